"""Native kernels of the decode step, compiled on first use with torch's C++ extension loader (g++ and ninja).

Each function runs the C++ kernel (``step_ops.cpp``) for float32 CPU tensors (and int8 caches, for the int8 decode
attention); on other devices or dtypes, or if the kernels cannot be built here, it computes the same result with
torch operations. The linear layers' block kernels are ``kernels.blocks``.
"""

from __future__ import annotations

import functools
from pathlib import Path
from types import ModuleType

import torch

from radixserve.worker.kernels.build import cpu_flags, load
from radixserve.worker.kv import int8

_SOURCE = Path(__file__).with_name("step_ops.cpp")


@functools.cache
def _native() -> ModuleType | None:
    """The compiled extension, or None when it cannot be built (logged once)."""
    # -march=native code must never run on another CPU: the build is keyed by the source and the CPU's flags.
    return load("radixserve_step_ops", _SOURCE, ["-march=native"], key=" ".join(sorted(cpu_flags())))


def build(device: torch.device) -> bool:
    """Builds (or loads the cached build of) the kernels a device uses; True when native code will run.

    The first build takes tens of seconds, so engines call this while loading rather than on the first request.
    """
    return device.type == "cpu" and _native() is not None


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           page_table: torch.Tensor, context_lens: torch.Tensor, page_size: int,
                           scale: float) -> torch.Tensor:
    """Attention of one query token per sequence over its paged context.

    q [B, Hq, D]; caches [num_slots, Hkv, D] (slot = page * page_size + offset); page_table [B, max_pages] int64
    (rows padded with any valid page); context_lens [B] int64. Returns [B, Hq, D] in q's dtype.
    """
    native = _native() if q.device.type == "cpu" else None
    if native is not None:
        return native.paged_decode_attention(q, k_cache, v_cache, page_table, context_lens, page_size,
                                             scale).to(q.dtype)
    return _torch_decode_attention(q, k_cache, v_cache, page_table, context_lens, page_size, scale)


def paged_decode_attention_int8(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                k_scale: torch.Tensor, v_scale: torch.Tensor, page_table: torch.Tensor,
                                context_lens: torch.Tensor, page_size: int, scale: float) -> torch.Tensor:
    """``paged_decode_attention`` over an int8 cache (``kv.int8``): caches [num_slots, Hkv, D] int8 read in place,
    with their float32 scales [num_slots, Hkv]. Returns [B, Hq, D] in q's dtype."""
    native = _native() if q.device.type == "cpu" else None
    if native is not None:
        return native.paged_decode_attention_int8(q, k_cache, v_cache, k_scale, v_scale, page_table, context_lens,
                                                  page_size, scale).to(q.dtype)
    return _torch_decode_attention_int8(q, k_cache, v_cache, k_scale, v_scale, page_table, context_lens, page_size,
                                        scale)


def _native_for(*tensors: torch.Tensor) -> ModuleType | None:
    for t in tensors:  # a plain loop: this runs several times per layer per step
        if t.dtype != torch.float32 or t.device.type != "cpu":
            return None
    return _native()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> torch.Tensor:
    """RMSNorm of the rows of ``x`` [T, n] (computed in float32) times ``weight``; given a ``residual`` [T, n],
    first ``residual += x`` in place and the norm is of that sum (the decoder's residual stream)."""
    native = _native_for(x, weight) if residual is None else _native_for(x, weight, residual)
    if native is not None:
        return native.rms_norm(x, residual, weight, eps)
    if residual is not None:
        x = residual.add_(x)
    return weight * torch.nn.functional.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


def rotary_(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [T, H, D] in place by the rows ``positions`` [T] of the tables [max_len, D] (``sin`` carries
    rotate-half's sign): ``x * cos + cat(x2, x1) * sin``. Returns ``x``."""
    native = _native_for(x, cos, sin)
    if native is not None and x.stride(-1) == 1:
        native.rotary_(x, positions, cos, sin)
        return x
    c, s = cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)  # [T, 1, D]
    x32, half = x.float(), x.shape[-1] // 2
    swapped = torch.cat((x32[..., half:], x32[..., :half]), dim=-1)
    return x.copy_(torch.addcmul(x32 * c, swapped, s))


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` of ``gate_up`` [T, 2I] (gate the first I columns): [T, I]."""
    native = _native_for(gate_up)
    if native is not None and gate_up.stride(-1) == 1:
        return native.silu_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def _torch_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            page_table: torch.Tensor, context_lens: torch.Tensor, page_size: int,
                            scale: float) -> torch.Tensor:
    num_seqs, max_pages = page_table.shape
    num_kv_heads, head_dim = k_cache.shape[1:]
    max_len = max_pages * page_size
    offsets = torch.arange(page_size, device=q.device)
    slots = (page_table.unsqueeze(-1) * page_size + offsets).view(num_seqs, max_len)
    positions = torch.arange(max_len, device=q.device)
    bias = torch.zeros(num_seqs, 1, 1, max_len, dtype=q.dtype, device=q.device)
    bias.masked_fill_((positions >= context_lens.unsqueeze(-1)).view(num_seqs, 1, 1, max_len), float("-inf"))
    keys = k_cache[slots].view(num_seqs, max_len, num_kv_heads, head_dim).permute(0, 2, 3, 1)
    values = v_cache[slots].view(num_seqs, max_len, num_kv_heads, head_dim).transpose(1, 2)
    grouped = q.view(num_seqs, num_kv_heads, -1, head_dim)  # [B, Hkv, G, D]
    scores = torch.matmul(grouped, keys).mul_(scale).add_(bias)  # [B, Hkv, G, max_len]
    return torch.matmul(scores.softmax(dim=-1), values).view(num_seqs, -1, head_dim)


def _torch_decode_attention_int8(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                 k_scale: torch.Tensor, v_scale: torch.Tensor, page_table: torch.Tensor,
                                 context_lens: torch.Tensor, page_size: int, scale: float) -> torch.Tensor:
    """Dequantizes the pages ``page_table`` names (only those: the pool may be far larger) into a compact cache,
    then ``_torch_decode_attention`` over it."""
    pages, compact_table = torch.unique(page_table, return_inverse=True)  # [U], [B, max_pages] into pages
    slots = (pages.unsqueeze(-1) * page_size + torch.arange(page_size, device=q.device)).flatten()
    keys = int8.dequantize(k_cache[slots], k_scale[slots], q.dtype)
    values = int8.dequantize(v_cache[slots], v_scale[slots], q.dtype)
    return _torch_decode_attention(q, keys, values, compact_table, context_lens, page_size, scale)
