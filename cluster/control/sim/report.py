"""Results of a simulated run: raw outcomes in; figures, a table, JSON, plots and a progress line out.

Contract: the simulator hands ``summarize`` one ``RequestOutcome`` per finished request and one ``WorkerStats`` per
worker, indexed as ``RequestOutcome.worker``. Times are seconds of simulated time (``sim_wall_s`` alone is real
time), lengths are tokens. ``summarize`` reduces them to a ``PolicyStats`` of plain floats, ints and tuples, so the
JSON form is ``dataclasses.asdict``. Percentiles are numpy's default definition: linear interpolation between the
two nearest ranks (``np.percentile(values, q)``). matplotlib is imported only inside the plot functions, which draw
on an Agg canvas of their own: no display, and no pyplot state touched.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Self, TextIO

import numpy as np

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

_PERCENTILES = (50, 90, 99)
_MAX_CDF_POINTS = 200


@dataclass(frozen=True)
class RequestOutcome:
    """One finished request: where it ran, when (absolute sim seconds) and how much of its prompt was cached."""

    worker: int
    arrival_s: float
    first_token_s: float
    finish_s: float
    input_len: int
    cached_tokens: int
    output_len: int

    def __post_init__(self) -> None:
        if self.worker < 0:
            raise ValueError(f"worker: must be >= 0, got {self.worker}")
        if not self.first_token_s >= self.arrival_s:
            raise ValueError(f"first_token_s: must be >= arrival_s ({self.arrival_s}), got {self.first_token_s}")
        if not self.finish_s >= self.first_token_s:
            raise ValueError(f"finish_s: must be >= first_token_s ({self.first_token_s}), got {self.finish_s}")
        if self.input_len < 1:
            raise ValueError(f"input_len: must be >= 1, got {self.input_len}")
        if not 0 <= self.cached_tokens <= self.input_len:
            raise ValueError(f"cached_tokens: must be in [0, input_len={self.input_len}], got {self.cached_tokens}")
        if self.output_len < 1:
            raise ValueError(f"output_len: must be >= 1, got {self.output_len}")


@dataclass(frozen=True)
class WorkerStats:
    """One worker over the whole run.

    ``kv_use_mean``: time-averaged fraction of the worker's KV blocks in use (cached or held by running requests);
    ``kv_use_peak``: the largest such fraction. ``num_requests``: requests it finished.
    """

    num_requests: int
    kv_use_mean: float
    kv_use_peak: float
    num_evicted_blocks: int
    num_preemptions: int

    def __post_init__(self) -> None:
        for name in ("num_requests", "num_evicted_blocks", "num_preemptions"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")
        for name in ("kv_use_mean", "kv_use_peak"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name}: must be in [0, 1], got {getattr(self, name)}")


@dataclass(frozen=True)
class PolicyStats:
    """The figures of one policy on one cluster size; built by ``summarize``.

    ``hit_ratio``: cached prompt tokens over all prompt tokens; ``oracle_share``: ``hit_ratio / oracle_hit_ratio``
    (0 when the oracle is 0). Latencies are seconds from arrival (TTFT: to the first token; e2e: to the last).
    Rates are per second of makespan, the time from the first arrival to the last finish. ``worker_share``: the
    fraction of requests each worker served; ``share_max_over_mean``: the busiest worker's count over the mean
    count (1 is perfectly even). ``kv_use_mean`` is the mean over workers of their time-averaged use,
    ``kv_use_peak`` the largest peak; block and preemption counts are cluster totals. ``sim_wall_s``: real seconds
    the simulation took. ``ttft_cdf``: points ``(ttft_s, fraction of requests with TTFT <= ttft_s)`` of the
    empirical CDF, ascending, at most 200, the last one ``(max TTFT, 1.0)``.
    """

    policy: str
    num_workers: int
    num_requests: int
    hit_ratio: float
    oracle_hit_ratio: float
    oracle_share: float
    ttft_p50_s: float
    ttft_p90_s: float
    ttft_p99_s: float
    e2e_p50_s: float
    e2e_p90_s: float
    e2e_p99_s: float
    throughput_rps: float
    output_tokens_per_s: float
    makespan_s: float
    share_max_over_mean: float
    worker_share: tuple[float, ...]
    kv_use_mean: float
    kv_use_peak: float
    num_evicted_blocks: int
    num_preemptions: int
    sim_wall_s: float
    ttft_cdf: tuple[tuple[float, float], ...]


def summarize(policy: str, outcomes: Sequence[RequestOutcome], workers: Sequence[WorkerStats],
              oracle_hit_ratio: float, sim_wall_s: float) -> PolicyStats:
    """Reduce one run of ``policy`` to its figures (see ``PolicyStats``).

    ``outcomes``: every finished request, non-empty, spanning a positive makespan; ``workers``: one entry per
    worker, whose ``num_requests`` must equal the outcomes it served. ``oracle_hit_ratio`` in [0, 1]: the best hit
    ratio any routing could reach on this workload. ``sim_wall_s`` >= 0: real seconds the run took.
    """
    if not outcomes:
        raise ValueError("outcomes: must be non-empty, got 0 outcomes")
    if not workers:
        raise ValueError("workers: must be non-empty, got 0 workers")
    if not 0 <= oracle_hit_ratio <= 1:
        raise ValueError(f"oracle_hit_ratio: must be in [0, 1], got {oracle_hit_ratio}")
    if not sim_wall_s >= 0:
        raise ValueError(f"sim_wall_s: must be >= 0, got {sim_wall_s}")
    counts = _requests_per_worker(outcomes, workers)
    makespan = max(o.finish_s for o in outcomes) - min(o.arrival_s for o in outcomes)
    if not makespan > 0:
        raise ValueError(f"outcomes: must span a positive time from first arrival to last finish, got {makespan} s")
    num_requests, num_workers = len(outcomes), len(workers)
    hit_ratio = sum(o.cached_tokens for o in outcomes) / sum(o.input_len for o in outcomes)
    ttft = np.array([o.first_token_s - o.arrival_s for o in outcomes])
    ttft_p50, ttft_p90, ttft_p99 = _percentiles(ttft)
    e2e_p50, e2e_p90, e2e_p99 = _percentiles(np.array([o.finish_s - o.arrival_s for o in outcomes]))
    return PolicyStats(
        policy=policy, num_workers=num_workers, num_requests=num_requests,
        hit_ratio=hit_ratio, oracle_hit_ratio=oracle_hit_ratio,
        oracle_share=hit_ratio / oracle_hit_ratio if oracle_hit_ratio > 0 else 0.0,
        ttft_p50_s=ttft_p50, ttft_p90_s=ttft_p90, ttft_p99_s=ttft_p99,
        e2e_p50_s=e2e_p50, e2e_p90_s=e2e_p90, e2e_p99_s=e2e_p99,
        throughput_rps=num_requests / makespan,
        output_tokens_per_s=sum(o.output_len for o in outcomes) / makespan,
        makespan_s=makespan,
        share_max_over_mean=max(counts) * num_workers / num_requests,
        worker_share=tuple(count / num_requests for count in counts),
        kv_use_mean=sum(w.kv_use_mean for w in workers) / num_workers,
        kv_use_peak=max(w.kv_use_peak for w in workers),
        num_evicted_blocks=sum(w.num_evicted_blocks for w in workers),
        num_preemptions=sum(w.num_preemptions for w in workers),
        sim_wall_s=sim_wall_s,
        ttft_cdf=_cdf_points(ttft),
    )


def _requests_per_worker(outcomes: Sequence[RequestOutcome], workers: Sequence[WorkerStats]) -> list[int]:
    counts = [0] * len(workers)
    for outcome in outcomes:
        if outcome.worker >= len(workers):
            raise ValueError(f"outcomes: worker must be < {len(workers)} (the number of workers), got {outcome.worker}")
        counts[outcome.worker] += 1
    reported = [w.num_requests for w in workers]
    if reported != counts:
        raise ValueError(f"workers: num_requests must match the outcomes each served ({counts}), got {reported}")
    return counts


def _percentiles(values: np.ndarray) -> list[float]:
    return [float(v) for v in np.percentile(values, _PERCENTILES)]


def _cdf_points(values: np.ndarray) -> tuple[tuple[float, float], ...]:
    """Points of the empirical CDF at evenly spaced ranks, the largest value always among them."""
    ordered = np.sort(values)
    n = len(ordered)
    k = min(n, _MAX_CDF_POINTS)
    ranks = (np.arange(1, k + 1) * n + k - 1) // k - 1  # ceil(j * n / k) - 1 for j = 1..k
    at = ordered[ranks]
    fractions = np.searchsorted(ordered, at, side="right") / n  # ties count in full
    return tuple((float(t), float(f)) for t, f in zip(at, fractions))


def format_duration(seconds: float) -> str:
    """About three significant figures, in ms below 1 s and in s from there: ``4.20 ms``, ``850 ms``, ``12.3 s``."""
    value, unit = (seconds * 1e3, "ms") if seconds < 1 else (seconds, "s")
    decimals = 2 if value < 10 else 1 if value < 100 else 0
    return f"{value:,.{decimals}f} {unit}"


_COLUMNS: tuple[tuple[str, Callable[[PolicyStats], str]], ...] = (
    ("workers", lambda s: str(s.num_workers)),
    ("policy", lambda s: s.policy),
    ("hit", lambda s: f"{s.hit_ratio:.3f}"),
    ("of oracle", lambda s: f"{s.oracle_share:.0%}"),
    ("TTFT p50", lambda s: format_duration(s.ttft_p50_s)),
    ("TTFT p90", lambda s: format_duration(s.ttft_p90_s)),
    ("TTFT p99", lambda s: format_duration(s.ttft_p99_s)),
    ("e2e p50", lambda s: format_duration(s.e2e_p50_s)),
    ("e2e p90", lambda s: format_duration(s.e2e_p90_s)),
    ("e2e p99", lambda s: format_duration(s.e2e_p99_s)),
    ("req/s", lambda s: f"{s.throughput_rps:,.2f}"),
    ("share max/mean", lambda s: f"{s.share_max_over_mean:.2f}"),
    ("KV use mean", lambda s: f"{s.kv_use_mean:.0%}"),
    ("evicted", lambda s: f"{s.num_evicted_blocks:,}"),
    ("preempted", lambda s: f"{s.num_preemptions:,}"),
    ("wall s", lambda s: f"{s.sim_wall_s:,.1f}"),
)


def format_table(stats: Sequence[PolicyStats]) -> str:
    """A Markdown table, one row per entry of ``stats`` in the given order; columns padded to line up as text."""
    rows = [[header for header, _ in _COLUMNS]] + [[cell(s) for _, cell in _COLUMNS] for s in stats]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    left = [header == "policy" for header, _ in _COLUMNS]

    def line(cells: list[str]) -> str:
        padded = (c.ljust(w) if is_left else c.rjust(w) for c, w, is_left in zip(cells, widths, left))
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join(":" + "-" * (w + 1) if is_left else "-" * (w + 1) + ":" for w, is_left in zip(widths, left))
    return "\n".join([line(rows[0]), rule + "|", *(line(row) for row in rows[1:])])


def to_json(stats: Sequence[PolicyStats], meta: Mapping[str, object]) -> dict[str, object]:
    """``{"meta": meta, "results": [every field of each PolicyStats]}``, ready for ``json.dumps``."""
    return {"meta": dict(meta), "results": [asdict(s) for s in stats]}


def write_json(path: Path, stats: Sequence[PolicyStats], meta: Mapping[str, object]) -> None:
    """Write ``to_json(stats, meta)`` to ``path`` as strict JSON (no NaN), creating its parent directories."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_json(stats, meta), indent=1, allow_nan=False) + "\n")


