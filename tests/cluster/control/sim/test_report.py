from __future__ import annotations

import io
import json
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from radixserve.cluster.control.sim.report import (
    PolicyStats,
    Progress,
    RequestOutcome,
    WorkerStats,
    format_duration,
    format_table,
    plot_scaling,
    plot_ttft_cdf,
    summarize,
    write_json,
)

# Four requests on three workers (the third idle): TTFTs 0.1, 0.2, 0.4, 0.8 s; e2e 0.5, 1, 1, 2 s; 150 of 500 prompt
# tokens cached; 100 output tokens; first arrival at 0 s, last finish at 5 s.
OUTCOMES = [
    RequestOutcome(worker=0, arrival_s=0.0, first_token_s=0.1, finish_s=0.5, input_len=100, cached_tokens=0,
                   output_len=10),
    RequestOutcome(worker=0, arrival_s=1.0, first_token_s=1.2, finish_s=2.0, input_len=200, cached_tokens=100,
                   output_len=20),
    RequestOutcome(worker=1, arrival_s=2.0, first_token_s=2.4, finish_s=3.0, input_len=100, cached_tokens=50,
                   output_len=30),
    RequestOutcome(worker=0, arrival_s=3.0, first_token_s=3.8, finish_s=5.0, input_len=100, cached_tokens=0,
                   output_len=40),
]
WORKERS = [
    WorkerStats(num_requests=3, kv_use_mean=0.5, kv_use_peak=0.9, num_evicted_blocks=10, num_preemptions=1),
    WorkerStats(num_requests=1, kv_use_mean=0.2, kv_use_peak=0.4, num_evicted_blocks=5, num_preemptions=0),
    WorkerStats(num_requests=0, kv_use_mean=0.0, kv_use_peak=0.0, num_evicted_blocks=0, num_preemptions=2),
]


def stats(policy: str = "prefix", oracle: float = 0.6) -> PolicyStats:
    return summarize(policy, OUTCOMES, WORKERS, oracle_hit_ratio=oracle, sim_wall_s=1.25)


def test_summarize_reduces_hand_made_outcomes_to_exact_figures() -> None:
    s = stats()
    assert (s.policy, s.num_workers, s.num_requests) == ("prefix", 3, 4)
    assert s.hit_ratio == pytest.approx(0.3)
    assert s.oracle_hit_ratio == 0.6
    assert s.oracle_share == pytest.approx(0.5)
    # numpy's linear interpolation: rank q * (n - 1) = 1.5, 2.7, 2.97 between the sorted values
    assert (s.ttft_p50_s, s.ttft_p90_s, s.ttft_p99_s) == pytest.approx((0.3, 0.68, 0.788))
    assert (s.e2e_p50_s, s.e2e_p90_s, s.e2e_p99_s) == pytest.approx((1.0, 1.7, 1.97))
    assert s.makespan_s == 5.0
    assert s.throughput_rps == pytest.approx(0.8)
    assert s.output_tokens_per_s == pytest.approx(20.0)
    assert s.worker_share == (0.75, 0.25, 0.0)
    assert s.share_max_over_mean == pytest.approx(2.25)  # 3 requests against a mean of 4/3
    assert s.kv_use_mean == pytest.approx(0.7 / 3)
    assert s.kv_use_peak == 0.9
    assert (s.num_evicted_blocks, s.num_preemptions) == (15, 3)
    assert s.sim_wall_s == 1.25
    assert [t for t, _ in s.ttft_cdf] == pytest.approx([0.1, 0.2, 0.4, 0.8])
    assert [fraction for _, fraction in s.ttft_cdf] == [0.25, 0.5, 0.75, 1.0]


def test_oracle_share_is_zero_when_the_oracle_is_zero() -> None:
    assert stats(oracle=0.0).oracle_share == 0.0


