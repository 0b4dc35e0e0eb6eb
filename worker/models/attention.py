"""Attention over a paged KV cache.

A step's new tokens are flattened into one [T] axis: one token for each decoding sequence, and the chunks of the
sequences being prefilled. Keys and values are written to their cache slots (``slot = page * page_size + offset``,
``KVPool.write``, quantized for an int8 pool), then every query attends to its sequence's cached context, itself
included, read in place through the page table (``kernels.paged_attention``), so a cached prefix is never
recomputed. Decode tokens and prompt tokens take the same kernel, which computes each (query, head) in one fixed
order: a token's attention is the same bits whether its context was cached, chunked or batched with others.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from radixserve.worker.kernels import paged_attention as attend
from radixserve.worker.kv.pool import KVPool


@dataclass(frozen=True)
class AttentionBatch:
    """Where the step's tokens go in the cache and what each attends to; built once per step. Query ``t`` belongs
    to sequence ``query_seqs[t]`` (a row of ``page_table``) and attends to that sequence's first ``context_lens[t]``
    tokens."""

    slot_mapping: torch.Tensor  # [T] int64: cache slot of each new token
    page_table: torch.Tensor  # [S, max_pages] int64: each sequence's pages, rows padded with page 0
    query_seqs: torch.Tensor  # [T] int64
    context_lens: torch.Tensor  # [T] int64: a token at position p attends to p + 1 tokens
    page_size: int


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv: KVPool, layer: int, batch: AttentionBatch,
                    scale: float) -> torch.Tensor:
    """q [T, Hq, D], k/v [T, Hkv, D] of the step; ``kv``'s caches of ``layer``. Writes k/v into the caches at
    ``batch.slot_mapping`` first. Returns [T, Hq, D]."""
    kv.write(layer, batch.slot_mapping, k, v)
    scales = (kv.k_scale[layer], kv.v_scale[layer]) if kv.quantized else (None, None)
    return attend(q, kv.k[layer], kv.v[layer], *scales, batch.page_table, batch.query_seqs, batch.context_lens,
                  batch.page_size, scale)
