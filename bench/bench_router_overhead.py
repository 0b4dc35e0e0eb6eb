"""The HTTP router overhead alone: our router and the peers in front of the same two workers, turn by turn.

One 2-worker cluster (``radixserve up --detach``, policy ``prefix``) serves every contender: our router at its HTTP
port, each peer started pointed at the workers' OpenAI endpoints (as ``bench_cluster.py`` does). Each round gives
every contender, in an order shuffled per round, ``--pairs`` paired requests of a short cached prompt and one
generated token (``bench_cluster.router_overhead``: through the router minus straight to the worker that served
it); the router process's CPU time (user and system, /proc) over its pairs, divided by the routed requests, is its
CPU per request. That figure also holds what the router burns while idle (health polls, timers; for ours also the Ray
driver's threads) over the pairs' wall time, which on a loaded machine is long: so each contender's idle CPU rate is
measured first, over ``--idle-s`` without requests, and the CPU per request is also given net of it. ``--profile`` records our router's process with py-spy (``pip install py-spy``) during its
pairs and prints the functions that hold the most samples, with and without their callees.

    python bench/bench_router_overhead.py --contenders prefix vllm_router_cache_aware smg_cache_aware
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from collections import Counter
from contextlib import ExitStack
from pathlib import Path

from bench_cluster import (CONTENDERS, PEERS, RESULTS, Cluster, load_tokenizer, make_probe, peer_router,
                           quantile, router_overhead, serving_pid, word_vocabulary)
from machine import cpu_model
from proc_cpu import cpu_seconds


def hot_functions(collapsed: Path, top: int) -> list[str]:
    """The ``top`` functions by samples in a py-spy ``--format raw`` file: on the stack (inclusive) and at its
    top (self)."""
    inclusive, own = Counter[str](), Counter[str]()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        total += int(count)
        own[frames[-1]] += int(count)
        for frame in set(frames):
            inclusive[frame] += int(count)
    lines = [f"{total} samples; inclusive:"]
    lines += [f"  {n / total:6.1%} {frame}" for frame, n in inclusive.most_common(top)]
    lines += ["self:"] + [f"  {n / total:6.1%} {frame}" for frame, n in own.most_common(top)]
    return lines


def idle_cpu_ms_per_s(pid: int, seconds: float) -> float:
    """The process's CPU milliseconds per second over ``seconds`` in which nobody sends it a request."""
    before = cpu_seconds(pid)
    time.sleep(seconds)
    return (cpu_seconds(pid) - before) * 1000 / seconds


def measure(name: str, url: str, cluster_workers: list, probe, pairs: int, profile: Path | None,
            idle_s: float) -> dict:
    """One contender's overhead pairs, its router's CPU time per routed request (as read, and net of its idle
    rate over the pairs' wall time), and its profile if asked."""
    contender = CONTENDERS[name]
    pid = serving_pid(url)
    idle_rate = idle_cpu_ms_per_s(pid, idle_s)
    spy = None
    if profile is not None and contender.router == "radixserve":
        spy = subprocess.Popen([shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(pid), "--format", "raw",
                                "--rate", "250", "--nonblocking", "--output", str(profile)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    before, started = cpu_seconds(pid), time.monotonic()
    diffs = asyncio.run(router_overhead(url, cluster_workers, pairs, probe, contender.text_prompts))
    cpu_ms = (cpu_seconds(pid) - before) * 1000
    wall_s = time.monotonic() - started
    if spy is not None:
        spy.send_signal(2)  # SIGINT: py-spy writes its file and exits
        spy.wait(60)
    return {"overhead_p50_ms": quantile(diffs, 0.5) * 1000, "overhead_p99_ms": quantile(diffs, 0.99) * 1000,
            "router_cpu_ms_per_request": cpu_ms / pairs,
            "router_cpu_ms_per_request_net_of_idle": (cpu_ms - idle_rate * wall_s) / pairs,
            "router_idle_cpu_ms_per_s": idle_rate, "pair_wall_ms": wall_s * 1000 / pairs, "pairs": len(diffs)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contenders", nargs="+", default=["prefix", *PEERS], choices=list(CONTENDERS))
    parser.add_argument("--pairs", type=int, default=100, help="overhead pairs per contender per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kv-memory-gib", type=float, default=0.3)
    parser.add_argument("--idle-s", type=float, default=5.0,
                        help="seconds without requests over which each contender's idle CPU rate is read")
    parser.add_argument("--profile", type=Path, help="py-spy's raw samples of our router, written here")
    parser.add_argument("--out", type=Path, default=RESULTS / "router_overhead.json")
    args = parser.parse_args()
    tokenizer = load_tokenizer()
    probe = make_probe(word_vocabulary(tokenizer), tokenizer)
    rng = random.Random(args.seed)
    runs: dict[str, list[dict]] = {name: [] for name in args.contenders}
    with Cluster("prefix", args.kv_memory_gib) as cluster, ExitStack() as peers:
        workers = cluster.workers()
        urls = {name: cluster.http_url if CONTENDERS[name].router == "radixserve" else peers.enter_context(
            peer_router(CONTENDERS[name], workers, Path("/tmp") / f"radixserve-bench-{name}.log"))
            for name in args.contenders}
        for round_index in range(args.rounds):
            order = list(args.contenders)
            rng.shuffle(order)
            for name in order:
                print(f"round {round_index + 1}/{args.rounds}: {name} ...", file=sys.stderr, flush=True)
                runs[name].append(measure(name, urls[name], workers, probe, args.pairs, args.profile,
                                             args.idle_s))
    summary = {name: {figure: statistics.median(r[figure] for r in rs) for figure in rs[0]}
               for name, rs in runs.items()}
    print(f"\nload average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("| contender | HTTP router overhead p50 / p99 | router CPU / request (net of idle) | idle CPU | "
          "wall / pair |\n|---|---|---|---|---|")
    for name, row in summary.items():
        print(f"| {name} | {row['overhead_p50_ms']:.2f} / {row['overhead_p99_ms']:.2f} ms | "
              f"{row['router_cpu_ms_per_request']:.2f} ms ({row['router_cpu_ms_per_request_net_of_idle']:.2f} ms) | "
              f"{row['router_idle_cpu_ms_per_s']:.1f} ms/s | {row['pair_wall_ms']:.0f} ms |")
    if args.profile is not None and args.profile.exists():
        print("\n" + "\n".join(hot_functions(args.profile, 25)))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"cpu": cpu_model(), "pairs": args.pairs, "rounds": args.rounds,
                                    "summary": summary, "runs": runs}, indent=1))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
