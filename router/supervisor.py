"""Background tasks that must not die unseen: the router's registry watch, KV log readers, event relays, load polls,
route hints and shared load.

Each loop handles the failures it expects (an unreachable bus, a failed RPC) itself. ``Supervisor.start`` runs it
so that anything else it raises is logged with its traceback, counted in ``failures`` (labelled by the task's
name) and the loop is started again after a backoff that doubles from ``min_backoff_s`` up to ``max_backoff_s``
(back to the start once a run lasted longer than ``max_backoff_s``). A loop that returns is done; cancelling the
task stops it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from prometheus_client import Counter

log = logging.getLogger(__name__)


class Supervisor:
    """Starts supervised tasks on the running loop; ``failures`` is a counter labelled by task name."""

    def __init__(self, failures: Counter, min_backoff_s: float = 0.05, max_backoff_s: float = 5.0) -> None:
        if not 0 < min_backoff_s <= max_backoff_s:
            raise ValueError(f"min_backoff_s: must be in (0, max_backoff_s], got {min_backoff_s}")
        self._failures = failures
        self._min_backoff_s = min_backoff_s
        self._max_backoff_s = max_backoff_s

    def start(self, name: str, loop: Callable[[], Awaitable[None]], detail: str = "") -> asyncio.Task[None]:
        """Run ``loop()`` as a task named ``name`` (the metric's label; ``detail``, e.g. a worker id, goes only to
        the log), restarted after any error it raises."""
        self._failures.labels(name)  # the series exists from the start, at 0
        return asyncio.create_task(self._keep(name, loop, f"{name} {detail}".strip()))

    async def _keep(self, name: str, loop: Callable[[], Awaitable[None]], described: str) -> None:
        backoff_s = self._min_backoff_s
        while True:
            started = time.monotonic()
            try:
                await loop()
                return
            except Exception:
                self._failures.labels(name).inc()
                if time.monotonic() - started > self._max_backoff_s:
                    backoff_s = self._min_backoff_s
                log.exception("background task %s failed; restarting it in %.2f s", described, backoff_s)
            await asyncio.sleep(backoff_s)
            backoff_s = min(2 * backoff_s, self._max_backoff_s)
