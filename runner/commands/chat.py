"""`runner chat RUN_DIR|RECIPE`: talk with a causal-LM model in the terminal.

Each line read is the user's turn; the model answers through its chat
template (the recipe's `data.chat_template`, else the tokenizer's) and stops
at the end of its turn; the conversation goes on with every turn kept
(`--system TEXT` puts a system turn first). An empty line or the end of the
input (Ctrl-D) ends it; `/reset` starts the conversation again. When it no
longer fits the model's positions, its oldest exchange is let go.
"""

from __future__ import annotations

import sys

from rich.console import Console
from rich.markup import escape

from jaxlora.errors import UserError
from runner import libraries
from runner.speaker import Speaker, sampling

RESET = "/reset"


def main(args, console, stop) -> int:
    cfg = sampling(args)
    libraries.set_up()
    speaker = Speaker.open(args.target, "chat")
    Console(stderr=True).print(
        f"[dim]{speaker.where}; {'greedy' if cfg.temperature == 0 else 'sampled'}, up to "
        f"{cfg.max_new_tokens} new tokens a turn; an empty line ends, {RESET} starts again[/]",
        highlight=False)
    system = [{"role": "system", "content": args.system}] if args.system else []
    turns: list[dict[str, str]] = []
    for line in _lines(console):
        if line == RESET:
            turns = []
            continue
        turns.append({"role": "user", "content": line})
        reply = _reply(speaker, system, turns, cfg, console)
        turns.append({"role": "assistant", "content": reply})
        console.print(f"[bold]assistant:[/] {escape(reply)}", highlight=False)
    return 0


def _lines(console):
    """The user's lines until an empty one or the end of the input."""
    while True:
        if sys.stdin.isatty():
            console.print("[bold]> [/]", end="")
        raw = sys.stdin.buffer.readline()
        if not raw:
            return
        try:
            line = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise UserError("stdin: a line is not valid utf-8") from None
        if not line:
            return
        yield line


def _reply(speaker: Speaker, system: list, turns: list, cfg, console) -> str:
    """The model's answer to the conversation; its oldest exchanges are let go
    while it and the answer do not fit the model's context."""
    ids = speaker.chat_ids(system + turns)
    while len(ids) + cfg.max_new_tokens > speaker.context and len(turns) > 1:
        del turns[:2]  # the oldest user turn and its answer
        console.print("[dim](the oldest exchange was let go: the conversation no longer fit "
                      "the model)[/]")
        ids = speaker.chat_ids(system + turns)
    [tokens] = speaker.answer([ids], cfg, chat=True)
    return speaker.text(tokens).strip()
