"""Turns a scheduled batch into model inputs, runs the model and returns the logits to sample from."""

from __future__ import annotations

import torch

from radixserve.worker.kv.pool import KVPool
from radixserve.worker.models.attention import AttentionBatch, PrefillSpan
from radixserve.worker.models.llama import LlamaForCausalLM
from radixserve.worker.scheduler import ScheduledBatch
from radixserve.worker.sequence import Sequence


class ModelRunner:
    """Runs one forward pass per step over the paged KV pool.

    ``run`` returns fp32 logits [N, vocab] for the N scheduled sequences whose fed tokens reach the end of
    their ``token_ids`` (the others are mid-prompt chunks and sample nothing), with those sequences in order.
    """

    def __init__(self, model: LlamaForCausalLM, kv: KVPool, device: torch.device):
        self.model = model
        self.kv = kv
        self.device = device
        self.page_size = kv.page_size

    def _slots(self, seq: Sequence, start: int, end: int) -> torch.Tensor:
        positions = torch.arange(start, end)
        pages = torch.tensor(seq.pages, dtype=torch.int64)
        return pages[positions // self.page_size] * self.page_size + positions % self.page_size

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> tuple[torch.Tensor, list[Sequence]]:
        token_ids: list[int] = []
        positions: list[torch.Tensor] = []
        slot_mapping: list[torch.Tensor] = []
        decode_contexts: list[torch.Tensor] = []
        prefills: list[PrefillSpan] = []
        sample_rows: list[int] = []
        sampled: list[Sequence] = []
        for seq, num_tokens in batch.items:
            start, end = seq.num_computed, seq.num_computed + num_tokens
            context = self._slots(seq, 0, end)
            q_start = len(token_ids)
            token_ids.extend(seq.token_ids[start:end])
            positions.append(torch.arange(start, end))
            slot_mapping.append(context[start:end])
            if num_tokens == 1:
                decode_contexts.append(context)
            else:
                prefills.append(PrefillSpan(q_start, num_tokens, context, _chunk_mask(start, end)))
            if end == len(seq.token_ids):
                sample_rows.append(len(token_ids) - 1)
                sampled.append(seq)
        decode_slots, decode_bias = _decode_table(decode_contexts, self.device) if decode_contexts else (None, None)
        attn = AttentionBatch(
            slot_mapping=torch.cat(slot_mapping).to(self.device),
            num_decode=len(decode_contexts),
            decode_slots=decode_slots,
            decode_bias=decode_bias,
            prefills=tuple(prefills),
        )
        hidden = self.model(
            torch.tensor(token_ids, dtype=torch.int64, device=self.device),
            torch.cat(positions).to(self.device),
            attn,
            self.kv,
        )
        rows = torch.tensor(sample_rows, dtype=torch.int64, device=self.device)
        return self.model.compute_logits(hidden.index_select(0, rows)), sampled


def _chunk_mask(start: int, end: int) -> torch.Tensor | None:
    """Causal mask of queries [start, end) over keys [0, end); None when the chunk starts at 0."""
    if start == 0:
        return None
    query_pos = torch.arange(start, end).unsqueeze(1)
    return torch.arange(end).unsqueeze(0) <= query_pos


def _decode_table(contexts: list[torch.Tensor], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Slot table [B, max_len] padded with slot 0, and its additive bias [B, 1, 1, max_len] (-inf on padding)."""
    max_len = max(len(c) for c in contexts)
    table = torch.zeros(len(contexts), max_len, dtype=torch.int64)
    bias = torch.full((len(contexts), 1, 1, max_len), float("-inf"))
    for i, context in enumerate(contexts):
        table[i, : len(context)] = context
        bias[i, 0, 0, : len(context)] = 0.0
    return table.to(device), bias.to(device)
