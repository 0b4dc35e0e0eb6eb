"""Linear layers over GGUF weight blocks (Q8_0, Q4_0, Q4_1), with the instruction set chosen at run time.

The kernels (``block_gemm.cpp``) are part of the native extension built per instruction set (``kernels.build``);
``isa=None`` picks the widest this CPU runs, and tests pass a narrower one to check every path. Where no build
succeeds, ``linear`` and ``dequantize`` compute the same results with torch operations (slow).

Two layouts of the blocks: ggml's, as files store it (uint8 [rows, row_bytes]: each block's scales, then its
quants), and the ``x8`` layout the kernels read (``repack``: uint8 [groups, 8 * row_bytes]): rows in groups of
eight (the last one padded with zero rows), each group's bytes regrouped so that one 32-byte load holds the same
four quant bytes of all eight rows, then every block's eight d, then (Q4_1) every block's eight m. ``quantize``
returns ggml's layout; ``linear`` and ``dequantize`` take the x8 one.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType, quants

from radixserve.worker.kernels.build import native

BLOCK_SIZE = 32
GROUP_ROWS = 8  # rows interleaved in a group of the x8 layout
BLOCK_TYPES: dict[str, int] = {"Q8_0": 8, "Q4_0": 2, "Q4_1": 3}  # ggml's type ids
BLOCK_BYTES: dict[int, int] = {8: 34, 2: 18, 3: 20}
_SCALE_BYTES: dict[int, int] = {8: 2, 2: 2, 3: 4}  # fp16 d (and m) at the head of each ggml block


def row_bytes(block_type: int, in_features: int) -> int:
    """Bytes a row of ``in_features`` inputs takes in ``block_type`` blocks."""
    if in_features % BLOCK_SIZE:
        raise ValueError(f"in_features: {in_features} is not a multiple of the block size {BLOCK_SIZE}")
    return in_features // BLOCK_SIZE * BLOCK_BYTES[block_type]


def repack(blocks: torch.Tensor, block_type: int) -> torch.Tensor:
    """Rows of ggml-layout blocks (uint8 [N, row_bytes]) in the x8 layout (uint8 [ceil(N / 8), 8 * row_bytes])."""
    rows, width = blocks.shape
    padded = torch.zeros(groups_for(rows) * GROUP_ROWS, width, dtype=torch.uint8)
    padded[:rows] = blocks
    per_block = padded.view(-1, GROUP_ROWS, width // BLOCK_BYTES[block_type], BLOCK_BYTES[block_type])
    groups, _, count, _ = per_block.shape
    scales = _SCALE_BYTES[block_type]
    quants = per_block[..., scales:].reshape(groups, GROUP_ROWS, count, -1, 4).permute(0, 2, 3, 1, 4)
    heads = [per_block[..., i:i + 2].permute(0, 2, 1, 3) for i in range(0, scales, 2)]  # [G, count, 8, 2] each
    return torch.cat([part.reshape(groups, -1) for part in (quants, *heads)], dim=1)


def unpack(blocks: torch.Tensor, block_type: int, rows: int) -> torch.Tensor:
    """The inverse of ``repack``: the first ``rows`` rows of x8-layout ``blocks`` in ggml's layout."""
    groups = blocks.shape[0]
    count = blocks.shape[1] // (GROUP_ROWS * BLOCK_BYTES[block_type])
    scales = _SCALE_BYTES[block_type]
    quant_end = GROUP_ROWS * count * (BLOCK_BYTES[block_type] - scales)
    quants = blocks[:, :quant_end].reshape(groups, count, -1, GROUP_ROWS, 4).permute(0, 3, 1, 2, 4)
    heads = blocks[:, quant_end:].reshape(groups, scales // 2, count, GROUP_ROWS, 2).permute(0, 3, 2, 1, 4)
    per_block = torch.cat([heads.reshape(groups, GROUP_ROWS, count, scales),
                           quants.reshape(groups, GROUP_ROWS, count, -1)], dim=3)
    return per_block.reshape(groups * GROUP_ROWS, -1)[:rows]


def groups_for(rows: int) -> int:
    """Groups of eight that hold ``rows`` rows."""
    return -(-rows // GROUP_ROWS)


def linear(x: torch.Tensor, blocks: torch.Tensor, block_type: int, out_features: int,
           isa: str | None = None) -> torch.Tensor:
    """``x`` [T, K] float32 times the [out_features, K] weight held in x8-layout ``blocks``: [T, out_features]
    float32.

    Activations are rounded to int8 per block of 32 inputs (one float scale each) before the integer products, as
    llama.cpp does: results differ from the float product by that rounding. Each output is computed in the same
    order whatever the build, the batch and the other rows, so all of them give the same bits."""
    module = native(isa)
    x = x.contiguous()
    if module is None:
        return _round_activations(x) @ dequantize(blocks, block_type, x.shape[1])[:out_features].T
    return module.linear(x, blocks, block_type, out_features)


def _round_activations(x: torch.Tensor) -> torch.Tensor:
    """``x`` [T, K] rounded as the kernel rounds it: int8 steps of max|x| / 127 per 32 inputs, back in float32."""
    tokens, cols = x.shape
    groups = x.reshape(tokens, cols // BLOCK_SIZE, BLOCK_SIZE)
    scales = groups.abs().amax(dim=-1, keepdim=True) / 127
    inverse = torch.where(scales > 0, 1 / scales, torch.zeros_like(scales))
    return (torch.round(groups * inverse) * scales).reshape(tokens, cols)


def dequantize(blocks: torch.Tensor, block_type: int, in_features: int, isa: str | None = None) -> torch.Tensor:
    """The float32 [groups * 8, in_features] weight that x8-layout ``blocks`` hold (padding rows are zeros)."""
    module = native(isa)
    if module is None:
        ggml = unpack(blocks, block_type, blocks.shape[0] * GROUP_ROWS)
        values = quants.dequantize(ggml.numpy(), GGMLQuantizationType(block_type))
        return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))
    return module.dequantize(blocks.contiguous(), block_type, in_features)


def dequantize_rows(blocks: torch.Tensor, block_type: int, in_features: int, ids: torch.Tensor) -> torch.Tensor:
    """Rows ``ids`` [T] of the weight that x8-layout ``blocks`` hold, float32 [T, in_features] (a table lookup:
    only the groups holding them are dequantized)."""
    groups = dequantize(blocks[ids // GROUP_ROWS], block_type, in_features)
    return groups.view(-1, GROUP_ROWS, in_features)[torch.arange(ids.shape[0]), ids % GROUP_ROWS]


def quantize(weight: torch.Tensor, block_type: int) -> torch.Tensor:
    """``weight`` [N, K] float32 in ``block_type`` blocks (uint8 [N, row_bytes], ggml's layout), rounded as
    llama.cpp's reference quantizer rounds (gguf-py's implementation of it)."""
    blocks = quants.quantize(weight.float().numpy(), GGMLQuantizationType(block_type))
    return torch.from_numpy(np.ascontiguousarray(blocks))
