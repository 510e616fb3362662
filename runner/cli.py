"""`runner`: argument parsing only; the work happens in `runner.pipeline`,
`runner.inference`, `runner.export` and `runner.compare`.

Exit codes: 0 done, 2 bad input (a recipe field, a data file, a model folder,
a run folder: one message naming it, no traceback), 128 + N stopped by signal
N (130 Ctrl-C, 143 SIGTERM) after saving a checkpoint when training.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.syntax import Syntax

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

Resuming: when the newest run of the recipe did not finish and holds a
checkpoint (stopped by SIGTERM/Ctrl-C, killed, preempted), `runner run RECIPE`
goes on from that checkpoint, after checking that the recipe, the base model
and the data are unchanged. --fresh always starts a new run folder; --resume
insists on resuming (exit 2 if there is nothing to resume). `runner run
RUN_DIR` resumes that run folder.
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="runner", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    validate = commands.add_parser(
        "validate", help="check a recipe and print it resolved (defaults filled in)",
        description="Check a recipe and print it resolved, with every default filled in. "
                    "Exit 2 with one message per problem when it is invalid.")
    validate.add_argument("recipe", type=Path, help="path to a recipe .toml file")
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
                     help="resume the newest unfinished run of the recipe; exit 2 if none")
    run.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                     help="override a recipe field (repeatable), e.g. --set adapter.rank=16; "
                          "validated like the file")
    evaluate = commands.add_parser(
        "eval", help="re-evaluate a finished run (its held-out set, or --data)",
        description="Rebuild a run's model (base checkpoint + its latest checkpoint) and "
                    "evaluate it on the recipe's held-out set, or on every labelled row of "
                    "--data. The result is printed and written to RUN_DIR/evals/.")
    evaluate.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    evaluate.add_argument("--data", metavar="SOURCE",
                          help="a data file/folder/hub id with the recipe's text and label "
                               "columns (default: the recipe's eval split)")
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
                    "(RECIPE). Prompts of a run trained on prompt/response pairs are shown "
                    "through the recipe's data.template, as in training (--raw: as given).")
    generate.add_argument("target", type=Path, metavar="RUN_DIR|RECIPE")
    generate.add_argument("--prompt", action="append", required=True,
                          help="a prompt (repeat for several; `-` reads one per line from "
                               "standard input)")
    generate.add_argument("--max-new-tokens", type=int, default=64)
    generate.add_argument("--temperature", type=float, default=0.0,
                          help="0 (default): greedy; else sample at this temperature")
    generate.add_argument("--top-p", type=float, default=1.0,
                          help="sample from the smallest set of tokens with this probability")
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--raw", action="store_true",
                          help="do not apply the recipe's data.template to the prompts")
    generate.add_argument("--json", action="store_true", help="one JSON object per line")
    export = commands.add_parser(
        "export", help="write a run's weights for PyTorch: PEFT adapter or merged model",
        description="peft: adapter_config.json + adapter_model.safetensors, loadable with "
                    "peft.PeftModel.from_pretrained(base_model, folder). merged: a Hugging "
                    "Face model folder with the adapter merged into the base weights, "
                    "loadable with transformers.AutoModelForSequenceClassification. Default "
                    "folder: RUN_DIR/export/FORMAT; an existing one is never overwritten.")
    export.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    export.add_argument("--format", required=True, metavar="peft|merged")
    export.add_argument("--out", type=Path, help="the folder to write (must not exist)")
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
        "report", help="draw a finished run's charts and report.md again, and show it",
        description="Draw loss.png and before_after.png from RUN_DIR/metrics.jsonl and "
                    "eval.json, write report.md again, and render it in the terminal.")
    show.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    recipes = commands.add_parser(
        "recipes", help="list the recipes in a folder (default: recipes/) with descriptions",
        description="List the recipe files of a folder (default: ./recipes, else the "
                    "project's own) with task, method, base model and description; a file "
                    "that does not validate is listed with its first problem.")
    recipes.add_argument("folder", type=Path, nargs="?", metavar="FOLDER")
    compare = commands.add_parser(
        "compare", help="finished runs side by side (rich table, then Markdown)",
        description="Read finished run folders (manifest.json, eval.json) and print "
                    "method, trainable parameters, frozen-weight memory and bits per "
                    "quantized parameter, peak memory, step and train time, and accuracy "
                    "and macro-F1 before and after, as a table and as Markdown.")
    compare.add_argument("runs", type=Path, nargs="+", metavar="RUN_DIR",
                         help="run folders, e.g. runs/bert-sentiment/20261126-050000")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    console = Console()
    errors = Console(stderr=True, soft_wrap=True)  # a message is never cut into lines
    # Import the heavy stack only after argument parsing, so --help is instant.
    from jaxlora.errors import UserError
    from runner.signals import Interrupted, StopSignals

    try:
        with StopSignals() as stop:
            return _dispatch(args, console, stop)
    except UserError as e:
        errors.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False)
        return EXIT_BAD_INPUT
    except Interrupted as e:
        errors.print(f"[bold red]stopped[/]: {escape(str(e))}", highlight=False)
        return e.exit_code
    except KeyboardInterrupt:
        errors.print("[bold red]interrupted[/]: the run folder keeps what was written so far")
        return EXIT_INTERRUPTED


def _dispatch(args, console: Console, stop) -> int:
    from jaxlora.errors import UserError
    from runner.recipe import load_recipe, to_toml

    if args.command == "compare":
        from runner import compare

        runs = [compare.read_run(path) for path in args.runs]
        console.print(compare.table(runs))
        print(compare.markdown(runs))  # plain: rich would wrap it at the terminal width
        return 0
    if args.command == "recipes":
        console.print(_recipes_table(args.folder))
        return 0
    if args.command == "plan":
        recipe = load_recipe(args.recipe, args.set)
        _set_up_libraries()
        from runner.plan import plan

        figures = plan(recipe, args.recipe, console)
        from runner.report import primary

        if args.json and primary():
            print(json.dumps(figures))
        return 0
    if args.command == "report":
        from runner.report import redraw

        redraw(args.run_dir, console)
        return 0
    if args.command == "validate":
        from rich.table import Table

        from runner.recipe import load_with_provenance, provenance_rows

        recipe, provenance = load_with_provenance(args.recipe, args.set)
        console.print(Syntax(to_toml(recipe), "toml", theme="ansi_dark"))
        table = Table(title="where each value comes from")
        for column in ("field", "value", "from"):
            table.add_column(column, overflow="fold")
        for row in provenance_rows(recipe, provenance):
            table.add_row(*map(escape, row))
        console.print(table)
        console.print(f"[green]{args.recipe}: valid[/]")
        return 0
    if args.command == "run":
        target = args.target
        if target.is_dir():
            from runner.runs import is_run_dir

            if not is_run_dir(target):
                raise UserError(f"{target}: a folder without manifest.json; give a recipe "
                                ".toml file or a run folder (runs/<name>/<timestamp>/)")
            if args.fresh:
                raise UserError(f"{target}: --fresh starts a new run from a recipe file; give "
                                "the recipe instead of a run folder")
            from runner.recipe import parse_override
            from runner.runs import RESUMABLE_WORDS, may_change_on_resume

            for assignment in args.set:  # a run goes on with its own recipe
                if not may_change_on_resume(parse_override(assignment)[0]):
                    raise UserError(f"--set {assignment}: a run folder resumes with its own "
                                    f"recipe; only {RESUMABLE_WORDS} may change")
            recipe = load_recipe(target / "recipe.toml", args.set)
            run_dir, recipe_path = target, target / "recipe.toml"
        else:
            recipe, run_dir, recipe_path = load_recipe(target, args.set), None, target
        _set_up_libraries()
        from runner.pipeline import run

        mode = "fresh" if args.fresh else "resume" if args.resume else "auto"
        run(recipe, recipe_path, console, mode=mode, run_dir=run_dir, stop=stop)
        return 0
    if args.command == "generate":
        from pydantic import ValidationError

        from jaxlora.generate import GenerateConfig

        try:
            cfg = GenerateConfig(max_new_tokens=args.max_new_tokens,
                                 temperature=args.temperature, top_p=args.top_p, seed=args.seed)
        except ValidationError as e:
            err = e.errors(include_url=False)[0]
            raise UserError(f"--{str(err['loc'][0]).replace('_', '-')}: {err['msg']} "
                            f"(got {err['input']!r})") from None
        prompts = _texts(args.prompt)
        _set_up_libraries()
        from runner.inference import generate_texts

        rows = generate_texts(args.target, prompts, cfg, console, raw=args.raw)
        for row in rows:
            if args.json:
                print(json.dumps(row, ensure_ascii=False))
            else:
                console.print(f"[bold]{escape(row['prompt'])}[/]{escape(row['completion'])}",
                              highlight=False)
        return 0
    if args.command == "export":
        from runner.export import check_format

        check_format(args.format)
    texts = None
    if args.command == "predict":
        texts = _texts(args.texts)
    _set_up_libraries()
    from runner.runs import open_run

    opened = open_run(args.run_dir)
    if args.command == "predict" and opened.recipe.model.task != "classification":
        raise UserError(f"{args.run_dir}: `runner predict` labels texts with a classification "
                        f"run; this one is {opened.recipe.model.task}: use `runner generate`")
    if not opened.finished and args.command != "export":  # export notes it in its folder too
        Console(stderr=True).print(
            f"note: {args.run_dir} has not finished (status "
            f"{opened.manifest.get('status')!r}): using its checkpoint at step {opened.step}"
            + (f" of {opened.total_steps}" if opened.total_steps else ""))
    if args.command == "export":
        from runner.export import export

        export(opened, args.format, args.out, console)
    elif args.command == "eval":
        from runner.inference import eval_run

        if args.batch_size is not None and not 0 < args.batch_size <= 65536:
            raise UserError(f"--batch-size: must be from 1 to 65536, as eval.batch_size "
                            f"(got {args.batch_size})")
        eval_run(opened, console, data=args.data, split=args.split, batch_size=args.batch_size)
    else:
        from runner.inference import predict, predictions_table

        rows = predict(opened, texts)
        if args.json:
            for row in rows:
                print(json.dumps(row, ensure_ascii=False))
        else:
            console.print(predictions_table(rows, list(opened.recipe.data.labels)))
    return 0


def _recipes_table(folder: Path | None):
    from rich.table import Table

    from jaxlora.errors import UserError
    from runner.recipe import load_recipe

    if folder is None:
        here = Path("recipes")
        folder = here if here.is_dir() else Path(__file__).resolve().parent.parent / "recipes"
    if not folder.is_dir():
        raise UserError(f"{folder}: no such folder of recipes")
    files = sorted(folder.glob("*.toml"))
    if not files:
        raise UserError(f"{folder}: no .toml recipes in it")
    table = Table(title=f"recipes in {folder}")
    table.add_column("recipe", no_wrap=True)  # a file name is never cut
    for column in ("task", "method", "model", "description"):
        table.add_column(column, overflow="fold")
    for path in files:
        try:
            r = load_recipe(path)
        except UserError as e:
            table.add_row(path.name, "-", "-", "-", f"[red]invalid:[/] {escape(str(e).splitlines()[0])}")
            continue
        table.add_row(path.name, r.model.task, r.adapter.method, r.model.source,
                      escape(r.description))
    return table


def _texts(args: list[str]) -> list[str]:
    """The texts of `predict` and the prompts of `generate`: the arguments, and
    for "-" the lines of stdin, each of which must be UTF-8."""
    from jaxlora.errors import UserError

    texts = []
    for number, arg in enumerate(args, 1):
        if arg != "-":
            try:
                arg.encode("utf-8")  # undecodable bytes reach argv as lone surrogates
            except UnicodeEncodeError:
                raise UserError(f"text {number} of the command line is not valid utf-8") from None
            texts.append(arg)
            continue
        for line_number, line in enumerate(sys.stdin.buffer.read().splitlines(), 1):
            try:
                line = line.decode("utf-8")
            except UnicodeDecodeError:
                raise UserError(f"stdin line {line_number} is not valid utf-8") from None
            if line.strip():
                texts.append(line)
    if not texts or any(not t.strip() for t in texts):
        raise UserError("every text or prompt must be non-empty")
    return texts


def _set_up_libraries() -> None:
    """Turn on the persistent compilation cache (`runner.xla_cache`), and keep library chatter (TF-style logs, transformers warnings, orbax's logged
    tracebacks) off the terminal: what goes wrong reaches the user as one
    message naming the file or field."""
    import logging

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import transformers

    transformers.logging.set_verbosity_error()
    from runner import xla_cache

    xla_cache.enable()
    # orbax logs a failed write (with its traceback) through absl before raising
    # it; the pipeline reports it as one message
    logging.getLogger("absl").setLevel(logging.CRITICAL)
    # After a failed checkpoint write, tensorstore's remaining write callbacks
    # find orbax's event loop closed and report that as unraisable.
    default_hook = sys.unraisablehook

    def hook(unraisable):
        value = unraisable.exc_value
        if not (isinstance(value, RuntimeError) and str(value) == "Event loop is closed"):
            default_hook(unraisable)

    sys.unraisablehook = hook


if __name__ == "__main__":
    sys.exit(main())
