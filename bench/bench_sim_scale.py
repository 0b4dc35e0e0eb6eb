"""How fast the simulator runs: 100,000 requests over 64 simulated H100 workers, on this machine.

The workload is the shared Mooncake trace overlaid ``--copies`` times with disjoint prefixes (25 copies: 99,825
requests) and stretched so that each of the 64 workers sees the load one of 8 workers sees at the trace's own
rate (time scale = copies x 8 / workers). The target is a wall time of at most 2 minutes per policy run;
``round_robin`` is timed too because it keeps every worker's cache churning (the most evictions and KV events).

    python bench/bench_sim_scale.py              # table on stdout, JSON in bench/results/sim_scale.json
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

from radixserve.cluster.control.sim import report
from radixserve.cluster.control.sim.simulator import SimConfig, compare
from radixserve.cluster.control.sim.workload import load_mooncake, mooncake_trace_path, tile

RESULTS = Path(__file__).parent / "results"
TARGET_S = 120.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trace", type=Path, help="the Mooncake trace (default: mooncake_trace_path())")
    parser.add_argument("--copies", type=int, default=25)
    parser.add_argument("--workers", type=int, default=64)
    parser.add_argument("--policies", nargs="+", default=["prefix", "round_robin"])
    parser.add_argument("--out", type=Path, default=RESULTS / "sim_scale.json")
    args = parser.parse_args()

    started = time.monotonic()
    args.trace = args.trace or mooncake_trace_path()
    trace = load_mooncake(args.trace)
    workload = tile(trace, args.copies).scaled(args.copies * 8 / args.workers)
    prepare_s = time.monotonic() - started
    base = SimConfig(num_workers=args.workers, device="h100", model="llama-3-8b", host_kv_gib=256.0,
                     load_weight=0.5)
    stats = compare(workload, [dataclasses.replace(base, policy=p) for p in args.policies])
    print(report.format_table(stats))
    print(f"\n{len(workload.requests):,} requests over {args.workers} workers; loading and tiling the trace took "
          f"{prepare_s:.1f} s; the wall times below are the simulations alone")
    for s in stats:
        met = "met" if s.sim_wall_s <= TARGET_S else "NOT met"
        print(f"- {s.policy}: {s.sim_wall_s:.1f} s wall, {s.num_requests / s.sim_wall_s:,.0f} requests/s "
              f"(target <= {TARGET_S:.0f} s: {met})")
    report.write_json(args.out, stats, {"trace": args.trace.name, "copies": args.copies,
                                        "num_requests": len(workload.requests), "config": dataclasses.asdict(base)})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
