"""Engine benchmark: decode and prefill throughput, and cached-prefix time to first token.

Measured side by side on the same weights against transformers' ``generate()`` (fp32, sdpa, warmed up, in this
process) and, when bench/.venv-llama exists (bash bench/peers/setup_llama_cpp.sh builds it), llama.cpp on the same
GGUF file, run by bench/peers/llama_cpp_runner.py in that venv's python as a subprocess kept for the whole run.
Prints a table and writes JSON. Every figure is the median of ``--repeats`` runs after one warm-up run, the
contenders' runs interleaved.

    python bench/bench_engine.py [--model smollm2-135m-instruct] [--repeats 3] [--out bench/results/engine.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Self

import torch
from machine import cpu_model

from radixserve.cluster.base.config import DEFAULT_MODEL, QUANTIZATIONS, CacheConfig, EngineConfig, SchedulerConfig
from radixserve.cluster.base.model_store import ModelStore
from radixserve.worker.engine import Engine
from radixserve.worker.models.checkpoint import Checkpoint
from radixserve.worker.models.loading import open_checkpoint
from radixserve.worker.models.reference import transformers_model
from radixserve.cluster.base.sampling_params import SamplingParams

LLAMA_VENV = Path(__file__).resolve().parent / ".venv-llama"
LLAMA_RUNNER = Path(__file__).resolve().parent / "peers" / "llama_cpp_runner.py"


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
    quantization: str = "auto"
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


LLAMA_CPP_DECODE_TARGETS = {1: 1.0, 32: 2.0}  # aggregate tok/s, x llama.cpp's on the same file
LLAMA_CPP_PREFILL_TARGET = 1.5
TRANSFORMERS_DECODE_TARGETS = {1: 1.0, 32: 1.3}  # where llama.cpp does not run (no GGUF file or no venv)


def _target(ours: float, transformers: float, llama_cpp: float | None, vs_llama: float | None,
            vs_transformers: float | None) -> tuple[str, bool | None]:
    """The row's target and whether it is met: against llama.cpp where it ran, else against transformers."""
    if llama_cpp is not None and vs_llama is not None:
        return f">= {vs_llama}x llama.cpp", ours / llama_cpp >= vs_llama
    if vs_transformers is not None:
        return f">= {vs_transformers}x transformers", ours / transformers >= vs_transformers
    return "", None


def decode_rows(engine: Engine, hf: torch.nn.Module, llama: LlamaCpp | None, prompts: Prompts,
                cfg: BenchConfig) -> list[Row]:
    rows = []
    for batch in cfg.batch_sizes:
        contenders = {"radixserve": lambda: ours_decode(engine, prompts, batch, cfg),
                      "transformers": lambda: hf_decode(hf, prompts, batch, cfg)}
        if llama is not None:
            contenders["llama_cpp"] = lambda: llama.decode([prompts.make(cfg.prompt_len) for _ in range(batch)],
                                                           cfg.decode_tokens)
        results = medians(contenders, cfg.repeats)
        engine.cache.flush()
        ours, theirs = results["radixserve"][0], results["transformers"][0]
        llama_cpp = results["llama_cpp"][0] if "llama_cpp" in results else None
        target, met = _target(ours, theirs, llama_cpp, LLAMA_CPP_DECODE_TARGETS.get(batch),
                              TRANSFORMERS_DECODE_TARGETS.get(batch))
        row = Row(f"decode batch {batch}, {cfg.prompt_len}-token prompts", "tok/s", ours, theirs,
                  llama_cpp=llama_cpp, target=target, met=met,
                  samples={name: values for name, (_, values) in results.items()})
        rows.append(row)
        _print_progress(row)
    return rows


