"""``radixserve top``: a live view of the cluster read from the same /metrics endpoints Prometheus scrapes.

Each frame scrapes the router and every worker listed in the Prometheus targets file that ``up`` keeps
(``cluster.discovery``). Rates and latency quantiles cover the interval since the previous frame (the first frame
covers everything since the processes started), computed from counter and histogram-bucket differences exactly
as Prometheus' ``rate`` and ``histogram_quantile`` would over that window.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from radixserve.cluster.control.discovery import read_targets
from radixserve.cluster.control.launcher import ClusterState
from radixserve.cluster.base.metrics import Sample, histogram_quantile, scrape, total


@dataclass(frozen=True)
class Frame:
    """One scrape of every endpoint: ``at`` (monotonic seconds), samples by address (None: did not answer)."""

    at: float
    router: dict[str, list[Sample] | None]
    workers: dict[str, list[Sample] | None]


def read_frame(targets: dict[str, list[str]]) -> Frame:
    """Scrape every router and worker endpoint of ``targets`` (``discovery.read_targets``) now."""
    return Frame(time.monotonic(), {a: _try_scrape(a) for a in targets.get("router", [])},
                 {a: _try_scrape(a) for a in targets.get("worker", [])})


def _try_scrape(address: str) -> list[Sample] | None:
    try:
        return scrape(address)
    except OSError:
        return None


def since(now: list[Sample], before: list[Sample] | None) -> list[Sample]:
    """Counters and histogram buckets as increases since ``before`` (gauges keep their value now).

    A series that went down was reset (a restarted process): its increase is its value now, as in Prometheus.
    """
    if before is None:
        return now
    old = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in before}
    out = []
    for s in now:
        if s.name.endswith(("_total", "_bucket", "_sum", "_count")):
            previous = old.get((s.name, tuple(sorted(s.labels.items()))), 0.0)
            out.append(Sample(s.name, s.labels, s.value - previous if s.value >= previous else s.value))
        else:
            out.append(s)
    return out


def format_frame(frame: Frame, previous: Frame | None) -> str:
    """The cluster line (router figures) and one row per worker, over the window since ``previous``."""
    window = frame.at - previous.at if previous is not None else None
    lines = [_router_line(address, samples, previous.router.get(address) if previous else None, window)
             for address, samples in frame.router.items()]
    rows = [("WORKER", "ADDRESS", "RUNNING", "WAITING", "KV USED", "HIT", "TOKENS/S", "TTFT P50", "ITL P50")]
    for address, samples in sorted(frame.workers.items()):
        rows.append(_worker_row(address, samples, previous.workers.get(address) if previous else None, window))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines += ["  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
              for row in rows]
    return "\n".join(lines)


def _router_line(address: str, samples: list[Sample] | None, before: list[Sample] | None,
                 window: float | None) -> str:
    if samples is None:
        return f"router {address}: not answering"
    d = since(samples, before)
    ok = total(d, "radixserve_router_requests_total", code="OK")
    failed = total(d, "radixserve_router_requests_total") - ok
    rate = f"{ok / window:.2f} req/s" if window else f"{ok:.0f} requests"
    p50 = histogram_quantile(d, "radixserve_router_time_to_first_token_seconds", 0.5)
    p99 = histogram_quantile(d, "radixserve_router_time_to_first_token_seconds", 0.99)
    hit = _ratio(total(d, "radixserve_router_cached_tokens_total"), total(d, "radixserve_router_prompt_tokens_total"))
    up = total(samples, "radixserve_router_workers", state="up")
    return (f"router {address}: {rate} ok, {failed:.0f} failed, TTFT p50 {_seconds(p50)} p99 {_seconds(p99)}, "
            f"hit {hit}, workers up {up:.0f}")


def _worker_row(address: str, samples: list[Sample] | None, before: list[Sample] | None,
                window: float | None) -> tuple[str, ...]:
    if samples is None:
        return ("?", address, "down", "", "", "", "", "", "")
    d = since(samples, before)
    worker = next((s.labels["worker"] for s in samples if "worker" in s.labels), "?")
    used, free = total(samples, "radixserve_worker_kv_used_pages"), total(samples, "radixserve_worker_kv_free_pages")
    generated = total(d, "radixserve_worker_generated_tokens_total")
    return (worker, address, f"{total(samples, 'radixserve_worker_running_requests'):.0f}",
            f"{total(samples, 'radixserve_worker_waiting_requests'):.0f}", _ratio(used, used + free),
            _ratio(total(d, "radixserve_worker_prefix_cache_hit_tokens_total"),
                   total(d, "radixserve_worker_prefix_cache_query_tokens_total")),
            f"{generated / window:.1f}" if window else "-",
            _seconds(histogram_quantile(d, "radixserve_worker_time_to_first_token_seconds", 0.5)),
            _seconds(histogram_quantile(d, "radixserve_worker_inter_token_latency_seconds", 0.5)))


def _ratio(part: float, whole: float) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


def add_top_command(subparsers: argparse._SubParsersAction) -> None:
    top = subparsers.add_parser("top", help="live per-worker figures from the processes' /metrics endpoints")
    top.add_argument("--targets", type=Path, default=None,
                     help="the Prometheus targets file (default: the running cluster's, from `radixserve up`)")
    top.add_argument("--interval", type=float, default=2.0, help="seconds between frames")
    top.add_argument("--iterations", type=int, default=0, help="frames to show (0: until Ctrl-C)")
    top.set_defaults(func=run_top)


def targets_path(explicit: Path | None) -> Path | None:
    """``explicit``, else the targets file of the cluster ``up`` is running, else None."""
    if explicit is not None:
        return explicit
    state = ClusterState.load()
    return Path(state.targets_path) if state is not None else None


def run_top(args: argparse.Namespace) -> int:
    path = targets_path(args.targets)
    if path is None or not path.exists():
        print("error: no targets file: is the cluster up? (or pass --targets)", file=sys.stderr)
        return 1
    if args.interval <= 0:
        print("error: --interval: must be > 0", file=sys.stderr)
        return 2
    previous: Frame | None = None
    shown = 0
    try:
        while args.iterations == 0 or shown < args.iterations:
            frame = read_frame(read_targets(path))
            print(("\033[H\033[J" if sys.stdout.isatty() else "") + format_frame(frame, previous), flush=True)
            previous, shown = frame, shown + 1
            if args.iterations == 0 or shown < args.iterations:
                time.sleep(args.interval)
    except KeyboardInterrupt:
        pass
    return 0