def plot_scaling(stats: Sequence[PolicyStats], path: Path, *, title: str = "") -> None:
    """A PNG at ``path`` of hit ratio (oracle dashed) and TTFT p99 (log y) against workers (log2 x), a line a policy."""
    if not stats:
        raise ValueError("stats: must be non-empty, got 0 entries")
    fig, (hit_ax, ttft_ax) = _figure(num_panels=2, title=title)
    for policy, rows in _by_policy(stats).items():
        x = [s.num_workers for s in rows]
        hit_ax.plot(x, [s.hit_ratio for s in rows], marker="o", label=policy)
        ttft_ax.plot(x, [s.ttft_p99_s for s in rows], marker="o", label=policy)
    oracle = sorted({s.num_workers: s.oracle_hit_ratio for s in stats}.items())
    hit_ax.plot([n for n, _ in oracle], [r for _, r in oracle], "k--", label="oracle")
    hit_ax.set(ylabel="prefix hit ratio", ylim=(0, 1.05))
    ttft_ax.set(ylabel="TTFT p99 (s)", yscale="log")
    worker_counts = [n for n, _ in oracle]
    for ax in (hit_ax, ttft_ax):
        ax.set_xscale("log", base=2)
        ax.set_xticks(worker_counts, labels=[str(n) for n in worker_counts])
        ax.set_xticks([], minor=True)
        ax.set_xlabel("workers")
        ax.grid(alpha=0.3)
        ax.legend()
    _save(fig, path)


