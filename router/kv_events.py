"""Applying workers' KV event batches to the prefix index in order, whatever order they arrive in.

A worker numbers its batches as it publishes them, per incarnation (``KvEventBatch.sequence``): live batches
1, 2, ...; a reset batch (a snapshot of the whole cache, sent to each new subscriber) carries the sequence of
the last batch folded into it. The same batch can reach a router twice (one router's resubscription, several
routers republishing on a shared bus), late, or not at all; ``KvEventSequencer`` keeps one cursor per worker,
the sequence of the last batch applied, so that the index always equals the worker's cache as of that batch:

* a reset with ``sequence >= cursor`` replaces what the index knew of the worker and moves the cursor there;
  an older one is stale and dropped;
* a live batch at or below the cursor is a duplicate and dropped; the next one (``cursor + 1``) is applied;
  one beyond it means batches were lost: the outcome is ``GAP``, and the caller must resubscribe (the worker
  answers with a fresh snapshot). Until a snapshot arrives, live batches are dropped.

Pure: no I/O, no clock; the router's worker set and the simulator can drive it alike.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from radixserve.router.prefix_index import PrefixIndex
from radixserve.v1 import worker_pb2


class BatchOutcome(enum.Enum):
    APPLIED = "applied"
    DUPLICATE = "duplicate"  # a live batch at or below the cursor
    STALE = "stale"  # a reset older than the cursor, or a worker / incarnation not followed
    AWAITING_SNAPSHOT = "awaiting_snapshot"  # a live batch while no snapshot is in force
    GAP = "gap"  # batches were lost: resubscribe


@dataclass
class _Cursor:
    incarnation: str
    sequence: int = -1  # of the last batch applied; -1 before the first snapshot
    synced: bool = False  # a snapshot is in force and no batch was lost since


class KvEventSequencer:
    """Feeds ``index`` each followed worker's KV event batches in sequence order; see the module docstring."""

    def __init__(self, index: PrefixIndex) -> None:
        self._index = index
        self._cursors: dict[str, _Cursor] = {}

    def follow(self, worker_id: str, incarnation: str) -> None:
        """Follow (a new incarnation of) the worker: the index forgets it and its batches wait for a snapshot.

        Batches of any other incarnation are stale from now on.
        """
        self._cursors[worker_id] = _Cursor(incarnation)
        self._index.reset(worker_id)
        self._index.set_events_live(worker_id, False)

    def forget(self, worker_id: str) -> None:
        """Stop following the worker; the index forgets it and its batches are stale."""
        self._cursors.pop(worker_id, None)
        self._index.remove_worker(worker_id)

    def resync(self, worker_id: str) -> None:
        """The caller asked the worker for a fresh snapshot: live batches wait for it.

        What the index knows of the worker stays until then, as approximate (its events are not live).
        """
        cursor = self._cursors.get(worker_id)
        if cursor is not None:
            cursor.synced = False
            self._index.set_events_live(worker_id, False)

    def is_live(self, worker_id: str) -> bool:
        """Whether the worker's events are in step: a snapshot was applied and no batch was lost since."""
        cursor = self._cursors.get(worker_id)
        return cursor is not None and cursor.synced

    def sequence(self, worker_id: str) -> int | None:
        """The sequence of the last batch applied for the worker; None before its first snapshot."""
        cursor = self._cursors.get(worker_id)
        return None if cursor is None or cursor.sequence < 0 else cursor.sequence

    def apply(self, batch: worker_pb2.KvEventBatch) -> BatchOutcome:
        """Apply ``batch`` to the index if it is the one due; says what became of it."""
        cursor = self._cursors.get(batch.worker_id)
        if cursor is None or batch.incarnation != cursor.incarnation:
            return BatchOutcome.STALE
        if batch.reset:
            return self._apply_reset(batch, cursor)
        if not cursor.synced:
            return BatchOutcome.AWAITING_SNAPSHOT
        if batch.sequence <= cursor.sequence:
            return BatchOutcome.DUPLICATE
        if batch.sequence > cursor.sequence + 1:
            self.resync(batch.worker_id)
            return BatchOutcome.GAP
        for event in batch.events:
            if event.kind == worker_pb2.KvEvent.STORED:
                self._index.apply_stored(batch.worker_id, event.page_hashes)
            elif event.kind == worker_pb2.KvEvent.REMOVED:
                self._index.apply_removed(batch.worker_id, event.page_hashes)
        cursor.sequence = batch.sequence
        return BatchOutcome.APPLIED

    def _apply_reset(self, batch: worker_pb2.KvEventBatch, cursor: _Cursor) -> BatchOutcome:
        if batch.sequence < cursor.sequence:
            return BatchOutcome.STALE
        self._index.reset(batch.worker_id, [page for event in batch.events for page in event.page_hashes])
        self._index.set_events_live(batch.worker_id, True)
        cursor.sequence, cursor.synced = batch.sequence, True
        return BatchOutcome.APPLIED
