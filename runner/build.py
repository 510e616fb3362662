"""Recipe -> model parts: the one place a recipe becomes a model folder, a
tokenizer, a loaded model (with its remat policy and its placement on the
devices) and an adapted one. Every command that needs a model builds it
here: `run` and `plan` for training, and `eval`, `predict`, `generate` and
`export` through `open_run`, which rebuilds a run's trained model.

    base_folder       where a recipe's relative sources are read from
    with_labels       a classifier's recipe with its labels (inferred from the
                      data when it names none), the same on every process
    model_folder      the local folder of `model.source` (hub, path, pkg://)
    placement_for     the run's device mesh and array layout
    load_pretrained   the base model from its safetensors, placed
    load_tokenizer    the model folder's fast tokenizer
    adapt             step 1, the method: LoRA / QLoRA / full on the model
                      (PiSSA: from the factors a run folder kept, where given)
    keep_start        PiSSA: the adapters' initial factors into the run folder
    open_run          a run folder's model: the base, adapted, with its
                      latest checkpoint's trained weights
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from jaxlora import runtime, sources
from jaxlora.checkpoint import Checkpointer
from jaxlora.data import labels_of
from jaxlora.errors import UserError
from jaxlora.export import write_safetensors
from jaxlora.lora import Factors, adapter_factors, count_params, select_targets
from jaxlora.lora import adapt as adapt_model
from jaxlora.models import gguf, load_model
from jaxlora.models.layers import resolve_attention, set_remat
from jaxlora.models.weights import LoadedModel, read_safetensors_file
from jaxlora.optim import make_optimizer
from jaxlora.quant import bits_per_parameter, footprint
from jaxlora.train import TrainState
from runner import manifest as manifests
from runner import run_folder
from runner.recipe import Recipe, load_recipe
from runner.resume import check_fingerprint, require_checkpoint, require_same_recipe

# The stream of the recipe's seed that initialises the adapters.
ADAPTER_STREAM = 2


def base_folder(recipe_path: Path) -> Path:
    """The folder a recipe's relative sources are read from: its own, except for
    the resolved recipe.toml of a run folder, whose sources stay where that run
    found them (so `runner run RUN_DIR/recipe.toml --fresh` runs it again)."""
    folder = Path(recipe_path).resolve().parent
    if run_folder.is_run_dir(folder):
        return manifests.source_folder(manifests.read_manifest(folder), folder)
    return folder


def with_labels(recipe: Recipe, base: Path) -> tuple[Recipe, str | None]:
    """A classification recipe with `data.labels` given: the recipe as it is;
    without: with the labels inferred from its train split (see
    `jaxlora.data.labels_of`) written into it, and how they were found (None
    where nothing was inferred). The filled recipe is the one hashed, recorded
    in the run folder (recipe.toml) and rebuilt by `open_run`, so eval, predict
    and export see the same labels; resuming infers them again, and data whose
    labels changed is a changed recipe. Every process reads the data and
    infers; they must agree, or all refuse."""
    if recipe.model.task != "classification" or recipe.data.labels is not None:
        return recipe, None
    hosting = runtime.Hosting(1, gather=runtime.gather if jax.process_count() > 1 else None)
    labels, how = hosting.agree(lambda: labels_of(recipe.data, base_dir=base))
    digest = hashlib.sha256(json.dumps(labels).encode()).hexdigest()
    if not all(runtime.every_process(runtime.agree_text(digest) == digest)):
        raise UserError("data.labels: the processes inferred different labels from "
                        f"{recipe.data.source}; list them as data.labels in the recipe")
    data = recipe.data.model_copy(update={"labels": labels})
    return recipe.model_copy(update={"data": data}), how


def model_folder(recipe: Recipe, base: Path) -> Path:
    """The local folder of the recipe's base model (see `jaxlora.sources`)."""
    return sources.resolve(recipe.model.source, "model", base)


def placement_for(recipe: Recipe) -> runtime.Placement:
    """The run's mesh and layout (`runner run` and `runner plan` alike); a
    UserError naming the field for a batch the mesh does not divide."""
    placement = runtime.make_placement(recipe.runtime,
                                       full_fine_tuning=recipe.adapter.method == "full")
    placement.check_batch("train.batch_size", recipe.train.batch_size)
    placement.check_batch("eval.batch_size", recipe.eval.batch_size)
    return placement


