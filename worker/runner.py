"""Turns a scheduled batch into model inputs, runs the model and returns the logits to sample from."""

from __future__ import annotations

import torch

from radixserve.worker.kv.pool import KVPool
from radixserve.worker.models.attention import AttentionBatch
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

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> tuple[torch.Tensor, list[Sequence]]:
        token_ids: list[int] = []
        positions: list[int] = []
        slot_mapping: list[int] = []
        query_seqs: list[int] = []
        sample_rows: list[int] = []
        sampled: list[Sequence] = []
        for index, (seq, num_tokens) in enumerate(batch.items):
            start, end = seq.num_computed, seq.num_computed + num_tokens
            token_ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            query_seqs.extend([index] * num_tokens)
            slot_mapping.extend(seq.pages[p // self.page_size] * self.page_size + p % self.page_size
                                for p in range(start, end))
            if end == len(seq.token_ids):
                sample_rows.append(len(token_ids) - 1)
                sampled.append(seq)
        position_tensor = torch.tensor(positions, dtype=torch.int64)
        attn = AttentionBatch(
            slot_mapping=torch.tensor(slot_mapping, dtype=torch.int64, device=self.device),
            page_table=_page_table([seq for seq, _ in batch.items], self.device),
            query_seqs=torch.tensor(query_seqs, dtype=torch.int64, device=self.device),
            context_lens=(position_tensor + 1).to(self.device),
            page_size=self.page_size,
        )
        hidden = self.model(torch.tensor(token_ids, dtype=torch.int64, device=self.device),
                            position_tensor.to(self.device), attn, self.kv)
        rows = torch.tensor(sample_rows, dtype=torch.int64, device=self.device)
        return self.model.compute_logits(hidden.index_select(0, rows)), sampled


def _page_table(seqs: list[Sequence], device: torch.device) -> torch.Tensor:
    """The sequences' pages [S, max_pages] int64, rows padded with page 0."""
    max_pages = max(len(seq.pages) for seq in seqs)
    return torch.tensor([seq.pages + [0] * (max_pages - len(seq.pages)) for seq in seqs], dtype=torch.int64,
                        device=device)
