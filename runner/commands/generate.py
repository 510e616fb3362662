"""`runner generate RUN_DIR|RECIPE --prompt TEXT ...`: completions from a
causal-LM run's fine-tuned model (RUN_DIR) or from a recipe's base model
(RECIPE, before fine-tuning: as the "before" evaluation sees it, 4-bit for
qlora), with a jit'd decode loop and a KV cache. Prompts are shown as in
training (`runner.speaker`): through the chat template for a run trained with
`data.chat` (or with --chat), through `data.template` for prompt/response
pairs; --raw shows them as given. Each prompt and its completion are shown
under their own headings (`--json`: one object per line).
"""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from jaxlora.generate import GenerateConfig
from runner import libraries
from runner.speaker import Speaker, sampling
from runner.terminal import read_texts


def main(args, console, stop) -> int:
    cfg = sampling(args)
    prompts = read_texts(args.prompt)
    libraries.set_up()
    rows = generate_texts(args.target, prompts, cfg, console, raw=args.raw, chat=args.chat)
    for number, row in enumerate(rows, 1):
        if args.json:
            print(json.dumps(row, ensure_ascii=False))
        else:
            show(row, console, number if len(rows) > 1 else None)
    return 0


def show(row: dict, console: Console, number: int | None = None) -> None:
    """A prompt and its completion, each under its own heading, so that where
    the prompt ends and the model's words begin is never in doubt; an empty
    completion says why it is empty."""
    which = "" if number is None else f" {number}"
    console.print(f"[dim]prompt{which}:[/]", highlight=False)
    console.print(escape(row["prompt"]), highlight=False)
    ended = ", then an end-of-sequence token" if row["stopped_at_eos"] else ""
    console.print(f"[dim]completion{which} ({row['tokens']} tokens{ended}):[/]",
                  highlight=False)
    if row["completion"].strip():
        console.print(f"[bold]{escape(row['completion'])}[/]", highlight=False)
    elif row["stopped_at_eos"] and row["tokens"] <= 1:
        console.print("[italic](empty: the model stopped at once, its first token ended the "
                      "answer)[/]", highlight=False)
    else:
        console.print(f"[italic](empty: {row['tokens']} tokens with no visible text, such as "
                      "special tokens or whitespace)[/]", highlight=False)


def generate_texts(target: Path, prompts: list[str], cfg: GenerateConfig, console: Console, *,
                   raw: bool = False, chat: bool = False) -> list[dict]:
    """The completion of each prompt by the model of `target` (a run folder or
    a recipe; see the module docstring), with its token count and whether it
    ended at a stop token."""
    speaker = Speaker.open(target, "generate")
    chat = chat or (speaker.recipe.data.chat and not raw)
    ids = [speaker.prompt_ids(p, chat=chat, raw=raw) for p in prompts]
    new = speaker.answer(ids, cfg, chat=chat)
    console.print(f"[dim]{speaker.where}; {'greedy' if cfg.temperature == 0 else 'sampled'}, "
                  f"up to {cfg.max_new_tokens} new tokens[/]", highlight=False)
    stops = speaker.stops(chat)
    return [{"prompt": p, "completion": speaker.text(tokens), "tokens": len(tokens),
             "stopped_at_eos": bool(tokens) and tokens[-1] in stops}
            for p, tokens in zip(prompts, new)]