def prefill_rows(engine: Engine, hf: torch.nn.Module, llama: LlamaCpp | None, prompts: Prompts,
                 cfg: BenchConfig) -> list[Row]:
    prompt = prompts.make(cfg.prefill_len)

    def uncached() -> float:
        engine.cache.flush()
        return ours_ttft(engine, prompt)

    ids = torch.tensor([prompt])
    contenders = {"radixserve": uncached, "transformers": lambda: hf_generate_seconds(hf, ids, 1)}
    if llama is not None:
        contenders["llama_cpp"] = lambda: llama.prefill_seconds(prompt)
    results = medians(contenders, cfg.repeats)
    seconds = {name: median for name, (median, _) in results.items()}
    ours, theirs = cfg.prefill_len / seconds["radixserve"], cfg.prefill_len / seconds["transformers"]
    llama_cpp = cfg.prefill_len / seconds["llama_cpp"] if "llama_cpp" in seconds else None
    target, met = _target(ours, theirs, llama_cpp, LLAMA_CPP_PREFILL_TARGET, None)
    row = Row(f"prefill {cfg.prefill_len} tokens", "tok/s", ours, theirs, llama_cpp=llama_cpp, target=target,
              met=met, samples={f"{name}_s": values for name, (_, values) in results.items()})
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


