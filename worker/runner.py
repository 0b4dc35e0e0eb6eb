"""Turns a scheduled batch into model inputs, runs the model and returns the logits to sample from."""

from __future__ import annotations

import torch

from radixserve.worker.kv.pool import KVPool
from radixserve.worker.models import forward_context
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

    def _slots(self, seq: Sequence, end: int) -> torch.Tensor:
        """Cache slots of the sequence's positions [0, end)."""
        positions = torch.arange(end)
        pages = torch.tensor(seq.pages, dtype=torch.int64)
        return pages[positions // self.page_size] * self.page_size + positions % self.page_size

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> tuple[torch.Tensor, list[Sequence]]:
        token_ids: list[int] = []
        positions: list[int] = []
        generated: list[bool] = []  # at or past the prompt (models.forward_context)
        slot_mapping: list[int] = []
        decode_seqs: list[Sequence] = []
        prefills: list[PrefillSpan] = []
        sample_rows: list[int] = []
        sampled: list[Sequence] = []
        for seq, num_tokens in batch.items:
            start, end = seq.num_computed, seq.num_computed + num_tokens
            q_start = len(token_ids)
            token_ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            generated.extend(position >= seq.prompt_len for position in range(start, end))
            if num_tokens == 1:
                decode_seqs.append(seq)
                slot_mapping.append(seq.pages[start // self.page_size] * self.page_size + start % self.page_size)
            else:
                context = self._slots(seq, end)
                slot_mapping.extend(context[start:end].tolist())
                prefills.append(PrefillSpan(q_start, num_tokens, context.to(self.device), _chunk_mask(start, end)))
            if end == len(seq.token_ids):
                sample_rows.append(len(token_ids) - 1)
                sampled.append(seq)
        page_table, context_lens = _decode_tables(decode_seqs, self.device) if decode_seqs else (None, None)
        attn = AttentionBatch(
            slot_mapping=torch.tensor(slot_mapping, dtype=torch.int64, device=self.device),
            num_decode=len(decode_seqs),
            decode_page_table=page_table,
            decode_context_lens=context_lens,
            page_size=self.page_size,
            prefills=tuple(prefills),
        )
        token_generated = torch.tensor(generated, dtype=torch.bool)
        with forward_context.generated_rows(token_generated):
            hidden = self.model(
                torch.tensor(token_ids, dtype=torch.int64, device=self.device),
                torch.tensor(positions, dtype=torch.int64, device=self.device),
                attn,
                self.kv,
            )
        rows = torch.tensor(sample_rows, dtype=torch.int64, device=self.device)
        with forward_context.generated_rows(token_generated[rows.cpu()]):
            return self.model.compute_logits(hidden.index_select(0, rows)), sampled


def _chunk_mask(start: int, end: int) -> torch.Tensor | None:
    """Causal mask of queries [start, end) over keys [0, end); None when the chunk starts at 0."""
    if start == 0:
        return None
    query_pos = torch.arange(start, end).unsqueeze(1)
    return torch.arange(end).unsqueeze(0) <= query_pos


def _decode_tables(seqs: list[Sequence], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Page table [B, max_pages] (rows padded with page 0) and context lengths [B] of the decoding sequences."""
    max_pages = max(len(seq.pages) for seq in seqs)
    table = torch.tensor([seq.pages + [0] * (max_pages - len(seq.pages)) for seq in seqs], dtype=torch.int64)
    lengths = torch.tensor([seq.num_computed + 1 for seq in seqs], dtype=torch.int64)
    return table.to(device), lengths.to(device)
