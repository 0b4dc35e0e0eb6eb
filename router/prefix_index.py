"""The router's view of which pages each worker holds, for prefix-aware routing.

A page is named by its chained hash (``radixserve.cluster.base.hashing``): hash ``k`` of a prompt names the whole
prefix of pages ``0..k``. A worker's cache is a radix tree that evicts leaves, so the pages it holds are closed
under prefixes: holding hash ``k`` means holding hashes ``0..k-1`` of the same prompt. The index relies on that
closure only for meaning: ``match`` counts the leading pages of a prompt that a worker holds, which under the
closure is the length of the prefix cached there.

The index believes a worker holds a page when either

* exact: the worker's KV events said so (``apply_stored``/``apply_removed``, or a snapshot via ``reset``); or
* routed: the router sent it a request with that page (``record_routed``), at most ``pending_ttl_s`` ago if the
  worker's events were flowing then (the gap until the prefill's ``stored`` event arrives) or at most
  ``approx_ttl_s`` ago if they were not (the approximate fallback). An entry counts while ``clock() < expiry``;
  recording a page again moves its expiry to the later of the old and the new one. A worker that did not take
  the request loses the entry at once (``withdraw_routed``).

Routed entries are kept only for pages not known exactly: a page's exact entry leaves only through
``apply_removed``, ``reset`` or ``remove_worker``, which drop its routed entry too, so the routed entry could never
outlive it. Expired routed entries are reclaimed incrementally from one FIFO per TTL (expiries in a FIFO are
non-decreasing while the clock is monotonic; a clock that steps back only delays reclamation, never a result).

The module is pure: no I/O, no asyncio; time comes from the injected ``clock``.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import ClassVar

_FifoEntry = tuple[float, str, int]  # (expiry, worker id, page hash)


class PrefixIndex:
    """Which page hashes each worker holds, exactly (from KV events) or by recent routing (with a TTL).

    Costs: ``match`` is O(sum over the matched pages of their holders among the listed workers) plus the
    number of listed workers; event and routing calls are O(pages given); reclamation is amortized O(1) per
    recorded page.
    """

    _PURGE_BATCH: ClassVar[int] = 64  # expired entries reclaimed per record_routed beyond twice its pages

    def __init__(self, pending_ttl_s: float, approx_ttl_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not pending_ttl_s > 0:
            raise ValueError(f"pending_ttl_s: must be > 0, got {pending_ttl_s}")
        if not approx_ttl_s > 0:
            raise ValueError(f"approx_ttl_s: must be > 0, got {approx_ttl_s}")
        self._pending_ttl_s = pending_ttl_s
        self._approx_ttl_s = approx_ttl_s
        self._clock = clock
        self._exact: dict[str, set[int]] = {}
        self._exact_holders: dict[int, set[str]] = {}
        self._routed: dict[str, dict[int, float]] = {}  # worker -> page -> expiry
        self._routed_holders: dict[int, dict[str, float]] = {}  # page -> worker -> expiry
        self._fifos: dict[float, deque[_FifoEntry]] = {}  # ttl -> entries in push order
        self._live: set[str] = set()

    def apply_stored(self, worker_id: str, hashes: Iterable[int]) -> None:
        """A ``stored`` event: the worker now holds these pages. Idempotent."""
        exact = self._exact.setdefault(worker_id, set())
        for page in hashes:
            exact.add(page)
            self._exact_holders.setdefault(page, set()).add(worker_id)
            self._drop_routed(worker_id, page)

    def apply_removed(self, worker_id: str, hashes: Iterable[int]) -> None:
        """A ``removed`` event: the worker no longer holds these pages, routed entries included.

        Pages the index did not have for the worker are ignored (an event may trail a ``reset``).
        """
        exact = self._exact.get(worker_id, set())
        for page in hashes:
            if page in exact:
                exact.remove(page)
                self._drop_exact_holder(worker_id, page)
            self._drop_routed(worker_id, page)

    def reset(self, worker_id: str, hashes: Iterable[int] = ()) -> None:
        """Replace everything known of the worker, routed entries included, by ``hashes``.

        For a snapshot on (re)subscription, or ``()`` for a restarted worker. Keeps ``set_events_live``'s flag.
        """
        self._forget(worker_id)
        self.apply_stored(worker_id, hashes)

    def remove_worker(self, worker_id: str) -> None:
        """Forget the worker entirely, its events-live flag included."""
        self._forget(worker_id)
        self._exact.pop(worker_id, None)
        self._live.discard(worker_id)

    def set_events_live(self, worker_id: str, live: bool) -> None:
        """Whether the worker's KV events are flowing (initially not).

        Picks the TTL of later ``record_routed`` calls for the worker; entries already recorded keep theirs.
        """
        if live:
            self._live.add(worker_id)
        else:
            self._live.discard(worker_id)

    def record_routed(self, worker_id: str, hashes: Iterable[int]) -> None:
        """A request with these pages was sent to the worker: count them as held there for a TTL from now.

        The TTL is ``pending_ttl_s`` while the worker's events are live, ``approx_ttl_s`` otherwise. Pass a
        prompt's hashes from its first page so that routed pages stay prefix-closed. Also reclaims up to
        ``2 * len(hashes)`` plus a small constant expired entries, so reclamation outpaces recording.
        """
        hashes = list(hashes)
        now = self._clock()
        self._purge(now, 2 * len(hashes) + self._PURGE_BATCH)
        ttl = self._pending_ttl_s if worker_id in self._live else self._approx_ttl_s
        expiry = now + ttl
        fifo = self._fifos.setdefault(ttl, deque())
        exact = self._exact.get(worker_id, set())
        routed = self._routed.setdefault(worker_id, {})
        for page in hashes:
            if page in exact or routed.get(page, -math.inf) >= expiry:
                continue
            routed[page] = expiry
            self._routed_holders.setdefault(page, {})[worker_id] = expiry
            fifo.append((expiry, worker_id, page))

    def withdraw_routed(self, worker_id: str, hashes: Iterable[int]) -> None:
        """The worker did not take a request ``record_routed`` credited it with: drop its routed entries of
        these pages. Exact entries stay (its events say what it holds), and so do other workers' entries.

        Entries are not counted per request, so a concurrent request's credit for the same pages on the same
        worker goes too; its ``stored`` event restores them.
        """
        for page in hashes:
            self._drop_routed(worker_id, page)

    def match(self, hashes: Sequence[int], worker_ids: Iterable[str]) -> dict[str, int]:
        """For each listed worker, how many leading pages of ``hashes`` it holds (exact or unexpired routed).

        Unknown workers get 0. Stops at the first page no listed worker holds.
        """
        counts = dict.fromkeys(worker_ids, 0)
        active = set(counts)
        now = self._clock()
        for depth, page in enumerate(hashes, start=1):
            active = self._holders(page, active, now)
            if not active:
                break
            for worker_id in active:
                counts[worker_id] = depth
        return counts

    def exact_pages(self, worker_id: str) -> frozenset[int]:
        """The pages the worker's KV events say it holds (routed guesses not included)."""
        return frozenset(self._exact.get(worker_id, ()))

    def num_pages(self, worker_id: str) -> int:
        """Distinct pages the index believes the worker holds: exact plus unexpired routed.

        Reclaims every expired entry first (amortized O(1) per recorded page).
        """
        self._purge(self._clock(), math.inf)
        return len(self._exact.get(worker_id, ())) + len(self._routed.get(worker_id, ()))

    def _holders(self, page: int, among: set[str], now: float) -> set[str]:
        """The workers of ``among`` that hold ``page`` at time ``now``."""
        exact = self._exact_holders.get(page)
        held = among & exact if exact else set()
        routed = self._routed_holders.get(page)
        if routed:
            held.update(w for w, expiry in routed.items() if expiry > now and w in among)
        return held

    def _purge(self, now: float, budget: float) -> None:
        """Pop up to ``budget`` expired FIFO entries, dropping those still current."""
        for fifo in self._fifos.values():
            while budget > 0 and fifo and fifo[0][0] <= now:
                expiry, worker_id, page = fifo.popleft()
                budget -= 1
                if self._routed.get(worker_id, {}).get(page) == expiry:
                    self._drop_routed(worker_id, page)

    def _forget(self, worker_id: str) -> None:
        """Drop every exact and routed entry of the worker (stale FIFO entries are skipped when popped)."""
        for page in self._exact.get(worker_id, ()):
            self._drop_exact_holder(worker_id, page)
        self._exact[worker_id] = set()
        for page in self._routed.pop(worker_id, {}):
            self._drop_routed_holder(worker_id, page)

    def _drop_routed(self, worker_id: str, page: int) -> None:
        routed = self._routed.get(worker_id)
        if routed is not None and routed.pop(page, None) is not None:
            self._drop_routed_holder(worker_id, page)

    def _drop_routed_holder(self, worker_id: str, page: int) -> None:
        holders = self._routed_holders[page]
        del holders[worker_id]
        if not holders:
            del self._routed_holders[page]

    def _drop_exact_holder(self, worker_id: str, page: int) -> None:
        holders = self._exact_holders[page]
        holders.remove(worker_id)
        if not holders:
            del self._exact_holders[page]
