"""A roofline cost model of one continuous-batching engine step, for the cluster simulator.

Contract: ``CostModel.step_time`` is the wall time, in seconds, of one step on one device (one tensor-parallel
rank; the ranks of a group run in lockstep)::

    step_overhead_s + max(compute, memory) + (1 - overlap) * min(compute, memory) + all-reduce

    compute = FLOP / (flops * compute_efficiency),  memory = bytes / (mem_bw * memory_efficiency)

which with ``overlap`` 1 (the default) is the roofline: the shorter of compute and memory hides under the longer.
The step's work on one rank:

* FLOP (a multiply-accumulate is 2): every new token goes through the decoder's matmuls (attention
  projections, the dense MLP or the router and its ``experts_per_token`` experts); the LM head runs once per
  sequence that samples (one row per decode request and one per prefill chunk: engines compute logits only for
  a sequence's last token, and a prefill chunk is counted as if it ended its prompt); attention costs
  ``4 * heads * head_dim`` FLOP per layer for each (query, key) pair, a causal chunk's query attending to the
  chunk's context, the chunk's earlier tokens and itself.
* bytes: the weights, read once per step (an untied input embedding is only gathered and is left out; of a
  mixture of experts only the experts some token routes to: their expected number under uniform, independent
  routing), the KV read by attention (each sequence's context and new tokens, once per step) and the KV written
  for the new tokens. Activations are left out.
* all-reduce (``tensor_parallel`` > 1): two per layer (after attention, after the MLP) of
  ``tokens * hidden_size * dtype_bytes``, each moving ``2 * (tp - 1) / tp`` of that over ``interconnect_bw``,
  not overlapped with compute.

Per rank, attention heads, MLP and expert columns and the vocabulary are split ``tensor_parallel`` ways; KV heads
too, one replicated head per rank when there are fewer KV heads than ranks. Norms and the MoE router are
replicated. ``kv_capacity_tokens`` is what is left of ``mem_bytes * kv_memory_fraction`` after the weights.

The GPU presets use datasheet peaks derated to 60% of the FLOP/s (MFU) and 80% of the memory bandwidth (MBU)
that serving engines typically reach on large matmuls and on decode, plus 0.5 ms of per-step scheduling the
GPU does not hide. The ``cpu`` preset is fitted to the real engine on this machine (``calibrate``): its figures
are achieved ones (efficiencies 1), and its ``overlap`` is fitted too: one CPU thread largely stalls on its loads
instead of computing under them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import NamedTuple

from radixserve.cluster.base.config import require

DEFAULT_KV_MEMORY_FRACTION = 0.9
CPU_PRESET_PATH = Path(__file__).with_name("presets") / "cpu.json"  # written by ``calibrate``


@dataclass(frozen=True)
class DeviceSpec:
    """One accelerator (or this CPU) as the cost model sees it.

    ``flops``: dense FLOP/s at the serving dtype; ``mem_bw``: device memory bytes/s; ``mem_bytes``: device
    memory; ``interconnect_bw``: bytes/s per device for tensor-parallel all-reduce (0: no tensor parallelism);
    ``step_overhead_s``: fixed seconds per step (scheduling, kernel launches). ``compute_efficiency`` and
    ``memory_efficiency`` are the achievable fractions of ``flops`` (MFU) and ``mem_bw`` (MBU). ``overlap``: the
    fraction of the shorter of a step's compute and memory times hidden under the longer (1: a roofline, 0: their
    sum).
    """

    name: str
    flops: float
    mem_bw: float
    mem_bytes: float
    interconnect_bw: float = 0.0
    step_overhead_s: float = 0.0
    compute_efficiency: float = 1.0
    memory_efficiency: float = 1.0
    overlap: float = 1.0

    def __post_init__(self) -> None:
        require(bool(self.name), "name", "must not be empty")
        for name in ("flops", "mem_bw", "mem_bytes"):
            value = getattr(self, name)
            require(value > 0 and math.isfinite(value), name, f"must be > 0 and finite, got {value}")
        for name in ("interconnect_bw", "step_overhead_s"):
            value = getattr(self, name)
            require(value >= 0 and math.isfinite(value), name, f"must be >= 0 and finite, got {value}")
        for name in ("compute_efficiency", "memory_efficiency"):
            value = getattr(self, name)
            require(0 < value <= 1, name, f"must be in (0, 1], got {value}")
        require(0 <= self.overlap <= 1, "overlap", f"must be in [0, 1], got {self.overlap}")


class _Params(NamedTuple):
    """Parameter counts of one rank's shard (of the whole model when unsplit)."""

    attention: int  # per layer: q, k, v and o projections
    mlp: int  # per layer: the dense MLP, or the MoE router
    expert: int  # per layer and expert: gate, up and down projections (0 when dense)
    norms: int  # every RMSNorm weight
    embedding: int  # the input embedding; the LM head has as many (it is the embedding when tied)


