"""Several router replicas: the shared Mooncake trace on 16 simulated H100 workers serving Llama-3-8B.

The ``prefix`` policy (``--load-weight``, default the router's) with a 256 GiB host KV tier per GPU, as
``bench_sim.py`` runs it, behind 1, 2, 4 and 8 routers that take the requests in turn, each with its own prefix
index and in-flight accounting, with shared load on (each sees the others' in-flight load as last published,
every ``--load-interval-s``) and off (only its own, and the workers' load reports polled every 0.5 s). One router
is the same run either way (checked here). Target: with shared load, every router count within 1 percentage point
of one router's hit ratio and within 5% of its TTFT p99.

    python bench/bench_sim_routers.py        # table on stdout, JSON in bench/results/sim_routers.json (< 1 minute)
"""

from __future__ import annotations

import argparse
import json
import dataclasses
import time
from pathlib import Path

from machine import cpu_model
from radixserve.cluster.base.config import BusConfig, RouterConfig
from radixserve.cluster.control.sim import report
from radixserve.cluster.control.sim.report import PolicyStats
from radixserve.cluster.control.sim.simulator import SimConfig, compare
from radixserve.cluster.control.sim.workload import load_mooncake, mooncake_trace_path

RESULTS = Path(__file__).parent / "results"
HIT_TARGET_PP = 1.0
TTFT_P99_TARGET = 0.05


@dataclasses.dataclass(frozen=True)
class Row:
    """One run: how many routers, whether they shared load, and its figures."""

    num_routers: int
    shared_load: bool
    stats: PolicyStats


def format_table(rows: list[Row], one: PolicyStats) -> str:
    """A Markdown table, one line a run, with each run's differences from one router (``one``)."""
    header = ("routers", "shared load", "hit", "hit vs 1 (pp)", "TTFT p50", "TTFT p99", "p99 vs 1", "req/s",
              "share max/mean", "wall s")
    lines = [header] + [(str(r.num_routers), "on" if r.shared_load else "off", f"{r.stats.hit_ratio:.4f}",
                         f"{100 * (r.stats.hit_ratio - one.hit_ratio):+.2f}",
                         report.format_duration(r.stats.ttft_p50_s), report.format_duration(r.stats.ttft_p99_s),
                         f"{r.stats.ttft_p99_s / one.ttft_p99_s - 1:+.1%}", f"{r.stats.throughput_rps:.3f}",
                         f"{r.stats.share_max_over_mean:.2f}", f"{r.stats.sim_wall_s:.1f}") for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["| " + " | ".join(cell.rjust(w) for cell, w in zip(line, widths)) + " |" for line in lines]
    text.insert(1, "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|")
    return "\n".join(text)


def check_targets(rows: list[Row], one: PolicyStats) -> list[str]:
    """One line per router count above one, shared load on: its hit ratio and TTFT p99 against one router's."""
    lines = []
    for r in rows:
        if r.num_routers == 1 or not r.shared_load:
            continue
        hit_pp = 100 * (r.stats.hit_ratio - one.hit_ratio)
        p99 = r.stats.ttft_p99_s / one.ttft_p99_s - 1
        met = abs(hit_pp) <= HIT_TARGET_PP and abs(p99) <= TTFT_P99_TARGET
        lines.append(f"- {r.num_routers} routers, shared load: hit {hit_pp:+.2f} pp, TTFT p99 {p99:+.1%} "
                     f"(target within {HIT_TARGET_PP:g} pp and {TTFT_P99_TARGET:.0%}): {'met' if met else 'NOT met'}")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trace", type=Path, help="the Mooncake trace (default: mooncake_trace_path())")
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--routers", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--host-kv-gib", type=float, default=256.0)
    parser.add_argument("--load-weight", type=float, default=RouterConfig.load_weight)
    parser.add_argument("--load-interval-s", type=float, default=BusConfig.load_interval_s)
    parser.add_argument("--time-scale", type=float, default=1.0, help="multiply arrival times (0.5 = twice the load)")
    parser.add_argument("--share-routes", choices=("on", "off"), default="on",
                        help="whether the routers credit each other's routing decisions (route hints)")
    parser.add_argument("--out", type=Path, default=RESULTS / "sim_routers.json")
    args = parser.parse_args()
    if 1 not in args.routers:
        parser.error("--routers: must include 1, the baseline")

    started = time.monotonic()
    args.trace = args.trace or mooncake_trace_path()
    trace = load_mooncake(args.trace, time_scale=args.time_scale)
    base = SimConfig(num_workers=args.workers, policy="prefix", device="h100", model="llama-3-8b",
                     host_kv_gib=args.host_kv_gib, load_weight=args.load_weight, load_interval_s=args.load_interval_s,
                     share_routes=args.share_routes == "on")
    runs = [(n, shared) for n in sorted(args.routers) for shared in (True, False)]
    stats = compare(trace, [dataclasses.replace(base, num_routers=n, shared_load=shared) for n, shared in runs])
    rows = [Row(n, shared, s) for (n, shared), s in zip(runs, stats, strict=True)]
    one_on, one_off = (r.stats for r in rows if r.num_routers == 1)
    alike = dataclasses.replace(one_on, sim_wall_s=0) == dataclasses.replace(one_off, sim_wall_s=0)
    print(format_table(rows, one_on))
    print(f"\n{len(trace.requests):,} requests over {args.workers} workers; one router with shared load on and off: "
          f"{'identical' if alike else 'DIFFERENT'}")
    print("\n".join(check_targets(rows, one_on)))
    wall_s = time.monotonic() - started
    meta = {"trace": args.trace.name, "num_requests": len(trace.requests), "time_scale": args.time_scale,
            "config": dataclasses.asdict(base), "cpu": cpu_model(), "wall_s": wall_s,
            "one_router_alike_on_and_off": alike, "targets": check_targets(rows, one_on)}
    results = [{"num_routers": r.num_routers, "shared_load": r.shared_load, **dataclasses.asdict(r.stats)}
               for r in rows]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=1, allow_nan=False) + "\n")
    print(f"\n{wall_s:.0f} s in all; wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
