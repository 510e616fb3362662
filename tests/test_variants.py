"""LoRA variants against PEFT, the reference they must equal.

rsLoRA and DoRA (`adapter.scaling = "rslora"`, `adapter.dora = true`):
forward logits equal PEFT's (`use_rslora`, `use_dora`) within 1e-4 on the
tiny BERT and Llama checkpoints, with random non-zero factors and magnitudes,
over full-precision and over our dequantized 4-bit weights (PEFT is given
those as its base weights: bitsandbytes is not installed); our PEFT exports
load in PEFT with equal logits, DoRA's merged weights give the adapted
model's logits; the adapted model starts exactly at the base model, so a
DoRA QLoRA run's "before" is a plain QLoRA run's; such a run through the CLI
trains and resumes bit for bit; method full refuses the LoRA fields.
"""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_cli import TINY_RECIPE, _tweets_csv, tiny_run
from test_cli import runner_here as _runner
from tiny_models import tiny_decoder_dir

from jaxlora.export import kernel_out_in, merged_tensors, peft_config, peft_tensors, \
    write_safetensors
from jaxlora.lora import LoraConfig, QLoraConfig, adapt
from jaxlora.models import bert, family, llama, load_model

BERT_TARGETS = ["query", "value", "attention.output", "output"]
LLAMA_TARGETS = "all-linear"
VARIANTS = {  # name -> the [adapter] fields it sets
    "rslora": dict(scaling="rslora"),
    "dora": dict(dora=True),
    "rslora+dora": dict(scaling="rslora", dora=True),
}


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    return tiny_decoder_dir(tmp_path_factory.mktemp("llama"), "llama-gqa-rope3")


def _inputs(task: str, seed: int = 0):
    """A right-padded batch of ids for the task's vocabulary."""
    rng = np.random.default_rng(seed)
    vocab = 30522 if task == "classification" else 211
    ids = rng.integers(4, vocab, (3, 12)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 7:] = 0
    return ids, mask


def _ours(folder, task: str, cfg, seed: int = 0):
    """Our model with `cfg`'s adapters, their A, B (and DoRA's magnitude) random."""
    model = load_model(folder, task=task, num_labels=2 if task == "classification" else None,
                       attention="xla", seed=0).model
    table = bert.LORA_TARGETS if task == "classification" else llama.LORA_TARGETS
    adapt(model, cfg, table, jax.random.key(seed))
    rng = np.random.default_rng(seed)
    for linear in model.linear_layers().values():
        lora = linear.lora
        if lora is None:
            continue
        lora.lora_b[...] = jnp.asarray(rng.normal(0, 0.3, lora.lora_b.shape), jnp.float32)
        if cfg.dora:  # 0.7 to 1.3 times the weight's norm
            lora.magnitude[...] = lora.magnitude[...] * jnp.asarray(
                rng.uniform(0.7, 1.3, lora.magnitude.shape), jnp.float32)
    if task == "classification":  # a head that shows differences (a fresh one's are tiny)
        head = model.classifier.kernel
        head[...] = jnp.asarray(rng.normal(0, 1, head.shape), jnp.float32)
    return model


def _torch_base(folder, task: str, ours):
    """transformers' model of `folder` holding our base weights: the linear
    layers' (dequantized under qlora) and the classifier head's."""
    import torch
    import transformers

    auto = (transformers.AutoModelForSequenceClassification if task == "classification"
            else transformers.AutoModelForCausalLM)
    kwargs = {"num_labels": 2} if task == "classification" else {}
    model = auto.from_pretrained(str(folder), **kwargs)
    with torch.no_grad():
        for path, linear in ours.linear_layers().items():
            model.get_submodule(path).weight.copy_(torch.from_numpy(kernel_out_in(linear)))
        if task == "classification":
            model.classifier.weight.copy_(torch.from_numpy(
                np.asarray(ours.classifier.kernel[...]).T.copy()))
            model.classifier.bias.copy_(torch.from_numpy(np.asarray(ours.classifier.bias[...])))
    return model.eval()


def _peft_reference(folder, task: str, cfg, ours):
    """PEFT's model with the same base weights, config and adapter weights as `ours`."""
    import peft

    paths = [p for p, linear in ours.linear_layers().items() if linear.lora is not None]
    model = peft.get_peft_model(_torch_base(folder, task, ours), peft.LoraConfig(
        r=cfg.rank, lora_alpha=cfg.alpha, target_modules=paths, lora_dropout=0.0,
        use_rslora=cfg.scaling == "rslora", use_dora=cfg.dora))
    for path in paths:
        _copy_adapter(ours.linear_layers()[path].lora, model.base_model.model.get_submodule(path))
    return model.eval()


