from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from radixserve.cluster.control.sim.workload import (
    MOONCAKE_TRACE_ENV,
    MOONCAKE_TRACE_URL,
    SimRequest,
    TokenPrompt,
    Workload,
    cached_tokens,
    chat_sessions,
    from_token_prompts,
    load_mooncake,
    mooncake_trace_path,
    oracle_cached_tokens,
    oracle_hit_ratio,
    shared_prefix,
    tile,
)


GOOD_LINES = [
    '{"timestamp": 0, "input_length": 1000, "output_length": 5, "hash_ids": [0, 1]}',
    '{"timestamp": 1500, "input_length": 1024, "output_length": 0, "hash_ids": [0, 2]}',
    '{"timestamp": 2500, "input_length": 1, "output_length": 3, "hash_ids": [3]}',
]


def write_trace(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "trace.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    return path


def assert_chained(workload: Workload) -> None:
    """Every block id always follows the same predecessor (-1 for a first block)."""
    predecessor: dict[int, int] = {}
    for request in workload.requests:
        for k, block in enumerate(request.block_ids):
            parent = request.block_ids[k - 1] if k else -1
            assert predecessor.setdefault(block, parent) == parent, (block, parent)


def test_oracle_counts_leading_matched_blocks_and_always_computes_the_last_token() -> None:
    workload = Workload("w", 4, (
        SimRequest(0.0, (0, 1, 2), input_len=10, output_len=1),  # a miss
        SimRequest(1.0, (0, 1, 3), input_len=12, output_len=1),  # two blocks match: 8 tokens
        SimRequest(2.0, (0, 1, 2), input_len=10, output_len=1),  # all three match: 10 tokens, capped at 9
        SimRequest(3.0, (0, 4, 5), input_len=9, output_len=1),  # one block matches: 4 tokens
    ))
    assert [cached_tokens(workload, r, m) for r, m in zip(workload.requests, [0, 2, 3, 1])] == [0, 8, 9, 4]
    assert oracle_hit_ratio(workload) == 21 / 41


def test_cached_tokens_rejects_more_matched_blocks_than_the_prompt_has() -> None:
    workload = Workload("w", 4, (SimRequest(0.0, (0, 1), input_len=6, output_len=1),))
    with pytest.raises(ValueError, match=r"^matched_blocks: must be in \[0, 2\], got 3$"):
        cached_tokens(workload, workload.requests[0], 3)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"arrival_s": -1.0}, r"^arrival_s: must be finite and >= 0, got -1.0$"),
    ({"arrival_s": float("nan")}, r"^arrival_s: "),
    ({"block_ids": ()}, r"^block_ids: must be non-empty"),
    ({"block_ids": (3, -1)}, r"^block_ids: must be in \[0, 2\*\*32\), got ids -1..3$"),
    ({"block_ids": (2**32,)}, r"^block_ids: "),
    ({"input_len": 0}, r"^input_len: must be >= 1, got 0$"),
    ({"output_len": 0}, r"^output_len: must be >= 1, got 0$"),
    ({"after": -2}, r"^after: must be >= -1, got -2$"),
    ({"think_s": -0.5}, r"^think_s: must be finite and >= 0, got -0.5$"),
])
def test_sim_request_rejects_bad_fields(kwargs: dict, message: str) -> None:
    fields = {"arrival_s": 0.0, "block_ids": (0,), "input_len": 1, "output_len": 1} | kwargs
    with pytest.raises(ValueError, match=message):
        SimRequest(**fields)


