"""`runner`: the argument parser and a table from command name to the module
that runs it (`runner.commands.<name>.main`); no business checks here.

Exit codes: 0 done, 1 a sweep with points that failed (the others ran), 2
bad input (a recipe field, a data file, a model folder, a run folder: one
message naming it, no traceback), 128 + N stopped by signal N (130 Ctrl-C,
143 SIGTERM) after saving a checkpoint when training.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from rich.console import Console
from rich.markup import escape

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130

DESCRIPTION = """\
jaxlora: declarative LoRA fine-tuning on JAX.

A recipe (TOML) names the base model, the data, the method and the training and
evaluation settings. `runner run` fine-tunes and evaluates the model before and
after, and writes everything to a run folder (see README.md).
"""

RUN_HELP = """\
Validate the recipe, prepare the data, load the model, attach the adapters,
evaluate before, train, evaluate after, and write a run folder under
output.dir/<name>/<timestamp>/. Checkpoints are written every
train.checkpoint_every steps and at the end.

Resuming: when the newest run made with the same recipe did not finish and holds a
checkpoint (stopped by SIGTERM/Ctrl-C, killed, preempted), `runner run RECIPE`
goes on from that checkpoint, after checking that the base model and the data
are unchanged; a changed recipe (an edit, another --set) starts a new run
instead, and says which run it did not resume. --fresh always starts a new
run folder; --resume insists on resuming (exit 2 if there is nothing to
resume or the recipe differs). `runner run RUN_DIR` resumes that run folder.
"""


# Each command's module, imported when it runs (so that --help is instant).
COMMANDS = {name: f"runner.commands.{name}" for name in (
    "validate", "run", "eval", "predict", "generate", "chat", "export", "plan", "report",
    "recipes", "cp", "compare", "sweep")}


def _parser() -> argparse.ArgumentParser:
    """The `runner` command line: one subparser per command, with its help."""
    parser = argparse.ArgumentParser(prog="runner", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    validate = commands.add_parser(
        "validate", help="check a recipe and summarize it (--full: resolved, field by field)",
        description="Check a recipe and print a short summary of what a run would do. "
                    "--full prints it resolved, with every default filled in, and where "
                    "each value comes from. Exit 2 with one message per problem when it "
                    "is invalid.")
    validate.add_argument("recipe", type=Path, help="path to a recipe .toml file")
    validate.add_argument("--full", action="store_true",
                          help="print the resolved recipe as TOML and where each value "
                               "comes from (a file of the extends chain, --set, or default)")
    validate.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                          help="override a field, e.g. --set train.learning_rate=3e-4")
    run = commands.add_parser(
        "run", help="fine-tune and evaluate before/after, or resume a stopped run",
        description=RUN_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("target", type=Path, metavar="RECIPE|RUN_DIR",
                     help="a recipe .toml file, or a run folder to resume")
    how = run.add_mutually_exclusive_group()
    how.add_argument("--fresh", action="store_true",
                     help="start a new run folder even if an unfinished run could resume")
    how.add_argument("--resume", action="store_true",
                     help="resume the newest unfinished run of the recipe (one made with the same "
                          "recipe first); exit 2 if none")
    run.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                     help="override a recipe field (repeatable), e.g. --set adapter.rank=16; "
                          "validated like the file")
    evaluate = commands.add_parser(
        "eval", help="re-evaluate a finished run (its held-out set, or --data)",
        description="Rebuild a run's model (base checkpoint + its latest checkpoint) and "
                    "evaluate it on the recipe's held-out set, or on every row of --data "
                    "(every labelled row for a classifier), beside the majority-class "
                    "baseline (a classifier) or with the exact match of greedy answers (a "
                    "causal LM trained on prompt/response pairs or conversations). The "
                    "result is printed and written to RUN_DIR/evals/.")
    evaluate.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    evaluate.add_argument("--data", metavar="SOURCE",
                          help="a data file/folder/hub id with the recipe's columns (text "
                               "and label; or a causal LM's text, prompt/response or "
                               "messages) (default: the recipe's eval split)")
    evaluate.add_argument("--split", help="the split of --data to use (default: test if "
                                          "present, else train)")
    evaluate.add_argument("--batch-size", type=int, help="default: the recipe's eval.batch_size")
    predict = commands.add_parser(
        "predict", help="label texts with a finished run's model",
        description="Print the predicted label and each class's probability for every "
                    "TEXT (`-` reads one text per line from standard input).")
    predict.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    predict.add_argument("texts", nargs="+", metavar="TEXT")
    predict.add_argument("--json", action="store_true", help="one JSON object per line")
    generate = commands.add_parser(
        "generate", help="complete prompts with a causal-LM run's model (or a recipe's base)",
        description="Sample completions with a jit'd decode loop and a KV cache, from a "
                    "causal-lm run's fine-tuned model (RUN_DIR) or a recipe's base model "
                    "(RECIPE). Prompts are shown as in training: through the chat template "
                    "for a run trained with data.chat (or --chat), through data.template for "
                    "prompt/response pairs (--raw: as given).")
    generate.add_argument("target", type=Path, metavar="RUN_DIR|RECIPE")
    generate.add_argument("--prompt", action="append", required=True,
                          help="a prompt (repeat for several; `-` reads one per line from "
                               "standard input)")
    _sampling_arguments(generate, max_new_tokens=64)
    shown = generate.add_mutually_exclusive_group()
    shown.add_argument("--raw", action="store_true",
                       help="show the prompts as given (no data.template, no chat template)")
    shown.add_argument("--chat", action="store_true",
                       help="show each prompt as a user's turn through the chat template "
                            "(what a run trained with data.chat does anyway) and stop at the "
                            "end of the model's turn")
    generate.add_argument("--json", action="store_true", help="one JSON object per line")
    chat = commands.add_parser(
        "chat", help="talk with a causal-LM run's model (or a recipe's base) in the terminal",
        description="Read the user's turns from standard input, one per line, and answer "
                    "each through the model's chat template, keeping the whole conversation. "
                    "An empty line or the end of the input ends it; /reset starts again.")
    chat.add_argument("target", type=Path, metavar="RUN_DIR|RECIPE")
    chat.add_argument("--system", metavar="TEXT", help="a system turn before the conversation")
    _sampling_arguments(chat, max_new_tokens=256)
    export = commands.add_parser(
        "export", help="write a run's model for other tools: PEFT adapter, merged model, GGUF",
        description="peft: adapter_config.json + adapter_model.safetensors, loadable with "
                    "peft.PeftModel.from_pretrained(base_model, folder). merged: a Hugging "
                    "Face model folder with the adapter merged into the base weights, "
                    "loadable with transformers.AutoModelForSequenceClassification (task "
                    "classification) or transformers.AutoModelForCausalLM (task causal-lm, "
                    "with a generation_config.json naming every end-of-sequence id). gguf "
                    "(causal-lm): the merged model as one GGUF file for llama.cpp, Ollama "
                    "and LM Studio, its weights as --quant says; written for Llama 3.0-style "
                    "and SmolLM Llamas, Qwen2, GPT-2 and Mistral-architecture models with a "
                    "byte-level BPE vocabulary; refused (before the model is merged) for "
                    "SentencePiece vocabularies (Llama 2, Mistral AI's releases) and Llama "
                    "3.1/3.2 (rope_type llama3). "
                    "Each export holds a model card (README.md). Default: "
                    "RUN_DIR/export/FORMAT (gguf: RUN_DIR/export/gguf-QUANT/NAME-QUANT.gguf); "
                    "nothing existing is ever overwritten; a temporary folder left by a "
                    "killed export is removed.")
    export.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    export.add_argument("--format", required=True, metavar="peft|merged|gguf")
    export.add_argument("--quant", metavar="f16|bf16|q8_0|f32",
                        help="gguf only: the type of the 2-D weights (default f16; norms "
                             "stay f32)")
    export.add_argument("--out", type=Path,
                        help="the folder to write (must not exist or be empty); gguf: the "
                             ".gguf file, its README.md written beside it")
    planned = commands.add_parser(
        "plan", help="per-device memory of a recipe on the devices seen, before running it",
        description="Load the base model and adapters as the run would, lay them out on "
                    "the recipe's [runtime] mesh over the devices this process sees, and "
                    "print per device the frozen weights, trainable weights, optimizer "
                    "state and activations; warn when they will not fit.")
    planned.add_argument("recipe", type=Path, help="path to a recipe .toml file")
    planned.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                         help="override a recipe field, e.g. --set runtime.fsdp=8")
    planned.add_argument("--json", action="store_true",
                         help="also print the figures (bytes per device) as one JSON line")
    show = commands.add_parser(
        "report", help="draw a run's charts and report.md again, and show it",
        description="Draw loss.png and before_after.png from RUN_DIR/metrics.jsonl and "
                    "eval.json, write report.md again, and render it in the terminal. A "
                    "run that has not finished (running, interrupted) gets a partial "
                    "report from what its folder holds, marked as such.")
    show.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    recipes = commands.add_parser(
        "recipes", help="list the recipes in a folder (default: recipes/), one line each",
        description="List the recipe files of a folder (default: ./recipes, else the "
                    "shipped ones), one line each: name, what it needs (offline, or the "
                    "network for a hub model or data set), method and description; a file "
                    "that does not validate is listed with its first problem.")
    recipes.add_argument("folder", type=Path, nargs="?", metavar="FOLDER")
    copy = commands.add_parser(
        "cp", help="copy a shipped recipe to a file of yours, to edit",
        description="Copy the shipped recipe NAME (see `runner recipes`) to DEST, a file "
                    "or a folder (then DEST/NAME.toml). An existing file is never "
                    "overwritten. Relative local sources become the absolute paths they "
                    "meant. To change a few fields and keep the rest in step with the "
                    "shipped recipe, write a recipe with extends = \"NAME\" instead.")
    copy.add_argument("name", metavar="NAME", help="a shipped recipe, e.g. bert-sentiment")
    copy.add_argument("dest", type=Path, metavar="DEST", help="the file (or folder) to write")
    _sweep_parser(commands)
    compare = commands.add_parser(
        "compare", help="finished runs side by side (a table, or --markdown)",
        description="Read finished run folders (manifest.json, eval.json) and print "
                    "method, trainable parameters, frozen-weight memory and bits per "
                    "quantized parameter, peak memory, step and train time, and accuracy "
                    "and macro-F1 before and after beside the majority-class baseline, as "
                    "a table that fits the terminal. Runs that have not finished are "
                    "skipped with one line each. A sweep folder (`runner sweep`), given "
                    "alone, gets its sweep.md and sweep.png written again from its points' "
                    "run folders, and its table shown.")
    compare.add_argument("runs", type=Path, nargs="+", metavar="RUN_DIR",
                         help="run folders, e.g. runs/bert-sentiment/*; or one sweep folder")
    compare.add_argument("--markdown", action="store_true",
                         help="print a Markdown table instead (one line per run)")
    return parser


SWEEP_HELP = """\
Run RECIPE (a recipe file, or the name of a shipped recipe) at several points,
one after another, each an ordinary `runner run` in a child process, and
compare them in SWEEP_DIR/sweep.md and sweep.png (scores, train time, steps/s,
peak memory, trainable parameters, frozen-weight bytes, checkpoint size; the
best of each column starred, dominated points named).

  --set FIELD=V1,V2,...   a list of values (commas inside [...], {...} or
                          quotes do not split); the lists multiply into a grid;
                          one value applies to every point
  --point 'NAME: FIELD=V FIELD=V'
                          a point of its own (NAME optional; 'NAME:' alone is
                          the recipe as written); every point is run at every
                          grid position

