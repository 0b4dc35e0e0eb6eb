"""Fits the ``cpu`` device preset to the real engine on this machine.

``calibrate`` builds an engine (by default the default model on the CPU), times engine steps of known shape
(``measure``) and fits the four free numbers of a ``DeviceSpec`` (achieved FLOP/s, achieved memory bytes/s, the
per-step overhead and the compute/memory ``overlap``) so that ``CostModel.step_time`` reproduces the timings
(``fit``: least squares on relative error). The timed steps, each a median:

* the chunks of a 1,024-token and of a 256-token prefill as the scheduler cuts them at ``max_num_batched_tokens``
  (512 by default: 512 tokens at context 0, then 512 at context 512; 256 at context 0), over ``repeats`` fresh
  prompts each;
* pure decode steps at batch 1, 4 and 16 with contexts of about 256 tokens, over ``8 * repeats`` steps each.

The engine runs on ``num_threads`` torch threads, as a pool worker with that many CPUs does (one by default, like
``PoolConfig.num_cpus_per_worker``). ``mem_bytes`` is set so that the default ``kv_memory_fraction`` leaves the
engine's KV pool (``cache.memory_gib``) after the weights, so a simulated worker holds as many tokens as a real one.
"""

from __future__ import annotations

import logging
import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from radixserve.cluster.base.config import EngineConfig
from radixserve.cluster.base.sampling_params import SamplingParams
from radixserve.cluster.control.sim.costmodel import (
    CPU_PRESET_PATH, DEFAULT_KV_MEMORY_FRACTION, CostModel, DeviceSpec, ModelShape, PrefillChunk, load_preset,
    save_preset,
)
from radixserve.worker.engine import Engine

__all__ = ["PRESET_PATH", "Measurement", "calibrate", "fit", "load_preset", "measure", "model_shape", "save_preset"]

PRESET_PATH = CPU_PRESET_PATH  # the packaged preset that ``DEVICES["cpu"]`` loads

_log = logging.getLogger(__name__)

_PREFILL_LENGTHS = (1024, 256)
_DECODE_BATCHES = (1, 4, 16)
_DECODE_CONTEXT = 256
_DECODE_STEPS_PER_REPEAT = 8
_DECODE_WARMUP_STEPS = 2
# Machine balance (FLOP per byte) searched by ``fit``: from memory-starved to compute-starved devices.
_BALANCE_RANGE = (1e-3, 1e6)
_GRID_POINTS = 2001
_OVERLAP_STEP = 0.01


@dataclass(frozen=True)
class Measurement:
    """The median wall time (``seconds``) of engine steps of one shape, given in ``CostModel.step_time``'s terms
    (``decode_context_tokens`` summed over the batch, averaged over the timed steps)."""

    label: str
    prefill: tuple[PrefillChunk, ...]
    decode_batch: int
    decode_context_tokens: int
    seconds: float


def model_shape(engine: Engine) -> ModelShape:
    """The engine's model as a ``ModelShape`` (one rank, the engine's dtype)."""
    m = engine.model_config
    return ModelShape(
        name=engine.config.model, num_layers=m.num_hidden_layers, hidden_size=m.hidden_size,
        num_heads=m.num_attention_heads, num_kv_heads=m.num_key_value_heads, head_dim=m.head_dim,
        intermediate_size=m.intermediate_size, vocab_size=m.vocab_size,
        dtype_bytes=getattr(torch, engine.config.dtype).itemsize, tie_word_embeddings=m.tie_word_embeddings,
    )


