"""Prometheus against the benchmark: the cluster benchmark's workload, scraped by a real Prometheus.

One ``prefix`` cluster (``radixserve up --detach``, as ``bench_cluster.py`` starts it) serves the cluster
benchmark's shared-prefix workload, over OpenAI HTTP as that benchmark sends it, while a local Prometheus scrapes
every process each second through the targets file ``up`` keeps. The table compares the figures the benchmark
measures at the client with the ones Prometheus reads from the router's metrics for the same run (hit ratio,
throughput, TTFT mean and p50); the target is agreement within 5%. The main dashboard panels are then rendered
from Prometheus range queries of the run, with the dashboard's own expressions, to
``bench/results/observability.png``; figures go to ``observability.json``.

    python bench/bench_observability.py          # about 2 minutes
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

from bench_cluster import RESULTS, Cluster, Workload, make_arrivals, replay

from radixserve.cluster.control.dashboards import dashboard_queries, legend
from radixserve.cluster.control.prometheus import PrometheusServer

ROOT = Path(__file__).parents[1]
DASHBOARD = ROOT / "dashboards" / "radixserve-overview.json"
ALERTS = ROOT / "dashboards" / "alerts.yml"
PANELS = ("Requests/s by code", "Generated tokens/s", "Time to first token (router)", "Prefix cache hit ratio",
          "Load share per worker", "KV pool use per worker", "Queue depth per worker", "Routing decision latency")


def prometheus_figures(server: PrometheusServer, start: float, end: float, makespan_s: float) -> dict[str, float]:
    """The run's figures as Prometheus reads them at ``end``, over the window ``[start, end]`` (unix seconds);
    throughput is the growth of the router's OK-request counter between ``start`` and ``end`` (exact stored
    values: ``increase()`` would extrapolate to the window's edges) over the run's ``makespan_s``."""
    window = f"{max(1, round(end - start))}s"

    def one(expr: str, at: float = end) -> float:
        rows = server.query(expr, at=at)
        if not rows:
            raise RuntimeError(f"Prometheus returned no data for {expr}")
        return float(rows[0]["value"][1])

    ok = 'sum(radixserve_router_requests_total{code="OK"}) or vector(0)'  # no series before the first success
    return {
        "hit_ratio": one("sum(radixserve_router_cached_tokens_total) / sum(radixserve_router_prompt_tokens_total)"),
        "requests_per_s": (one(ok) - one(ok, at=start)) / makespan_s,
        "ttft_mean_s": one("sum(radixserve_router_time_to_first_token_seconds_sum) / "
                           "sum(radixserve_router_time_to_first_token_seconds_count)"),
        "ttft_p50_s": one(f"histogram_quantile(0.5, sum by (le) "
                          f"(increase(radixserve_router_time_to_first_token_seconds_bucket[{window}])))"),
    }


def plot_panels(server: PrometheusServer, start: float, end: float, path: Path) -> None:
    """The ``PANELS`` of the dashboard over ``[start, end]``, one subplot each, from range queries."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    queries = dashboard_queries(DASHBOARD)
    fig, axes = plt.subplots(4, 2, figsize=(13, 13), constrained_layout=True)
    for ax, title in zip(axes.flat, PANELS):
        for query in (q for q in queries if q.title == title):
            for row in server.query_range(query.expr, start, end, step=1.0):
                times = [float(t) - start for t, _ in row["values"]]
                ax.plot(times, [float(v) for _, v in row["values"]], label=legend(query, row["metric"]))
        ax.set_title(title)
        ax.set_xlabel("seconds into the run")
        ax.legend(fontsize=7)
    fig.suptitle("radixserve dashboard panels, read back from Prometheus after the benchmark run")
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kv-memory-gib", type=float, default=0.3)
    parser.add_argument("--out", type=Path, default=RESULTS / "observability.json")
    args = parser.parse_args()
    workload = Workload()
    arrivals = make_arrivals(workload)
    with Cluster("prefix", args.kv_memory_gib) as cluster, \
            PrometheusServer(cluster.targets_path, [ALERTS], scrape_interval_s=1.0) as server:
        server.wait_for(lambda: len(server.query("up == 1")) == 3, timeout_s=60)
        start = time.time()
        outcomes, makespan = asyncio.run(replay(cluster.http_url, arrivals, workload.output_len))
        end = start + makespan
        time.sleep(3)  # two more scrapes, so the last requests are in Prometheus
        scraped = prometheus_figures(server, start, end + 2.5, makespan)
        plot_panels(server, start - 5, end + 3, args.out.with_name("observability.png"))
    done = [o for o in outcomes if not o.error]
    measured = {"hit_ratio": sum(o.cached_tokens for o in done) / sum(o.prompt_tokens for o in done),
                "requests_per_s": len(done) / makespan,
                "ttft_mean_s": statistics.fmean(o.ttft_s for o in done),
                "ttft_p50_s": statistics.median(o.ttft_s for o in done)}
    rows = [(name, measured[name], scraped[name], scraped[name] / measured[name] - 1) for name in measured]
    print("| figure | benchmark | Prometheus | difference |\n|---|---|---|---|")
    for name, bench, prom, diff in rows:
        print(f"| {name} | {bench:.4g} | {prom:.4g} | {diff:+.1%} |")
    worst = max(abs(diff) for *_, diff in rows)
    print(f"\nlargest difference {worst:.1%} (target <= 5%): {'met' if worst <= 0.05 else 'NOT met'}; "
          f"{len(outcomes) - len(done)} errors")
    args.out.write_text(json.dumps({"workload": asdict(workload), "benchmark": measured, "prometheus": scraped,
                                    "largest_difference": worst}, indent=1))
    print(f"wrote {args.out} and observability.png beside it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
