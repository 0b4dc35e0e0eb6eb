"""KvEventSequencer against a model worker: any delivery order of its batches leaves the prefix index equal to
the worker's cache as of the last batch applied, or asks for a resync; a fresh snapshot always mends it."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from radixserve.router.kv_events import BatchOutcome, KvEventSequencer
from radixserve.router.prefix_index import PrefixIndex
from radixserve.v1 import worker_pb2

WORKER = "w0"
INCARNATION = "inc-1"
PAGES = range(1, 13)  # few pages, so batches store and remove the same ones often
STORED, REMOVED = worker_pb2.KvEvent.STORED, worker_pb2.KvEvent.REMOVED


@dataclass(frozen=True)
class History:
    """A worker's published batches (``batches[k - 1]`` has sequence k) and its cache after each
    (``caches[k]``; ``caches[0]`` is the cache before any batch)."""

    batches: tuple[worker_pb2.KvEventBatch, ...]
    caches: tuple[frozenset[int], ...]

    @property
    def last(self) -> int:
        return len(self.batches)

    def snapshot(self, sequence: int, incarnation: str = INCARNATION) -> worker_pb2.KvEventBatch:
        """The reset batch a subscriber joining after batch ``sequence`` receives."""
        return batch(sequence, [(STORED, self.caches[sequence])], reset=True, incarnation=incarnation)


def batch(sequence: int, events: list[tuple[int, frozenset[int]]], reset: bool = False,
          incarnation: str = INCARNATION) -> worker_pb2.KvEventBatch:
    return worker_pb2.KvEventBatch(
        worker_id=WORKER, incarnation=incarnation, sequence=sequence, reset=reset,
        events=[worker_pb2.KvEvent(kind=kind, page_hashes=sorted(pages)) for kind, pages in events if pages])


@st.composite
def histories(draw: st.DrawFn) -> History:
    """Batches of one to three events each: a drawn page set is stored where absent and removed where held."""
    cache: frozenset[int] = frozenset()
    caches, batches = [cache], []
    for sequence in range(1, draw(st.integers(0, 10)) + 1):
        events = []
        for _ in range(draw(st.integers(1, 3))):
            pages = frozenset(draw(st.sets(st.sampled_from(PAGES), min_size=1, max_size=4)))
            events += [(STORED, pages - cache), (REMOVED, pages & cache)]
            cache = cache ^ pages
        caches.append(cache)
        batches.append(batch(sequence, events))
    return History(tuple(batches), tuple(caches))


def deliverable(history: History) -> st.SearchStrategy[worker_pb2.KvEventBatch]:
    """Any batch the router could be handed: a live batch, a snapshot at any point, or another incarnation's."""
    return st.one_of(
        st.sampled_from(history.batches) if history.batches else st.nothing(),
        st.integers(0, history.last).map(history.snapshot),
        st.integers(0, history.last).map(lambda k: history.snapshot(k, incarnation="inc-0")))


def following() -> tuple[PrefixIndex, KvEventSequencer]:
    index = PrefixIndex(30.0, 300.0, clock=lambda: 0.0)
    sequencer = KvEventSequencer(index)
    sequencer.follow(WORKER, INCARNATION)
    return index, sequencer


def held(index: PrefixIndex) -> frozenset[int]:
    return frozenset(page for page in PAGES if index.match([page], [WORKER])[WORKER])


@settings(max_examples=400, deadline=None)
@given(data=st.data(), history=histories())
def test_any_delivery_leaves_the_worker_as_of_the_cursor_or_asks_for_a_resync(data: st.DataObject,
                                                                               history: History) -> None:
    index, sequencer = following()
    resync_asked = False
    cursor = -1
    for item in data.draw(st.lists(deliverable(history), max_size=30)):
        outcome = sequencer.apply(item)
        if outcome is BatchOutcome.GAP:
            resync_asked = True
        elif outcome is BatchOutcome.APPLIED and item.reset:
            resync_asked = False
        sequence = sequencer.sequence(WORKER)
        assert (-1 if sequence is None else sequence) >= cursor, "the cursor moved back"
        cursor = -1 if sequence is None else sequence
        if sequencer.is_live(WORKER):
            assert sequence is not None and held(index) == history.caches[sequence]
        else:
            assert resync_asked or sequencer.sequence(WORKER) is None
    assert sequencer.apply(history.snapshot(history.last)) is BatchOutcome.APPLIED  # what a resync brings
    assert sequencer.is_live(WORKER) and held(index) == history.caches[history.last]