def test_summarize_rejects_runs_it_cannot_summarize() -> None:
    with pytest.raises(ValueError, match="^outcomes: must be non-empty"):
        summarize("prefix", [], WORKERS, oracle_hit_ratio=0.5, sim_wall_s=0.0)
    with pytest.raises(ValueError, match="^workers: must be non-empty"):
        summarize("prefix", OUTCOMES, [], oracle_hit_ratio=0.5, sim_wall_s=0.0)
    with pytest.raises(ValueError, match=r"^oracle_hit_ratio: must be in \[0, 1\], got 1.5"):
        summarize("prefix", OUTCOMES, WORKERS, oracle_hit_ratio=1.5, sim_wall_s=0.0)
    with pytest.raises(ValueError, match="^outcomes: worker must be < 3 .*got 3"):
        summarize("prefix", [*OUTCOMES, replace(OUTCOMES[0], worker=3)], WORKERS, oracle_hit_ratio=0.5,
                  sim_wall_s=0.0)
    miscounted = [replace(WORKERS[0], num_requests=2), *WORKERS[1:]]
    with pytest.raises(ValueError, match=r"^workers: num_requests must match .*\[3, 1, 0\].*got \[2, 1, 0\]"):
        summarize("prefix", OUTCOMES, miscounted, oracle_hit_ratio=0.5, sim_wall_s=0.0)
    instant = RequestOutcome(worker=0, arrival_s=1.0, first_token_s=1.0, finish_s=1.0, input_len=8, cached_tokens=0,
                             output_len=1)
    with pytest.raises(ValueError, match="^outcomes: must span a positive time"):
        summarize("prefix", [instant], [replace(WORKERS[0], num_requests=1)], oracle_hit_ratio=0.5, sim_wall_s=0.0)


@pytest.mark.parametrize(("change", "field"), [
    ({"worker": -1}, "worker"),
    ({"first_token_s": -0.1}, "first_token_s"),
    ({"finish_s": 0.05}, "finish_s"),
    ({"input_len": 0, "cached_tokens": 0}, "input_len"),
    ({"cached_tokens": 101}, "cached_tokens"),
    ({"output_len": 0}, "output_len"),
])
def test_request_outcome_names_the_invalid_field(change: dict[str, float], field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field}: must be"):
        replace(OUTCOMES[0], **change)


@pytest.mark.parametrize(("change", "field"), [
    ({"num_requests": -1}, "num_requests"),
    ({"kv_use_mean": 1.5}, "kv_use_mean"),
    ({"kv_use_peak": -0.1}, "kv_use_peak"),
    ({"num_evicted_blocks": -1}, "num_evicted_blocks"),
    ({"num_preemptions": -1}, "num_preemptions"),
])
def test_worker_stats_names_the_invalid_field(change: dict[str, float], field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field}: must be"):
        replace(WORKERS[0], **change)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=50), min_size=1, max_size=700))
def test_ttft_cdf_points_lie_on_the_empirical_cdf(ttfts_ms: list[int]) -> None:
    outcomes = [RequestOutcome(worker=0, arrival_s=0.0, first_token_s=t / 1000, finish_s=1.0, input_len=1,
                               cached_tokens=0, output_len=1) for t in ttfts_ms]
    worker = replace(WORKERS[0], num_requests=len(outcomes))
    cdf = summarize("p", outcomes, [worker], oracle_hit_ratio=0.0, sim_wall_s=0.0).ttft_cdf
    ttfts = [t / 1000 for t in ttfts_ms]
    assert len(cdf) == min(len(ttfts), 200)
    assert cdf[-1] == (max(ttfts), 1.0)
    assert [t for t, _ in cdf] == sorted(t for t, _ in cdf)
    for t, fraction in cdf:
        assert fraction == sum(x <= t for x in ttfts) / len(ttfts)