Values are written as for `runner run --set` (TOML: 16, 2e-4, true, "text",
["a","b"]; a bare word is a string). Each point drops the fields its
adapter.method does not take (adapter.rank for full, adapter.quant for lora,
train.lr_ratio_b for full) unless its own --point sets them; points whose
recipes are equal run once. Every point is validated before anything is
written.

SWEEP_DIR (--out; default <output.dir>/<name>-sweep-<hash>) holds sweep.json,
each point's recipe NN-<point>.toml and its run folder NN-<point>/<timestamp>/.
The same command again skips finished points and resumes a stopped one.
SIGTERM/Ctrl-C (and SIGHUP, as SIGTERM) is passed on to the running point,
which checkpoints; exit 128 + N. A failed point is said and the sweep goes
on; then exit 1. The order of the --set flags and of their values is the
points' order, part of the sweep (another order, another folder).
"""


def _sweep_parser(commands) -> None:
    """`runner sweep`'s arguments."""
    sweep = commands.add_parser(
        "sweep", help="run a grid of recipe variations and compare them (sweep.md)",
        description=SWEEP_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    sweep.add_argument("recipe", type=Path, metavar="RECIPE",
                       help="a recipe .toml file, or a shipped recipe's name")
    sweep.add_argument("--set", action="append", default=[], metavar="FIELD=V1,V2,...",
                       help="values of a field, one point each (repeatable: a grid), e.g. "
                            "--set adapter.rank=4,16")
    sweep.add_argument("--point", action="append", default=[], metavar="'NAME: FIELD=V ...'",
                       help="a named point (repeatable), e.g. --point 'full: "
                            'adapter.method="full"\'')
    sweep.add_argument("--max", type=int, metavar="N",
                       help="run only the first N points (the same command without --max "
                            "goes on with the rest)")
    sweep.add_argument("--out", type=Path, metavar="SWEEP_DIR",
                       help="the sweep folder (default: <output.dir>/<name>-sweep-<hash>)")


def _sampling_arguments(parser: argparse.ArgumentParser, *, max_new_tokens: int) -> None:
    """How `generate` and `chat` pick tokens (`runner.speaker.sampling` reads them)."""
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="0 (default): greedy; else sample at this temperature")
    parser.add_argument("--top-p", type=float, default=1.0,
                        help="sample from the smallest set of tokens with this probability")
    parser.add_argument("--seed", type=int, default=0)


def main(argv: list[str] | None = None) -> int:
    """Parse, run the command, and turn bad input and signals into exit codes."""
    args = _parser().parse_args(argv)
    console = Console()
    errors = Console(stderr=True, soft_wrap=True)  # a message is never cut into lines
    # Import the heavy stack only after argument parsing, so --help is instant.
    from jaxlora.errors import UserError
    from runner.signals import Interrupted, StopSignals

    try:
        with StopSignals() as stop:
            try:
                return importlib.import_module(COMMANDS[args.command]).main(args, console, stop)
            except UserError as e:
                code, said = EXIT_BAD_INPUT, f"[bold red]error:[/] {escape(str(e))}"
            except Interrupted as e:
                code, said = e.exit_code, f"[bold red]stopped[/]: {escape(str(e))}"
            stop.ended()  # a signal while the message is printed changes nothing
            errors.print(said, highlight=False)
            return code
    except KeyboardInterrupt:  # before the handlers were installed
        errors.print("[bold red]interrupted[/]: the run folder keeps what was written so far")
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
