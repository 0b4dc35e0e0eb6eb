"""Rotary position embeddings (rotate-half convention) with Hugging Face's scaling variants.

``linear``, ``llama3`` and ``yarn`` follow Hugging Face's definitions exactly. ``dynamic`` (NTK) rescales
the base once for ``max_len`` rather than per sequence length: a paged cache keeps keys rotated once, so a
frequency that changed as a sequence grew would invalidate every cached key.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from radixserve.worker import kernels
from radixserve.worker.models.config import RopeScaling


def _default_inv_freq(head_dim: int, base: float) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))


def _llama3_inv_freq(inv_freq: torch.Tensor, s: RopeScaling, max_len: int) -> torch.Tensor:
    old_len = s.original_max_position_embeddings or max_len
    low_wavelen = old_len / s.low_freq_factor
    high_wavelen = old_len / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (old_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _yarn_inv_freq(head_dim: int, base: float, s: RopeScaling, max_len: int) -> torch.Tensor:
    old_len = s.original_max_position_embeddings or max_len

    def correction_dim(num_rotations: float) -> float:
        return head_dim * math.log(old_len / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(s.beta_fast)), 0)
    high = min(math.ceil(correction_dim(s.beta_slow)), head_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = _default_inv_freq(head_dim, base)
    interpolation = extrapolation / s.factor
    extrapolation_weight = 1 - ramp
    return interpolation * (1 - extrapolation_weight) + extrapolation * extrapolation_weight


def rope_inv_freq(head_dim: int, base: float, scaling: RopeScaling | None, max_len: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [head_dim // 2] and the factor applied to cos/sin (1 except for yarn)."""
    if scaling is None:
        return _default_inv_freq(head_dim, base), 1.0
    if scaling.kind == "linear":
        return _default_inv_freq(head_dim, base) / scaling.factor, 1.0
    if scaling.kind == "llama3":
        return _llama3_inv_freq(_default_inv_freq(head_dim, base), scaling, max_len), 1.0
    if scaling.kind == "dynamic":
        old_len = scaling.original_max_position_embeddings or max_len
        ratio = max(1.0, scaling.factor * max_len / old_len - (scaling.factor - 1))
        return _default_inv_freq(head_dim, base * ratio ** (head_dim / (head_dim - 2))), 1.0
    attention_factor = scaling.attention_factor
    if attention_factor is None:
        attention_factor = 0.1 * math.log(scaling.factor) + 1.0 if scaling.factor > 1 else 1.0
    return _yarn_inv_freq(head_dim, base, scaling, max_len), attention_factor


class RotaryEmbedding(nn.Module):
    """Applies RoPE to rows of heads given each token's absolute position.

    cos/sin tables for positions [0, max_len) are precomputed in fp32; the sine table carries the sign of the
    rotate-half convention (``x * cos + cat(x2, x1) * sin``), saving a negation per call.
    """

    def __init__(self, head_dim: int, base: float, scaling: RopeScaling | None, max_len: int):
        super().__init__()
        inv_freq, factor = rope_inv_freq(head_dim, base, scaling, max_len)
        angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)  # [max_len, head_dim/2]
        sin = angles.sin() * factor
        self.register_buffer("cos", (angles.cos() * factor).repeat(1, 2), persistent=False)
        self.register_buffer("sin", torch.cat((-sin, sin), dim=-1), persistent=False)

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """x [T, H, D] (query and key heads together), positions [T]: x rotated in place, and returned."""
        return kernels.rotary_(x, positions, self.cos, self.sin)
