"""LoRA variants of initialisation and optimisation (issue 26): LoRA+
(`train.lr_ratio_b`) and PiSSA (`adapter.init = "pissa"`), against their
definitions and PEFT's own code, through training, resuming and export."""

import functools

import jax
import numpy as np
import optax
import pytest

from jaxlora.lora import LoraConfig, adapt
from jaxlora.models import bert, load_model
from jaxlora.optim import lora_plus_group, make_optimizer
from jaxlora.tasks import classification_step_loss
from jaxlora.train import TrainConfig, build_train_step
from test_cli import TINY_RECIPE, tiny_run
from test_cli import runner_here as _runner
from test_train import _toy_split


def _bytes(tree) -> list[bytes]:
    return [np.asarray(x).tobytes() for x in jax.tree.leaves(tree)]


def _adam_moments(opt_state) -> dict[str, list[bytes]]:
    """Adam's first and second moments of every trainable leaf, in the
    trainable tree's order, however the optimizer partitions them: a
    partitioned state holds each leaf's moment in one group, and a masked
    placeholder (`optax.MaskedNode`, no leaves) in the other."""
    moments = {}
    for name in ("mu", "nu"):
        groups = [jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, optax.MaskedNode))
                  for _, tree in optax.tree_utils.tree_get_all_with_path(opt_state, name)]
        moments[name] = [next(np.asarray(x).tobytes() for x in found
                              if not isinstance(x, optax.MaskedNode)) for found in zip(*groups)]
    return moments


# -- LoRA+ -----------------------------------------------------------------------


@functools.cache
def _lora_plus_steps(folder, ratio) -> list:
    """The tiny BERT classifier (LoRA on query/value) with lr_ratio_b = `ratio`:
    its trainable weights at the start and after each of 3 steps (on the host),
    and the optimizer state after the last. Cached: each ratio compiles once."""
    model = load_model(folder, task="classification", num_labels=2, attention="xla",
                       seed=0).model
    graphdef, trainable, frozen, _ = adapt(
        model, LoraConfig(rank=4, targets=["query", "value"]), bert.LORA_TARGETS,
        jax.random.key(1))
    cfg = TrainConfig(learning_rate=1e-3, schedule="constant", warmup_ratio=0.0,
                      weight_decay=0.0, lr_ratio_b=ratio)
    tx = make_optimizer(cfg, 10)
    step = build_train_step(graphdef, tx, classification_step_loss)
    states = [jax.tree.map(np.array, trainable)]
    opt_state = tx.init(trainable)
    for i, batch in enumerate(_toy_split(n=24).batches(8, shuffle=True, seed=0, epoch=0)):
        trainable, opt_state, _ = step(trainable, frozen, opt_state, batch, jax.random.key(i))
        states.append(jax.tree.map(np.array, trainable))
    return states, jax.tree.map(np.array, opt_state)


def test_lora_plus_with_ratio_one_is_plain_lora_bit_for_bit(tiny_bert_dir):
    """The partition itself changes nothing: with ratio 1 three steps give the
    same weights and the same Adam moments, bit for bit; unset, the optimizer
    state has no partition at all (today's step)."""
    (*_, plain), plain_state = _lora_plus_steps(tiny_bert_dir, None)
    (*_, ones), ones_state = _lora_plus_steps(tiny_bert_dir, 1.0)
    assert _bytes(plain) == _bytes(ones)
    assert _adam_moments(plain_state) == _adam_moments(ones_state)
    assert len(_adam_moments(plain_state)["mu"]) == len(jax.tree.leaves(plain))
    assert "PartitionState" not in str(jax.tree.structure(plain_state))
    assert "PartitionState" in str(jax.tree.structure(ones_state))


