"""One sample being generated: its tokens, its place in the KV cache and its sampling state.

``KVSequence`` is what the scheduler reads and writes (tokens and KV state only); the engine's ``Sequence`` adds
the sampling state and what it reports. Anything else the scheduler should run extends ``KVSequence`` too.
"""

from __future__ import annotations

import enum
from collections.abc import MutableSequence
from dataclasses import KW_ONLY, dataclass, field
from typing import TYPE_CHECKING

from radixserve.cluster.base.generation import TokenLogprob
from radixserve.cluster.base.sampling_params import SamplingParams
from radixserve.worker.kv.radix_cache import TreeNode

if TYPE_CHECKING:  # the sampler brings torch, which the scheduler's users need not load
    from radixserve.worker.sampler import SamplingState


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class KVSequence:
    """A sample of request ``request_id`` as the scheduler sees it. ``token_ids`` is prompt + generated tokens (any
    mutable sequence of ints: the engine's is a list).

    KV state: ``pages`` is the page table; its first ``num_tree_pages`` pages belong to the radix cache and
    are pinned through ``node`` (locked), the rest belong to this sequence. ``num_computed`` tokens have
    their keys/values in those pages; the next step feeds ``token_ids[num_computed:]``.
    ``num_cached_prompt_tokens``: the prompt tokens found cached when it was first admitted.
    """

    request_id: str
    token_ids: MutableSequence[int]
    prompt_len: int
    _: KW_ONLY
    status: SeqStatus = SeqStatus.WAITING
    pages: list[int] = field(default_factory=list)
    num_tree_pages: int = 0
    node: TreeNode | None = None
    num_computed: int = 0
    num_cached_prompt_tokens: int = 0
    num_preemptions: int = 0
    finish_reason: str | None = None

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed


@dataclass(eq=False)
class Sequence(KVSequence):
    """Sample ``index`` of an engine request, with its sampling parameters, sampler state and logprobs."""

    index: int
    params: SamplingParams
    sampling: SamplingState
    logprobs: list[TokenLogprob] = field(default_factory=list)
