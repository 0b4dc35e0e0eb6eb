"""Attention over a paged KV cache.

A step's new tokens are flattened into one [T] axis: first one token for each decoding sequence, then
the chunks of the sequences being prefilled. Keys and values are written to their cache slots
(``slot = page * page_size + offset``), then each query attends to its sequence's cached context, so a
cached prefix is never recomputed: decode queries read the cache in place through the page table (the
native kernel, int8 caches too), prefill chunks gather their context once (``KVPool.gather``, dequantized from
int8) and use SDPA with a causal mask. With an int8 pool every query, a prefill chunk's too, attends to the
stored (quantized) keys and values, so a token's attention does not depend on whether its context was cached.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from radixserve.worker.kernels import paged_decode_attention, paged_decode_attention_int8
from radixserve.worker.kv.pool import KVPool


@dataclass(frozen=True)
class PrefillSpan:
    """One sequence's prefill chunk: queries ``[q_start, q_start + q_len)`` of the step, attending to
    the ``slots`` of its whole context so far (cached prefix + this chunk), causally."""

    q_start: int
    q_len: int
    slots: torch.Tensor  # [ctx_len] int64
    mask: torch.Tensor | None  # [q_len, ctx_len] bool (True = attend); None when the chunk starts at 0


@dataclass(frozen=True)
class AttentionBatch:
    """Where the step's tokens go in the cache and what each attends to; built once per step."""

    slot_mapping: torch.Tensor  # [T] int64: cache slot of each new token
    num_decode: int
    decode_page_table: torch.Tensor | None  # [num_decode, max_pages] int64, rows padded with page 0
    decode_context_lens: torch.Tensor | None  # [num_decode] int64: tokens each decode query attends to
    page_size: int
    prefills: tuple[PrefillSpan, ...]


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv: KVPool,
    layer: int,
    batch: AttentionBatch,
    scale: float,
) -> torch.Tensor:
    """q [T, Hq, D], k/v [T, Hkv, D] of the step; ``kv``'s caches of ``layer`` [num_slots, Hkv, D]. Returns
    [T, Hq, D].

    Writes k/v into the caches at ``batch.slot_mapping`` first.
    """
    kv.write(layer, batch.slot_mapping, k, v)
    if batch.num_decode:
        decoded = _decode(q[: batch.num_decode], kv, layer, batch, scale)
        if not batch.prefills:  # a decode-only step: no buffer to assemble
            return decoded
    out = torch.empty_like(q)
    if batch.num_decode:
        out[: batch.num_decode] = decoded
    for span in batch.prefills:
        end = span.q_start + span.q_len
        out[span.q_start : end] = _prefill(q[span.q_start : end], kv, layer, span, scale)
    return out


def _decode(q: torch.Tensor, kv: KVPool, layer: int, batch: AttentionBatch, scale: float) -> torch.Tensor:
    if kv.quantized:
        return paged_decode_attention_int8(q, kv.k[layer], kv.v[layer], kv.k_scale[layer], kv.v_scale[layer],
                                           batch.decode_page_table, batch.decode_context_lens, batch.page_size,
                                           scale)
    return paged_decode_attention(q, kv.k[layer], kv.v[layer], batch.decode_page_table, batch.decode_context_lens,
                                  batch.page_size, scale)


def _prefill(q: torch.Tensor, kv: KVPool, layer: int, span: PrefillSpan, scale: float) -> torch.Tensor:
    keys, values = kv.gather(layer, span.slots)  # [ctx, Hkv, D]
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0), keys.transpose(0, 1).unsqueeze(0), values.transpose(0, 1).unsqueeze(0),
        attn_mask=span.mask, is_causal=span.mask is None, scale=scale, enable_gqa=True,
    )  # [1, Hq, q_len, D]
    return out.squeeze(0).transpose(0, 1)
