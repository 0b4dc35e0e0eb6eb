"""Does the simulator predict the real cluster? The cluster benchmark's run, replayed by the simulator.

Reads the real 2-worker runs that ``bench/bench_cluster.py`` wrote (``bench/results/cluster.json``, plus any
repeats given; each of our policies' median over them is compared, the peer routers' lines skipped), rebuilds their
exact workload with that benchmark's own generator (same seed, same arrival times and token ids, cut into the
engine's 16-token pages), and simulates it with the ``cpu`` device preset (fitted to the real engine on this
machine by ``radixserve calibrate``), the SmolLM2-135M shape, the engine's default batching (512 tokens a step,
64 running requests), each worker's KV pool as the real run sized it, and the router's default ``load_weight``.
Target: for every policy, the simulated prefix hit ratio is within 5 percentage points of the measured one. The
randomized policies (``random``, ``power_of_two``, and the random tie-breaks of the others) depend on timing as
well as on their seed, so each policy is simulated with ``--seeds`` seeds and the median is compared, with the
simulated range shown beside it.

    python bench/bench_cluster.py --contenders least_load random power_of_two dynamo_kv --out bench/results/cluster_repeat_baselines.json
    python bench/bench_sim_fidelity.py           # table on stdout, JSON in bench/results/sim_fidelity.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from pathlib import Path

from radixserve.cluster.base.config import POLICIES, RouterConfig
from radixserve.cluster.control.sim.costmodel import MODELS
from radixserve.cluster.control.sim.simulator import SimConfig, simulate
from radixserve.cluster.control.sim.report import summarize
from radixserve.cluster.control.sim.workload import TokenPrompt, Workload, from_token_prompts, oracle_hit_ratio

sys.path.insert(0, str(Path(__file__).parent))
import bench_cluster  # noqa: E402  (the cluster benchmark's workload generator, beside this file)

RESULTS = Path(__file__).parent / "results"
TARGET_PP = 5.0


def cluster_workload(measured: dict) -> Workload:
    """The real run's requests, in its arrival order, as simulator blocks of the engine's page size."""
    shape = bench_cluster.Workload(**measured["workload"])
    prompts = [TokenPrompt(a.at_s, tuple(a.token_ids), shape.output_len, group=a.group)
               for a in bench_cluster.make_arrivals(shape)]
    return from_token_prompts("cluster benchmark", prompts, bench_cluster.PAGE_SIZE)


def sim_config(measured: dict, policy: str) -> SimConfig:
    """Two workers as the real run had them: the CPU preset and the engine's KV pool and batching defaults."""
    page_bytes = bench_cluster.PAGE_SIZE * MODELS["smollm2-135m"].kv_bytes_per_token_per_rank
    num_pages = int(measured["kv_memory_gib"] * 2**30) // page_bytes  # as Engine._num_pages sizes the pool
    return SimConfig(num_workers=2, policy=policy, device="cpu", model="smollm2-135m", num_blocks=num_pages,
                     max_batch_tokens=512, max_running=64, load_weight=RouterConfig().load_weight,
                     kv_event_lag_s=0.01)


def _figures(workload: Workload, config: SimConfig, oracle: float) -> dict[str, float]:
    run = simulate(workload, config)
    stats = summarize(config.policy, run.outcomes, run.workers, oracle, run.wall_s)
    return {"hit_ratio": stats.hit_ratio, "ttft_p50_ms": 1000 * stats.ttft_p50_s,
            "requests_per_s": stats.throughput_rps}


def measured_runs(paths: list[Path]) -> tuple[dict, dict[str, list[dict]]]:
    """The first file's settings and, per policy, its results in every file (all of the same workload)."""
    files = [json.loads(path.read_text()) for path in paths]
    first = files[0]
    by_policy: dict[str, list[dict]] = {}
    for path, data in zip(paths, files, strict=True):
        if (data["workload"], data["kv_memory_gib"]) != (first["workload"], first["kv_memory_gib"]):
            raise SystemExit(f"{path}: another workload or KV size than {paths[0]}")
        for result in data["results"]:
            if result.get("seed") in (None, data["workload"]["seed"]):  # runs of other seeds replay other arrivals
                by_policy.setdefault(result["policy"], []).append(result)
    return first, by_policy


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--measured", type=Path, nargs="+",
                        default=[RESULTS / "cluster.json", *sorted(RESULTS.glob("cluster_repeat_*.json"))],
                        help="runs of bench_cluster.py on the same workload; each policy's median is compared")
    parser.add_argument("--out", type=Path, default=RESULTS / "sim_fidelity.json")
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args()

    measured, by_policy = measured_runs(args.measured)
    workload = cluster_workload(measured)
    oracle = oracle_hit_ratio(workload)
    rows = []
    for policy, reals in by_policy.items():
        if policy not in POLICIES:  # a peer router's line (bench_cluster's smg_*, vllm_router_*): not simulated
            continue
        runs = [_figures(workload, dataclasses.replace(sim_config(measured, policy), seed=seed), oracle)
                for seed in range(args.seeds)]
        hits = [r["hit_ratio"] for r in runs]
        real_hits = [r["hit_ratio"] for r in reals]
        hit, real_hit = statistics.median(hits), statistics.median(real_hits)
        rows.append({"policy": policy, "real_hit_ratio": real_hit, "real_hit_ratios": real_hits,
                     "sim_hit_ratio": hit, "sim_hit_ratio_range": [min(hits), max(hits)],
                     "diff_pp": 100 * (hit - real_hit),
                     "real_ttft_p50_ms": statistics.median(r["ttft_p50_ms"] for r in reals),
                     "sim_ttft_p50_ms": statistics.median(r["ttft_p50_ms"] for r in runs),
                     "real_requests_per_s": statistics.median(r["requests_per_s"] for r in reals),
                     "sim_requests_per_s": statistics.median(r["requests_per_s"] for r in runs)})
    print("| policy | real hit ratio (runs) | simulated (median) | simulated range | difference | real TTFT p50 "
          "| simulated | real req/s | simulated |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        low, high = r["sim_hit_ratio_range"]
        runs = ", ".join(f"{h:.3f}" for h in r["real_hit_ratios"])
        print(f"| {r['policy']} | {r['real_hit_ratio']:.3f} ({runs}) | {r['sim_hit_ratio']:.3f} | {low:.3f}-{high:.3f} "
              f"| {r['diff_pp']:+.1f} pp | {r['real_ttft_p50_ms']:,.0f} ms | {r['sim_ttft_p50_ms']:,.0f} ms | "
              f"{r['real_requests_per_s']:.3f} | {r['sim_requests_per_s']:.3f} |")
    worst = max(abs(r["diff_pp"]) for r in rows)
    print(f"\nlargest hit-ratio difference {worst:.1f} pp (target <= {TARGET_PP:.0f} pp: "
          f"{'met' if worst <= TARGET_PP else 'NOT met'})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"measured": [p.name for p in args.measured], "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
