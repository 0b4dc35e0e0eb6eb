"""The native paged attention (float and int8 caches) against a dense per-query reference, and the other step
kernels against torch."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch

from radixserve.worker import kernels
from radixserve.worker.kv import int8


@dataclass
class Case:
    """Queries of several sequences over random pages: sequence s's last ``chunks[s]`` positions of its context
    (a prefill chunk, or one decode token), each attending to its position + 1 tokens."""

    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    page_table: torch.Tensor
    query_seqs: torch.Tensor
    context_lens: torch.Tensor
    page_size: int

    def attend(self, rows: torch.Tensor | slice = slice(None), k_cache: torch.Tensor | None = None,
               v_cache: torch.Tensor | None = None, scales: tuple = (None, None), native: bool = True) -> torch.Tensor:
        fn = kernels.paged_attention if native else kernels._torch_paged_attention
        return fn(self.q[rows], self.k_cache if k_cache is None else k_cache,
                  self.v_cache if v_cache is None else v_cache, *scales, self.page_table, self.query_seqs[rows],
                  self.context_lens[rows], self.page_size, 0.2)


def random_case(seed: int, num_heads: int, num_kv_heads: int, dtype: torch.dtype = torch.float32,
                head_dim: int = 32, page_size: int = 4, num_seqs: int = 4, max_len: int = 40) -> Case:
    gen = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, max_len + 1, (num_seqs,), generator=gen)
    chunks = [int(torch.randint(1, int(n) + 1, (1,), generator=gen)) for n in lens]
    max_pages = int(-(-lens.max() // page_size))
    num_pages = max_pages * num_seqs + 2
    page_table = torch.stack([torch.randperm(num_pages, generator=gen)[:max_pages] for _ in range(num_seqs)])
    k_cache = torch.randn(num_pages * page_size, num_kv_heads, head_dim, generator=gen).to(dtype)
    v_cache = torch.randn(num_pages * page_size, num_kv_heads, head_dim, generator=gen).to(dtype)
    query_seqs = torch.cat([torch.full((c,), s) for s, c in enumerate(chunks)])
    context_lens = torch.cat([torch.arange(int(n) - c, int(n)) + 1 for n, c in zip(lens, chunks)])
    q = torch.randn(len(query_seqs), num_heads, head_dim, generator=gen)
    return Case(q, k_cache, v_cache, page_table, query_seqs, context_lens, page_size)


def dense_reference(case: Case, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
    outs = []
    for t in range(case.q.shape[0]):
        positions = torch.arange(int(case.context_lens[t]))
        pages = case.page_table[case.query_seqs[t]]
        slots = pages[positions // case.page_size] * case.page_size + positions % case.page_size
        keys, values = k_cache[slots].float().transpose(0, 1), v_cache[slots].float().transpose(0, 1)  # [Hkv, L, D]
        group = case.q.shape[1] // keys.shape[0]
        keys, values = keys.repeat_interleave(group, 0), values.repeat_interleave(group, 0)
        probs = (torch.einsum("hd,hld->hl", case.q[t].float(), keys) * 0.2).softmax(-1)
        outs.append(torch.einsum("hl,hld->hd", probs, values))
    return torch.stack(outs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16), num_kv_heads=st.integers(1, 4), group=st.integers(1, 4),
       head_dim=st.integers(1, 80), page_size=st.integers(1, 8), num_seqs=st.integers(1, 4))
def test_native_and_torch_paths_match_a_dense_reference(dtype: torch.dtype, seed: int, num_kv_heads: int,
                                                        group: int, head_dim: int, page_size: int,
                                                        num_seqs: int) -> None:
    assert kernels.build(torch.device("cpu")), "the C++ kernel must build here (g++ and ninja are installed)"
    case = random_case(seed, num_kv_heads * group, num_kv_heads, dtype, head_dim, page_size, num_seqs)
    expected = dense_reference(case, case.k_cache, case.v_cache)
    torch.testing.assert_close(case.attend(), expected, atol=1e-5, rtol=1e-5)
    float_case = Case(case.q, case.k_cache.float(), case.v_cache.float(), case.page_table, case.query_seqs,
                      case.context_lens, case.page_size)
    torch.testing.assert_close(float_case.attend(native=False), expected, atol=1e-5, rtol=1e-5)


def test_a_query_gives_the_same_bits_alone_in_any_chunk_or_batch() -> None:
    """Decode tokens and prompt tokens share the kernel: a query's result is the same whether it runs alone (a
    decode step), in its sequence's chunk cut anywhere (the tiles of eight and their remainders), or batched."""
    case = random_case(1, 9, 3, num_seqs=5, max_len=60)
    batched = case.attend()
    for t in range(case.q.shape[0]):
        assert torch.equal(case.attend(torch.tensor([t]))[0], batched[t])
    for cut in (3, 11):
        pieces = [case.attend(torch.arange(start, min(start + cut, len(batched))))
                  for start in range(0, len(batched), cut)]
        assert torch.equal(torch.cat(pieces), batched)


def test_bad_query_rows_and_context_lengths_are_refused_naming_the_argument() -> None:
    case = random_case(2, 4, 2)
    with pytest.raises(RuntimeError, match="query_seqs: "):
        kernels.paged_attention(case.q, case.k_cache, case.v_cache, None, None, case.page_table,
                                case.query_seqs + 100, case.context_lens, case.page_size, 0.2)
    with pytest.raises(RuntimeError, match="context_lens: "):
        kernels.paged_attention(case.q, case.k_cache, case.v_cache, None, None, case.page_table, case.query_seqs,
                                case.context_lens + 10_000, case.page_size, 0.2)
    with pytest.raises(RuntimeError, match="k_scale, v_scale: "):
        kernels.paged_attention(case.q, case.k_cache.to(torch.int8), case.v_cache.to(torch.int8), None, None,
                                case.page_table, case.query_seqs, case.context_lens, case.page_size, 0.2)


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


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), num_seqs=st.integers(1, 4), num_kv_heads=st.integers(1, 5),
       group=st.integers(1, 4), head_dim=st.integers(1, 80), page_size=st.integers(1, 8), max_len=st.integers(1, 50))
def test_int8_attention_is_attention_over_the_dequantized_cache(seed: int, num_seqs: int, num_kv_heads: int,
                                                               group: int, head_dim: int, page_size: int,
                                                               max_len: int) -> None:
    assert kernels.build(torch.device("cpu")), "the C++ kernel must build here (g++ and ninja are installed)"
    case = random_case(seed, num_kv_heads * group, num_kv_heads, torch.float32, head_dim, page_size, num_seqs,
                       max_len)
    (k8, ks), (v8, vs) = int8.quantize(case.k_cache), int8.quantize(case.v_cache)
    native = case.attend(k_cache=k8, v_cache=v8, scales=(ks, vs))
    fallback = case.attend(k_cache=k8, v_cache=v8, scales=(ks, vs), native=False)
    dequantized = dense_reference(case, int8.dequantize(k8, ks, torch.float32), int8.dequantize(v8, vs, torch.float32))
    torch.testing.assert_close(native, dequantized, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fallback, native, atol=1e-5, rtol=1e-5)
    # Against the float cache it came from: each element is off by at most half its row's scale (about 1.5% of
    # the row's largest magnitude here), which moves the outputs, means of unit-variance values, far less.
    torch.testing.assert_close(native, dense_reference(case, case.k_cache, case.v_cache), atol=0.05, rtol=0.05)
