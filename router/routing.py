"""One routing decision, shared by the router's server and the cluster simulator.

``decide`` asks the prefix index how many leading pages of the prompt each worker holds, pairs that with what
this router has outstanding on each worker (``WorkerLoad``), what the other routers last published of theirs
there (shared load, a ``ReportedLoad`` summed over them) and what each worker last reported of its own queue
(``ReportedLoad``: every router's and direct traffic included), and lets the policy choose. The caller then
records the request on the chosen worker's ``WorkerLoad`` with the decision's estimates, reports its progress,
and ends it when the request ends. Pure: no I/O, no clock of its own.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import NamedTuple

from radixserve.router.policies import Candidate, Policy, RouteRequest, uncached_tokens
from radixserve.router.prefix_index import PrefixIndex


class WorkerLoad:
    """What this router has outstanding on one worker: requests, the work they still owe, their KV pages.

    The work a new request would share the worker with: ``pending_prefill_tokens``, the uncached prompt tokens of
    requests that have not streamed their first token (prefill still ahead), and ``pending_output_tokens``, what
    is left of the output budget of every request in flight (decoding takes a token of every step's budget and
    slows each step): its ``max_tokens`` less the tokens it streamed so far (``progress``). All methods are O(1).
    """

    def __init__(self) -> None:
        self._requests: dict[Hashable, tuple[int, int, int]] = {}  # id -> (prefill, output tokens, pages)
        self.pending_prefill_tokens = 0
        self.pending_output_tokens = 0
        self.active_pages = 0

    @property
    def pending_tokens(self) -> int:
        """Prefill and output tokens still owed, counted alike."""
        return self.pending_prefill_tokens + self.pending_output_tokens

    @property
    def num_in_flight(self) -> int:
        return len(self._requests)

    def begin(self, request_id: Hashable, prefill_tokens: int, output_tokens: int, active_pages: int) -> None:
        """Count a request routed here until ``end(request_id)``; ids must be unique among those in flight."""
        if request_id in self._requests:
            raise ValueError(f"request_id: {request_id!r} is already in flight on this worker")
        self._requests[request_id] = (prefill_tokens, output_tokens, active_pages)
        self.pending_prefill_tokens += prefill_tokens
        self.pending_output_tokens += output_tokens
        self.active_pages += active_pages

    def first_token(self, request_id: Hashable) -> None:
        """The request's prefill is done: its prompt leaves ``pending_prefill_tokens``. Unknown ids are ignored."""
        entry = self._requests.get(request_id)
        if entry is not None and entry[0]:
            self.pending_prefill_tokens -= entry[0]
            self._requests[request_id] = (0, entry[1], entry[2])

    def progress(self, request_id: Hashable, num_tokens: int) -> None:
        """The request streamed ``num_tokens`` more tokens: they leave ``pending_output_tokens`` (never below what
        the request brought). Unknown ids are ignored."""
        entry = self._requests.get(request_id)
        if entry is not None:
            done = min(num_tokens, entry[1])
            self.pending_output_tokens -= done
            self._requests[request_id] = (entry[0], entry[1] - done, entry[2])

    def end(self, request_id: Hashable) -> None:
        """Stop counting the request; unknown ids are ignored (an attempt may end twice)."""
        entry = self._requests.pop(request_id, None)
        if entry is not None:
            self.pending_prefill_tokens -= entry[0]
            self.pending_output_tokens -= entry[1]
            self.active_pages -= entry[2]


class ReportedLoad(NamedTuple):
    """What a worker last reported of its queue, whoever sent the requests: how many, and the prefill and output
    tokens they still owe (its ``LoadReport``)."""

    num_requests: int
    pending_prefill_tokens: int
    pending_output_tokens: int


NO_REPORT = ReportedLoad(0, 0, 0)


class Decision(NamedTuple):
    """The chosen position in the worker list, its matched pages, and what to ``begin`` there."""

    worker: int
    matched_pages: int
    prefill_tokens: int
    output_tokens: int
    active_pages: int


def decide(policy: Policy, index: PrefixIndex, request: RouteRequest, hashes: Sequence[int],
           worker_ids: Sequence[str], loads: Sequence[WorkerLoad],
           reports: Sequence[ReportedLoad] | None = None, peers: Sequence[ReportedLoad] | None = None) -> Decision:
    """The policy's choice among ``worker_ids`` (non-empty; ``loads``, ``reports`` and ``peers`` in the same
    order) for a prompt whose page hashes are ``hashes``.

    A candidate's queue and pending work are the larger of the routers' figures (this router's own, current, plus
    what the other routers published, ``peers``) and the worker's report: the report is up to a poll interval
    old but counts traffic no router sent; the routers' figures count requests not yet at the worker.
    ``prefill_tokens`` is the prompt tokens not cached on the chosen worker, ``output_tokens`` the request's
    ``max_tokens``, ``active_pages`` the pages of the prompt plus ``max_tokens``, rounded up.
    """
    matched = index.match(hashes, worker_ids)
    reports = reports if reports is not None else [NO_REPORT] * len(worker_ids)
    peers = peers if peers is not None else [NO_REPORT] * len(worker_ids)
    candidates = [_candidate(worker_id, matched[worker_id], load, report, peer)
                  for worker_id, load, report, peer in zip(worker_ids, loads, reports, peers, strict=True)]
    chosen = policy.choose(request, candidates)
    pages = -(-(request.num_prompt_tokens + request.max_tokens) // request.page_size)
    return Decision(chosen, candidates[chosen].matched_pages, uncached_tokens(request, candidates[chosen]),
                    request.max_tokens, pages)


def _candidate(worker_id: str, matched_pages: int, load: WorkerLoad, report: ReportedLoad,
               peer: ReportedLoad) -> Candidate:
    return Candidate(worker_id, matched_pages, load.num_in_flight,
                     max(load.num_in_flight + peer.num_requests, report.num_requests),
                     max(load.pending_prefill_tokens + peer.pending_prefill_tokens, report.pending_prefill_tokens),
                     max(load.pending_output_tokens + peer.pending_output_tokens, report.pending_output_tokens),
                     load.active_pages)
