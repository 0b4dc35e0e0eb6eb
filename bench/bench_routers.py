"""One router against two and four router replicas on Redis: the same 2 workers and shared-prefix workload.

Each run starts a fresh cluster (``radixserve up --detach``; with more than one router, ``--routers N`` on the
local redis-server ``up`` starts) and replays the cluster benchmark's workload (``bench_cluster.py``: groups of
requests sharing a long system prompt, Poisson arrivals) over OpenAI HTTP, arrival i through router i mod N, as
a client taking turns between replicas. Reported per router count: hit ratio, TTFT p50/p99, throughput, the
HTTP router overhead p50 through the first router (paired with direct requests to the serving worker, as in the
cluster benchmark), and the KV event lag p50/p99 (worker taking a batch from its engine to a router applying
it) from the routers' own ``radixserve_router_kv_event_lag_seconds`` histograms, summed over the replicas.
A contender is a router count, or ``<count>-unshared`` for that many replicas that do not share their routing
decisions (``bus.share_routes = false``), to show what the route hints buy. Each contender runs ``--repeats``
times in one shuffled order; the table gives medians.

    python bench/bench_routers.py            # table on stdout, JSON in bench/results/routers.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
from dataclasses import asdict
from pathlib import Path

import httpx

from bench_cluster import (MODEL, RESULTS, Arrival, Cluster, Probe, Workload, add_workload_args, load_tokenizer,
                           make_arrivals, make_probe, oracle_hit_ratio, replay, router_overhead, run_shuffled,
                           settled_finished, summarize_run, word_vocabulary, workload_from_args)
from machine import cpu_model
from radixserve.cluster.control.discovery import read_targets

LAG = "radixserve_router_kv_event_lag_seconds"


def lag_buckets(router_metrics: list[str]) -> dict[float, float]:
    """The KV event lag histogram's cumulative buckets (upper bound -> count), summed over the routers."""
    buckets: dict[float, float] = {}
    for address in router_metrics:
        for line in httpx.get(f"http://{address}/metrics", timeout=10).text.splitlines():
            if line.startswith(f"{LAG}_bucket{{"):
                bound = line.split('le="')[1].split('"')[0]
                buckets[float(bound)] = buckets.get(float(bound), 0.0) + float(line.rsplit(" ", 1)[1])
    return buckets


def bucket_quantile(buckets: dict[float, float], q: float) -> float:
    """Prometheus's histogram_quantile over cumulative ``buckets`` (linear within a bucket)."""
    bounds = sorted(buckets)
    total = buckets[bounds[-1]] if bounds else 0.0
    if total == 0:
        return float("nan")
    rank, lower, below = q * total, 0.0, 0.0
    for bound in bounds:
        if buckets[bound] >= rank:
            if bound == float("inf"):
                return lower
            return lower + (bound - lower) * (rank - below) / max(buckets[bound] - below, 1e-12)
        lower, below = bound, buckets[bound]
    return lower


def parse_contender(name: str) -> tuple[int, bool]:
    """``"N"`` or ``"N-unshared"``: the router count and whether the replicas share their routing decisions."""
    count, _, suffix = name.partition("-")
    if not count.isdigit() or int(count) < 1 or suffix not in ("", "unshared"):
        raise argparse.ArgumentTypeError(f"contender: expected N or N-unshared, got {name!r}")
    return int(count), suffix == ""


def contender_name(name: str) -> str:
    """``name`` once ``parse_contender`` accepts it (an argparse ``type``)."""
    parse_contender(name)
    return name


def run(contender: str, args: argparse.Namespace, arrivals: list[Arrival], probe: Probe, workload: Workload,
        oracle: float) -> dict[str, object]:
    """One run on a fresh cluster of ``contender``: the replay, the lag histograms, the overhead."""
    num_routers, share_routes = parse_contender(contender)
    settings = () if share_routes else ("bus.share_routes=false",)
    with Cluster("prefix", args.kv_memory_gib, routers=num_routers, settings=settings) as cluster:
        workers = cluster.workers()
        kv_pages_per_gib = cluster.kv_pages_per_gib()
        routers = read_targets(cluster.targets_path).get("router", [])
        before = settled_finished(workers, 0)
        outcomes, makespan = asyncio.run(replay(cluster.http_urls, arrivals, workload.output_len))
        after = settled_finished(workers, sum(before.values()) + len(arrivals))
        buckets = lag_buckets(routers)
        overhead = asyncio.run(router_overhead(cluster.http_url, workers, args.overhead_pairs, probe, False))
    served = {wid: after[wid] - before.get(wid, 0.0) for wid in after}
    result = asdict(summarize_run(contender, outcomes, makespan, served, overhead, oracle, kv_pages_per_gib))
    result.pop("outcomes")
    result.update(contender=contender, routers=num_routers, share_routes=share_routes, kv_event_lag_p50_ms=bucket_quantile(buckets, 0.5) * 1000,
                  kv_event_lag_p99_ms=bucket_quantile(buckets, 0.99) * 1000, num_router_metrics=len(routers))
    return result


FIGURES = ("hit_ratio", "ttft_p50_ms", "ttft_p99_ms", "requests_per_s", "router_overhead_p50_ms",
           "kv_event_lag_p50_ms", "kv_event_lag_p99_ms")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_workload_args(parser)
    parser.add_argument("--contenders", nargs="+", default=["1", "2", "4", "2-unshared"], type=contender_name,
                        help="router counts; N-unshared: N replicas without shared routing decisions")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--order-seed", type=int, default=0)
    parser.add_argument("--kv-memory-gib", type=float, default=0.3)
    parser.add_argument("--overhead-pairs", type=int, default=30)
    parser.add_argument("--out", type=Path, default=RESULTS / "routers.json")
    args = parser.parse_args()
    workload = workload_from_args(args)
    tokenizer = load_tokenizer()
    vocabulary = word_vocabulary(tokenizer)
    arrivals = make_arrivals(workload, vocabulary)
    probe = make_probe(vocabulary, tokenizer)
    oracle = oracle_hit_ratio(arrivals, MODEL)
    results = run_shuffled(args.contenders, args.repeats, args.order_seed,
                           lambda contender: run(contender, args, arrivals, probe, workload, oracle))
    summary = {c: {f: statistics.median(float(r[f]) for r in results if r["contender"] == c) for f in FIGURES}
               for c in args.contenders}
    print(f"\noracle hit ratio {oracle:.3f}; {cpu_model()}; medians of {args.repeats} run(s) each\n")
    print("| routers | hit ratio (min-max) | TTFT p50 | TTFT p99 | req/s | HTTP router overhead p50 | KV event lag p50 / p99 |")
    print("|---|---|---|---|---|---|---|")
    for contender, r in summary.items():
        hits = [float(one["hit_ratio"]) for one in results if one["contender"] == contender]
        print(f"| {contender} | {r['hit_ratio']:.3f} ({min(hits):.3f}-{max(hits):.3f}) | "
              f"{r['ttft_p50_ms'] / 1000:.1f} s | {r['ttft_p99_ms'] / 1000:.1f} s | "
              f"{r['requests_per_s']:.3f} | {r['router_overhead_p50_ms']:.2f} ms | "
              f"{r['kv_event_lag_p50_ms']:.1f} / {r['kv_event_lag_p99_ms']:.1f} ms |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"workload": asdict(workload), "kv_memory_gib": args.kv_memory_gib,
                                    "oracle_hit_ratio": oracle, "cpu": cpu_model(), "summary": summary,
                                    "runs": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
