"""One sample being generated: its tokens, its place in the KV cache and its sampling state."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from radixserve.worker.kv.radix_cache import TreeNode
from radixserve.worker.sampler import SamplingState
from radixserve.cluster.base.sampling_params import SamplingParams


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(frozen=True)
class TokenLogprob:
    """The chosen token's log-probability under the raw model distribution, and the top alternatives."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(eq=False)
class Sequence:
    """A sample of a request. ``token_ids`` is prompt + generated tokens.

    KV state: ``pages`` is the page table; its first ``num_tree_pages`` pages belong to the radix cache and
    are pinned through ``node`` (locked), the rest belong to this sequence. ``num_computed`` tokens have
    their keys/values in those pages; the next step feeds ``token_ids[num_computed:]``.
    """

    request_id: str
    index: int
    token_ids: list[int]
    prompt_len: int
    params: SamplingParams
    sampling: SamplingState
    status: SeqStatus = SeqStatus.WAITING
    pages: list[int] = field(default_factory=list)
    num_tree_pages: int = 0
    node: TreeNode | None = None
    num_computed: int = 0
    num_cached_prompt_tokens: int = 0
    num_preemptions: int = 0
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed

