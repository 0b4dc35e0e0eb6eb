"""Routing policies: given a request and the workers that may take it, pick one.

A policy sees only ``Candidate`` snapshots (matched pages from the prefix index, the router's own load
accounting) and returns an index into them. Candidates are non-empty and all healthy and accepting. Policies are
pure and deterministic given their injected ``random.Random``; only ``round_robin`` keeps state between calls.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

from radixserve.cluster.base.config import POLICIES


@dataclass(frozen=True)
class Candidate:
    """A worker that may take the request, as the router sees it now.

    ``matched_pages``: leading pages of the prompt the worker holds (``PrefixIndex.match``).
    ``num_in_flight``: requests this router has outstanding on the worker; ``num_queued``: the requests the worker
    holds as far as anyone knows (the larger of every router's in flight there, this one's plus what the others
    published, and the worker's own report).
    ``pending_prefill_tokens`` / ``pending_output_tokens``: the work still owed there: uncached prompt tokens of
    requests before their first token, and what is left of every request's output budget (the routers' figures
    or the worker's report, the larger).
    ``active_pages``: the KV pages this router's requests' prompts and outputs will occupy there.
    """

    worker_id: str
    matched_pages: int
    num_in_flight: int
    num_queued: int
    pending_prefill_tokens: int
    pending_output_tokens: int
    active_pages: int

    @property
    def pending_tokens(self) -> int:
        """Prefill and output tokens still owed, counted alike."""
        return self.pending_prefill_tokens + self.pending_output_tokens


@dataclass(frozen=True)
class RouteRequest:
    """What a policy knows of the request: prompt length, output budget, and the pool's page size."""

    num_prompt_tokens: int
    max_tokens: int
    page_size: int


class Policy(ABC):
    """Chooses a candidate for a request."""

    name: ClassVar[str]

    @abstractmethod
    def choose(self, request: RouteRequest, candidates: Sequence[Candidate]) -> int:
        """The index in ``candidates`` (non-empty) of the worker to send ``request`` to."""


def lowest(keys: Sequence[object], rng: random.Random) -> int:
    """The index of the smallest key; ties drawn uniformly from ``rng`` (no draw without a tie)."""
    best = min(keys)
    tied = [i for i, key in enumerate(keys) if key == best]
    return tied[0] if len(tied) == 1 else rng.choice(tied)


def uncached_tokens(request: RouteRequest, candidate: Candidate) -> int:
    """Prompt tokens the candidate would have to prefill: those past its matched pages, and at least one."""
    return max(request.num_prompt_tokens - candidate.matched_pages * request.page_size, 1)


class PrefixPolicy(Policy):
    """Least estimated work before the first token, in prompt tokens' time: ``uncached_tokens + load_weight *
    (pending_prefill_tokens + decode_weight * pending_output_tokens)``: an output token still owed costs
    ``decode_weight`` prompt tokens (a decode step does little work per token: on CPUs one output token takes about
    as long as three prompt tokens of a prefill).

    Ties go to more matched pages, then fewer requests queued, then one drawn uniformly from ``rng``, so that
    idle workers share cold requests evenly.

    A prompt no worker holds a page of (a new prefix) follows the same rule: the least pending work wins, not
    the fewest requests (a worker serving many cached requests of a hot prefix owes little work per request).

    When a hot prefix spreads: a worker holding the prefix keeps winning its requests while its weighted
    pending work exceeds another worker's by at most ``saved / load_weight``, ``saved`` being the prefill it
    saves over that other worker (the difference of their ``uncached_tokens``); past that, the next request goes
    to the other worker. A larger ``load_weight`` spreads sooner; 0 never spreads a cached prefix.
    """

    name = "prefix"

    def __init__(self, load_weight: float, decode_weight: float, rng: random.Random) -> None:
        if not load_weight >= 0:
            raise ValueError(f"load_weight: must be >= 0, got {load_weight}")
        if not decode_weight >= 0:
            raise ValueError(f"decode_weight: must be >= 0, got {decode_weight}")
        self._load_weight = load_weight
        self._decode_weight = decode_weight
        self._rng = rng

    def cost(self, request: RouteRequest, candidate: Candidate) -> float:
        """The estimated work the request would wait on at the candidate, in tokens."""
        pending = candidate.pending_prefill_tokens + self._decode_weight * candidate.pending_output_tokens
        return uncached_tokens(request, candidate) + self._load_weight * pending

    def choose(self, request: RouteRequest, candidates: Sequence[Candidate]) -> int:
        return lowest([(self.cost(request, c), -c.matched_pages, c.num_queued) for c in candidates], self._rng)


class RoundRobinPolicy(Policy):
    """Cycles over worker ids in sorted order: the next id after the last chosen one, wrapping around.

    Stable when the candidate set changes: a worker that leaves is skipped, one that joins takes its place in
    the order, and the cycle goes on from the last chosen id (even if that worker has left).
    """

    name = "round_robin"

    def __init__(self) -> None:
        self._last: str | None = None

    def choose(self, request: RouteRequest, candidates: Sequence[Candidate]) -> int:
        ids = [c.worker_id for c in candidates]
        after = [i for i, worker_id in enumerate(ids) if self._last is None or worker_id > self._last]
        index = min(after or range(len(ids)), key=ids.__getitem__)
        self._last = ids[index]
        return index


class LeastLoadPolicy(Policy):
    """Fewest requests in flight; ties by fewer pending tokens, then drawn uniformly from ``rng``."""

    name = "least_load"

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def choose(self, request: RouteRequest, candidates: Sequence[Candidate]) -> int:
        return lowest([(c.num_in_flight, c.pending_tokens) for c in candidates], self._rng)


class RandomPolicy(Policy):
    """Uniform over the candidates, drawn from the injected ``rng``."""

    name = "random"

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def choose(self, request: RouteRequest, candidates: Sequence[Candidate]) -> int:
        return self._rng.randrange(len(candidates))


class PowerOfTwoPolicy(Policy):
    """Two distinct candidates drawn uniformly from ``rng``; the one with fewer requests in flight wins.

    Ties by fewer pending tokens, then the first drawn. A single candidate is chosen without a draw.
    """

    name = "power_of_two"

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def choose(self, request: RouteRequest, candidates: Sequence[Candidate]) -> int:
        if len(candidates) == 1:
            return 0
        pair = self._rng.sample(range(len(candidates)), 2)
        return min(pair, key=lambda i: (candidates[i].num_in_flight, candidates[i].pending_tokens))


class SglangCacheAwarePolicy(Policy):
    """SGLang's cache-aware routing, written from its documented rules, as a peer baseline.

    Load is the requests in flight from this router. When the load is imbalanced (the busiest worker has more than
    ``balance_abs_threshold`` requests more than the idlest and more than ``balance_rel_threshold`` times as many),
    the least loaded worker wins. Otherwise the worker with the longest matched prefix (ties: less loaded, then
    candidate order) wins if that prefix covers more than ``cache_threshold`` of the prompt's tokens; on a miss, the
    least loaded. Ties among the least loaded are drawn from ``rng`` (SGLang's own rule on a miss, the smallest
    radix tree, also spreads cold requests over idle workers). Defaults are SGLang's: 0.3, 64 and 1.5.
    """

    name = "sglang_cache_aware"

    def __init__(self, rng: random.Random, cache_threshold: float = 0.3, balance_abs_threshold: int = 64,
                 balance_rel_threshold: float = 1.5) -> None:
        self._rng = rng
        self._cache_threshold = cache_threshold
        self._abs = balance_abs_threshold
        self._rel = balance_rel_threshold

    def choose(self, request: RouteRequest, candidates: Sequence[Candidate]) -> int:
        loads = [c.num_in_flight for c in candidates]
        least = lowest(loads, self._rng)
        busiest, idlest = max(loads), min(loads)
        if busiest - idlest > self._abs and busiest > self._rel * idlest:
            return least
        best = min(range(len(candidates)), key=lambda i: (-candidates[i].matched_pages, loads[i]))
        matched_tokens = min(candidates[best].matched_pages * request.page_size, request.num_prompt_tokens)
        return best if matched_tokens > self._cache_threshold * request.num_prompt_tokens else least


class DynamoKvPolicy(Policy):
    """Dynamo's KV router cost, written from its documented rules, as a peer baseline.

    Cost = ``overlap_score_weight`` x prefill blocks + decode blocks; the lowest wins (router temperature 0),
    ties broken uniformly at random from ``rng``. Prefill blocks are the prompt tokens not cached on the worker,
    in pages; decode blocks are the pages the worker's in-flight requests occupy (``active_pages``) plus the
    request's own. Dynamo updates active blocks as tokens are generated; here they are the prompt plus
    ``max_tokens`` from the start.
    """

    name = "dynamo_kv"

    def __init__(self, rng: random.Random, overlap_score_weight: float = 1.0) -> None:
        self._rng = rng
        self._weight = overlap_score_weight

    def cost(self, request: RouteRequest, candidate: Candidate) -> float:
        prefill_blocks = uncached_tokens(request, candidate) / request.page_size
        own_blocks = -(-(request.num_prompt_tokens + request.max_tokens) // request.page_size)
        return self._weight * prefill_blocks + candidate.active_pages + own_blocks

    def choose(self, request: RouteRequest, candidates: Sequence[Candidate]) -> int:
        return lowest([self.cost(request, c) for c in candidates], self._rng)


_FACTORIES: dict[str, Callable[[float, float, random.Random], Policy]] = {
    PrefixPolicy.name: lambda load_weight, decode_weight, rng: PrefixPolicy(load_weight, decode_weight, rng),
    RoundRobinPolicy.name: lambda load_weight, decode_weight, rng: RoundRobinPolicy(),
    LeastLoadPolicy.name: lambda load_weight, decode_weight, rng: LeastLoadPolicy(rng),
    RandomPolicy.name: lambda load_weight, decode_weight, rng: RandomPolicy(rng),
    PowerOfTwoPolicy.name: lambda load_weight, decode_weight, rng: PowerOfTwoPolicy(rng),
    SglangCacheAwarePolicy.name: lambda load_weight, decode_weight, rng: SglangCacheAwarePolicy(rng),
    DynamoKvPolicy.name: lambda load_weight, decode_weight, rng: DynamoKvPolicy(rng),
}


def make_policy(name: str, load_weight: float, decode_weight: float, rng: random.Random) -> Policy:
    """The policy named ``name`` (one of ``cluster.config.POLICIES``); ``load_weight`` and ``decode_weight`` are
    used by ``prefix``."""
    if name not in POLICIES:
        raise ValueError(f"policy: must be one of {POLICIES}, got {name!r}")
    return _FACTORIES[name](load_weight, decode_weight, rng)
