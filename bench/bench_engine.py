"""Engine benchmark: decode and prefill throughput, and cached-prefix time to first token.

Measured side by side in one process on the same weights against transformers' ``generate()`` (fp32, sdpa,
warmed up) and, when ``llama_cpp`` is importable, llama.cpp on the same GGUF file. Prints a table and writes
JSON. Every figure is the median of ``--repeats`` runs after one warm-up run, the contenders' runs interleaved.

    python bench/bench_engine.py [--model smollm2-135m-instruct] [--repeats 3] [--out bench/results/engine.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from machine import cpu_model

from radixserve.cluster.base.config import DEFAULT_MODEL, QUANTIZATIONS, CacheConfig, EngineConfig, SchedulerConfig
from radixserve.cluster.base.model_store import ModelStore
from radixserve.worker.engine import Engine
from radixserve.worker.models.checkpoint import Checkpoint
from radixserve.worker.models.loading import open_checkpoint
from radixserve.worker.models.reference import transformers_model
from radixserve.cluster.base.sampling_params import SamplingParams


@dataclass(frozen=True)
class BenchConfig:
    model: str = DEFAULT_MODEL
    batch_sizes: tuple[int, ...] = (1, 8, 32)
    prompt_len: int = 128
    decode_tokens: int = 64
    prefill_len: int = 2048
    suffix_len: int = 32
    repeats: int = 3
    kv_memory_gib: float = 2.0
    quantization: str = "none"
    out: Path = Path("bench/results/engine.json")


@dataclass
class Row:
    metric: str
    unit: str
    radixserve: float
    transformers: float | None = None
    llama_cpp: float | None = None
    target: str = ""
    met: bool | None = None
    samples: dict[str, list[float]] = field(default_factory=dict)


def medians(fns: dict[str, Callable[[], float]], repeats: int) -> dict[str, tuple[float, list[float]]]:
    """Median of ``repeats`` runs of each function after one warm-up each, the runs interleaved
    (a, b, a, b, ...) so that drift in the machine's speed hits every contender alike."""
    for fn in fns.values():
        fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            samples[name].append(fn())
    return {name: (statistics.median(values), values) for name, values in samples.items()}


class Prompts:
    """Deterministic random token ids away from the special tokens at both ends of the vocabulary."""

    def __init__(self, vocab_size: int, seed: int = 0):
        self.rng = random.Random(seed)
        self.vocab_size = vocab_size

    def make(self, length: int) -> list[int]:
        return [self.rng.randrange(100, self.vocab_size - 100) for _ in range(length)]


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)


def ours_decode(engine: Engine, prompts: Prompts, batch: int, cfg: BenchConfig) -> float:
    """Decode tokens/s once every request of the batch has its first token (all prefills run in one step)."""
    for _ in range(batch):
        engine.add_request(prompts.make(cfg.prompt_len), greedy(cfg.decode_tokens + 1))
    num_first = 0
    while num_first < batch:
        num_first += sum(1 for out in engine.step() for c in out.outputs if c.token_ids)
    started = time.perf_counter()
    while engine.has_unfinished():
        engine.step()
    return batch * cfg.decode_tokens / (time.perf_counter() - started)


def hf_generate_seconds(model: torch.nn.Module, ids: torch.Tensor, new_tokens: int) -> float:
    started = time.perf_counter()
    with torch.inference_mode():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False)
    return time.perf_counter() - started


class _StepClock:
    """A logits processor that only records when each generated token's logits are ready."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.times.append(time.perf_counter())
        return scores


def hf_decode(model: torch.nn.Module, prompts: Prompts, batch: int, cfg: BenchConfig) -> float:
    """Decode tokens/s from the first token's logits to the last (one generate call, as for ours)."""
    from transformers import LogitsProcessorList

    ids = torch.tensor([prompts.make(cfg.prompt_len) for _ in range(batch)])
    clock = _StepClock()
    with torch.inference_mode():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=cfg.decode_tokens + 1,
                       do_sample=False, logits_processor=LogitsProcessorList([clock]))
    return batch * cfg.decode_tokens / (clock.times[-1] - clock.times[0])