@pytest.mark.parametrize(("seconds", "text"), [
    (0.0042, "4.20 ms"), (0.0421, "42.1 ms"), (0.85, "850 ms"), (1.25, "1.25 s"), (12.34, "12.3 s"),
    (1234.4, "1,234 s"),
])
def test_format_duration_picks_units_by_magnitude(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_format_table_has_a_row_per_entry_with_formatted_figures() -> None:
    small = stats("prefix")
    large = replace(stats("round_robin"), num_workers=16, num_evicted_blocks=12345)
    lines = format_table([small, large]).splitlines()
    assert len(lines) == 4
    header, rule, first, second = lines
    for column in ("workers", "policy", "hit", "of oracle", "TTFT p50", "TTFT p99", "e2e p90", "req/s",
                   "share max/mean", "KV use mean", "evicted", "preempted", "wall s"):
        assert f" {column} " in header
    assert len({len(line) for line in lines}) == 1  # columns line up
    assert rule.startswith("|--") and "|:--" in rule  # workers right-aligned, policy left-aligned
    cells = [c.strip() for c in first.strip("|").split("|")]
    assert cells == ["3", "prefix", "0.300", "50%", "300 ms", "680 ms", "788 ms", "1.00 s", "1.70 s", "1.97 s",
                     "0.80", "2.25", "23%", "15", "3", "1.2"]
    assert second.split("|")[1].strip() == "16" and "round_robin" in second and "12,345" in second


def test_write_json_round_trips_and_creates_parent_dirs(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "dir" / "results.json"
    entries = [stats("prefix"), stats("round_robin")]
    meta = {"trace": "mooncake", "num_requests": 4}
    write_json(path, entries, meta)
    loaded = json.loads(path.read_text())
    assert loaded["meta"] == meta
    assert [r["policy"] for r in loaded["results"]] == ["prefix", "round_robin"]
    assert loaded["results"][0]["hit_ratio"] == entries[0].hit_ratio
    assert loaded["results"][0]["ttft_cdf"] == [list(point) for point in entries[0].ttft_cdf]
    rebuilt = PolicyStats(**{**loaded["results"][0], "worker_share": tuple(loaded["results"][0]["worker_share"]),
                             "ttft_cdf": tuple(map(tuple, loaded["results"][0]["ttft_cdf"]))})
    assert rebuilt == entries[0]


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def scaling_entries() -> list[PolicyStats]:
    return [replace(stats(policy), num_workers=n, hit_ratio=hit, ttft_p99_s=p99)
            for policy, hit, p99 in [("prefix", 0.5, 0.2), ("round_robin", 0.2, 0.9)] for n in (1, 2, 4, 8)]


def test_plot_scaling_writes_a_png(tmp_path: Path) -> None:
    path = tmp_path / "plots" / "scaling.png"
    plot_scaling(scaling_entries(), path, title="mooncake trace")
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000


def test_plot_ttft_cdf_writes_a_png(tmp_path: Path) -> None:
    path = tmp_path / "cdf.png"
    plot_ttft_cdf([stats("prefix"), stats("round_robin")], path, title="4 workers")
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000


def test_plots_reject_no_entries(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="^stats: must be non-empty"):
        plot_scaling([], tmp_path / "a.png")
    with pytest.raises(ValueError, match="^stats: must be non-empty"):
        plot_ttft_cdf([], tmp_path / "b.png")


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_progress_off_a_tty_prints_a_line_per_tenth_and_ends_at_total() -> None:
    stream, clock = io.StringIO(), FakeClock()
    with Progress(1000, "sim prefix", stream=stream, clock=clock) as progress:
        for _ in range(1000):
            clock.now += 0.01
            progress.advance()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 10
    assert lines[0] == "sim prefix: 100/1,000  10% 100.0/s ETA 0:09"
    assert lines[-1] == "sim prefix: 1,000/1,000 100% 100.0/s in 0:10"
    assert "\r" not in stream.getvalue()


def test_progress_off_a_tty_closes_with_the_count_reached() -> None:
    stream, clock = io.StringIO(), FakeClock()
    progress = Progress(50, "replay", stream=stream, clock=clock)
    for seconds, n in [(2, 4), (4, 4), (5, 2), (6, 2)]:  # 4, 8, 10, 12 done: tenths 0, 1, 2, 2
        clock.now = 100.0 + seconds
        progress.advance(n)
    progress.close()
    progress.close()
    assert stream.getvalue().splitlines() == [
        "replay: 8/50  16% 2.0/s ETA 0:21",
        "replay: 10/50  20% 2.0/s ETA 0:20",
        "replay: 12/50  24% 2.0/s ETA 0:19",
    ]


class TtyStream(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_on_a_tty_redraws_in_place_at_most_every_fifth_of_a_second() -> None:
    stream, clock = TtyStream(), FakeClock()
    with Progress(100, "sim", stream=stream, clock=clock) as progress:
        for _ in range(100):
            clock.now += 0.0625  # exact in binary: 3 steps are under 0.2 s, 4 are over
            progress.advance()
    out = stream.getvalue()
    assert out.endswith("\n") and out.count("\n") == 1
    draws = out.rstrip("\n").split("\r")[1:]
    assert len(draws) == 26  # on the 1st advance, every 4th after it (5th, ..., 97th), and once more on close
    assert draws[-1].rstrip() == "sim: 100/100 100% 16.0/s in 0:06"


def test_progress_rejects_negative_counts() -> None:
    with pytest.raises(ValueError, match="^total: must be >= 0"):
        Progress(-1, "x", stream=io.StringIO())
    with pytest.raises(ValueError, match="^n: must be >= 0"):
        Progress(1, "x", stream=io.StringIO()).advance(-1)
