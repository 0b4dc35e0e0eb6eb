"""Native kernels of a step (``step_ops.cpp``, in the extension ``kernels.build`` compiles on first use).

Each function runs the C++ kernel of the widest build this CPU runs for float32 CPU tensors (and int8 caches, for
attention); on other devices or dtypes, or if the kernels cannot be built here, it computes the same result with
torch operations. The linear layers' block kernels are ``kernels.blocks``; a whole step's layers in one call,
``models.decoder_stack``.
"""

from __future__ import annotations

from types import ModuleType

import torch
import torch.nn.functional as F

from radixserve.worker.kernels.build import native as _native
from radixserve.worker.kv import int8


def build(device: torch.device) -> bool:
    """Builds (or loads the cached build of) the kernels a device uses; True when native code will run.

    The first build takes tens of seconds, so engines call this while loading rather than on the first request.
    """
    return device.type == "cpu" and _native() is not None


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, k_scale: torch.Tensor | None,
                    v_scale: torch.Tensor | None, page_table: torch.Tensor, query_seqs: torch.Tensor,
                    context_lens: torch.Tensor, page_size: int, scale: float) -> torch.Tensor:
    """Each query's attention to its sequence's context, read from the paged cache.

    q [T, Hq, D]: query t attends to the first ``context_lens[t]`` tokens of sequence ``query_seqs[t]``, whose pages
    are row ``query_seqs[t]`` of ``page_table`` [S, max_pages] int64 (rows padded with any valid page; slot = page *
    page_size + offset). Caches [num_slots, Hkv, D] in a float dtype, or int8 (``kv.int8``) with float32 scales
    [num_slots, Hkv] (None for a float cache). Returns [T, Hq, D] in q's dtype. The native kernel computes each
    (query, head) in one fixed order, so a query's result does not depend on what else the step holds.
    """
    native = _native() if q.device.type == "cpu" else None
    if native is not None:
        return native.paged_attention(q, k_cache, v_cache, k_scale, v_scale, page_table, query_seqs, context_lens,
                                      page_size, scale).to(q.dtype)
    return _torch_paged_attention(q, k_cache, v_cache, k_scale, v_scale, page_table, query_seqs, context_lens,
                                  page_size, scale)


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


def _torch_paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           k_scale: torch.Tensor | None, v_scale: torch.Tensor | None, page_table: torch.Tensor,
                           query_seqs: torch.Tensor, context_lens: torch.Tensor, page_size: int,
                           scale: float) -> torch.Tensor:
    """Per sequence: its queries' context gathered once (dequantized when int8), SDPA under the context lengths."""
    out = torch.empty_like(q)
    offsets = torch.arange(page_size, device=q.device)
    for seq in torch.unique(query_seqs).tolist():
        rows = (query_seqs == seq).nonzero().squeeze(1)
        lens = context_lens[rows]
        longest = int(lens.max())
        slots = (page_table[seq].unsqueeze(-1) * page_size + offsets).flatten()[:longest]
        keys, values = k_cache[slots], v_cache[slots]  # [ctx, Hkv, D]
        if k_scale is not None:
            keys, values = int8.dequantize(keys, k_scale[slots], q.dtype), int8.dequantize(values, v_scale[slots], q.dtype)
        mask = torch.arange(longest, device=q.device) < lens.unsqueeze(1)  # [n, ctx]
        attended = F.scaled_dot_product_attention(
            q[rows].transpose(0, 1).unsqueeze(0), keys.to(q.dtype).transpose(0, 1).unsqueeze(0),
            values.to(q.dtype).transpose(0, 1).unsqueeze(0), attn_mask=mask, scale=scale, enable_gqa=True)
        out[rows] = attended.squeeze(0).transpose(0, 1)
    return out
