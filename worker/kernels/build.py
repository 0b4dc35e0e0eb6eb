"""Compiling the native kernels: one extension built from every C++ source here, once per instruction set.

The extension (``native(isa)``) is compiled with torch's C++ extension loader (g++ and ninja) for each instruction
set in ``ISAS``: ``portable`` (no flags beyond the compiler's baseline), ``avx2`` (AVX2, FMA, F16C) and
``avx512vnni`` (those plus AVX-512 F/BW/VL/VNNI). ``isas()`` lists those this CPU can run, widest last; a build is
only ever loaded on a CPU that reports every flag it was compiled with, and builds are cached under names keyed by
the sources, the flags and the architecture, so one cache of builds can serve a fleet of different machines.
Callers serve through torch fallbacks where no build succeeds.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import platform
from pathlib import Path
from types import ModuleType

_log = logging.getLogger(__name__)
_HERE = Path(__file__).parent
# instruction set -> (the CPU flags it needs, the compiler flags that build it)
ISAS: dict[str, tuple[frozenset[str], list[str]]] = {
    "portable": (frozenset(), []),
    "avx2": (frozenset({"avx2", "fma", "f16c"}), ["-mavx2", "-mfma", "-mf16c"]),
    "avx512vnni": (frozenset({"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni"}),
                   ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni"]),
}


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


def isas() -> list[str]:
    """The instruction sets this CPU can run a build of, narrowest first (``portable`` needs no flag, so it is
    always there, also where ``/proc/cpuinfo`` cannot be read)."""
    return [name for name, (needs, _) in ISAS.items() if needs <= cpu_flags()]


@functools.cache
def native(isa: str | None = None) -> ModuleType | None:
    """The extension built for ``isa`` (default: the widest this CPU runs), or None when it cannot be built here
    (logged once). The first build takes tens of seconds."""
    isa = isa or isas()[-1]
    if isa not in isas():
        raise ValueError(f"isa: {isa!r} is not one this CPU can run ({isas()})")
    return _load(f"radixserve_kernels_{isa}", ISAS[isa][1])


def _load(name: str, cflags: list[str]) -> ModuleType | None:
    from torch.utils.cpp_extension import load as load_extension

    sources = sorted(_HERE.glob("*.cpp"))
    text = b"".join(path.read_bytes() for path in sorted([*sources, *_HERE.glob("*.h")]))
    digest = hashlib.sha256(text + f"{cflags} {platform.machine()}".encode()).hexdigest()[:12]
    try:
        # -fopenmp: at::parallel_for is OpenMP inlined from ATen's headers; compiled without it, it runs serially.
        return load_extension(name=f"{name}_{digest}", sources=[str(path) for path in sources],
                              extra_cflags=["-O3", "-fopenmp", *cflags], extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as error:  # no compiler, no ninja, ...: serve slower rather than not at all
        _log.warning("native kernels %s unavailable, using the torch fallbacks: %s", name, error)
        return None
