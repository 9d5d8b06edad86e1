"""Model FLOPs on real tokens, and the accelerator peaks they are measured against (MFU).

Used by the training loop's metrics and by `gist-scale bench`. FLOPs count the encoder's matmuls on real
(non-padding) tokens only, so padding and recomputation (GradCache's second forward) lower the utilization instead of
inflating it: a forward over texts of lengths L_i costs ``2 * P_linear * sum(L_i) + 4 * layers * hidden * sum(L_i^2)``
(projections and feed-forward, then attention scores and their product with the values); training costs 3x that
(forward, and a backward of twice the forward).
"""

from __future__ import annotations

import torch

from gist_scale.model.decoder import is_decoder

__all__ = ["PEAK_TFLOPS", "forward_flops", "peak_tflops"]

# Dense bf16 peak of the SXM parts (the PCIe H100 is lower); matched in order as substrings of the device name
# ("H200" also matches a GH200).
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H200", 989.4), ("H100", 989.4), ("A100", 312.0))


def forward_flops(config, tokens: int, tokens_squared: int) -> float:
    """Matmul FLOPs of one forward of a BERT-like encoder or a decoder LLM `config` over texts with `sum(L)` =
    `tokens` and `sum(L^2)` = `tokens_squared` real tokens.

    Decoders: queries of `heads x head_dim`, keys and values of `kv_heads x head_dim` (grouped-query attention) and
    a gated MLP (gate, up, down: Qwen, Llama, Mistral, Gemma); causal attention is counted in full, as the kernels
    compute it.
    """
    h, layers, inner = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    heads = getattr(config, "num_attention_heads", None)
    head_dim = getattr(config, "head_dim", None) or (h // heads if heads else h)
    q = heads * head_dim if heads else h
    kv_heads = getattr(config, "num_key_value_heads", None)
    kv = kv_heads * head_dim if kv_heads else q
    mlp = 3 if is_decoder(config) else 2
    linear = layers * (2 * h * q + 2 * h * kv + mlp * h * inner)
    return float(2 * linear * tokens + 4 * layers * q * tokens_squared)


def peak_tflops(device: torch.device) -> float | None:
    """The dense bf16 peak of a known accelerator (H100/H200/A100), None elsewhere (CPU: no MFU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_TFLOPS if key in name), None)
