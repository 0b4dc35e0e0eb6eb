"""Attention over a paged KV cache.

A step's new tokens are flattened into one [T] axis: first one token for each decoding sequence, then
the chunks of the sequences being prefilled. Keys and values are written to their cache slots
(``slot = page * page_size + offset``), then each query attends to its sequence's cached context, so a
cached prefix is never recomputed: decode queries read the cache in place through the page table (the
native kernel), prefill chunks gather their context once and use SDPA with a causal mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from radixserve.worker.kernels import paged_decode_attention


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
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    batch: AttentionBatch,
    scale: float,
) -> torch.Tensor:
    """q [T, Hq, D], k/v [T, Hkv, D]; caches [num_slots, Hkv, D]. Returns [T, Hq, D].

    Writes k/v into the caches at ``batch.slot_mapping`` first.
    """
    k_cache.index_copy_(0, batch.slot_mapping, k)
    v_cache.index_copy_(0, batch.slot_mapping, v)
    if batch.num_decode:
        decoded = paged_decode_attention(q[: batch.num_decode], k_cache, v_cache, batch.decode_page_table,
                                         batch.decode_context_lens, batch.page_size, scale)
        if not batch.prefills:  # a decode-only step: no buffer to assemble
            return decoded
    out = torch.empty_like(q)
    if batch.num_decode:
        out[: batch.num_decode] = decoded
    for span in batch.prefills:
        end = span.q_start + span.q_len
        out[span.q_start : end] = _prefill(q[span.q_start : end], k_cache, v_cache, span, scale)
    return out


def _prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, span: PrefillSpan, scale: float) -> torch.Tensor:
    keys = k_cache.index_select(0, span.slots).transpose(0, 1).unsqueeze(0)  # [1, Hkv, ctx, D]
    values = v_cache.index_select(0, span.slots).transpose(0, 1).unsqueeze(0)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0), keys, values,
        attn_mask=span.mask, is_causal=span.mask is None, scale=scale, enable_gqa=True,
    )  # [1, Hq, q_len, D]
    return out.squeeze(0).transpose(0, 1)
