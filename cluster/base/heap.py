"""``freeze_startup_heap``: keep the objects a process made while starting out of the garbage collector's scans.

A worker holds its model, torch and its tokenizer; a router, Ray's driver and grpcio: hundreds of thousands of
objects made once and kept for good. Python's full collections walk every tracked object, so each one in a serving
process paid for all of them, in the middle of whichever request was running. Once a process serves, its start-up
objects are frozen (``gc.freeze``): collections then walk only what requests made since.
"""

from __future__ import annotations

import gc


def freeze_startup_heap() -> None:
    """Collect what start-up left unreachable, then freeze the rest: call once a process is up and serving."""
    gc.collect()
    gc.freeze()