def plot_ttft_cdf(stats: Sequence[PolicyStats], path: Path, title: str = "") -> None:
    """A PNG at ``path`` of each entry's TTFT CDF (log x); lines are named by policy, plus workers if they differ."""
    if not stats:
        raise ValueError("stats: must be non-empty, got 0 entries")
    fig, (ax,) = _figure(num_panels=1, title=title)
    mixed_sizes = len({s.num_workers for s in stats}) > 1
    for s in stats:
        ttft, fraction = zip(*s.ttft_cdf)
        label = f"{s.policy} ({s.num_workers} workers)" if mixed_sizes else s.policy
        ax.step(ttft, fraction, where="post", label=label)
    ax.set(xscale="log", xlabel="TTFT (s)", ylabel="fraction of requests", ylim=(0, 1.02))
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)


def _by_policy(stats: Sequence[PolicyStats]) -> dict[str, list[PolicyStats]]:
    """Entries grouped by policy (in order of first appearance), each group by ascending worker count."""
    groups: dict[str, list[PolicyStats]] = {}
    for s in stats:
        groups.setdefault(s.policy, []).append(s)
    return {policy: sorted(rows, key=lambda s: s.num_workers) for policy, rows in groups.items()}


def _figure(num_panels: int, title: str) -> tuple[Figure, list[Axes]]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5 * num_panels, 4.2), layout="constrained")
    FigureCanvasAgg(fig)  # attaches itself: rendering never looks for a display backend
    if title:
        fig.suptitle(title)
    return fig, list(fig.subplots(1, num_panels, squeeze=False)[0])


