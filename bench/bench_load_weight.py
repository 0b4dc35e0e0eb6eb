"""How ``load_weight`` trades hits against balance on the cluster benchmark's workload, in the simulator, against
SGLang's rule, with and without the step-time noise of a shared machine.

The real 2-worker run (``bench/bench_cluster.py``) shares 2 cores between the workers, the router, the client and
Ray, so its steps take longer or shorter than the cost model says, differently on each worker; the simulated
workers' steps are exact. ``SimConfig.step_noise`` multiplies each simulated step by a log-normal factor (sigma
given) drawn per worker, so that the two workers drift apart as the real ones do. Each configuration runs
``--seeds`` seeds (the noise and the policies' tie-breaks), and the table gives medians and means.

    python bench/bench_load_weight.py     # table on stdout, JSON in bench/results/load_weight.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from pathlib import Path

from radixserve.cluster.control.sim.report import summarize
from radixserve.cluster.control.sim.simulator import simulate
from radixserve.cluster.control.sim.workload import oracle_hit_ratio

sys.path.insert(0, str(Path(__file__).parent))
import bench_sim_fidelity  # noqa: E402  (the cluster benchmark's workload and cluster, as the simulator sees them)

RESULTS = Path(__file__).parent / "results"
CONTENDERS = [("sglang_cache_aware", None), ("prefix", 0.25), ("prefix", 0.35), ("prefix", 0.5), ("prefix", 1.0)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--measured", type=Path, default=RESULTS / "cluster.json",
                        help="a bench_cluster.py result: its workload and KV size are simulated")
    parser.add_argument("--noise", type=float, nargs="+", default=[0.0, 0.3], help="step-time noise sigmas")
    parser.add_argument("--seeds", type=int, default=40)
    parser.add_argument("--out", type=Path, default=RESULTS / "load_weight.json")
    args = parser.parse_args()
    measured = json.loads(args.measured.read_text())
    workload = bench_sim_fidelity.cluster_workload(measured)
    oracle = oracle_hit_ratio(workload)
    rows = []
    print("| step noise | policy | load_weight | req/s median (mean) | TTFT p99 median (mean) | hit ratio median |")
    print("|---|---|---|---|---|---|")
    for noise in args.noise:
        for policy, load_weight in CONTENDERS:
            config = bench_sim_fidelity.sim_config(measured, policy)
            config = dataclasses.replace(config, step_noise=noise,
                                         load_weight=config.load_weight if load_weight is None else load_weight)
            runs = []
            for seed in range(args.seeds):
                run = simulate(workload, dataclasses.replace(config, seed=seed))
                stats = summarize(policy, run.outcomes, run.workers, oracle, run.wall_s)
                runs.append((stats.throughput_rps, stats.ttft_p99_s, stats.hit_ratio))
            row = {"step_noise": noise, "policy": policy, "load_weight": load_weight,
                   "requests_per_s": [r[0] for r in runs], "ttft_p99_s": [r[1] for r in runs],
                   "hit_ratio": [r[2] for r in runs]}
            rows.append(row)
            rps, p99, hit = row["requests_per_s"], row["ttft_p99_s"], row["hit_ratio"]
            label = "-" if load_weight is None else f"{load_weight:g}"
            print(f"| {noise:g} | {policy} | {label} | {statistics.median(rps):.3f} ({statistics.mean(rps):.3f}) | "
                  f"{statistics.median(p99):.1f} s ({statistics.mean(p99):.1f} s) | {statistics.median(hit):.3f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"measured": args.measured.name, "seeds": args.seeds, "rows": rows}, indent=1) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
