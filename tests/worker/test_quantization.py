"""Linear methods (``worker.models.quantization``): each against a float reference on random shapes, odd ones
included (those torch's kernels do not take run the dequantized fallback); sharded layers quantize their own
slice; an engine serves with quantized weights; on the default model, int8 and int4 keep the perplexity of the
shipped text within the issue's bounds of the float weights'."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from engine_runs import run_to_completion
from hypothesis import given, settings
from hypothesis import strategies as st

from radixserve.cluster.base.config import CacheConfig, EngineConfig
from radixserve.cluster.base.sampling_params import SamplingParams
from radixserve.worker.engine import Engine
from radixserve.worker.kernels import blocks
from radixserve.worker.models.checkpoint import BlockWeight, Checkpoint
from radixserve.worker.models.layers import ColumnLinear, RowLinear, Shard, VocabEmbedding
from radixserve.worker.models.loading import open_checkpoint
from radixserve.worker.models.quantization import (GGUFMethod, Int4Method, Int8Method,
                                                   dequantize_int4, dequantize_int8, int4_scales_and_zeros,
                                                   make_linear_method, quantize_int4, quantize_int8)
from radixserve.worker.models.scoring import build_model, perplexity

TEXT = Path(__file__).resolve().parents[2] / "bench" / "data" / "moby_dick_ch1-4.txt"


def _layer(method: object, rows: int, cols: int, seed: int, bias: bool = False) -> tuple[ColumnLinear, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=generator)
    layer = ColumnLinear(cols, [rows], bias=bias, method=method)  # type: ignore[arg-type]
    layer.weight.weight_loader(layer.weight, weight, 0)
    if bias:
        layer.bias.data.copy_(torch.randn(rows, generator=generator))
    layer.method.process_weights_after_loading(layer)
    return layer, weight


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 80), cols=st.integers(1, 200), seed=st.integers(0, 2**16))
def test_int8_rows_dequantize_within_half_a_step(rows: int, cols: int, seed: int) -> None:
    weight = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 3
    q, scales = quantize_int8(weight)
    assert q.dtype == torch.int8 and int(q.abs().max()) <= 127
    error = (q.float() * scales.unsqueeze(1) - weight).abs()
    assert bool((error <= scales.unsqueeze(1) / 2 * (1 + 1e-5)).all())


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 40), groups=st.integers(1, 5), group_size=st.sampled_from([32, 64, 128]),
       seed=st.integers(0, 2**16))
def test_int4_groups_dequantize_within_half_a_step_in_torchs_layout(rows: int, groups: int, group_size: int,
                                                                     seed: int) -> None:
    weight = torch.randn(rows, groups * group_size, generator=torch.Generator().manual_seed(seed))
    q, scales, minimums = quantize_int4(weight, group_size)
    assert int(q.min()) >= 0 and int(q.max()) <= 15
    steps = scales.repeat_interleave(group_size, dim=1)
    exact = q.float() * steps + minimums.repeat_interleave(group_size, dim=1)
    assert bool(((exact - weight).abs() <= steps / 2 * (1 + 1e-5)).all())
    # torch's (q - 8) * scale + zero form, with its bfloat16 scales and zeros
    dequantized = dequantize_int4(q, int4_scales_and_zeros(scales, minimums), group_size)
    assert torch.allclose(dequantized, exact, atol=float(steps.max()) * 0.5 + 0.02 * float(weight.abs().max()))


def _bfloat16_bound(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """How far a product may stray from the reference when activations (or the fallback's absence of that rounding)
    and the kernel's bfloat16 arithmetic each round by up to 2^-8 of a term: measured against the terms' magnitude,
    so that outputs near zero after cancellation are held to the same standard."""
    return 2**-6 * (x.abs() @ weight.abs().T) + 1e-4


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 70), cols=st.sampled_from([1, 7, 33, 36, 64, 128, 192]), tokens=st.integers(1, 9),
       bias=st.booleans(), seed=st.integers(0, 2**16))
def test_int8_linear_matches_the_float_product_of_its_dequantized_weight(rows: int, cols: int, tokens: int,
                                                                          bias: bool, seed: int) -> None:
    layer, _ = _layer(Int8Method(), rows, cols, seed, bias)
    x = torch.randn(tokens, cols, generator=torch.Generator().manual_seed(seed + 1))
    weight = dequantize_int8(layer.qweight, layer.scales)
    reference = x.to(torch.bfloat16).float() @ weight.T + (layer.bias if bias else 0)
    out = layer(x)
    assert out.shape == (tokens, rows) and out.dtype == torch.float32
    assert bool(((out - reference).abs() <= _bfloat16_bound(x, weight)).all())


@settings(max_examples=30, deadline=None)
@given(rows=st.sampled_from([1, 5, 16, 31, 48]), cols=st.sampled_from([32, 64, 96, 192, 384]),
       tokens=st.integers(1, 9), seed=st.integers(0, 2**16))
def test_int4_linear_matches_the_float_product_of_its_dequantized_weight(rows: int, cols: int, tokens: int,
                                                                          seed: int) -> None:
    layer, weight = _layer(Int4Method(), rows, cols, seed)
    assert layer.int4_packed == (rows % 16 == 0)
    x = torch.randn(tokens, cols, generator=torch.Generator().manual_seed(seed + 1))
    q, scales, minimums = quantize_int4(weight, layer.group_size)
    dequantized = dequantize_int4(q, int4_scales_and_zeros(scales, minimums), layer.group_size)
    reference = x.to(torch.bfloat16).float() @ dequantized.T
    assert bool(((layer(x) - reference).abs() <= _bfloat16_bound(x, dequantized)).all())


@pytest.mark.parametrize("method", [Int8Method(), Int4Method()], ids=["int8", "int4"])
def test_a_sharded_layer_quantizes_its_own_slice_as_the_whole_layer_would(method: object) -> None:
    """Row shards of a column-parallel layer each hold their rows' scales; their outputs concatenate to the
    whole layer's (int4 groups run along the input, which column parallelism does not split)."""
    weight = torch.randn(64, 128, generator=torch.Generator().manual_seed(3))
    x = torch.randn(4, 128, generator=torch.Generator().manual_seed(4))
    whole = ColumnLinear(128, [64], method=method)  # type: ignore[arg-type]
    whole.weight.weight_loader(whole.weight, weight, 0)
    whole.method.process_weights_after_loading(whole)
    outputs = []
    for rank in range(2):
        part = ColumnLinear(128, [64], shard=Shard(rank, 2), method=method)  # type: ignore[arg-type]
        part.weight.weight_loader(part.weight, weight, 0)
        part.method.process_weights_after_loading(part)
        outputs.append(part(x))
    assert torch.equal(torch.cat(outputs, dim=1), whole(x))
    rows = [RowLinear(128, 64, shard=Shard(rank, 2), method=method) for rank in range(2)]  # type: ignore[arg-type]
    for layer in rows:
        layer.weight.weight_loader(layer.weight, weight, 0)
        layer.method.process_weights_after_loading(layer)
    summed = sum(layer(x[:, 64 * r:64 * (r + 1)]) for r, layer in enumerate(rows))
    assert torch.allclose(summed, whole(x), rtol=0.05, atol=0.05 * float(whole(x).abs().max()))


def test_an_int4_embedding_table_is_held_in_int8_for_lookups_and_the_tied_head() -> None:
    table = VocabEmbedding(50, 64, Int4Method())
    weight = torch.randn(50, 64, generator=torch.Generator().manual_seed(5))
    table.weight.weight_loader(table.weight, weight, 0)
    table.method.process_weights_after_loading(table)
    assert isinstance(table.method, Int8Method) and table.qweight.dtype == torch.int8
    rows = table(torch.tensor([0, 7, 49]))
    assert torch.allclose(rows, weight[[0, 7, 49]], atol=float(weight.abs().max()) / 127)
    hidden = torch.randn(2, 64)
    assert torch.allclose(table.logits(hidden), hidden @ weight.T, rtol=0.05, atol=0.5)


def test_an_unknown_quantization_is_refused_naming_the_field() -> None:
    with pytest.raises(ValueError, match="^quantization: "):
        make_linear_method("int3")
    with pytest.raises(ValueError, match="quantization"):
        EngineConfig(quantization="fp8")
    with pytest.raises(ValueError, match="quantization"):
        EngineConfig(quantization="int8", device="cuda")


@pytest.fixture(scope="module")
def tiny_checkpoint(tiny_hf_dir: Path) -> Checkpoint:
    return open_checkpoint(tiny_hf_dir)


Q4_1 = blocks.BLOCK_TYPES["Q4_1"]


def _block_layer(layer: torch.nn.Module, parts: list[BlockWeight | torch.Tensor]) -> torch.nn.Module:
    for shard_id, part in enumerate(parts):
        layer.weight.weight_loader(layer.weight, part, shard_id)
    layer.method.process_weights_after_loading(layer)
    return layer


def test_gguf_layers_keep_the_files_blocks_and_shard_them_along_either_dimension() -> None:
    """A fused column layer holds its parts' blocks byte for byte, row shards hold their rows, and column
    (row-parallel) shards their blocks, so shard outputs concatenate / sum to the whole layer's."""
    generator = torch.Generator().manual_seed(11)
    q, k = (BlockWeight(blocks.quantize(torch.randn(rows, 128, generator=generator), Q4_1), Q4_1, 128)
            for rows in (64, 32))
    whole = _block_layer(ColumnLinear(128, [64, 32], method=GGUFMethod()), [q, k])
    assert whole.block_type == Q4_1
    assert torch.equal(blocks.unpack(whole.blocks, Q4_1, 96), torch.cat([q.data, k.data]))
    x = torch.randn(3, 128, generator=generator)
    reference = x @ torch.cat([q.dequantize(), k.dequantize()]).T
    assert torch.allclose(whole(x), reference, rtol=0.02, atol=0.02 * float(reference.abs().max()))
    halves = [_block_layer(ColumnLinear(128, [64, 32], shard=Shard(r, 2), method=GGUFMethod()), [q, k])
              for r in range(2)]
    assert torch.equal(blocks.unpack(torch.cat([half.blocks for half in halves]), Q4_1, 96),
                       torch.cat([q.data[:32], k.data[:16], q.data[32:], k.data[16:]]))
    rows = [_block_layer(RowLinear(128, 64, shard=Shard(r, 2), method=GGUFMethod()), [q]) for r in range(2)]
    summed = sum(layer(x[:, 64 * r:64 * (r + 1)]) for r, layer in enumerate(rows))
    assert torch.allclose(summed, x @ q.dequantize().T, rtol=0.02, atol=0.02 * float(reference.abs().max()))
    with pytest.raises(ValueError, match="^blocks: columns"):
        q.narrow(1, 16, 32)


def test_gguf_quantizes_mixed_parts_to_q8_0_and_gives_each_row_the_same_bits_in_any_batch() -> None:
    generator = torch.Generator().manual_seed(12)
    weight = torch.randn(48, 64, generator=generator)
    q4 = BlockWeight(blocks.quantize(weight[:16], Q4_1), Q4_1, 64)
    layer = _block_layer(ColumnLinear(64, [16, 32], method=GGUFMethod()), [q4, weight[16:]])
    assert layer.block_type == blocks.BLOCK_TYPES["Q8_0"]
    dequantized = blocks.dequantize(layer.blocks, layer.block_type, 64)[:48]
    assert torch.allclose(dequantized[16:], weight[16:], atol=float(weight.abs().max()) / 127)
    chunk = torch.randn(300, 64, generator=generator)
    assert torch.equal(layer(chunk)[5:8], layer(chunk[5:8]))
    assert torch.equal(layer(chunk)[299], layer(chunk[299:])[0])
    assert not any(p.dim() == 2 for p in layer.parameters())


@pytest.mark.parametrize("quantization", ["int8", "int4", "gguf"])
def test_an_engine_serves_with_quantized_weights(tiny_checkpoint: Checkpoint, quantization: str) -> None:
    engine = Engine(EngineConfig(model=tiny_checkpoint.name, quantization=quantization,
                                 cache=CacheConfig(page_size=4, num_pages=64)), tiny_checkpoint)
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    ids = [engine.add_request([5, 9, 14, 30, 2, 7, 11], params) for _ in range(3)]
    results = run_to_completion(engine)
    assert all(len(results[i].tokens) == 6 for i in ids)
    assert len({tuple(results[i].tokens) for i in ids}) == 1  # same prompt, greedy: same answer
    assert not any(isinstance(p, torch.nn.Parameter) and p.dim() == 2 for p in engine.model.parameters())


def test_on_the_default_model_int8_int4_and_gguf_keep_the_perplexity_within_the_bounds(
        smollm2_checkpoint: Checkpoint) -> None:
    """The first 1,024 tokens of the shipped text (the benchmark scores all of it): int8 within 1% of the
    float weights' perplexity, int4 and the file's own blocks within 5%."""
    ids = smollm2_checkpoint.tokenizer.encode(TEXT.read_text())[:1024]
    scores = {q: perplexity(build_model(smollm2_checkpoint, 1024, method=make_linear_method(q)), ids)
              for q in ("none", "int8", "int4", "gguf")}
    print(f"perplexity of 1,024 tokens: {scores}")
    assert scores["int8"] / scores["none"] - 1 < 0.01
    assert scores["int4"] / scores["none"] - 1 < 0.05
    assert scores["gguf"] / scores["none"] - 1 < 0.05


def test_the_default_models_gguf_layers_hold_the_files_bytes(smollm2_checkpoint: Checkpoint) -> None:
    model = build_model(smollm2_checkpoint, 64, method=GGUFMethod())
    stored = dict(smollm2_checkpoint.weights(blocks=True))
    down = stored["model.layers.3.mlp.down_proj.weight"]
    assert isinstance(down, BlockWeight) and down.block_type == Q4_1
    assert torch.equal(blocks.unpack(model.model.layers[3].mlp.down_proj.blocks, Q4_1, 576), down.data)
    table = stored["model.embed_tokens.weight"]
    assert torch.equal(blocks.unpack(model.model.embed_tokens.blocks, table.block_type, table.shape[0]),
                       table.data)  # Q8_0
    assert not any(p.dim() == 2 for p in model.parameters())
