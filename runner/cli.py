"""`runner`: argument parsing only; the work happens in `runner.pipeline`.

Exit codes: 0 done, 2 bad input (a recipe field, a data file, a model folder:
one message naming it, no traceback), 130 interrupted.
"""

from __future__ import annotations

import argparse
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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="runner", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    validate = commands.add_parser(
        "validate", help="check a recipe and print it resolved (defaults filled in)",
        description="Check a recipe and print it resolved, with every default filled in. "
                    "Exit 2 with one message per problem when it is invalid.")
    validate.add_argument("recipe", type=Path, help="path to a recipe .toml file")
    run = commands.add_parser(
        "run", help="fine-tune and evaluate before/after, as the recipe says",
        description="Validate the recipe, prepare the data, load the model, attach the "
                    "adapters, evaluate before, train, evaluate after, and write a run "
                    "folder under output.dir/<name>/<timestamp>/.")
    run.add_argument("recipe", type=Path, help="path to a recipe .toml file")
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
    from runner.recipe import load_recipe, to_toml

    try:
        if args.command == "compare":
            from runner import compare

            runs = [compare.read_run(path) for path in args.runs]
            console.print(compare.table(runs))
            print(compare.markdown(runs))  # plain: rich would wrap it at the terminal width
            return 0
        recipe = load_recipe(args.recipe)
        if args.command == "validate":
            console.print(Syntax(to_toml(recipe), "toml", theme="ansi_dark"))
            console.print(f"[green]{args.recipe}: valid[/]")
            return 0
        _quiet_libraries()
        from runner.pipeline import run

        run(recipe, args.recipe, console)
        return 0
    except UserError as e:
        errors.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        errors.print("[bold red]interrupted[/]: the run folder keeps what was written so far")
        return EXIT_INTERRUPTED


def _quiet_libraries() -> None:
    """Keep library chatter (TF-style logs, transformers warnings) off the terminal."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import transformers

    transformers.logging.set_verbosity_error()


if __name__ == "__main__":
    sys.exit(main())