def test_lora_plus_moves_b_sixteen_times_as_far_on_the_first_step(tiny_bert_dir):
    """On the first step Adam's update is lr * g / (|g| + eps), linear in lr.
    B starts at zero but its gradient does not (it is (x A)^T dL/dy, A being
    random); A's gradient is zero there (x^T dL/dy B^T with B = 0), and the
    head's is not. So with ratio 16 B moves exactly 16 times as far (16 is a
    power of two: the products are exact), and so does the head's bias (a
    vector: PEFT's LoRA+ groups vectors with B), everything else as far as
    with ratio 1."""
    (start, one, *_), _ = _lora_plus_steps(tiny_bert_dir, 1.0)
    (_, sixteen, *_), _ = _lora_plus_steps(tiny_bert_dir, 16.0)
    flat = jax.tree_util.tree_flatten_with_path
    b_moves = 0
    for (path, before), ratio1, ratio16 in zip(flat(start)[0], jax.tree.leaves(one),
                                                jax.tree.leaves(sixteen)):
        step1, step16 = np.asarray(ratio1) - before, np.asarray(ratio16) - before
        if lora_plus_group(path, before) == "b":
            assert np.abs(step1).min() > 0  # every B entry, the bias, had a gradient
            np.testing.assert_allclose(step16, 16 * step1, rtol=1e-6, atol=0)
            b_moves += 1
        else:
            np.testing.assert_array_equal(step16, step1)
    assert b_moves == 2 * 2 + 1  # query and value in both blocks, the head's bias


def test_lora_plus_decays_each_groups_matrices_at_its_learning_rate(tiny_bert_dir):
    """weight_decay > 0 with LoRA+: each group's AdamW decays its matrices only
    (the mask works inside the partition). On a zero gradient Adam's step is
    0, so the update is the decay alone: -ratio lr wd B for the B factors,
    -lr wd W for A and the head's kernel, and none for the vectors of the B
    group (DoRA's magnitudes, the head's bias)."""
    model = load_model(tiny_bert_dir, task="classification", num_labels=2, attention="xla",
                       seed=0).model
    _, trainable, _, _ = adapt(model, LoraConfig(rank=4, targets=["query", "value"], dora=True),
                               bert.LORA_TARGETS, jax.random.key(1))
    trainable = jax.tree.map(lambda x: x + 0.5, trainable)  # B not zero
    tx = make_optimizer(TrainConfig(learning_rate=1e-2, schedule="constant", warmup_ratio=0.0,
                                    weight_decay=0.1, lr_ratio_b=4.0), 10)
    updates, _ = jax.jit(tx.update)(jax.tree.map(np.zeros_like, trainable),
                                    tx.init(trainable), trainable)
    seen = set()
    for (path, param), update in zip(jax.tree_util.tree_flatten_with_path(trainable)[0],
                                     jax.tree.leaves(updates)):
        param, group = np.asarray(param), lora_plus_group(path, param)
        rate = 1e-2 * (4.0 if group == "b" else 1.0) if param.ndim == 2 else 0.0
        np.testing.assert_allclose(np.asarray(update), -rate * 0.1 * param, rtol=1e-6, atol=0,
                                   err_msg=jax.tree_util.keystr(path))
        seen.add((group, param.ndim))
    assert seen == {("b", 2), ("b", 1), ("rest", 2)}  # B; m and the bias; A and the kernel


def test_lora_plus_is_refused_with_full_fine_tuning(tmp_path, tiny_bert_dir):
    (tmp_path / "full.toml").write_text(TINY_RECIPE.replace(
        'method = "lora"\nrank = 4\ntargets = ["query", "value"]\n', 'method = "full"\n'))
    done = _runner("run", "full.toml", "--set", "train.lr_ratio_b=16", cwd=tmp_path)
    assert done.returncode == 2
    assert "train.lr_ratio_b" in done.stderr and 'method "full"' in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "runs").exists()


# -- PiSSA and the other inits: the adapted model at the start --------------------