def _copy_adapter(lora, theirs) -> None:
    """Our adapter's A, B (and DoRA's magnitude) into PEFT's layer `theirs`."""
    import torch

    weights = {"lora_A": np.asarray(lora.lora_a[...]).T, "lora_B": np.asarray(lora.lora_b[...]).T}
    if hasattr(lora, "magnitude"):
        weights["lora_magnitude_vector"] = np.asarray(lora.magnitude[...])
    with torch.no_grad():
        for name, value in weights.items():
            getattr(theirs, name)["default"].weight.copy_(torch.from_numpy(value.copy()))


def _torch_logits(model, ids, mask) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor(ids, dtype=torch.long),
                     attention_mask=torch.tensor(mask)).logits.numpy()


def _config(method: str, rank: int = 4, **fields):
    cls = QLoraConfig if method == "qlora" else LoraConfig
    return cls(rank=rank, alpha=6.0, **fields)


# (family fixture, task, targets, method, variant); DoRA over 4-bit BERT: TestDoraQloraRun
CASES = [
    ("tiny_bert_dir", "classification", BERT_TARGETS, "lora", "rslora"),
    ("tiny_llama_dir", "causal-lm", LLAMA_TARGETS, "lora", "rslora+dora"),
    ("tiny_llama_dir", "causal-lm", LLAMA_TARGETS, "qlora", "dora"),
]


