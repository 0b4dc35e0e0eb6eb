"""Linear layers over GGUF weight blocks (Q8_0, Q4_0, Q4_1), with the instruction set chosen at run time.

``block_gemm.cpp`` is compiled once per instruction set: ``portable`` (no flags beyond the compiler's baseline),
``avx2`` (AVX2, FMA, F16C) and ``avx512vnni`` (those plus AVX-512 F/BW/VL/VNNI). ``isas()`` lists those this CPU
can run, widest last; a build is only ever loaded on a CPU that reports every flag it was compiled with, so
the same cache of builds can serve a fleet of different machines. ``isa=None`` picks the widest; tests pass a
narrower one to check every path. Where no build succeeds, ``linear`` and ``dequantize`` compute the same
results with torch operations (slow).

Two layouts of a row of blocks: ggml's, as files store it (each block's scales, then its quants), and the
``split`` layout the kernels read (``repack``): the same bytes regrouped as every block's quants, then every
block's d, then (Q4_1) every block's m. ``quantize`` returns ggml's layout; ``linear`` and ``dequantize`` take the
split one.
"""

from __future__ import annotations

import functools
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from gguf import GGMLQuantizationType, quants

from radixserve.worker.kernels.build import cpu_flags, load

_SOURCE = Path(__file__).with_name("block_gemm.cpp")
BLOCK_SIZE = 32
BLOCK_TYPES: dict[str, int] = {"Q8_0": 8, "Q4_0": 2, "Q4_1": 3}  # ggml's type ids
BLOCK_BYTES: dict[int, int] = {8: 34, 2: 18, 3: 20}
_SCALE_BYTES: dict[int, int] = {8: 2, 2: 2, 3: 4}  # fp16 d (and m) at the head of each ggml block
# instruction set -> (the CPU flags it needs, the compiler flags that build it)
_ISAS: dict[str, tuple[frozenset[str], list[str]]] = {
    "portable": (frozenset(), []),
    "avx2": (frozenset({"avx2", "fma", "f16c"}), ["-mavx2", "-mfma", "-mf16c"]),
    "avx512vnni": (frozenset({"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni"}),
                   ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni"]),
}


def isas() -> list[str]:
    """The instruction sets this CPU can run a build of, narrowest first (``portable`` needs no flag, so it is
    always there, also where ``/proc/cpuinfo`` cannot be read)."""
    return [name for name, (needs, _) in _ISAS.items() if needs <= cpu_flags()]


@functools.cache
def native(isa: str | None = None) -> ModuleType | None:
    """The build for ``isa`` (default: the widest this CPU runs), or None when it cannot be built here."""
    isa = isa or isas()[-1]
    if isa not in isas():
        raise ValueError(f"isa: {isa!r} is not one this CPU can run ({isas()})")
    return load(f"radixserve_block_gemm_{isa}", _SOURCE, _ISAS[isa][1])


def row_bytes(block_type: int, in_features: int) -> int:
    """Bytes a row of ``in_features`` inputs takes in ``block_type`` blocks."""
    if in_features % BLOCK_SIZE:
        raise ValueError(f"in_features: {in_features} is not a multiple of the block size {BLOCK_SIZE}")
    return in_features // BLOCK_SIZE * BLOCK_BYTES[block_type]


def repack(blocks: torch.Tensor, block_type: int) -> torch.Tensor:
    """Rows of ggml-layout blocks (uint8 [N, row_bytes]) in the split layout (same shape, bytes regrouped)."""
    rows = blocks.shape[0]
    per_block = blocks.view(rows, -1, BLOCK_BYTES[block_type])
    scales = _SCALE_BYTES[block_type]
    parts = [per_block[:, :, scales:]] + [per_block[:, :, i:i + 2] for i in range(0, scales, 2)]
    return torch.cat([part.reshape(rows, -1) for part in parts], dim=1)


def unpack(blocks: torch.Tensor, block_type: int) -> torch.Tensor:
    """The inverse of ``repack``: split-layout rows back in ggml's layout."""
    rows, count = blocks.shape[0], blocks.shape[1] // BLOCK_BYTES[block_type]
    scales = _SCALE_BYTES[block_type]
    quants = blocks[:, :count * (BLOCK_BYTES[block_type] - scales)].reshape(rows, count, -1)
    heads = blocks[:, count * (BLOCK_BYTES[block_type] - scales):].reshape(rows, scales // 2, count, 2)
    return torch.cat([heads.permute(0, 2, 1, 3).reshape(rows, count, scales), quants], dim=2).reshape(rows, -1)


def linear(x: torch.Tensor, blocks: torch.Tensor, block_type: int, isa: str | None = None) -> torch.Tensor:
    """``x`` [T, K] float32 times the [N, K] weight held in split-layout ``blocks`` (uint8 [N, row_bytes]): [T, N]
    float32.

    Activations are rounded to int8 per block of 32 inputs (one float scale each) before the integer products, as
    llama.cpp does: results differ from the float product by that rounding."""
    module = native(isa)
    x = x.contiguous()
    if module is None:
        return _round_activations(x) @ dequantize(blocks, block_type, x.shape[1]).T
    return module.linear(x, blocks, block_type)


def _round_activations(x: torch.Tensor) -> torch.Tensor:
    """``x`` [T, K] rounded as the kernel rounds it: int8 steps of max|x| / 127 per 32 inputs, back in float32."""
    tokens, cols = x.shape
    groups = x.reshape(tokens, cols // BLOCK_SIZE, BLOCK_SIZE)
    scales = groups.abs().amax(dim=-1, keepdim=True) / 127
    inverse = torch.where(scales > 0, 1 / scales, torch.zeros_like(scales))
    return (torch.round(groups * inverse) * scales).reshape(tokens, cols)


def dequantize(blocks: torch.Tensor, block_type: int, in_features: int, isa: str | None = None) -> torch.Tensor:
    """The float32 [rows, in_features] weight that split-layout ``blocks`` (uint8 [rows, row_bytes]) hold."""
    module = native(isa)
    if module is None:
        values = quants.dequantize(unpack(blocks, block_type).numpy(), GGMLQuantizationType(block_type))
        return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))
    return module.dequantize(blocks.contiguous(), block_type, in_features)


def quantize(weight: torch.Tensor, block_type: int) -> torch.Tensor:
    """``weight`` [N, K] float32 in ``block_type`` blocks (uint8 [N, row_bytes], ggml's layout), rounded as
    llama.cpp's reference quantizer rounds (gguf-py's implementation of it)."""
    blocks = quants.quantize(weight.float().numpy(), GGMLQuantizationType(block_type))
    return torch.from_numpy(np.ascontiguousarray(blocks))
