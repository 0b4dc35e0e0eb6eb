"""The native paged decode attention (float and int8 caches) against a dense per-sequence reference, and the other
step kernels against torch."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch

from radixserve.worker import kernels
from radixserve.worker.kv import int8


def dense_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, page_table: torch.Tensor,
                    lens: torch.Tensor, page_size: int, scale: float) -> torch.Tensor:
    outs = []
    for b in range(q.shape[0]):
        positions = torch.arange(int(lens[b]))
        slots = page_table[b][positions // page_size] * page_size + positions % page_size
        keys, values = k_cache[slots].float().transpose(0, 1), v_cache[slots].float().transpose(0, 1)  # [Hkv, L, D]
        group = q.shape[1] // keys.shape[0]
        keys, values = keys.repeat_interleave(group, 0), values.repeat_interleave(group, 0)
        probs = (torch.einsum("hd,hld->hl", q[b].float(), keys) * scale).softmax(-1)
        outs.append(torch.einsum("hl,hld->hd", probs, values))
    return torch.stack(outs)


def random_case(seed: int, num_heads: int, num_kv_heads: int, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(seed)
    page_size, num_pages, head_dim = 4, 64, 32
    lens = torch.randint(1, 40, (6,), generator=gen)
    max_pages = int(-(-lens.max() // page_size))
    page_table = torch.stack([torch.randperm(num_pages, generator=gen)[:max_pages] for _ in range(6)])
    k_cache = torch.randn(num_pages * page_size, num_kv_heads, head_dim, generator=gen).to(dtype)
    v_cache = torch.randn(num_pages * page_size, num_kv_heads, head_dim, generator=gen).to(dtype)
    q = torch.randn(6, num_heads, head_dim, generator=gen)
    return q, k_cache, v_cache, page_table, lens, page_size


@pytest.mark.parametrize("heads", [(4, 4), (6, 2), (9, 3)], ids=["mha", "gqa-3", "gqa-3x3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_and_torch_paths_match_a_dense_reference(heads: tuple[int, int], dtype: torch.dtype) -> None:
    assert kernels.build(torch.device("cpu")), "the C++ kernel must build here (g++ and ninja are installed)"
    q, k_cache, v_cache, page_table, lens, page_size = random_case(0, *heads, dtype)
    expected = dense_reference(q, k_cache, v_cache, page_table, lens, page_size, 0.2)
    native = kernels.paged_decode_attention(q, k_cache, v_cache, page_table, lens, page_size, 0.2)
    fallback = kernels._torch_decode_attention(q, k_cache.float(), v_cache.float(), page_table, lens, page_size, 0.2)
    torch.testing.assert_close(native, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fallback, expected, atol=1e-5, rtol=1e-5)


def test_a_sequence_gives_the_same_bits_whatever_else_is_in_the_batch() -> None:
    q, k_cache, v_cache, page_table, lens, page_size = random_case(1, 9, 3, torch.float32)
    batched = kernels.paged_decode_attention(q, k_cache, v_cache, page_table, lens, page_size, 0.2)
    for b in range(q.shape[0]):
        alone = kernels.paged_decode_attention(q[b:b + 1], k_cache, v_cache, page_table[b:b + 1], lens[b:b + 1],
                                               page_size, 0.2)
        assert torch.equal(alone[0], batched[b])


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 9), n=st.integers(1, 200), seed=st.integers(0, 2**16))
def test_fused_rms_norm_with_and_without_the_residual_matches_torch(rows: int, n: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    x, residual, weight = torch.randn(rows, n, generator=gen), torch.randn(rows, n, generator=gen), torch.rand(n)
    expected = weight * torch.nn.functional.rms_norm(x, (n,), eps=1e-5)
    assert torch.allclose(kernels.rms_norm(x, weight, 1e-5), expected, rtol=1e-5, atol=1e-6)
    total = x + residual
    fused = kernels.rms_norm(x, weight, 1e-5, residual)
    assert torch.equal(residual, total)  # the residual stream now holds the sum
    assert torch.allclose(fused, weight * torch.nn.functional.rms_norm(total, (n,), eps=1e-5), rtol=1e-5, atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(tokens=st.integers(1, 7), heads=st.integers(1, 5), half=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_rotary_in_place_rotates_each_pair_of_halves_by_its_positions_angle(tokens: int, heads: int, half: int,
                                                                          seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    angles = torch.rand(50, half, generator=gen) * 6
    cos, sin = angles.cos().repeat(1, 2), torch.cat((-angles.sin(), angles.sin()), dim=-1)
    fused = torch.randn(tokens, heads + 1, 2 * half, generator=gen)  # one extra head: x is a strided view
    x, positions = fused[:, :heads], torch.randint(0, 50, (tokens,), generator=gen)
    first, second = x[..., :half].clone(), x[..., half:].clone()
    a = angles[positions].unsqueeze(1)
    expected = torch.cat((first * a.cos() - second * a.sin(), second * a.cos() + first * a.sin()), dim=-1)
    assert kernels.rotary_(x, positions, cos, sin) is x
    assert torch.allclose(fused[:, :heads], expected, rtol=1e-5, atol=1e-5)


def test_silu_mul_is_silu_of_the_gate_half_times_the_up_half() -> None:
    gate_up = torch.randn(5, 2 * 37, generator=torch.Generator().manual_seed(3))
    gate, up = gate_up.chunk(2, dim=-1)
    assert torch.allclose(kernels.silu_mul(gate_up), torch.nn.functional.silu(gate) * up, rtol=1e-5, atol=1e-6)
    assert torch.allclose(kernels.silu_mul(gate_up.double()), (torch.nn.functional.silu(gate) * up).double())


def int8_case(seed: int, num_seqs: int, num_kv_heads: int, group: int, head_dim: int, page_size: int,
              max_len: int):
    """A float cache, its int8 form (``kv.int8``) and a batch of queries over random pages; context lengths are
    drawn from [1, max_len], so most are not a multiple of the page size."""
    gen = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, max_len + 1, (num_seqs,), generator=gen)
    max_pages = int(-(-lens.max() // page_size))
    num_pages = max_pages + 3
    page_table = torch.stack([torch.randperm(num_pages, generator=gen)[:max_pages] for _ in range(num_seqs)])
    k_cache = torch.randn(num_pages * page_size, num_kv_heads, head_dim, generator=gen)
    v_cache = torch.randn(num_pages * page_size, num_kv_heads, head_dim, generator=gen)
    q = torch.randn(num_seqs, num_kv_heads * group, head_dim, generator=gen)
    return q, (k_cache, v_cache), (*int8.quantize(k_cache), *int8.quantize(v_cache)), page_table, lens


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), num_seqs=st.integers(1, 4), num_kv_heads=st.integers(1, 5),
       group=st.integers(1, 4), head_dim=st.integers(1, 80), page_size=st.integers(1, 8), max_len=st.integers(1, 50))
def test_int8_decode_attention_is_attention_over_the_dequantized_cache(seed: int, num_seqs: int, num_kv_heads: int,
                                                                      group: int, head_dim: int, page_size: int,
                                                                      max_len: int) -> None:
    assert kernels.build(torch.device("cpu")), "the C++ kernel must build here (g++ and ninja are installed)"
    q, (k_float, v_float), (k8, ks, v8, vs), page_table, lens = int8_case(seed, num_seqs, num_kv_heads, group,
                                                                          head_dim, page_size, max_len)
    scale = head_dim**-0.5
    native = kernels.paged_decode_attention_int8(q, k8, v8, ks, vs, page_table, lens, page_size, scale)
    fallback = kernels._torch_decode_attention_int8(q, k8, v8, ks, vs, page_table, lens, page_size, scale)
    dequantized = dense_reference(q, int8.dequantize(k8, ks, torch.float32), int8.dequantize(v8, vs, torch.float32),
                                  page_table, lens, page_size, scale)
    torch.testing.assert_close(native, dequantized, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fallback, native, atol=1e-5, rtol=1e-5)
    # Against the float cache it came from: each element is off by at most half its row's scale (about 1.5% of
    # the row's largest magnitude here), which moves the outputs, means of unit-variance values, far less.
    torch.testing.assert_close(native, dense_reference(q, k_float, v_float, page_table, lens, page_size, scale),
                               atol=0.05, rtol=0.05)


def test_int8_decode_attention_gives_a_sequence_the_same_bits_whatever_else_is_in_the_batch() -> None:
    q, _, (k8, ks, v8, vs), page_table, lens = int8_case(2, 6, 3, 3, 64, 16, 100)
    batched = kernels.paged_decode_attention_int8(q, k8, v8, ks, vs, page_table, lens, 16, 0.125)
    for b in range(q.shape[0]):
        alone = kernels.paged_decode_attention_int8(q[b:b + 1], k8, v8, ks, vs, page_table[b:b + 1], lens[b:b + 1],
                                                    16, 0.125)
        assert torch.equal(alone[0], batched[b])
