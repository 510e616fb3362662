"""A causal-LM model to generate with, and how prompts are shown to it: what
`runner generate` and `runner chat` share.

    Speaker.open(RUN_DIR)   a run's fine-tuned model (its latest checkpoint)
    Speaker.open(RECIPE)    a recipe's base model, as the "before" evaluation
                            sees it (4-bit for qlora), no adapter attached

A prompt is shown as in training: through the chat template for a run trained
with `data.chat` (or with `--chat`; the recipe's `data.template` and
`data.system_prompt` shape the user's turn as they shaped it in training), or
through `data.template` for prompt/response pairs; as given with `raw`.
Generation stops at the tokenizer's EOS, the model folder's
generation_config.json stop ids and, for chat, the end-of-turn token.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from jaxlora.data import chat_template
from jaxlora.data.chat import pair_messages
from jaxlora.errors import UserError
from jaxlora.generate import GenerateConfig, generate, stop_ids
from runner import build, run_folder
from runner import manifest as manifests
from runner.recipe import Recipe, load_recipe

@dataclass
class Speaker:
    """A model to generate with (see the module docstring)."""

    recipe: Recipe
    graphdef: Any
    trainable: Any
    frozen: Any
    tokenizer: Any
    model_dir: Path
    base: Path  # the folder the recipe's relative paths are read from
    where: str  # what it is, for the terminal
    context: int  # the positions the model was trained for (its context length)

    @classmethod
    def open(cls, target: Path, command: str) -> Speaker:
        """The model of a run folder or a recipe, for the command `command`."""
        if target.is_dir():
            if not run_folder.is_run_dir(target):
                raise UserError(f"{target}: not a run folder (no manifest.json) and not a recipe")
            recipe = load_recipe(target / "recipe.toml")
        else:
            recipe = load_recipe(target)
        if recipe.model.task != "causal-lm":
            raise UserError(f"{target}: {command} needs a causal-lm model; this recipe's task is "
                            f"{recipe.model.task} (use `runner predict`)")
        if target.is_dir():
            opened = build.open_run(target)
            return cls(recipe, opened.graphdef, opened.trainable, opened.frozen,
                       opened.tokenizer, opened.model_dir,
                       manifests.source_folder(opened.manifest, target),
                       f"{target} at step {opened.step}",
                       opened.loaded.config.max_position_embeddings)
        base = build.base_folder(target)
        model_dir = build.model_folder(recipe, base)
        parts = build.adapt(recipe, build.load_pretrained(recipe, model_dir), adapters=False)
        return cls(recipe, parts.graphdef, parts.trainable, parts.frozen,
                   build.load_tokenizer(model_dir), model_dir, base,
                   f"the base model {recipe.model.source} (not fine-tuned)",
                   parts.loaded.config.max_position_embeddings)

    def stops(self, chat: bool) -> list[int]:
        """The token ids that end an answer."""
        return stop_ids(self.tokenizer, self.model_dir, chat=chat)

    def prompt_ids(self, prompt: str, *, chat: bool, raw: bool) -> list[int]:
        """A prompt's token ids, shown as in training (see the module docstring)."""
        data = self.recipe.data
        if raw:
            return self.tokenizer(prompt)["input_ids"]
        if chat or data.chat:
            return self.chat_ids(pair_messages(prompt, "", data.template,
                                               data.system_prompt)[:-1])
        shown = data.template.replace("{prompt}", prompt) if data.pairs else prompt
        return self.tokenizer(shown)["input_ids"]

    def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """A conversation's token ids up to the assistant's turn to speak."""
        # the recipe's template (its text or file), else the tokenizer's; as in training
        template = chat_template(self.recipe.data.model_copy(update={"chat": True}),
                                 self.tokenizer, self.base)
        try:
            text = self.tokenizer.apply_chat_template(messages, chat_template=template,
                                                      tokenize=False, add_generation_prompt=True)
        except Exception as e:  # noqa: BLE001 - Jinja and the template's own raise_exception
            raise UserError(f"the chat template fails: {str(e).strip() or type(e).__name__}") \
                from None
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def answer(self, ids: list[list[int]], cfg: GenerateConfig, *, chat: bool
               ) -> list[list[int]]:
        """The new tokens for each prompt, up to and including a stop id."""
        if any(not row for row in ids):
            raise UserError("--prompt: a prompt gave no tokens")
        return generate(self.graphdef, self.trainable, self.frozen, ids, cfg,
                        eos_id=self.stops(chat), pad_id=self.tokenizer.pad_token_id or 0)

    def text(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)



def sampling(args) -> GenerateConfig:
    """The sampling settings of the command line (--max-new-tokens,
    --temperature, --top-p, --seed), checked."""
    try:
        return GenerateConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                              top_p=args.top_p, seed=args.seed)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        raise UserError(f"--{str(err['loc'][0]).replace('_', '-')}: {err['msg']} "
                        f"(got {err['input']!r})") from None