def calibrate(engine_config: EngineConfig | None = None, repeats: int = 3, num_threads: int = 1) -> DeviceSpec:
    """Measures the engine built from ``engine_config`` (default: ``EngineConfig()``) and returns the fitted
    ``DeviceSpec`` named ``cpu``. Takes about a minute with the default model; logs each measurement and the
    fitted model's time for it at INFO. Run it on an otherwise idle machine: other processes' CPU and memory
    traffic inflate the timings (by 20% and more on a shared two-core machine)."""
    if repeats < 1:
        raise ValueError(f"repeats: must be >= 1, got {repeats}")
    if num_threads < 1:
        raise ValueError(f"num_threads: must be >= 1, got {num_threads}")
    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        engine = Engine.from_config(engine_config or EngineConfig())
        measurements = measure(engine, repeats)
    finally:
        torch.set_num_threads(previous)
    shape = model_shape(engine)
    pool_tokens = engine.allocator.num_pages * engine.config.cache.page_size
    # Half a token of slack keeps kv_capacity_tokens from rounding down below the pool.
    kv_bytes = (pool_tokens + 0.5) * shape.kv_bytes_per_token_per_rank
    spec = fit(measurements, shape, (shape.weight_bytes_per_rank + kv_bytes) / DEFAULT_KV_MEMORY_FRACTION)
    cost = CostModel(spec, shape)
    for m in measurements:
        predicted = cost.step_time(m.prefill, m.decode_batch, m.decode_context_tokens)
        _log.info("%s: measured %.2f ms, model %.2f ms", m.label, m.seconds * 1e3, predicted * 1e3)
    return spec


def measure(engine: Engine, repeats: int) -> list[Measurement]:
    """Times prefill chunks and decode steps on ``engine`` (idle, with an empty enough KV pool for 16 requests
    of 256 tokens); the first prefill and the first decode steps of each batch are warm-up, not timed."""
    rng = random.Random(0)
    vocab_size = engine.model_config.vocab_size

    def prompt(num_tokens: int) -> list[int]:  # fresh random tokens: no prefix cache hits
        return [rng.randrange(vocab_size) for _ in range(num_tokens)]

    _prefill_step_times(engine, prompt(_PREFILL_LENGTHS[0]))
    budget = engine.config.scheduler.max_num_batched_tokens
    measurements = []
    for num_tokens in _PREFILL_LENGTHS:
        runs = [_prefill_step_times(engine, prompt(num_tokens)) for _ in range(repeats)]
        for i, start in enumerate(range(0, num_tokens, budget)):
            chunk = PrefillChunk(min(budget, num_tokens - start), start)
            measurements.append(Measurement(f"prefill {chunk.new_tokens} tokens at context {start}", (chunk,), 0, 0,
                                            statistics.median(run[i] for run in runs)))
    for batch in _DECODE_BATCHES:
        seconds, context = _decode_step_times(engine, [prompt(_DECODE_CONTEXT) for _ in range(batch)],
                                              _DECODE_STEPS_PER_REPEAT * repeats)
        measurements.append(Measurement(f"decode batch {batch} at context {context // batch}", (), batch,
                                        context, statistics.median(seconds)))
    return measurements


def _prefill_step_times(engine: Engine, prompt: list[int]) -> list[float]:
    """Seconds of each step of the prompt's prefill, up to and including the one that samples its first token."""
    engine.add_request(prompt, SamplingParams(max_tokens=1, temperature=0))
    times: list[float] = []
    while engine.has_unfinished():
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    expected = -(-len(prompt) // engine.config.scheduler.max_num_batched_tokens)
    if len(times) != expected:
        raise RuntimeError(f"calibrate: a {len(prompt)}-token prefill took {len(times)} steps, not {expected}")
    return times


def _decode_step_times(engine: Engine, prompts: list[list[int]], num_steps: int) -> tuple[list[float], int]:
    """Seconds of ``num_steps`` pure decode steps of the prompts run together, after the warm-up ones, and their
    mean context summed over the batch."""
    # No request may finish while timed: a prefill step computes at least one prompt token.
    max_tokens = sum(map(len, prompts)) + _DECODE_WARMUP_STEPS + num_steps
    generated = {engine.add_request(p, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)): 0
                 for p in prompts}
    times: list[float] = []
    contexts: list[int] = []
    num_warm = 0
    while len(times) < num_steps:
        decoding = min(generated.values()) > 0  # every prompt is done: the step is pure decode
        context = sum(len(p) + g - 1 for p, g in zip(prompts, generated.values()))
        start = time.perf_counter()
        outputs = engine.step()
        elapsed = time.perf_counter() - start
        for output in outputs:
            generated[output.request_id] += len(output.outputs[0].token_ids)
        if not decoding:
            continue
        if len(outputs) != len(prompts):
            raise RuntimeError(f"calibrate: a decode step of {len(prompts)} requests advanced {len(outputs)}")
        if num_warm < _DECODE_WARMUP_STEPS:
            num_warm += 1
        else:
            times.append(elapsed)
            contexts.append(context)
    for request_id in generated:
        engine.abort(request_id)
    while engine.has_unfinished():
        engine.step()
    return times, round(statistics.fmean(contexts))