def ours_ttft(engine: Engine, prompt: list[int]) -> float:
    started = time.perf_counter()
    engine.add_request(prompt, greedy(1))
    while engine.has_unfinished():
        engine.step()
    return time.perf_counter() - started


def decode_rows(engine: Engine, hf: torch.nn.Module, llama: object | None, prompts: Prompts,
                cfg: BenchConfig) -> list[Row]:
    rows = []
    for batch in cfg.batch_sizes:
        contenders = {"radixserve": lambda: ours_decode(engine, prompts, batch, cfg),
                      "transformers": lambda: hf_decode(hf, prompts, batch, cfg)}
        if llama is not None and batch == 1:
            contenders["llama_cpp"] = lambda: llama_decode(llama, prompts, cfg)
        results = medians(contenders, cfg.repeats)
        engine.cache.flush()
        ours, theirs = results["radixserve"][0], results["transformers"][0]
        target = {1: 1.0, 32: 1.3}.get(batch)
        row = Row(f"decode batch {batch}, {cfg.prompt_len}-token prompts", "tok/s", ours, theirs,
                  llama_cpp=results["llama_cpp"][0] if "llama_cpp" in results else None,
                  target=f">= {target}x transformers" if target else "",
                  met=ours / theirs >= target if target else None,
                  samples={name: values for name, (_, values) in results.items()})
        rows.append(row)
        _print_progress(row)
    return rows


def prefill_rows(engine: Engine, hf: torch.nn.Module, llama: object | None, prompts: Prompts,
                 cfg: BenchConfig) -> list[Row]:
    prompt = prompts.make(cfg.prefill_len)

    def uncached() -> float:
        engine.cache.flush()
        return ours_ttft(engine, prompt)

    ids = torch.tensor([prompt])
    contenders = {"radixserve": uncached, "transformers": lambda: hf_generate_seconds(hf, ids, 1)}
    if llama is not None:
        contenders["llama_cpp"] = lambda: llama_prefill(llama, prompt)
    results = medians(contenders, cfg.repeats)
    seconds = {name: median for name, (median, _) in results.items()}
    row = Row(f"prefill {cfg.prefill_len} tokens", "tok/s", cfg.prefill_len / seconds["radixserve"],
              cfg.prefill_len / seconds["transformers"],
              llama_cpp=cfg.prefill_len / seconds["llama_cpp"] if "llama_cpp" in seconds else None,
              samples={f"{name}_s": values for name, (_, values) in results.items()})
    _print_progress(row)
    return [row]


def ttft_rows(engine: Engine, hf: torch.nn.Module, prompts: Prompts, cfg: BenchConfig) -> list[Row]:
    prefix = prompts.make(cfg.prefill_len)

    def cached() -> float:
        engine.cache.flush()
        ours_ttft(engine, prefix)  # leaves the prefix's pages in the radix cache
        return ours_ttft(engine, prefix + prompts.make(cfg.suffix_len))

    def uncached() -> float:
        engine.cache.flush()
        return ours_ttft(engine, prefix + prompts.make(cfg.suffix_len))

    ids = torch.tensor([prefix + prompts.make(cfg.suffix_len)])
    results = medians({"cached": cached, "uncached": uncached,
                       "transformers": lambda: hf_generate_seconds(hf, ids, 1)}, cfg.repeats)
    (hot, hot_all), (cold, cold_all), (theirs, theirs_all) = (results[k] for k in ("cached", "uncached", "transformers"))
    label = f"TTFT {cfg.prefill_len} cached + {cfg.suffix_len} new"
    rows = [
        Row(f"{label} (cached)", "ms", hot * 1e3, target=">= 20x faster than uncached",
            met=cold / hot >= 20, samples={"radixserve_s": hot_all}),
        Row(f"{label} (uncached)", "ms", cold * 1e3, theirs * 1e3,
            samples={"radixserve_s": cold_all, "transformers_s": theirs_all}),
    ]
    for row in rows:
        _print_progress(row)
    return rows


def load_llama_cpp(path: Path) -> object | None:
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    return Llama(model_path=str(path), n_ctx=4096, n_threads=torch.get_num_threads(), verbose=False)


