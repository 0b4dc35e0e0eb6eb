"""A host-DRAM KV tier below a simulated worker's device cache, as SGLang's HiCache or LMCache keep one.

Blocks evicted from the device go to an LRU store of ``num_blocks`` blocks in host memory instead of being
dropped; a prompt whose cached prefix continues there loads those blocks instead of computing them. Blocks are
named by their chained page hashes, as in the device cache's KV events. The worker's KV events then describe both
tiers: a block is ``stored`` when it enters the worker and ``removed`` only when neither tier holds it. With
``num_blocks`` 0 the tier holds nothing and the device cache's events pass through unchanged.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

from radixserve.worker.kv.radix_cache import KVEvent


class HostTier:
    """The host store of one worker and the worker's KV events over both tiers."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 0:
            raise ValueError(f"num_blocks: must be >= 0, got {num_blocks}")
        self._num_blocks = num_blocks
        self._blocks: OrderedDict[int, None] = OrderedDict()  # page hash -> None, least recently used first
        self._on_device: set[int] = set()
        self._events: list[KVEvent] = []

    def absorb(self, device_events: Iterable[KVEvent]) -> None:
        """Apply the device cache's events, oldest first: evicted blocks move here (the oldest here may drop)."""
        for event in device_events:
            if event.kind == "stored":
                self._on_device.update(event.page_hashes)
                fresh = tuple(h for h in event.page_hashes if h not in self._blocks)
                if fresh:
                    self._events.append(KVEvent("stored", fresh))
            else:
                self._on_device.difference_update(event.page_hashes)
                if self._num_blocks:
                    self._demote(event.page_hashes)
                else:
                    self._events.append(event)

    def held(self, hashes: list[int], start: int, stop: int) -> int:
        """How many blocks of ``hashes[start:stop]`` this tier holds, consecutively from ``start``; changes nothing.
        Call ``absorb`` first, so that the blocks the device just evicted are here."""
        k = start
        while k < stop and hashes[k] in self._blocks:
            k += 1
        return k - start

    def hits(self, hashes: list[int], start: int, stop: int) -> int:
        """``held``, marking those blocks used."""
        num_held = self.held(hashes, start, stop)
        for page in hashes[start : start + num_held]:
            self._blocks.move_to_end(page)
        return num_held

    def take_events(self) -> list[KVEvent]:
        """The worker's events since the last call, oldest first."""
        events, self._events = self._events, []
        return events

    def _demote(self, hashes: tuple[int, ...]) -> None:
        for page in hashes:
            self._blocks[page] = None
            self._blocks.move_to_end(page)
        dropped = []
        while len(self._blocks) > self._num_blocks:
            page, _ = self._blocks.popitem(last=False)
            if page not in self._on_device:
                dropped.append(page)
        if dropped:
            self._events.append(KVEvent("removed", tuple(dropped)))
