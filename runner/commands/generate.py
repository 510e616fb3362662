"""`runner generate RUN_DIR|RECIPE --prompt TEXT ...`: completions from a
causal-LM run's fine-tuned model (RUN_DIR) or from a recipe's base model
(RECIPE, before fine-tuning: as the "before" evaluation sees it, 4-bit for
qlora), with a jit'd decode loop and a KV cache. The recipe's
`data.template` is applied to each prompt when the run was trained on
prompt/response pairs (as in training), unless `--raw`.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape

from jaxlora.errors import UserError
from jaxlora.generate import GenerateConfig, generate, stop_ids
from jaxlora.lora import without_adapters
from runner import build, libraries, run_folder
from runner.recipe import load_recipe
from runner.terminal import read_texts


def main(args, console, stop) -> int:
    try:
        cfg = GenerateConfig(max_new_tokens=args.max_new_tokens,
                             temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        raise UserError(f"--{str(err['loc'][0]).replace('_', '-')}: {err['msg']} "
                        f"(got {err['input']!r})") from None
    prompts = read_texts(args.prompt)
    libraries.set_up()
    rows = generate_texts(args.target, prompts, cfg, console, raw=args.raw)
    for row in rows:
        if args.json:
            print(json.dumps(row, ensure_ascii=False))
        else:
            console.print(f"[bold]{escape(row['prompt'])}[/]{escape(row['completion'])}",
                          highlight=False)
    return 0


def generate_texts(target: Path, prompts: list[str], cfg: GenerateConfig, console: Console, *,
                   raw: bool = False) -> list[dict]:
    """The completion of each prompt by the model of `target` (a run folder or
    a recipe; see the module docstring), with its token count and whether it
    ended at a stop token."""
    if target.is_dir():
        if not run_folder.is_run_dir(target):
            raise UserError(f"{target}: not a run folder (no manifest.json) and not a recipe")
        recipe = load_recipe(target / "recipe.toml")
    else:
        recipe = load_recipe(target)
    if recipe.model.task != "causal-lm":
        raise UserError(f"{target}: generate needs a causal-lm model; this recipe's task is "
                        f"{recipe.model.task} (use `runner predict`)")
    if target.is_dir():
        opened = build.open_run(target)
        tokenizer, model_dir = opened.tokenizer, opened.model_dir
        graphdef, trainable, frozen = opened.graphdef, opened.trainable, opened.frozen
        where = f"{target} at step {opened.step}"
    else:
        model_dir = build.model_folder(recipe, build.base_folder(target))
        parts = build.adapt(recipe, build.load_pretrained(recipe, model_dir))
        graphdef, trainable, frozen = parts.graphdef, without_adapters(parts.trainable), \
            parts.frozen
        tokenizer = build.load_tokenizer(model_dir)
        where = f"the base model {recipe.model.source} (not fine-tuned)"
    shown = [p if raw or not recipe.data.pairs else recipe.data.template.replace("{prompt}", p)
             for p in prompts]
    ids = [tokenizer(text)["input_ids"] for text in shown]
    if any(not row for row in ids):
        raise UserError("--prompt: a prompt gave no tokens")
    stops = stop_ids(tokenizer, model_dir)
    new = generate(graphdef, trainable, frozen, ids, cfg, eos_id=stops,
                   pad_id=tokenizer.pad_token_id or 0)
    console.print(f"[dim]{where}; {'greedy' if cfg.temperature == 0 else 'sampled'}, "
                  f"up to {cfg.max_new_tokens} new tokens[/]", highlight=False)
    return [{"prompt": p, "completion": tokenizer.decode(tokens, skip_special_tokens=True),
             "tokens": len(tokens), "stopped_at_eos": bool(tokens) and tokens[-1] in stops}
            for p, tokens in zip(prompts, new)]
