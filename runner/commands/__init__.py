"""One module per `runner` subcommand, each with `main(args, console, stop)`
(the parsed arguments, the rich Console, the installed `StopSignals`), which
returns the exit code. `runner.cli` imports them, nothing else does: what two
commands share lives below them (`runner.build`, `runner.run_folder`, ...).
Start reading at `run.py`: the five steps."""