def load_tokenizer(model_dir: Path):
    """The model folder's fast tokenizer (never remote code); a GGUF file's own."""
    from transformers import AutoTokenizer

    if gguf.is_gguf(model_dir):
        return gguf.tokenizer(model_dir)
    try:
        return AutoTokenizer.from_pretrained(str(model_dir), use_fast=True,
                                             trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - a malformed tokenizer file fails in many ways
        # (a list for tokenizer_config.json, a vocab.txt that is not UTF-8, a
        # tokenizer.json without a key: AttributeError, tokenizers' Exception, KeyError)
        detail = str(e).strip().splitlines()[0] if str(e).strip() else ""
        if not isinstance(e, (OSError, ValueError)):
            detail = f"{type(e).__name__} {detail}".strip()
        raise UserError(f"{model_dir}: cannot load a tokenizer from the model folder: "
                        f"{detail}") from None


def load_pretrained(recipe: Recipe, model_dir: Path, placement: runtime.Placement | None = None,
                    *, train: bool = False) -> LoadedModel:
    """The base model with a fresh head; refuses a max_length beyond its positions.
    With a `placement` each base weight goes straight into its sharding (a
    process copies only its own devices' slices out of the checkpoint); for
    training (`train`) the layers keep what `train.remat` says."""
    param_dtype, compute_dtype = recipe.model.dtypes()
    labels = recipe.data.labels
    loaded = load_model(model_dir, task=recipe.model.task,
                        num_labels=len(labels) if labels else None,
                        param_dtype=param_dtype, compute_dtype=compute_dtype,
                        attention=resolve_attention(recipe.model.attention, compute_dtype),
                        seed=recipe.train.seed,
                        place=placement.place_weight if placement is not None else None)
    limit = loaded.config.max_position_embeddings
    if recipe.data.max_length > limit:
        raise UserError(f"data.max_length: {recipe.data.max_length} is more than the "
                        f"{limit} positions the model {recipe.model.source} has")
    if train:
        set_remat(loaded.model, recipe.train.remat)
    return loaded


@dataclass(frozen=True)
class ModelParts:
    """A recipe's model after step 1: split once into what trains and what
    stays frozen (see `jaxlora.lora`)."""

    loaded: LoadedModel
    graphdef: nnx.GraphDef
    trainable: Any
    frozen: Any
    layers: list[str]  # the adapted linear layers' paths
    base_params: int  # the base model's parameters, counted before any 4-bit packing
    start: Factors | None = None  # PiSSA: the factors the adapters start from

    @property
    def total_params(self) -> int:
        """The base model's parameters and the adapters'."""
        return self.base_params + count_params(nnx.state(self.loaded.model, nnx.LoRAParam))

    def record(self, model_dir: Path, fingerprint: str) -> dict:
        """The manifest's `model` record."""
        return {"source": str(model_dir), "fingerprint": fingerprint,
                "trainable_params": count_params(self.trainable),
                "total_params": self.total_params, "adapted_layers": self.layers,
                "ignored_keys": self.loaded.ignored_keys, **footprint(self.frozen),
                "bits_per_quantized_param": bits_per_parameter(
                    self.loaded.model.linear_layers())}


def adapt(recipe: Recipe, loaded: LoadedModel, placement: runtime.Placement | None = None,
          *, adapters: bool = True, run_dir: Path | None = None) -> ModelParts:
    """Step 1, the method, on the loaded model (in place): LoRA adapters, 4-bit
    frozen weights (QLoRA; computed straight into their sharding on
    `placement`), or every weight trainable; the adapters drawn from the
    recipe's seed. With PiSSA the frozen weights are residuals: computed (SVD)
    for a new run, or, given the `run_dir` of a run that started already,
    rebuilt from the factors it kept (`keep_start`): as it had them, bit for
    bit on the same kind of device and layout, else up to float rounding.
    Without `adapters`: the base model as the method holds it (4-bit for
    QLoRA), no adapter attached and no target checked."""
    base_params = count_params(nnx.state(loaded.model))  # before 4-bit packing
    key = jax.random.fold_in(jax.random.key(recipe.train.seed), ADAPTER_STREAM)
    pissa = adapters and getattr(recipe.adapter, "init", None) == "pissa"
    kept = _kept_start(run_dir, recipe, loaded) if pissa and run_dir is not None else None
    graphdef, trainable, frozen, layers = adapt_model(
        loaded.model, recipe.adapter, loaded.lora_targets, key,
        sharding=placement.frozen_sharding if placement is not None else None,
        attach=adapters, initial=kept)
    start = adapter_factors(loaded.model) if pissa else None
    return ModelParts(loaded, graphdef, trainable, frozen, layers, base_params, start)


def keep_start(run_dir: Path, parts: ModelParts) -> None:
    """PiSSA: the factors the adapters start from, into RUN_DIR/pissa.safetensors
    (`<layer>.lora_a` (in, r), `<layer>.lora_b` (r, out), float32), written
    whole; nothing for the other inits."""
    if parts.start is None:
        return
    tensors = {f"{path}.{name}": factor for path, pair in parts.start.items()
               for name, factor in zip(("lora_a", "lora_b"), pair)}
    run_folder.replace_whole(run_dir / run_folder.PISSA,
                             lambda tmp: write_safetensors(tmp, tensors))


def _kept_start(run_dir: Path, recipe: Recipe, loaded: LoadedModel) -> Factors:
    """The factors a PiSSA run kept (`keep_start`), checked against the layers
    the recipe adapts: a UserError naming the file if it is missing or holds
    anything else."""
    path = run_dir / run_folder.PISSA
    if not path.is_file():
        raise UserError(f"{path}: missing; a PiSSA run's frozen weights are rebuilt from the "
                        "base model and the adapters' initial factors kept there. Restore it, "
                        "or start the recipe again with --fresh")
    tensors = read_safetensors_file(path)
    linears, rank = loaded.model.linear_layers(), recipe.adapter.rank
    layers = select_targets(recipe.adapter.targets, linears, loaded.lora_targets)
    wanted = {}
    for layer in layers:
        wanted[f"{layer}.lora_a"] = (linears[layer].in_features, rank)
        wanted[f"{layer}.lora_b"] = (rank, linears[layer].out_features)
    found = {name: tuple(t.shape) for name, t in tensors.items() if t.dtype == np.float32}
    if found != wanted:
        odd = sorted(set(found.items()) ^ set(wanted.items()))[0][0]
        raise UserError(f"{path}: not the initial factors of this run's adapters ({odd!r} "
                        f"is missing, unexpected or of another shape or dtype; expected float32 "
                        f"<layer>.lora_a (in, {rank}) and <layer>.lora_b ({rank}, out) for "
                        f"{len(wanted) // 2} layers). Restore it, or start the recipe again "
                        "with --fresh")
    return {layer: (tensors[f"{layer}.lora_a"], tensors[f"{layer}.lora_b"]) for layer in layers}


def attention_dropout_skipped(recipe: Recipe, config) -> float:
    """The model's dropout on attention probabilities where the fused cuDNN
    kernel, which has none, runs attention in training; 0.0 elsewhere."""
    _, compute_dtype = recipe.model.dtypes()
    if resolve_attention(recipe.model.attention, compute_dtype) != "cudnn":
        return 0.0
    return float(config.attention_dropout)


@dataclass
class OpenedRun:
    """A run's model, rebuilt: base weights from the base checkpoint (checked
    against the manifest's fingerprint), trained weights from the latest
    checkpoint."""

    run_dir: Path
    recipe: Recipe
    manifest: dict
    model_dir: Path
    parts: ModelParts  # the adapted model, its trainable part as first built
    trainable: Any  # the trained weights
    step: int
    total_steps: int | None
    tokenizer: Any

    @property
    def graphdef(self) -> nnx.GraphDef:
        return self.parts.graphdef

    @property
    def frozen(self) -> Any:
        return self.parts.frozen

    @property
    def loaded(self) -> LoadedModel:
        return self.parts.loaded

    @property
    def finished(self) -> bool:
        return self.manifest.get("status") == "finished"

    def model(self):
        """The task model with the trained weights (an nnx module)."""
        return nnx.merge(self.graphdef, self.trainable, self.frozen)


def open_run(run_dir: Path) -> OpenedRun:
    """Rebuild a run's trained model; a UserError for anything missing or changed."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run folder")
    if not run_folder.is_run_dir(run_dir):
        raise UserError(f"{run_dir}: no manifest.json; not a run folder "
                        "(runs/<name>/<timestamp>/ after `runner run`)")
    manifest = manifests.read_manifest(run_dir)
    require_checkpoint(run_dir, "the run stopped before its first checkpoint, or was made "
                                "before checkpoints existed")
    recipe = load_recipe(run_dir / "recipe.toml")
    require_same_recipe(run_dir, manifest, recipe, "its recipe.toml was edited; restore it")
    model_dir = model_folder(recipe, manifests.source_folder(manifest, run_dir))
    loaded = load_pretrained(recipe, model_dir)
    check_fingerprint(model_dir, loaded.fingerprint, manifest, run_dir)
    parts = adapt(recipe, loaded, run_dir=run_dir)
    state = _latest_state(run_dir, recipe, parts)
    return OpenedRun(run_dir=run_dir, recipe=recipe, manifest=manifest, model_dir=model_dir,
                     parts=parts, trainable=state.trainable, step=state.step,
                     total_steps=manifest.get("train", {}).get("total_steps"),
                     tokenizer=load_tokenizer(model_dir))


def _latest_state(run_dir: Path, recipe: Recipe, parts: ModelParts) -> TrainState:
    """The run's newest complete checkpoint, shaped as `parts` train."""
    template = TrainState(trainable=parts.trainable,
                          opt_state=make_optimizer(recipe.train, 1).init(parts.trainable),
                          dropout_key=jax.random.key_data(jax.random.key(recipe.train.seed)))
    folder = run_dir / run_folder.CHECKPOINTS
    with Checkpointer(folder, read_only=True) as checkpointer:
        try:
            return checkpointer.restore(template)[0]
        except UserError:
            # A run training in this folder may have just pruned the step we
            # began reading; the newest one is then complete.
            if checkpointer.latest_step() in run_folder.checkpoint_steps(run_dir):
                raise  # still there: really unreadable
    with Checkpointer(folder, read_only=True) as again:
        return again.restore(template)[0]