@dataclass(frozen=True)
class ModelShape:
    """A Llama-family decoder (GQA attention, SwiGLU MLP or mixture of experts) as deployed.

    ``num_experts`` 0 is a dense MLP of ``intermediate_size``; otherwise each layer has ``num_experts`` experts of
    that size and routes each token to ``experts_per_token`` of them. ``dtype_bytes``: bytes per weight and per
    KV element. ``tensor_parallel``: ranks the model is split across. ``tie_word_embeddings``: the LM head is the
    input embedding (stored once).
    """

    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    dtype_bytes: int = 2
    num_experts: int = 0
    experts_per_token: int = 0
    tensor_parallel: int = 1
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        require(bool(self.name), "name", "must not be empty")
        for name in ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim", "intermediate_size",
                     "vocab_size", "dtype_bytes", "tensor_parallel"):
            require(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        require(self.num_heads % self.num_kv_heads == 0, "num_kv_heads",
                 f"must divide num_heads ({self.num_heads}), got {self.num_kv_heads}")
        require(self.num_experts >= 0, "num_experts", f"must be >= 0, got {self.num_experts}")
        top_k = (1, self.num_experts) if self.num_experts else (0, 0)
        require(top_k[0] <= self.experts_per_token <= top_k[1], "experts_per_token",
                 f"must be in [{top_k[0]}, {top_k[1]}] with {self.num_experts} experts, got {self.experts_per_token}")
        tp, kv = self.tensor_parallel, self.num_kv_heads
        require(self.num_heads % tp == 0 and (kv % tp == 0 or tp % kv == 0), "tensor_parallel",
                 f"must divide num_heads ({self.num_heads}) and divide or be a multiple of num_kv_heads ({kv}), "
                 f"got {tp}")

    def _params(self, ranks: int) -> _Params:
        heads, kv_heads = self.num_heads // ranks, max(1, self.num_kv_heads // ranks)
        h = self.hidden_size
        mlp = 3 * h * -(-self.intermediate_size // ranks)
        return _Params(
            attention=h * self.head_dim * 2 * (heads + kv_heads),
            mlp=h * self.num_experts if self.num_experts else mlp,
            expert=mlp if self.num_experts else 0,
            norms=(2 * self.num_layers + 1) * h,
            embedding=-(-self.vocab_size // ranks) * h,
        )

    def _count(self, p: _Params, num_experts: int) -> int:
        per_layer = p.attention + p.mlp + num_experts * p.expert
        return self.num_layers * per_layer + p.norms + p.embedding * (1 if self.tie_word_embeddings else 2)

    @property
    def kv_heads_per_rank(self) -> int:
        """KV heads one rank holds: its share, or one replicated head when there are fewer KV heads than ranks."""
        return max(1, self.num_kv_heads // self.tensor_parallel)

    @property
    def num_params(self) -> int:
        """Parameters of the whole model (every expert, the embedding and an untied LM head)."""
        return self._count(self._params(1), self.num_experts)

    @property
    def active_params_per_token(self) -> int:
        """``num_params`` with only ``experts_per_token`` experts per layer (equal to it for a dense model)."""
        return self._count(self._params(1), self.experts_per_token)

    @property
    def weight_bytes_per_rank(self) -> int:
        """Bytes of weights one tensor-parallel rank holds (replicated KV heads, norms and router included)."""
        return self._count(self._params(self.tensor_parallel), self.num_experts) * self.dtype_bytes

    @property
    def kv_bytes_per_token_per_rank(self) -> int:
        """Bytes of K and V one token occupies on one rank, over all layers."""
        return 2 * self.num_layers * self.kv_heads_per_rank * self.head_dim * self.dtype_bytes


@dataclass(frozen=True)
class PrefillChunk:
    """``new_tokens`` prompt tokens computed in a step, after ``context_tokens`` already in the KV cache (a
    cached prefix plus earlier chunks)."""

    new_tokens: int
    context_tokens: int

    def __post_init__(self) -> None:
        require(self.new_tokens >= 1, "new_tokens", f"must be >= 1, got {self.new_tokens}")
        require(self.context_tokens >= 0, "context_tokens", f"must be >= 0, got {self.context_tokens}")


class StepWork(NamedTuple):
    """One step's work on one rank: tokens fed to the model, FLOP and bytes of memory traffic."""

    tokens: int
    flop: float
    bytes: float


class CostModel:
    """Step times of ``model`` served on ``device`` (see the module docstring for the formula).

    Raises ``ValueError`` naming ``tensor_parallel`` when the model is split but the device has no interconnect,
    and naming ``model`` when one rank's weights leave no room for a single token of KV cache in
    ``mem_bytes * kv_memory_fraction``.
    """

    def __init__(self, device: DeviceSpec, model: ModelShape,
                 kv_memory_fraction: float = DEFAULT_KV_MEMORY_FRACTION) -> None:
        require(0 < kv_memory_fraction <= 1, "kv_memory_fraction", f"must be in (0, 1], got {kv_memory_fraction}")
        tp = model.tensor_parallel
        require(tp == 1 or device.interconnect_bw > 0, "tensor_parallel",
                 f"{tp} needs a device with interconnect_bw > 0, and {device.name} has none")
        self.device = device
        self.model = model
        self.kv_memory_fraction = kv_memory_fraction
        weight_bytes = model.weight_bytes_per_rank
        kv_budget = device.mem_bytes * kv_memory_fraction - weight_bytes
        require(kv_budget >= model.kv_bytes_per_token_per_rank, "model",
                 f"{model.name} needs {weight_bytes / 1e9:.2f} GB of weights per rank, which leaves no KV cache in "
                 f"{kv_memory_fraction:g} of {device.name}'s {device.mem_bytes / 1e9:.2f} GB; "
                 f"raise tensor_parallel or pick a larger device")
        self._kv_capacity_tokens = int(kv_budget // model.kv_bytes_per_token_per_rank)
        self._precompute(device, model)

    def _precompute(self, device: DeviceSpec, model: ModelShape) -> None:
        p = model._params(model.tensor_parallel)
        layers, dtype_bytes = model.num_layers, model.dtype_bytes
        self._flop_per_token = 2.0 * layers * (p.attention + p.mlp + model.experts_per_token * p.expert)
        self._flop_per_sample = 2.0 * p.embedding
        self._flop_per_pair = 4.0 * layers * (model.num_heads // model.tensor_parallel) * model.head_dim
        self._expert_bytes = float(layers * model.num_experts * p.expert * dtype_bytes)
        # Chance that a token leaves a given expert unused: 1 for a dense model, whose expert bytes are 0.
        self._expert_miss = 1 - model.experts_per_token / model.num_experts if model.num_experts else 1.0
        gathered = 0 if model.tie_word_embeddings else p.embedding * dtype_bytes
        self._dense_bytes = float(model.weight_bytes_per_rank - gathered) - self._expert_bytes
        self._kv_bytes = float(model.kv_bytes_per_token_per_rank)
        self._s_per_flop = 1.0 / (device.flops * device.compute_efficiency)
        self._s_per_byte = 1.0 / (device.mem_bw * device.memory_efficiency)
        tp = model.tensor_parallel
        ring = 2 * (tp - 1) / tp
        self._allreduce_s_per_token = (2 * layers * model.hidden_size * dtype_bytes * ring / device.interconnect_bw
                                       if tp > 1 else 0.0)
        self._overhead_s = device.step_overhead_s
        self._serial = 1.0 - device.overlap

    @property
    def kv_capacity_tokens(self) -> int:
        """Tokens of KV cache one rank holds: ``(mem_bytes * kv_memory_fraction - weights) // KV bytes per token``."""
        return self._kv_capacity_tokens

    def _work(self, prefill: Sequence[PrefillChunk], decode_batch: int,
              decode_context_tokens: int) -> tuple[int, float, float]:
        if decode_batch < 0 or decode_context_tokens < 0 or (decode_context_tokens and not decode_batch):
            raise ValueError(f"decode_batch: must be >= 0 with decode_context_tokens >= 0 (0 without decodes), "
                             f"got {decode_batch} and {decode_context_tokens}")
        tokens = decode_batch
        pairs = decode_context_tokens + decode_batch  # each decode query sees its context and itself
        kv_read = pairs
        for chunk in prefill:
            n, context = chunk.new_tokens, chunk.context_tokens
            tokens += n
            pairs += n * context + n * (n + 1) // 2
            kv_read += context + n
        flop = (self._flop_per_token * tokens + self._flop_per_sample * (decode_batch + len(prefill))
                + self._flop_per_pair * pairs)
        weight_bytes = self._dense_bytes + self._expert_bytes * (1.0 - self._expert_miss ** tokens)
        return tokens, flop, weight_bytes + self._kv_bytes * (kv_read + tokens)

    def step_work(self, prefill: Sequence[PrefillChunk], decode_batch: int,
                  decode_context_tokens: int) -> StepWork:
        """The FLOP and bytes per rank that ``step_time`` prices (same arguments)."""
        return StepWork(*self._work(prefill, decode_batch, decode_context_tokens))

    def step_time(self, prefill: Sequence[PrefillChunk], decode_batch: int, decode_context_tokens: int) -> float:
        """Seconds for one step that computes the ``prefill`` chunks and one token for each of ``decode_batch``
        running requests.

        ``decode_context_tokens`` is the sum over those requests of the tokens already in their KV cache (prompt
        plus earlier output), so a batch of 16 requests at 256 tokens of context passes 4096. An empty step (no
        chunk, no decode) costs 0. Raises ``ValueError`` naming ``decode_batch`` for negative counts.
        """
        tokens, flop, nbytes = self._work(prefill, decode_batch, decode_context_tokens)
        if not tokens:
            return 0.0
        compute, memory = flop * self._s_per_flop, nbytes * self._s_per_byte
        longer, shorter = (compute, memory) if compute >= memory else (memory, compute)
        return self._overhead_s + longer + self._serial * shorter + tokens * self._allreduce_s_per_token

    def prefill_time(self, new_tokens: int, context_tokens: int = 0) -> float:
        """Seconds for a step that prefills one chunk of ``new_tokens`` after ``context_tokens`` cached tokens and
        nothing else."""
        return self.step_time((PrefillChunk(new_tokens, context_tokens),), 0, 0)

    def decode_step_time(self, batch: int, context_tokens: int) -> float:
        """Seconds for a pure decode step: ``step_time((), batch, context_tokens)`` (``context_tokens`` summed
        over the batch)."""
        return self.step_time((), batch, context_tokens)


def save_preset(spec: DeviceSpec, path: Path) -> None:
    """Writes ``spec`` as a JSON object of its fields."""
    path.write_text(json.dumps(asdict(spec), indent=2) + "\n", encoding="utf-8")


def load_preset(path: Path) -> DeviceSpec:
    """Reads a ``save_preset`` file. Raises ``ValueError`` starting with ``preset`` when it is not a JSON object
    with exactly ``DeviceSpec``'s fields (or naming the field when a value is invalid)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"preset: cannot read {path}: {exc}") from exc
    names = {f.name for f in fields(DeviceSpec)}
    if not isinstance(data, dict) or not data.keys() <= names:
        raise ValueError(f"preset: {path} must be a JSON object with keys among {sorted(names)}")
    try:
        return DeviceSpec(**data)
    except TypeError as exc:  # a required field is missing
        raise ValueError(f"preset: {path}: {exc}") from exc


_GPU_STEP_OVERHEAD_S = 0.5e-3
_GPU_EFFICIENCY = {"compute_efficiency": 0.6, "memory_efficiency": 0.8}

DEVICES: dict[str, DeviceSpec] = {
    "h100": DeviceSpec("h100", flops=989e12, mem_bw=3.35e12, mem_bytes=80e9, interconnect_bw=450e9,
                       step_overhead_s=_GPU_STEP_OVERHEAD_S, **_GPU_EFFICIENCY),
    "h200": DeviceSpec("h200", flops=989e12, mem_bw=4.8e12, mem_bytes=141e9, interconnect_bw=450e9,
                       step_overhead_s=_GPU_STEP_OVERHEAD_S, **_GPU_EFFICIENCY),
    "a100": DeviceSpec("a100", flops=312e12, mem_bw=2.0e12, mem_bytes=80e9, interconnect_bw=300e9,
                       step_overhead_s=_GPU_STEP_OVERHEAD_S, **_GPU_EFFICIENCY),
    "cpu": load_preset(CPU_PRESET_PATH),
}

MODELS: dict[str, ModelShape] = {
    "llama-3-8b": ModelShape("llama-3-8b", num_layers=32, hidden_size=4096, num_heads=32, num_kv_heads=8,
                             head_dim=128, intermediate_size=14336, vocab_size=128256),
    "llama-3-70b": ModelShape("llama-3-70b", num_layers=80, hidden_size=8192, num_heads=64, num_kv_heads=8,
                              head_dim=128, intermediate_size=28672, vocab_size=128256, tensor_parallel=4),
    # The CPU engine runs fp32; on a GPU preset use dataclasses.replace(..., dtype_bytes=2).
    "smollm2-135m": ModelShape("smollm2-135m", num_layers=30, hidden_size=576, num_heads=9, num_kv_heads=3,
                               head_dim=64, intermediate_size=1536, vocab_size=49152, dtype_bytes=4,
                               tie_word_embeddings=True),
    "mixtral-8x7b": ModelShape("mixtral-8x7b", num_layers=32, hidden_size=4096, num_heads=32, num_kv_heads=8,
                               head_dim=128, intermediate_size=14336, vocab_size=32000, num_experts=8,
                               experts_per_token=2, tensor_parallel=2),
}