def _family_model(name: str, tiny_bert_dir, tmp_path):
    """Our model and the same checkpoint in transformers (float32, eval mode):
    the tiny BERT classifier or the tiny Llama (grouped-query attention)."""
    import transformers
    from tiny_models import tiny_decoder_dir

    if name == "bert":
        ours = load_model(tiny_bert_dir, task="classification", num_labels=2, attention="xla",
                          seed=0)
        theirs = transformers.BertForSequenceClassification.from_pretrained(
            str(tiny_bert_dir), num_labels=2)
    else:
        folder = tiny_decoder_dir(tmp_path / "llama", "llama-gqa-rope3")
        ours = load_model(folder, task="causal-lm", attention="xla", seed=0)
        theirs = transformers.LlamaForCausalLM.from_pretrained(str(folder))
    return ours, theirs.eval()


def _ids(vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """Two rows of ids, the second right-padded, and their mask."""
    ids = np.random.default_rng(0).integers(4, vocab, (2, 12)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 8:] = 0
    return ids, mask


def _logits(model, vocab: int) -> np.ndarray:
    return np.asarray(model(*_ids(vocab)), np.float32)


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_pissa_starts_at_the_base_model_with_peft_factors(family, tiny_bert_dir, tmp_path):
    """PiSSA's adapted model is the base model (1e-4) and its factors are
    PEFT's `init_lora_weights="pissa"` of the same weights. Each singular
    vector is defined up to its sign, so A and B are compared through the
    product s A B (the rank-r approximation, unique for distinct singular
    values, as those of random weights are) and through the residual; two
    float32 SVDs (LAPACK's in torch, XLA's here) of matrices with entries
    ~0.1 agree to about 1e-6, so 1e-5 leaves room and still catches a wrong
    split of S (sqrt(S) on each side vs S on one: ~0.1 off) or a missing 1/s."""
    import peft
    import torch
    from flax import nnx

    from jaxlora.lora import adapter_factors

    loaded, hf = _family_model(family, tiny_bert_dir, tmp_path)
    vocab = loaded.config.vocab_size
    base = _logits(loaded.model, vocab)
    cfg = LoraConfig(rank=4, alpha=8, targets="all-linear", init="pissa")
    graphdef, trainable, frozen, paths = adapt(loaded.model, cfg, loaded.lora_targets,
                                               jax.random.key(1))
    start = _logits(nnx.merge(graphdef, trainable, frozen), vocab)
    assert np.abs(base).max() > 0.01
    np.testing.assert_allclose(start, base, atol=1e-4, rtol=0)

    theirs = peft.get_peft_model(hf, peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=paths, init_lora_weights="pissa"))
    modules = {name.removeprefix("base_model.model."): m for name, m in theirs.named_modules()
               if isinstance(m, peft.tuners.lora.Linear)}
    linears = nnx.merge(graphdef, trainable, frozen).linear_layers()
    assert sorted(modules) == sorted(paths)
    for path, (a, b) in adapter_factors(loaded.model).items():
        with torch.no_grad():
            lora_a = modules[path].lora_A["default"].weight.numpy()
            lora_b = modules[path].lora_B["default"].weight.numpy()
            residual = modules[path].base_layer.weight.numpy()
        np.testing.assert_allclose(2.0 * a @ b, 2.0 * (lora_b @ lora_a).T, atol=1e-5, rtol=0,
                                   err_msg=path)
        np.testing.assert_allclose(np.asarray(linears[path].kernel[...]), residual.T,
                                   atol=1e-5, rtol=0, err_msg=path)


def test_pissa_with_dora_is_refused_naming_both_fields(tmp_path):
    from jaxlora.errors import UserError
    from runner.recipe import load_recipe

    (tmp_path / "tiny.toml").write_text(TINY_RECIPE)
    with pytest.raises(UserError) as refused:
        load_recipe(tmp_path / "tiny.toml", ["adapter.init=pissa", "adapter.dora=true"])
    assert 'adapter.init = "pissa" with adapter.dora = true' in str(refused.value)


