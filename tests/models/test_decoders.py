"""GPT-2 and Llama-family decoders against transformers' PyTorch models on tiny
random configs: logits within 1e-4 (float32) on a right-padded batch, for
GPT-2, Llama (grouped-query attention, Llama-3 rope scaling, tied embeddings),
Mistral (sliding window) and Qwen2 (q/k/v biases)."""

import numpy as np
import pytest

from jaxlora.models import load_model

from tiny_models import CONFIGS, save_tiny_decoder


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