def _save(fig: Figure, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=120)


class Progress:
    """A progress line on a text stream (default ``sys.stderr``): label, done/total, percent, rate, ETA.

    On a TTY the line is redrawn in place with ``\\r`` at most every 0.2 s of ``clock`` and once more on
    ``close()``. Otherwise a line is printed each time another tenth of ``total`` is done, and on ``close()`` when
    the count moved since: at most 11 lines. The last line shows the elapsed time instead of the ETA once done
    reaches total. A context manager: leaving it closes the line.
    """

    _REDRAW_S = 0.2
    _NUM_STEPS = 10

    def __init__(self, total: int, label: str, stream: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if total < 0:
            raise ValueError(f"total: must be >= 0, got {total}")
        self._total = total
        self._label = label
        self._stream = sys.stderr if stream is None else stream
        self._tty = self._stream.isatty()
        self._clock = clock
        self._start = clock()
        self._done = 0
        self._last_draw = -math.inf  # TTY: clock time of the last redraw
        self._drawn_width = 0  # TTY: length of the line on screen, to blank out what a shorter one leaves
        self._printed_steps = 0  # otherwise: tenths of total already printed
        self._printed_done: int | None = None  # otherwise: the count on the last printed line
        self._closed = False

    def advance(self, n: int = 1) -> None:
        """Count ``n`` (>= 0) more units done."""
        if n < 0:
            raise ValueError(f"n: must be >= 0, got {n}")
        self._done += n
        if self._tty:
            now = self._clock()
            if now - self._last_draw >= self._REDRAW_S:
                self._redraw(now)
            return
        steps = self._NUM_STEPS if self._total == 0 else min(self._done * self._NUM_STEPS // self._total,
                                                              self._NUM_STEPS)
        if steps > self._printed_steps:
            self._printed_steps = steps
            self._print_line()

    def close(self) -> None:
        """Show the final count and end the line; later calls do nothing."""
        if self._closed:
            return
        self._closed = True
        if self._tty:
            self._redraw(self._clock())
            self._stream.write("\n")
            self._stream.flush()
        elif self._printed_done != self._done:
            self._print_line()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _redraw(self, now: float) -> None:
        line = self._line(now)
        self._stream.write("\r" + line.ljust(self._drawn_width))
        self._stream.flush()
        self._drawn_width = len(line)
        self._last_draw = now

    def _print_line(self) -> None:
        self._stream.write(self._line(self._clock()) + "\n")
        self._stream.flush()
        self._printed_done = self._done

    def _line(self, now: float) -> str:
        elapsed = now - self._start
        percent = 100 * self._done / self._total if self._total else 100.0
        rate = self._done / elapsed if elapsed > 0 else 0.0
        text = f"{self._label}: {self._done:,}/{self._total:,} {percent:3.0f}%"
        if rate > 0:
            text += f" {rate:,.1f}/s"
        if self._done >= self._total:
            return f"{text} in {_clock_time(elapsed)}"
        return f"{text} ETA {_clock_time((self._total - self._done) / rate)}" if rate > 0 else f"{text} ETA ?"


def _clock_time(seconds: float) -> str:
    """``m:ss``, or ``h:mm:ss`` from an hour."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