@pytest.mark.parametrize(("block_size", "requests", "message"), [
    (0, (SimRequest(0.0, (0,), 1, 1),), r"^block_size: must be >= 1, got 0$"),
    (4, (), r"^requests: must be non-empty"),
    (4, (SimRequest(0.0, (0,), 4, 1), SimRequest(0.0, (0, 1), 9, 1)),
     r"^requests\[1\].input_len: must be in \(4, 8\] for 2 blocks of 4, got 9$"),
    (4, (SimRequest(0.0, (0, 1), 4, 1),), r"^requests\[0\].input_len: must be in \(4, 8\] for 2 blocks of 4, got 4$"),
    (4, (SimRequest(0.0, (0,), 4, 1), SimRequest(0.0, (0,), 4, 1, after=1)),
     r"^requests\[1\].after: must be an earlier index, got 1$"),
])
def test_workload_rejects_inconsistent_requests(block_size: int, requests: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Workload("w", block_size, requests)


def test_scaled_multiplies_arrival_and_think_times() -> None:
    workload = Workload("w", 4, (SimRequest(2.0, (0,), 3, 5), SimRequest(0.0, (0, 1), 6, 2, after=0, think_s=3.0)))
    half = workload.scaled(0.5)
    assert [(r.arrival_s, r.think_s) for r in half.requests] == [(1.0, 0.0), (0.0, 1.5)]
    assert [r.block_ids for r in half.requests] == [r.block_ids for r in workload.requests]
    with pytest.raises(ValueError, match=r"^time_scale: must be finite and > 0, got 0$"):
        workload.scaled(0)


def test_load_mooncake_reads_blocks_times_and_lengths(tmp_path: Path) -> None:
    workload = load_mooncake(write_trace(tmp_path, GOOD_LINES), time_scale=2.0)
    assert (workload.name, workload.block_size, workload.num_requests) == ("trace", 512, 3)
    first, second, third = workload.requests
    assert [r.arrival_s for r in workload.requests] == [0.0, 3.0, 5.0]
    assert [r.block_ids for r in workload.requests] == [(0, 1), (0, 2), (3,)]
    assert [r.input_len for r in workload.requests] == [1000, 1024, 1]
    assert [r.output_len for r in workload.requests] == [5, 1, 3]  # output_length 0 becomes 1
    assert [workload.block_tokens(first, k) for k in range(2)] == [512, 488]
    assert [workload.block_tokens(second, k) for k in range(2)] == [512, 512]
    assert workload.block_tokens(third, 0) == 1
    with pytest.raises(ValueError, match=r"^k: must be in \[0, 2\), got 2$"):
        workload.block_tokens(first, 2)
    assert oracle_hit_ratio(workload) == 512 / 2025


def test_load_mooncake_reads_only_the_first_limit_lines_and_sorts_by_arrival(tmp_path: Path) -> None:
    lines = [GOOD_LINES[1], GOOD_LINES[0], "not read"]
    workload = load_mooncake(write_trace(tmp_path, lines), limit=2)
    assert [r.block_ids for r in workload.requests] == [(0, 1), (0, 2)]
    with pytest.raises(ValueError, match=r"^limit: must be None or >= 1, got 0$"):
        load_mooncake(write_trace(tmp_path, lines), limit=0)


@pytest.mark.parametrize(("line", "message"), [
    ("{not json", r"^line 2: not valid JSON \("),
    ("[1, 2]", r"^line 2: must be a JSON object, got \[1, 2\]$"),
    ('{"timestamp": 0, "input_length": 5, "hash_ids": [7]}', r"^line 2: output_length: missing$"),
    ('{"timestamp": "5", "input_length": 5, "output_length": 1, "hash_ids": [7]}',
     r"^line 2: timestamp: must be a finite number >= 0, got '5'$"),
    ('{"timestamp": -1, "input_length": 5, "output_length": 1, "hash_ids": [7]}', r"^line 2: timestamp: "),
    ('{"timestamp": 0, "input_length": 0, "output_length": 1, "hash_ids": [7]}',
     r"^line 2: input_length: must be an int >= 1, got 0$"),
    ('{"timestamp": 0, "input_length": 5, "output_length": -1, "hash_ids": [7]}',
     r"^line 2: output_length: must be an int >= 0, got -1$"),
    ('{"timestamp": 0, "input_length": 5, "output_length": true, "hash_ids": [7]}', r"^line 2: output_length: "),
    ('{"timestamp": 0, "input_length": 5, "output_length": 1, "hash_ids": []}', r"^line 2: hash_ids: "),
    ('{"timestamp": 0, "input_length": 5, "output_length": 1, "hash_ids": [4294967296]}', r"^line 2: hash_ids: "),
    ('{"timestamp": 0, "input_length": 5, "output_length": 1, "hash_ids": [1.5]}', r"^line 2: hash_ids: "),
    ('{"timestamp": 0, "input_length": 1025, "output_length": 1, "hash_ids": [7, 8]}',
     r"^line 2: input_length: must be in \(512, 1024\] for 2 hash_ids, got 1025$"),
    ('{"timestamp": 0, "input_length": 512, "output_length": 1, "hash_ids": [7, 8]}',
     r"^line 2: input_length: must be in \(512, 1024\] for 2 hash_ids, got 512$"),
])
def test_load_mooncake_names_the_line_and_field_of_a_bad_line(tmp_path: Path, line: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_mooncake(write_trace(tmp_path, [GOOD_LINES[0], line]))


# The published trace's shape (Mooncake FAST'25 ``synthetic_trace.jsonl``, which the project does not carry): a
# conversation whose turns extend one chained prefix, an unrelated request, a repeat of the first prompt.
PUBLISHED_FORMAT_LINES = [
    '{"timestamp": 0, "input_length": 1024, "output_length": 30, "hash_ids": [0, 1]}',
    '{"timestamp": 500, "input_length": 1800, "output_length": 20, "hash_ids": [0, 1, 2, 3]}',
    '{"timestamp": 800, "input_length": 300, "output_length": 0, "hash_ids": [4]}',
    '{"timestamp": 1200, "input_length": 2048, "output_length": 12, "hash_ids": [0, 1, 2, 5]}',
    '{"timestamp": 1250, "input_length": 1024, "output_length": 7, "hash_ids": [0, 1]}',
]


def test_a_trace_in_the_published_format_loads_chained_with_its_hand_counted_hit_ratio(tmp_path: Path) -> None:
    workload = load_mooncake(write_trace(tmp_path, PUBLISHED_FORMAT_LINES))
    assert workload.num_requests == 5
    assert [r.arrival_s for r in workload.requests] == [0.0, 0.5, 0.8, 1.2, 1.25]
    assert sum(len(r.block_ids) for r in workload.requests) == 13
    # Cached: 0, 2 blocks, 0, 3 blocks, 2 blocks less the last prompt token (always computed).
    assert oracle_cached_tokens(workload) == [0, 1024, 0, 1536, 1023]
    assert oracle_hit_ratio(workload) == 3583 / 6196
    assert_chained(workload)


def test_the_trace_path_is_the_one_the_environment_names_and_a_missing_one_says_where_to_get_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    trace = write_trace(tmp_path, PUBLISHED_FORMAT_LINES)
    monkeypatch.setenv(MOONCAKE_TRACE_ENV, str(trace))
    assert mooncake_trace_path() == trace
    monkeypatch.setenv(MOONCAKE_TRACE_ENV, str(tmp_path / "absent.jsonl"))
    with pytest.raises(FileNotFoundError, match=rf"absent\.jsonl: download synthetic_trace\.jsonl from "
                                                rf"{re.escape(MOONCAKE_TRACE_URL)}"):
        mooncake_trace_path()


def test_from_token_prompts_interns_blocks_by_previous_block_and_tokens() -> None:
    prompts = [
        (1, 2, 3, 4, 5),
        (1, 2, 3, 4, 6, 7),  # shares two blocks, then diverges
        (9, 9, 3, 4),  # block (3, 4) again, after a different first block
        (1, 2, 3, 4, 5, 0),  # full block (5, 0) where the first prompt had the partial block (5,)
        (1, 2, 3, 4, 5),  # the first prompt again
    ]
    workload = from_token_prompts("w", [TokenPrompt(float(i), p, output_len=2) for i, p in enumerate(prompts)], 2)
    assert [r.block_ids for r in workload.requests] == [(0, 1, 2), (0, 1, 3), (4, 5), (0, 1, 6), (0, 1, 2)]
    assert [r.input_len for r in workload.requests] == [5, 6, 4, 6, 5]
    assert [r.arrival_s for r in workload.requests] == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_token_prompt_rejects_an_empty_prompt() -> None:
    with pytest.raises(ValueError, match=r"^token_ids: must be non-empty"):
        TokenPrompt(0.0, (), 1)


token_prompts = st.lists(st.lists(st.integers(0, 1), min_size=1, max_size=7), min_size=1, max_size=8)


def token_blocks(tokens: list[int], block_size: int) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(tokens[i : i + block_size]) for i in range(0, len(tokens), block_size))


@settings(max_examples=200, deadline=None)
@given(prompts=token_prompts, block_size=st.integers(1, 3))
def test_oracle_equals_a_brute_force_over_token_blocks(prompts: list[list[int]], block_size: int) -> None:
    workload = from_token_prompts("w", [TokenPrompt(0.0, tuple(p), 1) for p in prompts], block_size)
    blocks = [token_blocks(p, block_size) for p in prompts]
    cached = 0
    for i, mine in enumerate(blocks):
        matched = max((m for theirs in blocks[:i] for m in range(len(mine) + 1) if theirs[:m] == mine[:m]), default=0)
        cached += min(matched * block_size, len(prompts[i]) - 1)
    ratio = oracle_hit_ratio(workload)
    assert ratio == cached / sum(len(p) for p in prompts)
    assert 0 <= ratio < 1
    for mine, request in zip(blocks, workload.requests):  # equal ids exactly where the whole prefix is equal
        for theirs, other in zip(blocks, workload.requests):
            for k in range(min(len(mine), len(theirs))):
                assert (request.block_ids[k] == other.block_ids[k]) == (mine[: k + 1] == theirs[: k + 1])


def test_shared_prefix_has_the_generated_shared_prefix_shape() -> None:
    workload = shared_prefix()  # 8 groups of 8 prompts: 1024 system tokens (64 blocks), 64 question tokens
    assert workload.num_requests == 64
    assert {(r.input_len, len(r.block_ids), r.output_len) for r in workload.requests} == {(1088, 68, 32)}
    assert len({r.block_ids[0] for r in workload.requests}) == 8
    by_group = {r.group: r.block_ids[:64] for r in workload.requests}
    assert sorted(by_group) == list(range(8))
    assert all(r.block_ids[:64] == by_group[r.group] for r in workload.requests)
    assert len({r.block_ids[64] for r in workload.requests}) == 64  # every question is new
    assert [r.group for r in workload.requests] != sorted(r.group for r in workload.requests)  # shuffled
    arrivals = [r.arrival_s for r in workload.requests]
    assert arrivals[0] == 0.0 and arrivals == sorted(arrivals)
    assert oracle_hit_ratio(workload) == 14 / 17  # all but each group's first prompt hit 1024 of 1088 tokens
    assert_chained(workload)


def test_shared_prefix_is_deterministic_per_seed_with_poisson_gaps_at_rate() -> None:
    small = {"groups": 40, "prompts_per_group": 50, "system_len": 4, "question_len": 4, "rate": 8.0}
    workload = shared_prefix(seed=3, **small)
    assert workload == shared_prefix(seed=3, **small)
    assert workload != shared_prefix(seed=4, **small)
    assert workload.requests[-1].arrival_s / (workload.num_requests - 1) == pytest.approx(1 / 8, rel=0.1)


def test_chat_turns_extend_the_previous_prompt_and_wait_on_it() -> None:
    workload = chat_sessions(num_sessions=3, turns=3, num_system_prompts=2, system_len=20, user_len=5, output_len=7,
                             think_s=2.0, session_rate=0.5, block_size=4)
    assert workload.num_requests == 9
    starts = [workload.requests[3 * s].arrival_s for s in range(3)]
    assert starts[0] == 0.0 and starts == sorted(starts)
    for s in range(3):
        for t in range(3):
            request = workload.requests[3 * s + t]
            assert (request.input_len, request.output_len, request.group) == (20 + 5 * (t + 1) + 7 * t, 7, s)
            if t == 0:
                assert (request.after, request.think_s) == (-1, 0.0)
                continue
            assert (request.after, request.think_s) == (3 * s + t - 1, 2.0)
            previous = workload.requests[request.after]
            full = previous.input_len // 4
            assert request.block_ids[:full] == previous.block_ids[:full]
            # the previous prompt ends in a partial block, which the reply fills out into a different block
            assert request.block_ids[full] != previous.block_ids[full]
    assert len({workload.requests[3 * s].block_ids[:5] for s in range(3)}) <= 2  # system prompts are shared
    assert_chained(workload)


def test_chat_oracle_counts_the_shared_system_prompt_and_the_history() -> None:
    workload = chat_sessions(num_sessions=2, turns=2, num_system_prompts=1, system_len=8, user_len=4, output_len=4,
                             block_size=4)
    # turn 0: 12 tokens, then 8 (system) cached for the second session; turn 1: 20 tokens, 12 cached
    assert [r.input_len for r in workload.requests] == [12, 20, 12, 20]
    assert oracle_hit_ratio(workload) == (0 + 12 + 8 + 12) / 64


def test_chat_sessions_rejects_bad_parameters() -> None:
    with pytest.raises(ValueError, match=r"^turns: must be >= 1, got 0$"):
        chat_sessions(turns=0)
    with pytest.raises(ValueError, match=r"^session_rate: must be finite and > 0, got 0.0$"):
        chat_sessions(session_rate=0.0)
    with pytest.raises(ValueError, match=r"^think_s: must be finite and >= 0, got -1.0$"):
        chat_sessions(think_s=-1.0)


def test_tile_overlays_disjoint_copies_and_keeps_the_oracle() -> None:
    workload = chat_sessions(num_sessions=4, turns=3, system_len=32, user_len=8, output_len=8, block_size=8)
    tiled = tile(workload, 3)
    assert (tiled.name, tiled.num_requests) == ("chat_sessionsx3", 36)
    copies = [[tiled.requests[3 * i + c] for i in range(12)] for c in range(3)]
    ids = [{b for r in copy for b in r.block_ids} for copy in copies]
    assert not ids[0] & ids[1] and not ids[0] & ids[2] and not ids[1] & ids[2]
    for c, copy in enumerate(copies):
        for original, request in zip(workload.requests, copy):
            assert request.after == (original.after * 3 + c if original.after >= 0 else -1)
            assert request.group == original.group + 4 * c
            assert (request.arrival_s, request.think_s, request.input_len) == (
                original.arrival_s, original.think_s, original.input_len)
    assert oracle_hit_ratio(tiled) == oracle_hit_ratio(workload)
    assert_chained(tiled)


def test_tile_refuses_block_ids_reaching_2_pow_32() -> None:
    workload = Workload("w", 4, (SimRequest(0.0, (0, 2**31 - 1), 8, 1),))
    assert max(tile(workload, 2).requests[1].block_ids) == 2**32 - 1
    with pytest.raises(ValueError, match=r"^copies: must keep block ids below 2\*\*32"):
        tile(workload, 3)
    with pytest.raises(ValueError, match=r"^copies: must be >= 1, got 0$"):
        tile(workload, 0)
