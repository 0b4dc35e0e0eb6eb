"""Quality and memory of quantized weights: perplexity, greedy agreement, resident memory, per linear method.

On the held-out public-domain text shipped in ``bench/data`` (Moby-Dick, chapters 1-4), each method of
``engine.quantization`` scores the whole text in disjoint windows of ``--window`` tokens
(``worker.models.scoring.perplexity``). Ten prompts cut from the text (64 tokens each, evenly spaced) are
continued greedily for 64 tokens by an engine of each method, and counted equal to the float weights' when every
token matches. A worker's resident memory per method is the RSS of a fresh process holding an engine (a small KV
pool). The default model's file is a Q4_1 GGUF, so "float" means its blocks dequantized to float32: the
reference a quantized method is held to. Prints a table and writes JSON.

    python bench/bench_quality.py            # table on stdout, JSON in bench/results/quality.json
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from machine import cpu_model

from radixserve.cluster.base.config import DEFAULT_MODEL, QUANTIZATIONS, CacheConfig, EngineConfig
from radixserve.cluster.base.model_store import ModelStore
from radixserve.cluster.base.sampling_params import SamplingParams
from radixserve.worker.engine import Engine
from radixserve.worker.models.checkpoint import Checkpoint
from radixserve.worker.models.loading import open_checkpoint
from radixserve.worker.models.quantization import make_linear_method
from radixserve.worker.models.scoring import build_model, perplexity

BENCH = Path(__file__).resolve().parent
TEXT = BENCH / "data" / "moby_dick_ch1-4.txt"
RESULTS = BENCH / "results"
TARGETS = {"int8": 0.01, "int4": 0.05, "gguf": 0.05}  # perplexity above the float weights', at most
NUM_PROMPTS, PROMPT_LEN, CONTINUATION = 10, 64, 64


def greedy_continuations(checkpoint: Checkpoint, quantization: str, prompts: list[list[int]]) -> list[list[int]]:
    engine = Engine(EngineConfig(model=checkpoint.name, quantization=quantization,
                                 cache=CacheConfig(num_pages=256)), checkpoint)
    params = SamplingParams(max_tokens=CONTINUATION, temperature=0, ignore_eos=True)
    ids = [engine.add_request(prompt, params) for prompt in prompts]
    tokens: dict[str, list[int]] = {request_id: [] for request_id in ids}
    while engine.has_unfinished():
        for out in engine.step():
            for choice in out.outputs:
                tokens[out.request_id].extend(choice.token_ids)
    return [tokens[request_id] for request_id in ids]


def resident_mib(quantization: str) -> float:
    """VmRSS of a fresh process holding an engine of the default model with ``quantization``."""
    out = subprocess.run([sys.executable, __file__, "--rss-of", quantization], check=True, capture_output=True,
                         text=True, timeout=600).stdout
    return float(out.strip().splitlines()[-1])


def _print_rss(quantization: str) -> None:
    checkpoint = open_checkpoint(ModelStore().resolve(DEFAULT_MODEL))
    engine = Engine(EngineConfig(quantization=quantization, cache=CacheConfig(num_pages=64)), checkpoint)
    del checkpoint
    gc.collect()
    rss_kib = next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
                   if line.startswith("VmRSS:"))
    assert engine.model is not None  # held while measured
    print(rss_kib / 1024)


def _common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    methods = [q for q in QUANTIZATIONS if q != "auto"]
    parser.add_argument("--methods", nargs="+", default=methods, choices=methods)
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "quality.json")
    parser.add_argument("--rss-of", choices=QUANTIZATIONS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.rss_of:
        _print_rss(args.rss_of)
        return 0
    checkpoint = open_checkpoint(ModelStore().resolve(DEFAULT_MODEL))
    ids = checkpoint.tokenizer.encode(TEXT.read_text())
    step = (len(ids) - PROMPT_LEN) // NUM_PROMPTS
    prompts = [ids[i * step:i * step + PROMPT_LEN] for i in range(NUM_PROMPTS)]
    rows = {}
    for quantization in args.methods:
        started = time.perf_counter()
        model = build_model(checkpoint, args.window, method=make_linear_method(quantization))
        score = perplexity(model, ids, args.window)
        del model
        rows[quantization] = {"perplexity": score, "seconds": time.perf_counter() - started,
                              "continuations": greedy_continuations(checkpoint, quantization, prompts),
                              "resident_mib": resident_mib(quantization)}
        print(f"{quantization}: perplexity {score:.3f}", file=sys.stderr, flush=True)
    base = rows.get("none")
    print(f"\n{len(ids):,} tokens of {TEXT.name}, windows of {args.window}; {NUM_PROMPTS} prompts of {PROMPT_LEN} "
          f"tokens continued for {CONTINUATION}; {args.threads} threads; {cpu_model()}\n")
    print("| method | perplexity | vs float | target | greedy = float (of 10) | mean common prefix | resident MiB | "
          "vs float |")
    print("|---|---|---|---|---|---|---|---|")
    for quantization, row in rows.items():
        if base is not None:
            row["perplexity_vs_float"] = row["perplexity"] / base["perplexity"] - 1
            prefixes = [_common_prefix(a, b) for a, b in zip(row["continuations"], base["continuations"])]
            row["greedy_equal"] = sum(p == CONTINUATION for p in prefixes)
            row["mean_common_prefix"] = sum(prefixes) / len(prefixes)
            row["resident_vs_float"] = row["resident_mib"] / base["resident_mib"]
        target = TARGETS.get(quantization)
        row["target_met"] = None if target is None or base is None else row["perplexity_vs_float"] < target
        print(f"| {quantization} | {row['perplexity']:.3f} | {row.get('perplexity_vs_float', 0):+.2%} | "
              f"{'' if target is None else f'< +{target:.0%}'} | {row.get('greedy_equal', '-')} | "
              f"{row.get('mean_common_prefix', float('nan')):.1f} | {row['resident_mib']:.0f} | "
              f"{row.get('resident_vs_float', float('nan')):.2f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"text": TEXT.name, "tokens": len(ids), "window": args.window,
                                    "cpu": cpu_model(), "methods": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
