from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from radixserve.router.policies import LeastLoadPolicy, PrefixPolicy, RouteRequest
from radixserve.router.prefix_index import PrefixIndex
from radixserve.router.routing import WorkerLoad, decide

PAGE = 16


def test_decide_counts_the_chosen_workers_uncached_tokens_and_pages() -> None:
    index = PrefixIndex(30, 300, clock=lambda: 0.0)
    index.apply_stored("b", [11, 12, 13])
    request = RouteRequest(num_prompt_tokens=5 * PAGE + 3, max_tokens=10, page_size=PAGE)
    decision = decide(PrefixPolicy(1.0, random.Random(0)), index, request, [11, 12, 99, 100, 101], ["a", "b"],
                      [WorkerLoad(), WorkerLoad()])
    assert decision.worker == 1 and decision.matched_pages == 2
    assert (decision.prefill_tokens, decision.output_tokens) == (5 * PAGE + 3 - 2 * PAGE, 10)
    assert decision.active_pages == 6  # ceil((83 + 10) / 16)


def test_decide_sees_the_load_begun_on_each_worker() -> None:
    index = PrefixIndex(30, 300, clock=lambda: 0.0)
    loads = [WorkerLoad(), WorkerLoad()]
    request = RouteRequest(num_prompt_tokens=PAGE, max_tokens=1, page_size=PAGE)
    policy = LeastLoadPolicy(random.Random(0))
    picks = []
    for i in range(4):
        decision = decide(policy, index, request, [], ["a", "b"], loads)
        loads[decision.worker].begin(i, decision.prefill_tokens, decision.output_tokens, decision.active_pages)
        picks.append(decision.worker)
    assert sorted(picks[:2]) == sorted(picks[2:]) == [0, 1]
    loads[picks[0]].end(0)
    assert decide(policy, index, request, [], ["a", "b"], loads).worker == picks[0]


def test_a_request_owes_its_prefill_until_its_first_token_and_its_output_until_it_ends() -> None:
    load = WorkerLoad()
    load.begin("a", 500, 64, 40)
    load.begin("b", 300, 16, 20)
    load.first_token("a")
    load.first_token("a")  # idempotent
    assert (load.num_in_flight, load.pending_tokens, load.active_pages) == (2, 64 + 316, 60)
    load.end("a")
    assert (load.num_in_flight, load.pending_tokens, load.active_pages) == (1, 316, 20)


def test_a_request_id_in_flight_twice_is_refused() -> None:
    load = WorkerLoad()
    load.begin("r", 1, 1, 1)
    with pytest.raises(ValueError, match="^request_id"):
        load.begin("r", 1, 1, 1)


@given(st.lists(st.tuples(st.sampled_from(["begin", "first", "end"]), st.integers(0, 9), st.integers(0, 500),
                          st.integers(0, 64), st.integers(0, 40)), max_size=60))
def test_worker_load_sums_match_the_requests_in_flight(operations: list[tuple[str, int, int, int, int]]) -> None:
    load = WorkerLoad()
    live: dict[int, list[int]] = {}  # id -> [prefill still owed, output, pages]
    for operation, request_id, prefill, output, pages in operations:
        if operation == "begin" and request_id not in live:
            load.begin(request_id, prefill, output, pages)
            live[request_id] = [prefill, output, pages]
        elif operation == "first":
            load.first_token(request_id)
            if request_id in live:
                live[request_id][0] = 0
        elif operation == "end":
            load.end(request_id)
            live.pop(request_id, None)
    assert load.num_in_flight == len(live)
    assert load.pending_tokens == sum(prefill + output for prefill, output, _ in live.values())
    assert load.active_pages == sum(pages for _, _, pages in live.values())