def llama_decode(llama: object, prompts: Prompts, cfg: BenchConfig) -> float:
    prompt = prompts.make(cfg.prompt_len)
    llama.reset()
    llama.eval(prompt)
    started = time.perf_counter()
    for _ in range(cfg.decode_tokens):
        llama.eval([llama.sample(temp=0.0)])
    return cfg.decode_tokens / (time.perf_counter() - started)


def llama_prefill(llama: object, prompt: list[int]) -> float:
    llama.reset()
    started = time.perf_counter()
    llama.eval(prompt)
    return time.perf_counter() - started


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def _print_progress(row: Row) -> None:
    print(f"  measured {row.metric}: radixserve {_fmt(row.radixserve)} {row.unit}", file=sys.stderr, flush=True)


def print_table(rows: list[Row]) -> None:
    header = ("metric", "unit", "radixserve", "transformers", "ratio", "llama.cpp", "target", "met")
    lines = [header]
    for r in rows:
        ratio = "-" if r.transformers is None else f"{r.radixserve / r.transformers:.2f}x"
        if r.unit == "ms" and r.transformers is not None:
            ratio = f"{r.transformers / r.radixserve:.2f}x"  # lower is better: speed-up over the peer
        met = "-" if r.met is None else ("yes" if r.met else "NO")
        lines.append((r.metric, r.unit, _fmt(r.radixserve), _fmt(r.transformers), ratio, _fmt(r.llama_cpp),
                      r.target, met))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for i, line in enumerate(lines):
        print("| " + " | ".join(cell.ljust(w) for cell, w in zip(line, widths)) + " |")
        if i == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")


def build(cfg: BenchConfig) -> tuple[Engine, torch.nn.Module, object | None, Checkpoint]:
    path = ModelStore().resolve(cfg.model)
    checkpoint = open_checkpoint(path)
    budget = max(SchedulerConfig().max_num_batched_tokens, max(cfg.batch_sizes) * cfg.prompt_len)
    engine = Engine(EngineConfig(model=cfg.model, quantization=cfg.quantization,
                                 cache=CacheConfig(memory_gib=cfg.kv_memory_gib),
                                 scheduler=SchedulerConfig(max_num_batched_tokens=budget)), checkpoint)
    return engine, transformers_model(checkpoint), load_llama_cpp(path) if path.suffix == ".gguf" else None, checkpoint


def run(cfg: BenchConfig) -> list[Row]:
    engine, hf, llama, checkpoint = build(cfg)
    prompts = Prompts(checkpoint.config.vocab_size)
    rows = decode_rows(engine, hf, llama, prompts, cfg)
    # Prefill and TTFT with the default token budget: long prompts are chunked as in serving.
    engine.scheduler.config = SchedulerConfig()
    rows += prefill_rows(engine, hf, llama, prompts, cfg)
    rows += ttft_rows(engine, hf, prompts, cfg)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=BenchConfig.model)
    parser.add_argument("--repeats", type=int, default=BenchConfig.repeats)
    parser.add_argument("--decode-tokens", type=int, default=BenchConfig.decode_tokens)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=list(BenchConfig.batch_sizes))
    parser.add_argument("--prompt-len", type=int, default=BenchConfig.prompt_len,
                        help="prompt tokens of each decoding request")
    parser.add_argument("--kv-memory-gib", type=float, default=BenchConfig.kv_memory_gib)
    parser.add_argument("--quantization", choices=QUANTIZATIONS, default=BenchConfig.quantization,
                        help="our engine's linear method (transformers and llama.cpp run as they do)")
    parser.add_argument("--out", type=Path, default=BenchConfig.out)
    args = parser.parse_args(argv)
    cfg = BenchConfig(model=args.model, repeats=args.repeats, decode_tokens=args.decode_tokens,
                      batch_sizes=tuple(args.batch_sizes), prompt_len=args.prompt_len,
                      kv_memory_gib=args.kv_memory_gib, quantization=args.quantization, out=args.out)
    rows = run(cfg)
    print_table(rows)
    report = {
        "benchmark": "engine",
        "machine": {"cpu": cpu_model(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__, "python": platform.python_version()},
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "rows": [asdict(r) for r in rows],
    }
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    cfg.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {cfg.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
