"""Model FLOPs on real tokens, and the accelerator peaks they are measured against (MFU).

Used by the training loop's metrics and by `gist-scale bench`. FLOPs count the encoder's matmuls on real
(non-padding) tokens only, so padding and recomputation (GradCache's second forward) lower the utilization instead of
inflating it: a forward over texts of lengths L_i costs ``2 * P_linear * sum(L_i) + 4 * layers * hidden * sum(L_i^2)``
(projections and feed-forward, then attention scores and their product with the values); training costs 3x that
(forward, and a backward of twice the forward).
"""

from __future__ import annotations

import torch

__all__ = ["PEAK_TFLOPS", "forward_flops", "peak_tflops"]

# Dense bf16 peak of the SXM parts (the PCIe H100 is lower); matched in order as substrings of the device name
# ("H200" also matches a GH200).
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H200", 989.4), ("H100", 989.4), ("A100", 312.0))


def forward_flops(config, tokens: int, tokens_squared: int) -> float:
    """Matmul FLOPs of one forward of a BERT-like encoder `config` over texts with `sum(L)` = `tokens` and
    `sum(L^2)` = `tokens_squared` real tokens."""
    h, layers, inner = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    linear = layers * (4 * h * h + 2 * h * inner)
    return float(2 * linear * tokens + 4 * layers * h * tokens_squared)


def peak_tflops(device: torch.device) -> float | None:
    """The dense bf16 peak of a known accelerator (H100/H200/A100), None elsewhere (CPU: no MFU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_TFLOPS if key in name), None)
