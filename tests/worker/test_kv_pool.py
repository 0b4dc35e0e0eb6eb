"""The KV pool in both forms (the engine's dtype, int8 with per-(slot, head) scales) and the int8 quantizer."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from radixserve.worker.kv import int8
from radixserve.worker.kv.pool import KVPool

SMOLLM2_SHAPE = {"num_layers": 30, "page_size": 16, "num_kv_heads": 3, "head_dim": 64}


@settings(max_examples=100, deadline=None)
@given(rows=arrays("float32", st.tuples(st.integers(1, 4), st.integers(1, 96)),
                   elements=st.floats(-1e4, 1e4, width=32, allow_subnormal=False)))
def test_dequantized_rows_are_within_half_a_scale_of_the_originals(rows) -> None:
    x = torch.from_numpy(rows)
    values, scales = int8.quantize(x)
    assert values.dtype == torch.int8 and scales.dtype == torch.float32 and scales.shape == x.shape[:-1]
    assert torch.equal(scales, x.abs().amax(dim=-1) / 127)
    error = (x - int8.dequantize(values, scales, torch.float32)).abs()
    # half a scale, plus float32's rounding of x / scale and of values * scale
    assert bool((error <= scales.unsqueeze(-1) * (0.5 + 1e-5) + 1e-30).all())


def test_an_all_zero_row_has_scale_zero_and_comes_back_as_zeros() -> None:
    values, scales = int8.quantize(torch.zeros(2, 8))
    assert not scales.any() and not values.any()
    assert not int8.dequantize(values, scales, torch.float32).any()


def _read(pool: KVPool, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys and values stored at ``slots`` of ``layer``, as float32 (dequantized when int8)."""
    if not pool.quantized:
        return pool.k[layer][slots].float(), pool.v[layer][slots].float()
    return (int8.dequantize(pool.k[layer][slots], pool.k_scale[layer][slots], torch.float32),
            int8.dequantize(pool.v[layer][slots], pool.v_scale[layer][slots], torch.float32))


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8"])
def test_write_stores_the_rows_and_copy_page_carries_the_scales_and_copy_page_carries_the_scales(kv_cache_dtype: str) -> None:
    pool = KVPool(2, 4, 4, 3, 8, torch.float32, "cpu", kv_cache_dtype)
    gen = torch.Generator().manual_seed(0)
    k, v = torch.randn(6, 3, 8, generator=gen), torch.randn(6, 3, 8, generator=gen)
    slots = torch.tensor([0, 1, 2, 9, 13, 14])
    pool.write(1, slots, k, v)
    keys, values = _read(pool, 1, slots)
    assert keys.dtype == values.dtype == torch.float32 and keys.shape == (6, 3, 8)
    for got, original in ((keys, k), (values, v)):  # exact, or within half of each row's scale
        half_scale = 0 if kv_cache_dtype == "auto" else original.abs().amax(-1, keepdim=True) / 254 * (1 + 1e-5)
        assert bool(((got - original).abs() <= half_scale).all())
    assert _read(pool, 0, slots)[0].abs().max() == 0  # another layer is untouched
    pool.copy_page(0, 3, 3)  # slots 0..2 into 12..14
    copied = _read(pool, 1, torch.tensor([12, 13, 14]))
    assert torch.equal(copied[0], keys[:3]) and torch.equal(copied[1], values[:3])


def test_the_int8_pool_holds_int8_values_and_float32_scales() -> None:
    pool = KVPool(2, 4, 4, 3, 8, torch.bfloat16, "cpu", "int8")
    assert pool.quantized and all(t.dtype == torch.int8 and t.shape == (16, 3, 8) for t in (*pool.k, *pool.v))
    assert all(t.dtype == torch.float32 and t.shape == (16, 3) for t in (*pool.k_scale, *pool.v_scale))
    pool.write(0, torch.tensor([5]), torch.ones(1, 3, 8), -torch.ones(1, 3, 8))
    plain = KVPool(2, 4, 4, 3, 8, torch.bfloat16, "cpu")
    assert not plain.quantized and plain.k_scale is None and plain.v_scale is None


def test_page_bytes_counts_the_scales_and_is_what_the_tensors_take() -> None:
    for dtype, kv_cache_dtype in ((torch.float32, "auto"), (torch.bfloat16, "auto"), (torch.float32, "int8")):
        pool = KVPool(3, 5, 4, 2, 16, dtype, "cpu", kv_cache_dtype)
        tensors = [*pool.k, *pool.v, *(pool.k_scale or ()), *(pool.v_scale or ())]
        held = sum(t.numel() * t.element_size() for t in tensors)
        assert KVPool.page_bytes(3, 4, 2, 16, dtype, kv_cache_dtype) * 5 == held
    float32 = KVPool.page_bytes(**SMOLLM2_SHAPE, dtype=torch.float32)
    quantized = KVPool.page_bytes(**SMOLLM2_SHAPE, dtype=torch.float32, kv_cache_dtype="int8")
    assert float32 == 2 * 30 * 16 * 3 * 64 * 4 and quantized == 2 * 30 * 16 * 3 * (64 + 4)
    assert float32 / quantized > 3.7  # (4 * 64) / (64 + 4)


def test_an_unknown_kv_cache_dtype_is_refused_naming_the_setting() -> None:
    with pytest.raises(ValueError, match="^kv_cache_dtype: must be one of"):
        KVPool(1, 2, 4, 1, 8, torch.float32, "cpu", "fp8")