@settings(max_examples=300, deadline=None)
@given(data=st.data(), history=histories())
def test_an_in_order_stream_with_late_duplicates_and_stale_snapshots_ends_equal_without_a_resync(
        data: st.DataObject, history: History) -> None:
    """A subscription's stream (its snapshot, then every later batch) with anything already passed mixed in."""
    index, sequencer = following()
    start = data.draw(st.integers(0, history.last), label="subscribed after batch")
    for due in (history.snapshot(start), *history.batches[start:]):
        assert sequencer.apply(due) is BatchOutcome.APPLIED
        passed = [*history.batches[:due.sequence], *map(history.snapshot, range(due.sequence + 1))]
        for late in data.draw(st.lists(st.sampled_from(passed), max_size=3), label="late"):
            assert sequencer.apply(late) in (BatchOutcome.DUPLICATE, BatchOutcome.STALE, BatchOutcome.APPLIED)
        assert held(index) == history.caches[due.sequence]
    assert sequencer.is_live(WORKER) and sequencer.sequence(WORKER) == history.last


def test_a_late_stored_after_removed_and_an_old_snapshot_do_not_resurrect_a_page() -> None:
    index, sequencer = following()
    stored, removed = batch(1, [(STORED, frozenset({7}))]), batch(2, [(REMOVED, frozenset({7}))])
    first = batch(0, [], reset=True)
    for item in (first, stored, removed):
        assert sequencer.apply(item) is BatchOutcome.APPLIED
    assert sequencer.apply(stored) is BatchOutcome.DUPLICATE
    assert sequencer.apply(batch(1, [(STORED, frozenset({7}))], reset=True)) is BatchOutcome.STALE
    assert held(index) == frozenset() and sequencer.sequence(WORKER) == 2


def test_a_gap_asks_for_a_resync_and_live_batches_wait_for_the_snapshot() -> None:
    index, sequencer = following()
    assert sequencer.apply(batch(1, [(STORED, frozenset({1}))])) is BatchOutcome.AWAITING_SNAPSHOT
    assert sequencer.apply(batch(1, [(STORED, frozenset({1}))], reset=True)) is BatchOutcome.APPLIED
    assert sequencer.apply(batch(3, [(STORED, frozenset({3}))])) is BatchOutcome.GAP
    assert not sequencer.is_live(WORKER)
    assert sequencer.apply(batch(2, [(STORED, frozenset({2}))])) is BatchOutcome.AWAITING_SNAPSHOT
    assert sequencer.apply(batch(3, [(STORED, frozenset({1, 2, 3}))], reset=True)) is BatchOutcome.APPLIED
    assert sequencer.is_live(WORKER) and held(index) == {1, 2, 3}


def test_a_new_incarnation_starts_empty_and_the_old_ones_batches_are_stale() -> None:
    index, sequencer = following()
    sequencer.apply(batch(4, [(STORED, frozenset({1, 2}))], reset=True))
    sequencer.follow(WORKER, "inc-2")
    assert held(index) == frozenset() and not sequencer.is_live(WORKER) and sequencer.sequence(WORKER) is None
    assert sequencer.apply(batch(5, [(STORED, frozenset({3}))])) is BatchOutcome.STALE
    assert sequencer.apply(batch(0, [], reset=True, incarnation="inc-2")) is BatchOutcome.APPLIED
    sequencer.forget(WORKER)
    assert sequencer.apply(batch(1, [(STORED, frozenset({3}))], incarnation="inc-2")) is BatchOutcome.STALE
    assert held(index) == frozenset()