def fit(measurements: Sequence[Measurement], model: ModelShape, mem_bytes: float, name: str = "cpu") -> DeviceSpec:
    """The ``DeviceSpec`` (efficiencies 1) whose ``flops``, ``mem_bw``, ``step_overhead_s`` and ``overlap`` make
    ``CostModel`` reproduce ``measurements`` best, in least squares of the relative error.

    With ``balance = flops / mem_bw`` (FLOP per byte) and ``c, m = FLOP, balance * bytes``, a step takes
    ``overhead + (max(c, m) + (1 - overlap) * min(c, m)) / flops``. For each balance (log grid) and overlap (steps of
    0.01) the overhead (>= 0) and ``1 / flops`` are a linear least-squares fit; each overlap's best balance is then
    refined on a finer grid between its neighbours.
    """
    if len(measurements) < 4:
        raise ValueError(f"measurements: need at least 4 to fit 4 numbers, got {len(measurements)}")
    probe = CostModel(DeviceSpec(name, flops=1.0, mem_bw=1.0, mem_bytes=mem_bytes), model)
    works = [probe.step_work(m.prefill, m.decode_batch, m.decode_context_tokens) for m in measurements]
    flop = np.array([w.flop for w in works])
    nbytes = np.array([w.bytes for w in works])
    seconds = np.array([m.seconds for m in measurements])
    overlaps = np.linspace(0.0, 1.0, round(1 / _OVERLAP_STEP) + 1)[:, None]  # [O, 1]
    coarse = np.broadcast_to(np.geomspace(*_BALANCE_RANGE, _GRID_POINTS), (len(overlaps), _GRID_POINTS))
    at = _fit_grid(coarse, overlaps, flop, nbytes, seconds)[2].argmin(axis=1)  # [O]
    rows = np.arange(len(overlaps))
    fine = np.geomspace(coarse[rows, np.maximum(at - 1, 0)], coarse[rows, np.minimum(at + 1, _GRID_POINTS - 1)],
                        _GRID_POINTS, axis=1)  # [O, G]: each overlap's best balance, refined
    s_per_flop, overhead, residual = _fit_grid(fine, overlaps, flop, nbytes, seconds)
    o, g = np.unravel_index(residual.argmin(), residual.shape)
    return DeviceSpec(name, flops=float(1 / s_per_flop[o, g]), mem_bw=float(1 / (fine[o, g] * s_per_flop[o, g])),
                      mem_bytes=mem_bytes, step_overhead_s=float(overhead[o, g]),
                      overlap=round(float(overlaps[o, 0]), 2))


def _fit_grid(balances: np.ndarray, overlaps: np.ndarray, flop: np.ndarray, nbytes: np.ndarray,
              seconds: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each balance [O, G] at its row's overlap [O, 1]: seconds per FLOP, overhead and the sum of squared
    relative errors of the best fit over the M measurements.

    Minimizes ``sum((overhead / t + s_per_flop * work / t - 1) ** 2)`` with ``work = max(c, m) + (1 - overlap) *
    min(c, m)``; an overhead below 0 is clamped to 0 and ``s_per_flop`` refitted alone.
    """
    memory = balances[..., None] * nbytes  # [O, G, M]
    work = np.maximum(flop, memory) + (1 - overlaps[..., None]) * np.minimum(flop, memory)
    a = work / seconds
    b = 1 / seconds  # [M]
    saa, sab, sa = (a * a).sum(-1), a @ b, a.sum(-1)
    sbb, sb = b @ b, b.sum()
    with np.errstate(divide="ignore", invalid="ignore"):
        det = saa * sbb - sab * sab
        s_per_flop = (sa * sbb - sb * sab) / det
        overhead = (sb * saa - sa * sab) / det
    clamp = ~(overhead >= 0)  # NaN too, for a singular system
    s_per_flop = np.where(clamp, sa / saa, s_per_flop)
    overhead = np.where(clamp, 0.0, overhead)
    residual = ((a * s_per_flop[..., None] + overhead[..., None] * b - 1) ** 2).sum(-1)
    return s_per_flop, overhead, np.where(s_per_flop > 0, residual, np.inf)
