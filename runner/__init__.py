"""The jaxlora application: the `runner` command (`cli.py`, one module per
command in `commands/`), the recipe, and the services the commands share:
building a recipe's model (`build.py`), run folders, manifests, resuming, a
run in progress (`session.py`) and its report. Start at `commands/run.py`."""
