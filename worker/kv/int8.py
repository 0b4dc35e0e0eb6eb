"""The int8 form of cached keys and values: symmetric, one float32 scale per row of ``head_dim`` values.

A row ``x`` (one token's key or value for one KV head) is stored as ``round(x / scale)`` in [-127, 127] with
``scale = max|x| / 127``, so ``dequantize`` gives back every element within ``scale / 2`` (up to float32
rounding; rows far into the subnormal range lose more). An all-zero row has scale 0 and comes back as zeros.
The native kernels read this form in place (``kernels.paged_attention``) and write it as ``quantize`` does, bit
for bit (the decoder stack, ``kernels/decoder.cpp``); everything else goes through these two functions.
"""

from __future__ import annotations

import torch


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` [..., D] as int8 values [..., D] and float32 scales [...] (computed in float32)."""
    x32 = x.float()
    scales = x32.abs().amax(dim=-1) / 127  # [...]
    per_row = scales.unsqueeze(-1)
    values = torch.where(per_row > 0, x32 / per_row, 0.0).round_().clamp_(-127, 127).to(torch.int8)
    return values, scales


def dequantize(values: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int8 ``values`` [..., D] times their float32 ``scales`` [...], as ``dtype`` [..., D]."""
    return (values.float() * scales.unsqueeze(-1)).to(dtype)
