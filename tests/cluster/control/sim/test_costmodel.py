"""The roofline cost model: parameter and KV arithmetic, the step-time formula, presets."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from radixserve.cluster.control.sim.calibrate import Measurement, fit
from radixserve.cluster.control.sim.costmodel import (
    DEVICES, MODELS, CostModel, DeviceSpec, PrefillChunk, load_preset, save_preset,
)

H100_FLOPS = 989e12 * 0.6  # achievable: the preset's peak at 60% MFU
H100_BW = 3.35e12 * 0.8  # and 80% MBU
OVERHEAD = 0.5e-3

# Llama-3-8B by hand: one layer's q/k/v/o and MLP, the embedding (untied: the LM head has as many).
L8_ATTENTION = 4096 * 128 * 2 * (32 + 8)  # 41,943,040
L8_MLP = 3 * 4096 * 14336  # 176,160,768
L8_EMBEDDING = 128256 * 4096  # 525,336,576
L8_WEIGHT_BYTES = 2 * (32 * (L8_ATTENTION + L8_MLP) + 65 * 4096 + 2 * L8_EMBEDDING)
L8_KV_BYTES = 2 * 32 * 8 * 128 * 2


def test_published_parameter_counts():
    assert MODELS["llama-3-8b"].num_params == 8_030_261_248
    assert MODELS["llama-3-70b"].num_params == 70_553_706_496
    assert MODELS["smollm2-135m"].num_params == 134_515_008  # tied: the embedding counts once
    mixtral = MODELS["mixtral-8x7b"]
    assert mixtral.num_params == 46_702_792_704
    assert mixtral.active_params_per_token == 12_879_925_248  # two of eight experts per layer
    assert MODELS["llama-3-8b"].active_params_per_token == MODELS["llama-3-8b"].num_params


def test_llama3_8b_on_h100_weights_kv_and_capacity():
    model = MODELS["llama-3-8b"]
    assert model.weight_bytes_per_rank == L8_WEIGHT_BYTES == 16_060_522_496
    assert model.kv_bytes_per_token_per_rank == L8_KV_BYTES == 131_072
    cost = CostModel(DEVICES["h100"], model)
    assert cost.kv_capacity_tokens == (72_000_000_000 - 16_060_522_496) // 131_072 == 426_784
    assert CostModel(DEVICES["h100"], model, kv_memory_fraction=0.5).kv_capacity_tokens == (
        (40_000_000_000 - 16_060_522_496) // 131_072)


def test_decode_at_batch_1_is_memory_bound():
    cost = CostModel(DEVICES["h100"], MODELS["llama-3-8b"])
    # Weights but the untied input embedding (only gathered); KV of 1,000 context tokens and the new one read,
    # the new one written.
    nbytes = L8_WEIGHT_BYTES - 2 * L8_EMBEDDING + (1000 + 1 + 1) * L8_KV_BYTES
    flop = 2 * 32 * (L8_ATTENTION + L8_MLP) + 2 * L8_EMBEDDING + 4 * 32 * 32 * 128 * 1001
    work = cost.step_work((), 1, 1000)
    assert (work.tokens, work.flop, work.bytes) == (1, flop, nbytes)
    assert cost.decode_step_time(1, 1000) == pytest.approx(OVERHEAD + nbytes / H100_BW, rel=1e-12)
    assert flop / H100_FLOPS < nbytes / H100_BW / 100
    serial = CostModel(dataclasses.replace(DEVICES["h100"], overlap=0.0), MODELS["llama-3-8b"])
    assert serial.decode_step_time(1, 1000) == pytest.approx(OVERHEAD + nbytes / H100_BW + flop / H100_FLOPS,
                                                             rel=1e-12)


def test_a_long_prefill_is_compute_bound():
    cost = CostModel(DEVICES["h100"], MODELS["llama-3-8b"])
    # 8,192 tokens through the layers, one LM-head row, causal attention over 8192 * 8193 / 2 pairs.
    flop = 2 * 32 * (L8_ATTENTION + L8_MLP) * 8192 + 2 * L8_EMBEDDING + 4 * 32 * 32 * 128 * (8192 * 8193 // 2)
    assert cost.prefill_time(8192, 0) == pytest.approx(OVERHEAD + flop / H100_FLOPS, rel=1e-12)
    assert cost.step_work([PrefillChunk(8192, 0)], 0, 0).bytes / H100_BW < flop / H100_FLOPS / 10


def test_a_chunk_attends_to_its_context_and_earlier_chunk_tokens():
    cost = CostModel(DEVICES["h100"], MODELS["llama-3-8b"])
    first, second = cost.step_work([PrefillChunk(512, 0)], 0, 0), cost.step_work([PrefillChunk(512, 512)], 0, 0)
    assert second.flop - first.flop == 4 * 32 * 32 * 128 * 512 * 512
    assert second.bytes - first.bytes == 512 * L8_KV_BYTES
    both = cost.step_work([PrefillChunk(512, 0), PrefillChunk(512, 512)], 3, 300)
    single = cost.step_work((), 3, 300)
    assert both.tokens == 1027
    assert both.flop == pytest.approx(first.flop + second.flop + single.flop, rel=1e-12)
    weights = L8_WEIGHT_BYTES - 2 * L8_EMBEDDING  # read once however many sequences the step has
    assert both.bytes == pytest.approx(first.bytes + second.bytes + single.bytes - 2 * weights, rel=1e-12)


def test_tensor_parallel_splits_weights_and_adds_all_reduce():
    model = MODELS["llama-3-70b"]
    assert model.tensor_parallel == 4 and model.kv_heads_per_rank == 2
    # Per rank: 16 of 64 heads and 2 of 8 KV heads, a quarter of the MLP and vocabulary, every norm.
    per_rank = 80 * (8192 * 128 * 2 * (16 + 2) + 3 * 8192 * 7168) + 161 * 8192 + 2 * 32064 * 8192
    assert model.weight_bytes_per_rank == 2 * per_rank == 35_278_831_616
    assert model.weight_bytes_per_rank == pytest.approx(2 * model.num_params / 4, rel=1e-4)
    assert model.kv_bytes_per_token_per_rank == 2 * 80 * 2 * 128 * 2
    cost = CostModel(DEVICES["h100"], model)
    work = cost.step_work((), 64, 64 * 2000)
    # Two all-reduces a layer of tokens * hidden * 2 bytes, ring factor 2 * 3 / 4, over 450 GB/s.
    all_reduce = 64 * 2 * 80 * 8192 * 2 * 1.5 / 450e9
    expected = OVERHEAD + max(work.flop / H100_FLOPS, work.bytes / H100_BW) + all_reduce
    assert cost.decode_step_time(64, 64 * 2000) == pytest.approx(expected, rel=1e-12)


def test_kv_heads_are_replicated_when_fewer_than_ranks():
    model = dataclasses.replace(MODELS["llama-3-70b"], tensor_parallel=16)
    assert model.kv_heads_per_rank == 1
    assert model.kv_bytes_per_token_per_rank == 2 * 80 * 1 * 128 * 2


def test_moe_reads_only_the_experts_its_tokens_route_to():
    model = dataclasses.replace(MODELS["mixtral-8x7b"], tensor_parallel=1)
    cost = CostModel(DEVICES["h200"], model)
    expert_bytes = 32 * 8 * 3 * 4096 * 14336 * 2  # every expert of every layer
    one, many = cost.step_work((), 1, 1000), cost.step_work((), 256, 1000)
    # One token uses 2 of 8 experts a layer; 256 tokens leave an expert unused with chance 0.75 ** 256.
    kv = 2 * 32 * 8 * 128 * 2
    assert many.bytes - one.bytes == pytest.approx(expert_bytes * (0.75 - 0.75 ** 256) + 255 * 2 * kv, rel=1e-12)
    dense = one.bytes - expert_bytes / 4 - 1002 * kv
    assert dense == model.weight_bytes_per_rank - expert_bytes - 2 * 32000 * 4096


_COSTS = [
    CostModel(DEVICES["h100"], MODELS["llama-3-8b"]),
    CostModel(DEVICES["h100"], MODELS["llama-3-70b"]),
    CostModel(DEVICES["h100"], MODELS["mixtral-8x7b"]),
    CostModel(DEVICES["cpu"], MODELS["smollm2-135m"]),
]


@given(chunks=st.lists(st.tuples(st.integers(1, 4096), st.integers(0, 100_000)), max_size=3),
       decode_batch=st.integers(0, 512), per_request_context=st.integers(1, 8192),
       which=st.sampled_from(["new_tokens", "context_tokens", "decode_batch", "decode_context"]),
       bump=st.integers(1, 1000))
def test_step_time_never_decreases_with_more_work(chunks: list[tuple[int, int]], decode_batch: int,
                                                  per_request_context: int, which: str, bump: int):
    context = decode_batch * per_request_context
    prefill = [PrefillChunk(n, c) for n, c in chunks]
    more_prefill, more_batch, more_context = list(prefill), decode_batch, context
    if which == "decode_batch":
        more_batch += bump
    elif which == "decode_context" and decode_batch:
        more_context += bump
    elif prefill:
        n, c = chunks[0]
        more_prefill[0] = PrefillChunk(n + bump, c) if which == "new_tokens" else PrefillChunk(n, c + bump)
    for cost in _COSTS:
        assert cost.step_time(more_prefill, more_batch, more_context) >= cost.step_time(prefill, decode_batch, context)


def test_an_empty_step_costs_nothing_and_bad_counts_name_the_field():
    cost = CostModel(DEVICES["h100"], MODELS["llama-3-8b"])
    assert cost.step_time((), 0, 0) == 0.0
    for batch, context in ((-1, 0), (0, 5), (2, -1)):
        with pytest.raises(ValueError, match="^decode_batch: "):
            cost.step_time((), batch, context)
    with pytest.raises(ValueError, match="^new_tokens: "):
        PrefillChunk(0, 0)
    with pytest.raises(ValueError, match="^context_tokens: "):
        PrefillChunk(1, -1)


def test_weights_that_do_not_fit_and_tensor_parallel_without_interconnect_are_errors():
    with pytest.raises(ValueError, match="^model: llama-3-70b needs 141.11 GB of weights per rank"):
        CostModel(DEVICES["h100"], dataclasses.replace(MODELS["llama-3-70b"], tensor_parallel=1))
    with pytest.raises(ValueError, match="^tensor_parallel: 2 needs a device with interconnect_bw > 0"):
        CostModel(DEVICES["cpu"], dataclasses.replace(MODELS["smollm2-135m"], num_heads=12, num_kv_heads=4,
                                                      tensor_parallel=2))
    with pytest.raises(ValueError, match="^kv_memory_fraction: "):
        CostModel(DEVICES["h100"], MODELS["llama-3-8b"], kv_memory_fraction=0.0)


@pytest.mark.parametrize("changes, field", [
    ({"tensor_parallel": 3}, "tensor_parallel"),  # 3 does not divide 64 heads
    ({"tensor_parallel": 0}, "tensor_parallel"),
    ({"num_kv_heads": 7}, "num_kv_heads"),
    ({"num_experts": 8}, "experts_per_token"),
    ({"experts_per_token": 2}, "experts_per_token"),
    ({"hidden_size": 0}, "hidden_size"),
])
def test_invalid_model_shapes_name_the_field(changes: dict[str, int], field: str):
    with pytest.raises(ValueError, match=f"^{field}: "):
        dataclasses.replace(MODELS["llama-3-70b"], **changes)


@pytest.mark.parametrize("changes, field", [
    ({"flops": 0.0}, "flops"), ({"mem_bw": -1.0}, "mem_bw"), ({"mem_bytes": float("inf")}, "mem_bytes"),
    ({"step_overhead_s": -1e-3}, "step_overhead_s"), ({"memory_efficiency": 1.5}, "memory_efficiency"),
    ({"compute_efficiency": 0.0}, "compute_efficiency"), ({"overlap": 1.5}, "overlap"), ({"name": ""}, "name"),
])
def test_invalid_device_specs_name_the_field(changes: dict[str, object], field: str):
    with pytest.raises(ValueError, match=f"^{field}: "):
        dataclasses.replace(DEVICES["h100"], **changes)


def test_cpu_preset_round_trips_and_holds_the_engines_default_kv_pool(tmp_path: Path):
    cpu = DEVICES["cpu"]
    assert cpu.name == "cpu" and cpu.interconnect_bw == 0 and cpu.compute_efficiency == cpu.memory_efficiency == 1
    path = tmp_path / "cpu.json"
    save_preset(cpu, path)
    assert load_preset(path) == cpu
    # calibrate sizes mem_bytes so the default fraction leaves the engine's default pool: 1 GiB of 16-token
    # pages of 30 layers * 3 KV heads * 64 * fp32 K and V = 1,456 pages.
    assert CostModel(cpu, MODELS["smollm2-135m"]).kv_capacity_tokens == 2**30 // (2 * 30 * 16 * 3 * 64 * 4) * 16


def test_load_preset_rejects_what_is_not_a_device_spec(tmp_path: Path):
    path = tmp_path / "bad.json"
    for text in ("[1]", json.dumps({"name": "x", "flops": 1.0, "mem_bw": 1.0, "mem_bytes": 1.0, "speed": 2}),
                 json.dumps({"name": "x", "flops": 1.0}), "{not json"):
        path.write_text(text)
        with pytest.raises(ValueError, match="^preset: "):
            load_preset(path)
    path.write_text(json.dumps({"name": "x", "flops": -1.0, "mem_bw": 1.0, "mem_bytes": 1.0}))
    with pytest.raises(ValueError, match="^flops: "):
        load_preset(path)
    with pytest.raises(ValueError, match="^preset: cannot read"):
        load_preset(tmp_path / "missing.json")


def test_fit_recovers_the_device_that_produced_the_timings():
    model = MODELS["smollm2-135m"]
    truth = DeviceSpec("cpu", flops=60e9, mem_bw=8e9, mem_bytes=2e9, step_overhead_s=3e-3, overlap=0.2)
    cost = CostModel(truth, model)
    shapes = [((PrefillChunk(512, 0),), 0, 0), ((PrefillChunk(512, 512),), 0, 0),
              ((), 1, 256), ((), 4, 4 * 256), ((), 16, 16 * 256)]
    measurements = [Measurement(str(i), *shape, cost.step_time(*shape)) for i, shape in enumerate(shapes)]
    fitted = fit(measurements, model, mem_bytes=2e9)
    assert fitted.overlap == 0.2 and fitted.name == "cpu" and fitted.mem_bytes == 2e9
    assert fitted.flops == pytest.approx(60e9, rel=1e-4) and fitted.mem_bw == pytest.approx(8e9, rel=1e-4)
    assert fitted.step_overhead_s == pytest.approx(3e-3, rel=1e-3)
    with pytest.raises(ValueError, match="^measurements: need at least 4"):
        fit(measurements[:3], model, mem_bytes=2e9)
