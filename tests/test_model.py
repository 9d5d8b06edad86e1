"""The Embedder's encoder call (gist_scale.model)."""

from __future__ import annotations

import pytest
import torch

from gist_scale.model import SDPA_MASK_MODEL_TYPES, Embedder, pool


@pytest.mark.parametrize("model_type", SDPA_MASK_MODEL_TYPES)
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_embeddings_equal_the_encoder_with_its_own_2d_mask(model_type, attention):
    """Under sdpa the Embedder hands the encoder a ready 4D mask (no host read of the mask per call); the
    embeddings equal those of the encoder given the usual 2D mask, for every listed encoder family and padding."""
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.for_model(model_type, vocab_size=120, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=64, max_position_embeddings=80,
                                  pad_token_id=1, attn_implementation=attention)
    torch.manual_seed(0)
    encoder = AutoModel.from_config(config, add_pooling_layer=False).eval()
    assert encoder.config._attn_implementation == attention
    lengths = torch.tensor([9, 3, 6, 1])
    mask = (torch.arange(9)[None] < lengths[:, None]).long()
    ids = torch.randint(5, 120, (4, 9)) * mask + 1 * (1 - mask)
    embedder = Embedder(encoder, "mean", True)
    with torch.no_grad():
        got = embedder(ids, mask)
        hidden = encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        want = torch.nn.functional.normalize(pool(hidden, mask, "mean"), dim=-1)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