class LlamaCpp:
    """llama.cpp on a GGUF file in bench/.venv-llama's python: a bench/peers/llama_cpp_runner.py subprocess that
    answers one JSON line per request (its docstring has the protocol). Use it as a context manager: leaving it
    closes the runner's stdin, which ends the runner, and waits for it (killing it after ``exit_timeout_s``)."""

    exit_timeout_s = 30.0

    def __init__(self, model_path: Path, threads: int):
        self.proc = subprocess.Popen([str(LLAMA_VENV / "bin" / "python"), str(LLAMA_RUNNER), str(model_path),
                                      "--threads", str(threads)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            self.info: dict[str, Any] = self.request({"op": "info"})
        except BaseException:
            self.close()
            raise

    def request(self, message: dict[str, Any]) -> dict[str, Any]:
        """The runner's reply to ``message``; raises RuntimeError if it replies with an error or has exited."""
        try:
            self.proc.stdin.write(json.dumps(message) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except BrokenPipeError:
            line = ""
        if not line:
            raise RuntimeError(f"llama.cpp runner exited (status {self.proc.wait()}); its stderr is above")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"llama.cpp runner: {reply['error']}")
        return reply

    def decode(self, prompts: list[list[int]], decode_tokens: int) -> float:
        """Aggregate decode tok/s of one sequence per prompt (one llama_decode call per step for all of them)."""
        return self.request({"op": "decode", "prompts": prompts, "decode_tokens": decode_tokens})["tok_s"]

    def prefill_seconds(self, tokens: list[int]) -> float:
        """Seconds to evaluate ``tokens`` in an empty KV cache and take the first token."""
        return self.request({"op": "prefill", "tokens": tokens})["seconds"]

    def close(self) -> None:
        with contextlib.suppress(BrokenPipeError):  # the runner has died: nothing left to tell it
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=self.exit_timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_llama_cpp(path: Path) -> contextlib.AbstractContextManager[LlamaCpp | None]:
    """llama.cpp on ``path`` with our thread count, or None (with a note on stderr) where it cannot run."""
    if path.suffix != ".gguf":
        print(f"note: no llama.cpp column ({path.name} is not a GGUF file)", file=sys.stderr)
        return contextlib.nullcontext(None)
    if not (LLAMA_VENV / "bin" / "python").exists():
        print(f"note: no llama.cpp column ({LLAMA_VENV} does not exist; build it with "
              "bash bench/peers/setup_llama_cpp.sh)", file=sys.stderr)
        return contextlib.nullcontext(None)
    return LlamaCpp(path, torch.get_num_threads())


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def _print_progress(row: Row) -> None:
    print(f"  measured {row.metric}: radixserve {_fmt(row.radixserve)} {row.unit}", file=sys.stderr, flush=True)


def print_table(rows: list[Row]) -> None:
    header = ("metric", "unit", "radixserve", "transformers", "ratio", "llama.cpp", "vs llama.cpp", "target", "met")
    lines = [header]
    for r in rows:
        ratio = "-" if r.transformers is None else f"{r.radixserve / r.transformers:.2f}x"
        if r.unit == "ms" and r.transformers is not None:
            ratio = f"{r.transformers / r.radixserve:.2f}x"  # lower is better: speed-up over the peer
        met = "-" if r.met is None else ("yes" if r.met else "NO")
        vs_llama = "-" if r.llama_cpp is None else f"{r.radixserve / r.llama_cpp:.2f}x"
        lines.append((r.metric, r.unit, _fmt(r.radixserve), _fmt(r.transformers), ratio, _fmt(r.llama_cpp), vs_llama,
                      r.target, met))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for i, line in enumerate(lines):
        print("| " + " | ".join(cell.ljust(w) for cell, w in zip(line, widths)) + " |")
        if i == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")


def build(cfg: BenchConfig, path: Path) -> tuple[Engine, torch.nn.Module, Checkpoint]:
    checkpoint = open_checkpoint(path)
    budget = max(SchedulerConfig().max_num_batched_tokens, max(cfg.batch_sizes) * cfg.prompt_len)
    engine = Engine(EngineConfig(model=cfg.model, quantization=cfg.quantization,
                                 cache=CacheConfig(memory_gib=cfg.kv_memory_gib),
                                 scheduler=SchedulerConfig(max_num_batched_tokens=budget)), checkpoint)
    return engine, transformers_model(checkpoint), checkpoint


def run(cfg: BenchConfig) -> tuple[list[Row], dict[str, Any] | None]:
    """The table's rows, and the llama.cpp runner's info (None when llama.cpp did not run)."""
    path = ModelStore().resolve(cfg.model)
    engine, hf, checkpoint = build(cfg, path)
    prompts = Prompts(checkpoint.config.vocab_size)
    with open_llama_cpp(path) as llama:
        rows = decode_rows(engine, hf, llama, prompts, cfg)
        # Prefill and TTFT with the default token budget: long prompts are chunked as in serving.
        engine.scheduler.config = SchedulerConfig()
        rows += prefill_rows(engine, hf, llama, prompts, cfg)
        rows += ttft_rows(engine, hf, prompts, cfg)
        return rows, None if llama is None else llama.info


def describe_llama_cpp(info: dict[str, Any] | None) -> str:
    if info is None:
        return "llama.cpp: not run (see the note above)"
    return (f"llama.cpp: llama-cpp-python {info['llama_cpp']}, n_threads {info['n_threads']}, "
            f"build flags {info['build_flags'] or 'unknown'}; ggml: {info['system_info']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=BenchConfig.model)
    parser.add_argument("--repeats", type=int, default=BenchConfig.repeats)
    parser.add_argument("--decode-tokens", type=int, default=BenchConfig.decode_tokens)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=list(BenchConfig.batch_sizes))
    parser.add_argument("--prompt-len", type=int, default=BenchConfig.prompt_len,
                        help="prompt tokens of each decoding request")
    parser.add_argument("--prefill-len", type=int, default=BenchConfig.prefill_len,
                        help="prompt tokens of the prefill row and of the TTFT rows' cached prefix")
    parser.add_argument("--kv-memory-gib", type=float, default=BenchConfig.kv_memory_gib)
    parser.add_argument("--quantization", choices=QUANTIZATIONS, default=BenchConfig.quantization,
                        help="our engine's linear method (transformers and llama.cpp run as they do)")
    parser.add_argument("--out", type=Path, default=BenchConfig.out)
    args = parser.parse_args(argv)
    cfg = BenchConfig(model=args.model, repeats=args.repeats, decode_tokens=args.decode_tokens,
                      batch_sizes=tuple(args.batch_sizes), prompt_len=args.prompt_len, prefill_len=args.prefill_len,
                      kv_memory_gib=args.kv_memory_gib, quantization=args.quantization, out=args.out)
    rows, llama_info = run(cfg)
    print_table(rows)
    print(describe_llama_cpp(llama_info))
    report = {
        "benchmark": "engine",
        "machine": {"cpu": cpu_model(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__, "python": platform.python_version(), "llama_cpp": llama_info},
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "rows": [asdict(r) for r in rows],
    }
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    cfg.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {cfg.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
