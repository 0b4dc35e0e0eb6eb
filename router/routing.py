"""One routing decision, shared by the router's server and the cluster simulator.

``decide`` asks the prefix index how many leading pages of the prompt each worker holds, pairs that with what
this router has outstanding on each worker (``WorkerLoad``), and lets the policy choose. The caller then records
the request on the chosen worker's ``WorkerLoad`` with the decision's estimates, and ends it when the request
ends. Pure: no I/O, no clock of its own.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import NamedTuple

from radixserve.router.policies import Candidate, Policy, RouteRequest, uncached_tokens
from radixserve.router.prefix_index import PrefixIndex


class WorkerLoad:
    """What this router has outstanding on one worker: requests, the work they still owe, their KV pages.

    ``pending_tokens`` is the work a new request would share the worker with, in tokens: the uncached prompt
    tokens of requests that have not streamed their first token (prefill still ahead) plus the output budget of
    every request in flight (decoding takes a token of every step's budget and slows each step). All methods are
    O(1).
    """

    def __init__(self) -> None:
        self._requests: dict[Hashable, tuple[int, int, int]] = {}  # id -> (prefill, output tokens, pages)
        self.pending_tokens = 0
        self.active_pages = 0

    @property
    def num_in_flight(self) -> int:
        return len(self._requests)

    def begin(self, request_id: Hashable, prefill_tokens: int, output_tokens: int, active_pages: int) -> None:
        """Count a request routed here until ``end(request_id)``; ids must be unique among those in flight."""
        if request_id in self._requests:
            raise ValueError(f"request_id: {request_id!r} is already in flight on this worker")
        self._requests[request_id] = (prefill_tokens, output_tokens, active_pages)
        self.pending_tokens += prefill_tokens + output_tokens
        self.active_pages += active_pages

    def first_token(self, request_id: Hashable) -> None:
        """The request's prefill is done: its prompt leaves ``pending_tokens``. Unknown ids are ignored."""
        entry = self._requests.get(request_id)
        if entry is not None and entry[0]:
            self.pending_tokens -= entry[0]
            self._requests[request_id] = (0, entry[1], entry[2])

    def end(self, request_id: Hashable) -> None:
        """Stop counting the request; unknown ids are ignored (an attempt may end twice)."""
        entry = self._requests.pop(request_id, None)
        if entry is not None:
            self.pending_tokens -= entry[0] + entry[1]
            self.active_pages -= entry[2]


class Decision(NamedTuple):
    """The chosen position in the worker list, its matched pages, and what to ``begin`` there."""

    worker: int
    matched_pages: int
    prefill_tokens: int
    output_tokens: int
    active_pages: int


def decide(policy: Policy, index: PrefixIndex, request: RouteRequest, hashes: Sequence[int],
           worker_ids: Sequence[str], loads: Sequence[WorkerLoad]) -> Decision:
    """The policy's choice among ``worker_ids`` (non-empty; ``loads`` in the same order) for a prompt whose
    page hashes are ``hashes``.

    ``prefill_tokens`` is the prompt tokens not cached on the chosen worker, ``output_tokens`` the request's
    ``max_tokens``, ``active_pages`` the pages of the prompt plus ``max_tokens``, rounded up.
    """
    matched = index.match(hashes, worker_ids)
    candidates = [Candidate(worker_id, matched[worker_id], load.num_in_flight, load.pending_tokens,
                            load.active_pages) for worker_id, load in zip(worker_ids, loads, strict=True)]
    chosen = policy.choose(request, candidates)
    pages = -(-(request.num_prompt_tokens + request.max_tokens) // request.page_size)
    return Decision(chosen, candidates[chosen].matched_pages, uncached_tokens(request, candidates[chosen]),
                    request.max_tokens, pages)