class TestDoraLayerEqualsPeftInTraining:
    """One DoRA layer in train mode, dropout on: PEFT's output and gradients
    (the norm detached; the rescaled base term on the dropped-out input)."""

    def test_output_and_gradients(self):
        import peft
        import torch

        from jaxlora.lora import apply_lora
        from jaxlora.models.layers import Linear, dropout

        rng = np.random.default_rng(3)
        x = rng.normal(size=(2, 5, 16)).astype(np.float32)
        g = rng.normal(size=(2, 5, 8)).astype(np.float32)
        key = jax.random.key(7)
        layer = Linear(16, 8)
        cfg = LoraConfig(rank=4, alpha=6.0, dropout=0.25, dora=True, targets="all-linear")
        apply_lora({"lin": layer}, ["lin"], cfg, jax.random.key(0))
        weight, bias = rng.normal(size=(8, 16)), rng.normal(size=8)
        layer.kernel[...] = jnp.asarray(weight.T, jnp.float32)
        layer.bias[...] = jnp.asarray(bias, jnp.float32)
        lora = layer.lora
        lora.sq_norm[...] = jnp.sum(layer.kernel[...] ** 2, axis=0)
        lora.lora_b[...] = jnp.asarray(rng.normal(0, 0.3, (4, 8)), jnp.float32)
        lora.magnitude[...] = jnp.asarray(rng.uniform(2, 5, 8), jnp.float32)

        graphdef, params, rest = nnx.split(layer, nnx.LoRAParam, ...)

        def loss(params):
            y = nnx.merge(graphdef, params, rest)(jnp.asarray(x), key)
            return jnp.sum(y * g), y

        grads, y = jax.grad(loss, has_aux=True)(params)

        class Tiny(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.lin = torch.nn.Linear(16, 8)

            def forward(self, inputs):
                return self.lin(inputs)

        class Dropped(torch.nn.Module):  # the mask our dropout drew, for PEFT's dropout
            def forward(self, inputs):
                return torch.from_numpy(np.asarray(dropout(jnp.asarray(x), 0.25, key)))

        model = peft.get_peft_model(Tiny(), peft.LoraConfig(
            r=4, lora_alpha=6.0, target_modules=["lin"], lora_dropout=0.25, use_dora=True))
        theirs = model.base_model.model.lin
        with torch.no_grad():
            theirs.base_layer.weight.copy_(torch.from_numpy(weight))
            theirs.base_layer.bias.copy_(torch.from_numpy(bias))
        _copy_adapter(lora, theirs)
        theirs.lora_dropout["default"] = Dropped()
        model.train()
        out = model(torch.from_numpy(x))
        (out * torch.from_numpy(g)).sum().backward()
        np.testing.assert_allclose(np.asarray(y), out.detach().numpy(), atol=1e-5, rtol=0)
        found = {"lora_a": theirs.lora_A["default"].weight.grad.numpy().T,
                 "lora_b": theirs.lora_B["default"].weight.grad.numpy().T,
                 "magnitude": theirs.lora_magnitude_vector["default"].weight.grad.numpy()}
        for name, expected in found.items():
            assert np.abs(expected).max() > 1e-2, name
            np.testing.assert_allclose(np.asarray(grads["lora"][name][...]), expected,
                                       atol=1e-4, rtol=1e-5, err_msg=name)


class TestDoraStartsAtTheBaseModel:
    """The trainable weights as `adapt` builds them (B zero, each magnitude its
    weight's norm), which the run's "before" evaluation takes, give exactly
    the base model (here the 4-bit one, as qlora holds it), compiled."""

    def test_exact(self, tiny_bert_dir):
        cfg = _config("qlora", targets=BERT_TARGETS, dora=True)
        ids, mask = _inputs("classification")
        forward = jax.jit(lambda graphdef, state: nnx.merge(graphdef, *state)(ids, mask))
        base = load_model(tiny_bert_dir, task="classification", num_labels=2, attention="xla",
                          seed=0).model
        graphdef, *state, _ = adapt(base, cfg, bert.LORA_TARGETS, jax.random.key(0),
                                    attach=False)
        expected = np.asarray(forward(graphdef, state))
        model = load_model(tiny_bert_dir, task="classification", num_labels=2, attention="xla",
                           seed=0).model
        graphdef, trainable, frozen, _ = adapt(model, cfg, bert.LORA_TARGETS, jax.random.key(0))
        np.testing.assert_array_equal(np.asarray(forward(graphdef, (trainable, frozen))),
                                      expected)
        moved = nnx.from_flat_state([  # the adapters are live: every A, B and m moved
            (path, var.replace(var[...] * 1.5 + 0.1) if "lora" in path else var)
            for path, var in nnx.to_flat_state(trainable)])
        assert not np.allclose(np.asarray(forward(graphdef, (moved, frozen))), expected)


def _merged_logits(folder, task: str, ours, ids, mask) -> np.ndarray:
    """The logits of transformers' model holding our merged weights."""
    import torch

    model = _torch_base(folder, task, ours)
    tensors = merged_tensors(ours, family(folder), task=task)
    missing, unexpected = model.load_state_dict(
        {k: torch.from_numpy(v) for k, v in tensors.items()}, strict=False)
    assert not unexpected and not [k for k in missing if k in dict(model.named_parameters())]
    return _torch_logits(model, ids, mask)


class TestEqualToPeft:
    """Same base weights (the dequantized ones for qlora: bitsandbytes is not
    installed here) and adapter weights: PEFT's model gives our logits; so does
    our PEFT export loaded by `PeftModel.from_pretrained` over those base
    weights, and so do our merged weights in transformers' model."""

    @pytest.mark.parametrize("fixture, task, targets, method, variant", CASES)
    def test_forward_and_exports(self, request, tmp_path, fixture, task, targets, method,
                                 variant):
        from peft import PeftModel

        folder = request.getfixturevalue(fixture)
        cfg = _config(method, targets=targets, **VARIANTS[variant])
        ours = _ours(folder, task, cfg)
        ids, mask = _inputs(task)
        kept = (mask == 1) if task == "causal-lm" else ...  # padded positions predict nothing
        mine = np.asarray(ours(ids, mask))[kept]
        plain = _torch_logits(_torch_base(folder, task, ours), ids, mask)[kept]
        assert np.abs(mine - plain).max() > 0.05  # the adapters do change the logits
        theirs = _torch_logits(_peft_reference(folder, task, cfg, ours), ids, mask)[kept]
        np.testing.assert_allclose(mine, theirs, atol=1e-4, rtol=0)

        fam = family(folder)
        write_safetensors(tmp_path / "adapter_model.safetensors", peft_tensors(ours, fam))
        config = peft_config(cfg, ours, fam, task=task, base_model=None)
        assert (config["use_rslora"], config["use_dora"]) == (
            "rslora" in variant, "dora" in variant)
        (tmp_path / "adapter_config.json").write_text(json.dumps(config))
        loaded = PeftModel.from_pretrained(_torch_base(folder, task, ours), str(tmp_path))
        exported = _torch_logits(loaded.eval(), ids, mask)[kept]
        np.testing.assert_allclose(exported, mine, atol=1e-4, rtol=0)
        merged = _merged_logits(folder, task, ours, ids, mask)[kept]
        np.testing.assert_allclose(merged, mine, atol=1e-4, rtol=0)


DORA_QLORA = (TINY_RECIPE.replace('method = "lora"', 'method = "qlora"\ndora = true\ndropout = 0.1')
              .replace("epochs = 3", "epochs = 3\nmax_steps = 8\ncheckpoint_every = 4\n"
                                     "keep_checkpoints = 3"))


@pytest.fixture(scope="module")
def dora_run(tmp_path_factory, tiny_bert_dir):
    """A finished tiny DoRA-over-QLoRA run made by the CLI."""
    return tiny_run(tmp_path_factory.mktemp("dora"), tiny_bert_dir, DORA_QLORA)


def _trained(run):
    from runner.build import open_run

    opened = open_run(run)
    return opened, [np.asarray(x) for x in jax.tree_util.tree_leaves(opened.trainable)]


class TestDoraQloraRun:
    """`runner run` with adapter.dora over qlora: it trains the magnitudes,
    resumes bit for bit, and its exports load in PEFT and transformers."""

    def test_trains_and_resumes_bit_for_bit(self, dora_run, tmp_path):
        opened, final = _trained(dora_run)
        for linear in opened.model().linear_layers().values():
            if linear.lora is not None:  # the magnitude moved off the weight's norm
                assert not np.allclose(np.asarray(linear.lora.magnitude[...]),
                                       np.sqrt(np.asarray(linear.lora.sq_norm[...])))
        assert "hyperparameters: method `qlora (DoRA)`" in (dora_run / "report.md").read_text()
        # the finished run as if stopped after its checkpoint of step 4
        stopped = tmp_path / dora_run.name
        shutil.copytree(dora_run, stopped)
        for later in [p for p in (stopped / "checkpoints").iterdir()
                      if p.name.isdigit() and int(p.name) > 4]:
            shutil.rmtree(later)
        manifest = json.loads((stopped / "manifest.json").read_text())
        (stopped / "manifest.json").write_text(json.dumps({**manifest, "status": "interrupted"}))
        resumed = _runner("run", str(stopped), cwd=dora_run.parents[2])
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert "from its checkpoint at step 4" in resumed.stdout
        _, again = _trained(stopped)
        assert [x.tobytes() for x in again] == [x.tobytes() for x in final]

    def test_before_is_a_plain_qlora_runs(self, dora_run):
        """"before" evaluates the adapters as `adapt` builds them, with which the
        DoRA model is the (4-bit) base model: the same figures, bit for bit, as
        a plain QLoRA run of the same recipe (the same seed: the same head)."""
        root = dora_run.parents[2]
        (root / "plain.toml").write_text(DORA_QLORA.replace("dora = true\n", "")
                                         .replace("max_steps = 8", "max_steps = 1"))
        done = _runner("run", "plain.toml", cwd=root)
        assert done.returncode == 0, done.stderr[-3000:]
        [plain] = list((root / "runs" / "plain").iterdir())
        dora, base = (json.loads((run / "eval.json").read_text())["before"]
                      for run in (dora_run, plain))
        assert base["loss"] > 0 and dora == base

    def test_exports_load_with_equal_logits(self, dora_run):
        from peft import PeftModel
        from transformers import AutoModelForSequenceClassification

        root = dora_run.parents[2]
        opened, _ = _trained(dora_run)
        ours_model = opened.model()
        ids, mask = _inputs("classification", seed=2)
        ours = np.asarray(ours_model(ids, mask))
        for fmt in ("peft", "merged"):
            done = _runner("export", str(dora_run), "--format", fmt, cwd=root)
            assert done.returncode == 0, done.stderr[-2000:]
            assert "(qlora (DoRA), step 8)" in done.stdout
        folder = dora_run / "export" / "peft"
        config = json.loads((folder / "adapter_config.json").read_text())
        assert config["use_dora"] is True and config["use_rslora"] is False
        card = (folder / "README.md").read_text()
        assert '"qlora", "dora"' in card and "method `qlora (DoRA)`" in card
        # over the dequantized NF4 weights the adapter was trained against
        base = _torch_base(root / "model", "classification", ours_model)
        peft_model = PeftModel.from_pretrained(base, str(folder)).eval()
        np.testing.assert_allclose(_torch_logits(peft_model, ids, mask), ours, atol=1e-4, rtol=0)
        merged = AutoModelForSequenceClassification.from_pretrained(
            str(dora_run / "export" / "merged")).eval()
        np.testing.assert_allclose(_torch_logits(merged, ids, mask), ours, atol=1e-4, rtol=0)


def test_dora_with_method_full_is_refused_naming_the_field(tmp_path, tiny_bert_dir):
    shutil.copytree(tiny_bert_dir, tmp_path / "model")
    _tweets_csv(tmp_path / "tweets.csv")
    (tmp_path / "full.toml").write_text(TINY_RECIPE.replace(
        'method = "lora"\nrank = 4\ntargets = ["query", "value"]\n', 'method = "full"\n'))
    done = _runner("run", "full.toml", "--set", "adapter.dora=true", cwd=tmp_path)
    assert done.returncode == 2
    assert 'adapter.dora: only for method "lora" or "qlora"' in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "runs").exists()
