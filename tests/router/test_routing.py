from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from radixserve.cluster.base.config import RouterConfig
from radixserve.cluster.base.hashing import page_hashes
from radixserve.router.policies import LeastLoadPolicy, PrefixPolicy, RouteRequest
from radixserve.router.prefix_index import PrefixIndex
from radixserve.router.routing import ReportedLoad, WorkerLoad, decide
from radixserve.router.workers import WorkerClient
from radixserve.v1 import types_pb2, worker_pb2

PAGE = 16


def test_decide_counts_the_chosen_workers_uncached_tokens_and_pages() -> None:
    index = PrefixIndex(30, 300, clock=lambda: 0.0)
    index.apply_stored("b", [11, 12, 13])
    request = RouteRequest(num_prompt_tokens=5 * PAGE + 3, max_tokens=10, page_size=PAGE)
    decision = decide(PrefixPolicy(1.0, 1.0, random.Random(0)), index, request, [11, 12, 99, 100, 101], ["a", "b"],
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
    load.progress("a", 10)  # streamed tokens leave the output still owed
    assert (load.pending_prefill_tokens, load.pending_output_tokens) == (300, 54 + 16)
    load.progress("a", 100)  # never below what the request brought
    assert load.pending_output_tokens == 16
    load.end("a")
    assert (load.num_in_flight, load.pending_tokens, load.active_pages) == (1, 316, 20)


def test_a_request_id_in_flight_twice_is_refused() -> None:
    load = WorkerLoad()
    load.begin("r", 1, 1, 1)
    with pytest.raises(ValueError, match="^request_id"):
        load.begin("r", 1, 1, 1)


@given(st.lists(st.tuples(st.sampled_from(["begin", "first", "progress", "end"]), st.integers(0, 9),
                          st.integers(0, 500), st.integers(0, 64), st.integers(0, 40)), max_size=60))
def test_worker_load_sums_match_the_requests_in_flight(operations: list[tuple[str, int, int, int, int]]) -> None:
    load = WorkerLoad()
    live: dict[int, list[int]] = {}  # id -> [prefill still owed, output still owed, pages]
    for operation, request_id, prefill, output, pages in operations:
        if operation == "begin" and request_id not in live:
            load.begin(request_id, prefill, output, pages)
            live[request_id] = [prefill, output, pages]
        elif operation == "first":
            load.first_token(request_id)
            if request_id in live:
                live[request_id][0] = 0
        elif operation == "progress":
            load.progress(request_id, output)
            if request_id in live:
                live[request_id][1] = max(0, live[request_id][1] - output)
        elif operation == "end":
            load.end(request_id)
            live.pop(request_id, None)
    assert load.num_in_flight == len(live)
    assert load.pending_tokens == sum(prefill + output for prefill, output, _ in live.values())
    assert load.active_pages == sum(pages for _, _, pages in live.values())


# The hot-prefix case: a 2,048-token shared prefix, 64-token suffixes, 32 output tokens, two workers.
PREFIX_LEN, SUFFIX_LEN, OUTPUT_LEN = 2048, 64, 32


def _hot_prefix_requests(direct_on_holder: int) -> int:
    """Route hot-prefix requests (none finishing) until one leaves the holder; returns how many the holder took.

    The holder "h" caches the prefix (its KV events said so); ``direct_on_holder`` requests that other clients
    sent straight to it appear only in its load report.
    """
    prompt = list(range(PREFIX_LEN + SUFFIX_LEN))
    hashes = page_hashes(prompt, PAGE, 0)
    index = PrefixIndex(30, 300, clock=lambda: 0.0)
    index.apply_stored("h", hashes[: PREFIX_LEN // PAGE])
    config = RouterConfig()
    policy = PrefixPolicy(config.load_weight, config.decode_weight, random.Random(0))
    request = RouteRequest(len(prompt), OUTPUT_LEN, PAGE)
    loads = [WorkerLoad(), WorkerLoad()]
    per_request = SUFFIX_LEN + OUTPUT_LEN  # what each request still owes on the holder before it starts
    for taken in range(1000):
        report = ReportedLoad(taken + direct_on_holder, (taken + direct_on_holder) * SUFFIX_LEN,
                              (taken + direct_on_holder) * OUTPUT_LEN)
        decision = decide(policy, index, request, hashes, ["h", "o"], loads, [report, ReportedLoad(0, 0, 0)])
        if decision.worker == 1:
            assert loads[0].pending_tokens == taken * per_request
            return taken
        loads[0].begin(taken, decision.prefill_tokens, decision.output_tokens, decision.active_pages)
    raise AssertionError("the hot prefix never spread")


def test_a_hot_prefix_spreads_once_its_holder_is_behind_by_the_prefill_it_saves_over_load_weight() -> None:
    # load_weight 0.35, decode_weight 3: the holder keeps the prefix while its pending work (64 tokens a request
    # to prefill, 32 to generate at 3 each: 160) exceeds the idle worker's by at most 2,048 / 0.35 = 5,851 tokens,
    # that is for 37 requests in flight (37 * 160 = 5,920 > 5,851 only at the 38th); the 38th goes elsewhere.
    assert (RouterConfig().load_weight, RouterConfig().decode_weight) == (0.35, 3.0)
    assert _hot_prefix_requests(direct_on_holder=0) == 37


def test_the_holders_own_report_counts_traffic_this_router_did_not_send() -> None:
    # 20 requests sent straight to the holder: it reports 20 more than this router has there, so the prefix
    # spreads after 17 of this router's requests (17 + 20 = 37).
    assert _hot_prefix_requests(direct_on_holder=20) == 17


def test_decide_takes_the_larger_of_own_and_reported_figures() -> None:
    index = PrefixIndex(30, 300, clock=lambda: 0.0)
    own = WorkerLoad()
    own.begin("r", 100, 10, 7)
    seen = {}

    class Spy(LeastLoadPolicy):
        def choose(self, request, candidates):  # type: ignore[no-untyped-def]
            seen["candidate"] = candidates[0]
            return 0

    decide(Spy(random.Random(0)), index, RouteRequest(PAGE, 1, PAGE), [], ["w"], [own], [ReportedLoad(3, 50, 40)])
    c = seen["candidate"]
    assert (c.num_in_flight, c.num_queued, c.pending_prefill_tokens, c.pending_output_tokens) == (1, 3, 100, 40)


def test_a_worker_is_full_when_its_waiting_requests_reach_max_waiting_requests() -> None:
    # Regression: the router counted running requests against max_waiting_requests, which bounds waiting ones.
    info = worker_pb2.WorkerInfo(max_running_requests=64, max_waiting_requests=2)

    def full(num_running: int, num_waiting: int) -> bool:
        reported = SimpleNamespace(info=info, load=types_pb2.LoadReport(num_running=num_running,
                                                                        num_waiting=num_waiting))
        return WorkerClient.full.fget(reported)  # type: ignore[attr-defined]  # the property on a report alone

    assert not full(64, 1)
    assert full(0, 2) and full(64, 2)
