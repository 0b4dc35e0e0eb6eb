"""``LoopThread``: an event loop on its own daemon thread, the home of a process's servers and clients.

The cluster's processes (the ``up`` process that hosts the embedded router, each worker actor and router actor)
run their asyncio code on such a thread, so that Ray's calls into them stay synchronous. The loop is uvloop's:
its transports and scheduling cost about half of the standard loop's per call, and a router request makes
several (an HTTP request in, a gRPC call out, the events back), which shows in the router's overhead.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

import uvloop

T = TypeVar("T")


class LoopThread:
    """An event loop that runs on a daemon thread named ``name`` from ``start`` until ``stop``."""

    def __init__(self, name: str) -> None:
        self.loop = uvloop.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def start(self) -> LoopThread:
        self._thread.start()
        return self

    def call(self, coroutine: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coroutine`` on the loop and wait for its result (or its error) for up to ``timeout`` seconds."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the loop (what runs on it is left as it stands), wait up to ``timeout`` for the thread, and close
        the loop once the thread ended."""
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=timeout)
        if not self._thread.is_alive() and not self.loop.is_closed():
            self.loop.close()
