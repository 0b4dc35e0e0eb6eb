from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from radixserve.cluster.base.hashing import namespace_seed, page_hashes
from radixserve.router.prefix_index import PrefixIndex

SEED = namespace_seed("test-model")
PENDING_TTL = 3.0
APPROX_TTL = 10.0
WORKERS = ("w0", "w1", "w2")

prompts = st.lists(st.integers(0, 1), min_size=1, max_size=4)  # few pages, so prompts often share them
workers = st.sampled_from(WORKERS)


def chain(tokens: list[int]) -> list[int]:
    """Page hashes of ``tokens`` with one token a page."""
    return page_hashes(tokens, 1, SEED)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class NoSlackIndex(PrefixIndex):
    """Reclaims only twice the pages recorded, so reclamation often stops with expired entries left."""

    _PURGE_BATCH = 0


def make() -> tuple[FakeClock, PrefixIndex]:
    clock = FakeClock()
    return clock, PrefixIndex(PENDING_TTL, APPROX_TTL, clock)


class IndexMachine(RuleBasedStateMachine):
    """PrefixIndex against brute force: a set of pages per worker and a routed (worker, page) -> expiry dict."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.index = NoSlackIndex(PENDING_TTL, APPROX_TTL, self.clock)
        self.exact: dict[str, set[int]] = {}
        self.routed: dict[tuple[str, int], float] = {}
        self.live: set[str] = set()
        self.parent: dict[int, int] = {}  # page -> the page before it
        self.queries: set[tuple[int, ...]] = set()  # every chain seen

    def remember(self, tokens: list[int]) -> list[int]:
        hashes = chain(tokens)
        self.parent.update(zip(hashes[1:], hashes))
        self.queries.add(tuple(hashes))
        return hashes

    def held(self, worker: str, page: int) -> bool:
        return page in self.exact.get(worker, set()) or self.routed.get((worker, page), -1.0) > self.clock.now

    def forget_routed(self, worker: str, pages: set[int] | None = None) -> None:
        for key in [k for k in self.routed if k[0] == worker and (pages is None or k[1] in pages)]:
            del self.routed[key]

    @rule(worker=workers, tokens=prompts)
    def store(self, worker: str, tokens: list[int]) -> None:
        """The worker caches a prompt: a stored event for the pages past those it held."""
        hashes = self.remember(tokens)
        exact = self.exact.setdefault(worker, set())
        new = [h for h in hashes if h not in exact]
        exact.update(new)
        self.index.apply_stored(worker, new)

    def pages_of(self, worker: str) -> set[int]:
        """Pages the model has for the worker, exact or routed (expired or not)."""
        return self.exact.get(worker, set()) | {h for w, h in self.routed if w == worker}

    @precondition(lambda self: any(self.exact.values()) or self.routed)
    @rule(data=st.data())
    def evict(self, data: st.DataObject) -> None:
        """A removed event for a page and every page below it that the index may have for the worker."""
        worker = data.draw(st.sampled_from([w for w in WORKERS if self.pages_of(w)]))
        top = data.draw(st.sampled_from(sorted(self.pages_of(worker))))
        removed = {h for h in self.pages_of(worker) if self.descends(h, top)}
        self.exact[worker] = self.exact.get(worker, set()) - removed
        self.forget_routed(worker, removed)
        self.index.apply_removed(worker, removed)

    def descends(self, page: int, top: int) -> bool:
        while page != top and page in self.parent:
            page = self.parent[page]
        return page == top

    @rule(worker=workers, snapshot=st.lists(prompts, max_size=3))
    def reset(self, worker: str, snapshot: list[list[int]]) -> None:
        pages = {h for tokens in snapshot for h in self.remember(tokens)}
        self.exact[worker] = pages
        self.forget_routed(worker)
        self.index.reset(worker, pages)

    @rule(worker=workers)
    def remove_worker(self, worker: str) -> None:
        self.exact.pop(worker, None)
        self.forget_routed(worker)
        self.live.discard(worker)
        self.index.remove_worker(worker)

    @rule(worker=workers, tokens=prompts)
    def record_routed(self, worker: str, tokens: list[int]) -> None:
        expiry = self.clock.now + (PENDING_TTL if worker in self.live else APPROX_TTL)
        hashes = self.remember(tokens)
        for page in hashes:
            self.routed[worker, page] = max(self.routed.get((worker, page), expiry), expiry)
        self.index.record_routed(worker, hashes)

    @rule(worker=workers, tokens=prompts)
    def withdraw_routed(self, worker: str, tokens: list[int]) -> None:
        hashes = self.remember(tokens)
        self.forget_routed(worker, set(hashes))
        self.index.withdraw_routed(worker, hashes)

    @rule(worker=workers, live=st.booleans())
    def set_events_live(self, worker: str, live: bool) -> None:
        (self.live.add if live else self.live.discard)(worker)
        self.index.set_events_live(worker, live)

    @rule(seconds=st.sampled_from([0.5, 1.0, 3.0, 7.0, 10.0]))
    def advance(self, seconds: float) -> None:
        self.clock.now += seconds

    @invariant()
    def matches_the_model(self) -> None:
        """``match`` first: ``num_pages`` reclaims every expired entry, ``match`` must skip them unreclaimed."""
        listed = [*WORKERS, "unknown"]
        for hashes in self.queries:
            expected = {w: next((k for k, h in enumerate(hashes) if not self.held(w, h)), len(hashes)) for w in listed}
            assert self.index.match(hashes, listed) == expected
        for worker in WORKERS:
            routed = {h for (w, h), expiry in self.routed.items() if w == worker and expiry > self.clock.now}
            assert self.index.num_pages(worker) == len(self.exact.get(worker, set()) | routed)


TestIndexMachine = IndexMachine.TestCase
TestIndexMachine.settings = settings(max_examples=300, stateful_step_count=50, deadline=None)


def test_routed_pages_expire_after_the_pending_ttl_while_events_are_live() -> None:
    clock, index = make()
    hashes = chain([1, 2, 3])
    index.set_events_live("w0", True)
    index.record_routed("w0", hashes)
    clock.now = PENDING_TTL - 0.01
    assert index.match(hashes, ["w0"]) == {"w0": 3}
    clock.now = PENDING_TTL
    assert index.match(hashes, ["w0"]) == {"w0": 0}


def test_routed_pages_last_the_approx_ttl_while_events_are_not_flowing() -> None:
    clock, index = make()
    hashes = chain([1, 2])
    index.record_routed("w0", hashes)
    clock.now = APPROX_TTL - 0.01
    assert index.match(hashes, ["w0"]) == {"w0": 2} and index.num_pages("w0") == 2
    clock.now = APPROX_TTL
    assert index.match(hashes, ["w0"]) == {"w0": 0} and index.num_pages("w0") == 0


def test_recording_again_never_shortens_an_expiry() -> None:
    clock, index = make()
    hashes = chain([1, 2])
    index.record_routed("w0", hashes)  # events not flowing: held until APPROX_TTL
    index.set_events_live("w0", True)
    clock.now = 1.0
    index.record_routed("w0", hashes[:1])  # 1 + PENDING_TTL is earlier: kept
    clock.now = 1.0 + PENDING_TTL
    assert index.match(hashes, ["w0"]) == {"w0": 2}
    clock.now = APPROX_TTL - 1.0
    index.record_routed("w0", hashes)  # now + PENDING_TTL is later: moved
    clock.now = APPROX_TTL + 1.0
    assert index.match(hashes, ["w0"]) == {"w0": 2}
    clock.now = APPROX_TTL - 1.0 + PENDING_TTL
    assert index.match(hashes, ["w0"]) == {"w0": 0}


def test_a_stored_event_makes_routed_pages_exact_and_they_stop_expiring() -> None:
    clock, index = make()
    hashes = chain([4, 5, 6])
    index.set_events_live("w0", True)
    index.record_routed("w0", hashes)
    index.apply_stored("w0", hashes[:2])
    clock.now = 100.0
    assert index.match(hashes, ["w0", "w1"]) == {"w0": 2, "w1": 0}
    assert index.num_pages("w0") == 2


def test_match_stops_at_the_first_page_a_worker_lacks() -> None:
    _, index = make()
    long, other = chain([1, 2, 3, 4]), chain([1, 2, 9])
    index.apply_stored("w0", long)
    index.apply_stored("w1", other)
    assert index.match(long, ["w0", "w1", "w2"]) == {"w0": 4, "w1": 2, "w2": 0}
    assert index.match(other, ["w0"]) == {"w0": 2}


def test_record_routed_reclaims_a_bounded_number_of_expired_entries() -> None:
    clock, index = make()
    index.record_routed("w0", chain(list(range(1000))))
    clock.now = APPROX_TTL
    index.record_routed("w1", chain([7]))
    backlog = sum(len(fifo) for fifo in index._fifos.values())
    assert backlog == 1000 + 1 - (2 + PrefixIndex._PURGE_BATCH)
    assert index.num_pages("w0") == 0
    assert sum(len(fifo) for fifo in index._fifos.values()) == 1
    assert not index._routed["w0"] and set(index._routed_holders) == set(chain([7]))


def test_apply_removed_clears_routed_pages_and_ignores_unknown_ones() -> None:
    _, index = make()
    hashes = chain([1, 2, 3])
    index.record_routed("w0", hashes)
    index.apply_removed("w0", [hashes[2], 12345])
    index.apply_removed("w9", hashes)
    assert index.match(hashes, ["w0"]) == {"w0": 2}


def test_withdrawing_routed_pages_keeps_exact_ones_and_other_workers() -> None:
    _, index = make()
    held, refused = chain([1, 2]), chain([1, 2, 3, 4])
    index.apply_stored("w0", held)
    for worker in ("w0", "w1"):
        index.record_routed(worker, refused)
    index.withdraw_routed("w0", refused)
    assert index.match(refused, ["w0", "w1"]) == {"w0": 2, "w1": 4}
    assert index.num_pages("w0") == 2


@pytest.mark.parametrize("name, value", [("pending_ttl_s", 0.0), ("approx_ttl_s", -1.0)])
def test_non_positive_ttls_are_rejected_by_name(name: str, value: float) -> None:
    ttls = {"pending_ttl_s": 1.0, "approx_ttl_s": 1.0, name: value}
    with pytest.raises(ValueError, match=name):
        PrefixIndex(**ttls)
