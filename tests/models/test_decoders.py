"""GPT-2 and Llama-family decoders against transformers' PyTorch models on tiny
random configs: logits within 1e-4 (float32) on a right-padded batch, for
GPT-2, Llama (grouped-query attention, Llama-3 rope scaling, tied embeddings),
Mistral (sliding window) and Qwen2 (q/k/v biases)."""

import numpy as np
import pytest

from jaxlora.models import load_model

TINY = dict(vocab_size=211, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, max_position_embeddings=64)
CONFIGS = {
    "gpt2": ("GPT2Config", "GPT2LMHeadModel",
             dict(vocab_size=211, n_embd=32, n_layer=2, n_head=4, n_positions=64)),
    "llama-gqa-rope3": ("LlamaConfig", "LlamaForCausalLM",
                        dict(TINY, num_key_value_heads=2, rope_scaling={
                            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                            "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    "llama-tied": ("LlamaConfig", "LlamaForCausalLM", dict(TINY, tie_word_embeddings=True)),
    "mistral-window": ("MistralConfig", "MistralForCausalLM",
                       dict(TINY, num_key_value_heads=1, sliding_window=4)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(TINY, num_key_value_heads=2)),
}


def save_tiny_decoder(name: str, folder):
    """A tiny random decoder saved by transformers (safetensors), every weight perturbed."""
    import torch
    import transformers

    config_cls, model_cls, kwargs = CONFIGS[name]
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**kwargs))
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    model.save_pretrained(folder)
    return model.eval()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(name, tmp_path):
    import torch

    reference = save_tiny_decoder(name, tmp_path)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 211, (3, 12)).astype(np.int32)
    mask = np.ones((3, 12), np.int32)
    mask[1, 7:] = 0  # right padding
    mask[2, 3:] = 0
    ours = load_model(tmp_path, task="causal-lm", attention="xla").model
    logits = np.asarray(ours(ids, mask))
    with torch.no_grad():
        theirs = reference(input_ids=torch.tensor(ids, dtype=torch.long),
                           attention_mask=torch.tensor(mask)).logits.numpy()
    real = mask.astype(bool)
    assert logits.shape == theirs.shape
    np.testing.assert_allclose(logits[real], theirs[real], atol=1e-4, rtol=0)
    if name == "mistral-window":  # the window matters at this length: it is really applied
        for layer in ours.model.layers:
            layer.window = None
        assert np.abs(np.asarray(ours(ids, mask)) - logits)[real].max() > 1e-3


def test_classification_is_refused_for_a_decoder(tmp_path):
    from jaxlora.errors import UserError

    save_tiny_decoder("gpt2", tmp_path)
    with pytest.raises(UserError, match="task 'classification' is not supported by gpt2"):
        load_model(tmp_path, task="classification", num_labels=2)
