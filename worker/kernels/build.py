"""Compiling the native kernels: torch's C++ extension loader (g++ and ninja), builds cached by source and flags."""

from __future__ import annotations

import functools
import hashlib
import logging
import platform
from pathlib import Path
from types import ModuleType

_log = logging.getLogger(__name__)


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The instruction-set flags this CPU reports (``/proc/cpuinfo``; empty where it cannot be read)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()


def load(name: str, source: Path, cflags: list[str], key: str = "") -> ModuleType | None:
    """The extension built from ``source`` with ``cflags`` (cached under a name keyed by both, the machine's
    architecture and ``key``), or None when it cannot be built here (logged): callers then serve through their
    torch fallback."""
    from torch.utils.cpp_extension import load as load_extension

    digest = hashlib.sha256(source.read_bytes() + f"{cflags} {platform.machine()} {key}".encode()).hexdigest()[:12]
    try:
        # -fopenmp: at::parallel_for is OpenMP inlined from ATen's headers; compiled without it, it runs serially.
        return load_extension(name=f"{name}_{digest}", sources=[str(source)],
                              extra_cflags=["-O3", "-fopenmp", *cflags], extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as error:  # no compiler, no ninja, ...: serve slower rather than not at all
        _log.warning("native kernel %s unavailable, using the torch fallback: %s", name, error)
        return None
