"""GGUF block kernels (``worker.kernels.blocks``) on every instruction set this CPU can run, the narrower ones
forced: dequantizing equals gguf-py's reference, and each product is within the bound that rounding activations
to int8 per block allows of the float product of the dequantized weight, on random and odd shapes."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from radixserve.worker.kernels import blocks
from radixserve.worker.kernels.build import isas, native

ISAS = isas()
TYPES = sorted(blocks.BLOCK_TYPES.items())


def _weights(rows: int, cols: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=generator) * torch.rand(rows, 1, generator=generator) * 2


def _rounding_bound(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """|x W^T - x' W^T| where x' is x rounded to int8 per 32 inputs (scale max|x| / 127): at most half a step per
    input, times |w|; plus float32 slack for the sums."""
    tokens, cols = x.shape
    steps = x.view(tokens, cols // 32, 32).abs().amax(dim=-1) / 127  # [T, K/32]
    per_input = steps.repeat_interleave(32, dim=1) / 2  # [T, K]
    return per_input @ weight.abs().T * (1 + 1e-3) + 1e-4 * (x.abs() @ weight.abs().T) + 1e-6


def test_this_cpu_runs_the_portable_build_and_the_widest_it_reports() -> None:
    assert ISAS[0] == "portable"
    for isa in ISAS:
        module = native(isa)
        assert module is not None and module.isa() == isa
    with pytest.raises(ValueError, match="^isa: "):
        native("avx1024")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("name,block_type", TYPES)
@settings(max_examples=15, deadline=None)
@given(rows=st.integers(1, 70), blocks_a_row=st.integers(1, 9), seed=st.integers(0, 2**16))
def test_dequantize_equals_the_reference(isa: str, name: str, block_type: int, rows: int, blocks_a_row: int,
                                         seed: int) -> None:
    cols = 32 * blocks_a_row
    data = blocks.quantize(_weights(rows, cols, seed), block_type)
    expected = gguf.dequantize(data.numpy(), gguf.GGMLQuantizationType(block_type)).astype(np.float32)
    packed = blocks.repack(data, block_type)
    assert packed.shape == (blocks.groups_for(rows), 8 * data.shape[1])
    assert torch.equal(blocks.unpack(packed, block_type, rows), data)
    dequantized = blocks.dequantize(packed, block_type, cols, isa)
    np.testing.assert_allclose(dequantized[:rows].numpy(), expected, rtol=1e-6, atol=1e-7)
    assert not dequantized[rows:].any()  # the last group's padding rows
    ids = torch.tensor([rows - 1, 0, rows // 2, rows - 1])
    assert torch.equal(blocks.dequantize_rows(packed, block_type, cols, ids), dequantized[ids])


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("name,block_type", TYPES)
@settings(max_examples=15, deadline=None)
@given(rows=st.integers(1, 70), blocks_a_row=st.integers(1, 20), tokens=st.sampled_from([1, 2, 3, 5, 8, 11, 300]),
       seed=st.integers(0, 2**16))
def test_linear_is_the_float_product_but_for_activation_rounding(isa: str, name: str, block_type: int, rows: int,
                                                                  blocks_a_row: int, tokens: int, seed: int) -> None:
    cols = 32 * blocks_a_row
    data = blocks.repack(blocks.quantize(_weights(rows, cols, seed), block_type), block_type)
    weight = blocks.dequantize(data, block_type, cols, "portable")[:rows]
    x = torch.randn(tokens, cols, generator=torch.Generator().manual_seed(seed + 1))
    x[0, :32] = 0  # an all-zero block: scale 0
    actual = blocks.linear(x, data, block_type, rows, isa)
    assert actual.shape == (tokens, rows) and actual.dtype == torch.float32
    assert bool(((actual - x @ weight.T).abs() <= _rounding_bound(x, weight)).all())


@pytest.mark.parametrize("isa", ISAS)
def test_every_path_batch_and_row_gives_the_portable_builds_bits(isa: str) -> None:
    """Each output is one fixed sequence of roundings: the same bits on every build, for a token alone or in any
    batch (the tiles of four and their remainders), and for a row whatever the rows around it."""
    x = torch.randn(13, 256, generator=torch.Generator().manual_seed(7))
    for _, block_type in TYPES:
        ggml = blocks.quantize(_weights(37, 256, 8), block_type)
        data = blocks.repack(ggml, block_type)
        batched = blocks.linear(x, data, block_type, 37, isa)
        assert torch.equal(batched, blocks.linear(x, data, block_type, 37, "portable"))
        for rows in (x[5:6], x[2:5], x[3:10]):
            start = int((rows.data_ptr() - x.data_ptr()) // (4 * 256))
            assert torch.equal(blocks.linear(rows, data, block_type, 37, isa), batched[start:start + len(rows)])
        alone = blocks.linear(x, blocks.repack(ggml[20:29], block_type), block_type, 9, isa)
        assert torch.equal(alone, batched[:, 20:29])


def test_bad_shapes_are_refused_naming_the_argument() -> None:
    data = blocks.repack(blocks.quantize(_weights(4, 64, 0), blocks.BLOCK_TYPES["Q4_1"]), blocks.BLOCK_TYPES["Q4_1"])
    with pytest.raises(RuntimeError, match="blocks: "):
        blocks.linear(torch.randn(2, 96), data, blocks.BLOCK_TYPES["Q4_1"], 4)
    with pytest.raises(RuntimeError, match="block type: "):
        blocks.linear(torch.randn(2, 64), data, 5, 4)
    with pytest.raises(RuntimeError, match="x: "):
        blocks.linear(torch.randn(2, 64, dtype=torch.float64), data, blocks.BLOCK_TYPES["Q4_1"], 4)
    with pytest.raises(RuntimeError, match="out_features: "):
        blocks.linear(torch.randn(2, 64), data, blocks.BLOCK_TYPES["Q4_1"], 9)
    with pytest.raises(ValueError, match="in_features: "):
        blocks.row_bytes(blocks.BLOCK_TYPES["Q8_0"], 48)