@pytest.mark.parametrize("scaling", ["standard", "rslora"])
def test_pissa_peft_export_keeps_the_scale(scaling, tiny_bert_dir, tmp_path):
    """The PEFT export of a trained PiSSA adapter (rank 2r, see
    `jaxlora.export`) keeps the scale s: lora_alpha doubled (alpha / r), or
    times sqrt(2) under rsLoRA (alpha / sqrt(r)); PeftModel.from_pretrained
    over the untouched base model gives our logits (1e-4)."""
    import json

    import torch
    from peft import PeftModel

    from jaxlora.export import peft_config, peft_tensors, write_safetensors
    from jaxlora.lora import adapter_factors
    from jaxlora.models import family

    loaded, hf = _family_model("llama", tiny_bert_dir, tmp_path)
    cfg = LoraConfig(rank=4, alpha=8, targets="all-linear", init="pissa", scaling=scaling)
    adapt(loaded.model, cfg, loaded.lora_targets, jax.random.key(1))
    start = adapter_factors(loaded.model)
    rng = np.random.default_rng(1)
    for linear in loaded.model.linear_layers().values():  # as if trained: the factors moved
        for factor in (linear.lora.lora_a, linear.lora.lora_b):
            factor[...] = factor[...] + rng.normal(0, 0.05, factor.shape).astype(np.float32)
    ids, mask = _ids(loaded.config.vocab_size)
    ours = np.asarray(loaded.model(ids, mask), np.float32)[mask == 1]

    fam = family(tmp_path / "llama")
    write_safetensors(tmp_path / "adapter_model.safetensors",
                      peft_tensors(loaded.model, fam, start))
    config = peft_config(cfg, loaded.model, fam, task="causal-lm", base_model=None,
                         start=start)
    assert config["r"] == 8 and config["lora_alpha"] == (
        16 if scaling == "standard" else pytest.approx(8 * np.sqrt(2), rel=1e-12))
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with torch.no_grad():
        plain = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
        theirs = PeftModel.from_pretrained(hf, str(tmp_path)).eval()(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    assert np.abs(plain[mask == 1] - ours).max() > 0.05  # the update does change the logits
    np.testing.assert_allclose(theirs[mask == 1], ours, atol=1e-4, rtol=0)


def test_gaussian_init_is_peft_gaussian(tiny_bert_dir):
    """"gaussian": A ~ normal(0, std 1/r) (PEFT's nn.init.normal_(std=1/r)), B
    zero, so the model starts exactly at the base model; "default" draws
    kaiming-uniform A (|A| <= 1/sqrt(in))."""
    from flax import nnx

    from jaxlora.lora import adapter_factors

    stats = {}
    for init in ("gaussian", "default"):
        loaded = load_model(tiny_bert_dir, task="classification", num_labels=2,
                            attention="xla", seed=0)
        base = _logits(loaded.model, 30522)
        cfg = LoraConfig(rank=4, targets="all-linear", init=init)
        graphdef, trainable, frozen, _ = adapt(loaded.model, cfg, bert.LORA_TARGETS,
                                               jax.random.key(1))
        np.testing.assert_array_equal(_logits(nnx.merge(graphdef, trainable, frozen), 30522),
                                      base)
        factors = adapter_factors(loaded.model).values()
        assert all(not b.any() for _, b in factors)
        a = np.concatenate([a.ravel() for a, _ in factors])
        stats[init] = (a.std(), np.abs(a).max())
    std, _ = stats["gaussian"]
    assert abs(std - 1 / 4) < 0.01, std  # ~12,000 draws: the std within 1%
    assert stats["default"][1] <= 1 / np.sqrt(32)  # the smallest fan-in is 32


def test_qlora_pissa_quantizes_the_residual(tiny_bert_dir):
    """QLoRA + PiSSA quantizes W0 - s A B, not W0: its 4-bit kernels are
    exactly those of the residual LoRA + PiSSA leaves, and differ from the
    4-bit original's. Layers without adapters keep their plain quantization."""
    from jaxlora.lora import QLoraConfig
    from jaxlora.quant import QuantConfig, QuantizedKernel

    def kernels(cfg):
        loaded = load_model(tiny_bert_dir, task="classification", num_labels=2,
                            attention="xla", seed=0)
        adapt(loaded.model, cfg, bert.LORA_TARGETS, jax.random.key(1))
        return loaded.model.linear_layers()

    settings = dict(rank=4, targets=["query", "value"], init="pissa")
    residuals = kernels(LoraConfig(**settings))
    quantized = kernels(QLoraConfig(**settings))
    plain = kernels(QLoraConfig(rank=4, targets=["query", "value"]))
    for path, layer in quantized.items():
        ours = np.asarray(layer.kernel.dequantize_out_in(jax.numpy.float32))
        expected = QuantizedKernel(residuals[path].kernel[...], QuantConfig())
        np.testing.assert_array_equal(ours, np.asarray(expected.dequantize_out_in(
            jax.numpy.float32)), err_msg=path)
        original = np.asarray(plain[path].kernel.dequantize_out_in(jax.numpy.float32))
        assert (layer.lora is not None) == (not np.array_equal(ours, original)), path


# -- a PiSSA run: before, exports, resume --------------------------------------------

PISSA_RECIPE = (TINY_RECIPE
                .replace('rank = 4\ntargets = ["query", "value"]',
                         'rank = 12\ntargets = ["query", "value", "output"]\ninit = "pissa"\n'
                         'alpha = 12')
                .replace("epochs = 3", "max_steps = 6\ncheckpoint_every = 3\nkeep_checkpoints = 5\n"
                                       "lr_ratio_b = 4.0"))


@pytest.fixture(scope="module")
def pissa_run(tmp_path_factory, tiny_bert_dir):
    """A finished tiny PiSSA run (with LoRA+, whose partitioned optimizer state
    is checkpointed too), made by the real CLI, and its folder's parent."""
    root = tmp_path_factory.mktemp("pissa")
    return tiny_run(root, tiny_bert_dir, PISSA_RECIPE), root


@pytest.fixture()
def no_svd(monkeypatch):
    """Whatever rebuilds a PiSSA run's model must take the factors the run kept,
    never a new SVD (not bit-reproducible on another machine)."""
    import jaxlora.lora

    def refuse(*args):
        raise AssertionError("a PiSSA model was rebuilt by a new SVD")

    monkeypatch.setattr(jaxlora.lora, "_principal", refuse)


def test_a_pissa_run_evaluates_the_base_model_before(pissa_run):
    """"before" is the base model (with the run's fresh head): the same figures
    as a default-init LoRA run's, whose adapters start at zero (the PiSSA start
    is W0 - s A B + s A B, equal up to rounding); the report names the settings."""
    import json

    run, root = pissa_run
    (root / "plain.toml").write_text(TINY_RECIPE.replace("epochs = 3", "max_steps = 1"))
    done = _runner("run", "plain.toml", cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    plain = next((root / "runs" / "plain").iterdir())
    ours = json.loads((run / "eval.json").read_text())["before"]
    base = json.loads((plain / "eval.json").read_text())["before"]
    assert ours["confusion"] == base["confusion"]
    # the tiny head's logits are ~0.01, so the loss moves little: the residuals
    # alone (B zeroed) move it by ~3e-6 here, the PiSSA start by float rounding
    assert abs(ours["loss"] - base["loss"]) < 2e-7
    report = (run / "report.md").read_text()
    [line] = [x for x in report.splitlines() if x.startswith("- hyperparameters:")]
    assert "method `lora (PiSSA)`" in line and line.lower().count("pissa") == 1
    assert "LoRA+: B at 4.0x the learning rate" in line
    assert (run / "pissa.safetensors").is_file()


def test_pissa_exports_load_onto_the_untouched_base_model(pissa_run, no_svd):
    """The PEFT export is a plain rank-2r LoRA for the original weights (PEFT's
    own PiSSA-to-LoRA conversion): loaded onto the untouched base model it
    gives our logits (1e-4), as the merged model (residual + s A B) does."""
    import json

    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from test_export import TEXTS, _jaxlora_logits

    run, root = pissa_run
    _, enc, ours = _jaxlora_logits(run, TEXTS)
    assert np.abs(ours).max() > 0.01
    inputs = dict(input_ids=torch.tensor(enc["input_ids"]),
                  attention_mask=torch.tensor(enc["attention_mask"]))
    for fmt in ("peft", "merged"):
        done = _runner("export", str(run), "--format", fmt, cwd=root)
        assert done.returncode == 0, done.stderr[-2000:]
    folder = run / "export" / "peft"
    config = json.loads((folder / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["init_lora_weights"]) == (24, 24, True)
    base = AutoModelForSequenceClassification.from_pretrained(str(root / "model"), num_labels=2)
    models = [PeftModel.from_pretrained(base, str(folder)),
              AutoModelForSequenceClassification.from_pretrained(str(run / "export" / "merged"))]
    for model in models:
        with torch.no_grad():
            theirs = model.eval()(**inputs).logits.numpy()
        np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)


def test_a_stopped_pissa_run_resumes_bit_for_bit(pissa_run, tmp_path, no_svd):
    """The run as if stopped after its checkpoint of step 3 goes on from the
    factors it kept to exactly the finished run's weights; without the file,
    with a damaged one or with other factors it is refused, naming the file."""
    import json
    import shutil

    from runner.build import open_run

    run, root = pissa_run
    stopped = tmp_path / run.name
    shutil.copytree(run, stopped, ignore=shutil.ignore_patterns("export"))
    shutil.rmtree(stopped / "checkpoints" / "6")
    manifest = json.loads((stopped / "manifest.json").read_text())
    (stopped / "manifest.json").write_text(json.dumps({**manifest, "status": "interrupted"}))

    kept = (stopped / "pissa.safetensors").read_bytes()
    (stopped / "pissa.safetensors").unlink()
    refused = _runner("run", str(stopped), cwd=root)
    assert refused.returncode == 2 and "pissa.safetensors: missing" in refused.stderr
    (stopped / "pissa.safetensors").write_bytes(kept[:-8])
    refused = _runner("eval", str(stopped), cwd=root)
    assert refused.returncode == 2 and "pissa.safetensors: not a valid safetensors" in refused.stderr
    (stopped / "pissa.safetensors").write_bytes(kept)
    _refuses_other_factors(stopped)

    resumed = _runner("run", str(stopped), cwd=root)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "from its checkpoint at step 3" in resumed.stdout
    assert _bytes(open_run(stopped).trainable) == _bytes(open_run(run).trainable)


def _refuses_other_factors(run) -> None:
    """Factors of another shape, or another run's (one adapted layer fewer:
    other targets), are refused when the run's model is rebuilt, naming the
    file and the odd tensor; the run's own file is put back."""
    from jaxlora.errors import UserError
    from jaxlora.export import write_safetensors
    from jaxlora.models.weights import read_safetensors_file
    from runner.build import open_run

    path = run / "pissa.safetensors"
    kept = path.read_bytes()
    own = {name: np.array(t) for name, t in read_safetensors_file(path).items()}
    first = sorted(own)[0]  # "<layer>.lora_a"
    layer = first.removesuffix(".lora_a")
    others = {"transposed": {**own, first: own[first].T.copy()},
              "other targets": {k: v for k, v in own.items() if not k.startswith(layer + ".")}}
    for why, tensors in others.items():
        write_safetensors(path, tensors)
        with pytest.raises(UserError, match="pissa.safetensors: not the initial factors of "
                                            "this run's adapters") as refused:
            open_run(run)
        assert repr(first) in str(refused.value), why
    path.write_bytes(kept)
