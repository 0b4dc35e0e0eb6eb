from __future__ import annotations

import random
from collections import Counter

import pytest

from radixserve.cluster.base.config import POLICIES
from radixserve.router.policies import (
    Candidate,
    DynamoKvPolicy,
    LeastLoadPolicy,
    Policy,
    PowerOfTwoPolicy,
    PrefixPolicy,
    RandomPolicy,
    RoundRobinPolicy,
    RouteRequest,
    SglangCacheAwarePolicy,
    make_policy,
)

PAGE = 16
REQUEST = RouteRequest(num_prompt_tokens=40 * PAGE + 5, max_tokens=64, page_size=PAGE)


def idle(worker_id: str, matched_pages: int = 0) -> Candidate:
    return Candidate(worker_id, matched_pages, num_in_flight=0, num_queued=0, pending_prefill_tokens=0,
                     pending_output_tokens=0, active_pages=0)


def busy(worker_id: str, num_in_flight: int, pending_tokens: int, matched_pages: int = 0) -> Candidate:
    return Candidate(worker_id, matched_pages, num_in_flight, num_in_flight, pending_tokens, 0, active_pages=0)


@pytest.mark.parametrize("load_weight", [0.5, 1.0, 2.0, 4.0])
def test_hot_prefix_spreads_exactly_when_its_backlog_outweighs_the_prefill_saved(load_weight: float) -> None:
    policy = PrefixPolicy(load_weight, 1.0, random.Random(0))
    matched = 32
    saved = matched * PAGE  # the cold worker prefills these prompt tokens on top of what both prefill
    threshold = int(saved / load_weight)  # pending tokens on the hot worker at which both costs are equal
    assert threshold * load_weight == saved
    for pending, expected in [(threshold - 1, 0), (threshold, 0), (threshold + 1, 1)]:
        hot = busy("hot", num_in_flight=5, pending_tokens=pending, matched_pages=matched)
        assert policy.choose(REQUEST, [hot, idle("cold")]) == expected, pending


def test_a_full_hit_still_prefills_one_token() -> None:
    request = RouteRequest(num_prompt_tokens=4 * PAGE, max_tokens=8, page_size=PAGE)
    policy = PrefixPolicy(1.0, 1.0, random.Random(0))
    full = busy("full", 1, pending_tokens=4 * PAGE - 1, matched_pages=4)  # cost 1 + 63 = 64 = a cold prefill
    assert policy.choose(request, [idle("cold"), full]) == 1  # equal cost: more matched pages wins
    full = busy("full", 1, pending_tokens=4 * PAGE, matched_pages=4)
    assert policy.choose(request, [idle("cold"), full]) == 0


def test_prefix_prefers_an_idle_worker_on_a_miss() -> None:
    candidates = [busy("a", 2, 300), idle("b"), busy("c", 1, 50)]
    assert PrefixPolicy(1.0, 1.0, random.Random(0)).choose(REQUEST, candidates) == 1


def test_prefix_falls_back_to_the_least_loaded_once_the_prefix_is_evicted() -> None:
    candidates = [busy("a", 3, 900), busy("b", 1, 120), busy("c", 2, 400)]
    assert PrefixPolicy(1.0, 1.0, random.Random(0)).choose(REQUEST, candidates) == 1


def test_prefix_ties_go_to_fewer_in_flight_then_spread_evenly() -> None:
    policy = PrefixPolicy(1.0, 1.0, random.Random(0))
    tied = [busy("a", 3, 100), busy("b", 2, 100), busy("c", 2, 100), busy("d", 2, 100)]
    picks = Counter(policy.choose(REQUEST, tied) for _ in range(600))
    assert set(picks) == {1, 2, 3} and min(picks.values()) > 150  # never "a"; b, c, d about 200 each


def test_load_weight_zero_never_spreads_a_cached_prefix() -> None:
    hot = busy("hot", 50, 10**9, matched_pages=1)
    assert PrefixPolicy(0.0, 1.0, random.Random(0)).choose(REQUEST, [idle("cold"), hot]) == 1


def test_round_robin_cycles_in_id_order_whatever_the_candidate_order() -> None:
    policy = RoundRobinPolicy()
    picks = []
    for _ in range(6):
        candidates = [idle(w) for w in random.Random(len(picks)).sample(["w0", "w1", "w2"], 3)]
        picks.append(candidates[policy.choose(REQUEST, candidates)].worker_id)
    assert picks == ["w0", "w1", "w2"] * 2


def test_round_robin_survives_workers_leaving_and_joining() -> None:
    policy = RoundRobinPolicy()

    def pick(*ids: str) -> str:
        candidates = [idle(w) for w in ids]
        return candidates[policy.choose(REQUEST, candidates)].worker_id

    assert [pick("w0", "w1", "w2") for _ in range(2)] == ["w0", "w1"]
    assert pick("w0", "w2") == "w2"  # w1 left right after being chosen
    assert pick("w0", "w3") == "w3"  # w2 left, w3 joined after it
    assert pick("w0", "w1", "w3") == "w0"  # wraps around


def test_least_load_orders_by_in_flight_then_pending_then_spreads_ties() -> None:
    policy = LeastLoadPolicy(random.Random(0))
    assert policy.choose(REQUEST, [busy("a", 2, 0), busy("b", 1, 500), busy("c", 1, 400)]) == 2
    tied = [busy("a", 1, 400), busy("b", 1, 400), busy("c", 2, 0)]
    assert Counter(policy.choose(REQUEST, tied) for _ in range(400)).keys() == {0, 1}


def test_power_of_two_never_picks_the_more_loaded_of_its_pair() -> None:
    candidates = [busy(f"w{i}", num_in_flight=i, pending_tokens=0) for i in range(6)]
    policy, replay = PowerOfTwoPolicy(random.Random(7)), random.Random(7)
    picks: Counter[int] = Counter()
    for _ in range(500):
        pair = replay.sample(range(len(candidates)), 2)
        choice = policy.choose(REQUEST, candidates)
        assert choice == min(pair)  # the less loaded of the two drawn
        picks[choice] += 1
    assert 5 not in picks and len(picks) == 5


def test_power_of_two_with_one_candidate_picks_it() -> None:
    assert PowerOfTwoPolicy(random.Random(0)).choose(REQUEST, [busy("only", 9, 9)]) == 0


def test_power_of_two_breaks_in_flight_ties_by_pending_tokens() -> None:
    policy = PowerOfTwoPolicy(random.Random(3))
    candidates = [busy("a", 2, 900), busy("b", 2, 100)]
    assert {policy.choose(REQUEST, candidates) for _ in range(20)} == {1}


def test_random_covers_every_worker_and_replays_for_a_seed() -> None:
    candidates = [idle(f"w{i}") for i in range(8)]

    def draws(seed: int) -> list[int]:
        policy = RandomPolicy(random.Random(seed))
        return [policy.choose(REQUEST, candidates) for _ in range(400)]

    assert set(draws(1)) == set(range(8))
    assert draws(1) == draws(1) != draws(2)


def test_sglang_follows_a_prefix_covering_more_than_its_cache_threshold() -> None:
    # cache_threshold 0.3 of REQUEST's 645 tokens: more than 193.5, so 13 pages
    policy = SglangCacheAwarePolicy(random.Random(0))
    assert policy.choose(REQUEST, [busy("a", 0, 0), busy("holder", 30, 0, matched_pages=13)]) == 1
    assert policy.choose(REQUEST, [busy("a", 0, 0), busy("holder", 30, 0, matched_pages=12)]) == 0  # a miss


def test_sglang_breaks_match_ties_by_load_and_misses_go_to_the_least_loaded() -> None:
    policy = SglangCacheAwarePolicy(random.Random(0))
    holders = [busy("a", 4, 0, matched_pages=20), busy("b", 3, 0, matched_pages=20), busy("c", 9, 0)]
    assert policy.choose(REQUEST, holders) == 1
    misses = [busy("a", 4, 0), busy("b", 2, 0), busy("c", 2, 0)]
    assert {policy.choose(REQUEST, misses) for _ in range(50)} == {1, 2}


def test_sglang_balances_only_when_both_thresholds_are_exceeded() -> None:
    policy = SglangCacheAwarePolicy(random.Random(0))
    hot = lambda n: busy("hot", n, 0, matched_pages=40)  # noqa: E731
    assert policy.choose(REQUEST, [hot(66), busy("idle", 1, 0)]) == 1  # 65 more and 66x as many
    assert policy.choose(REQUEST, [hot(64), busy("idle", 0, 0)]) == 0  # not more than 64 more
    assert policy.choose(REQUEST, [hot(200), busy("idle", 134, 0)]) == 0  # 66 more, but under 1.5x


def test_dynamo_minimises_weighted_prefill_blocks_plus_active_blocks() -> None:
    policy = DynamoKvPolicy(random.Random(0))
    cached = Candidate("cached", 30, num_in_flight=1, num_queued=1, pending_prefill_tokens=0, pending_output_tokens=0,
                       active_pages=20)
    cold = Candidate("cold", 0, num_in_flight=0, num_queued=0, pending_prefill_tokens=0, pending_output_tokens=0,
                       active_pages=0)
    # cached: (645 - 480) / 16 + 20 = 30.3; cold: 645 / 16 = 40.3 (plus the same own blocks for both)
    assert policy.cost(REQUEST, cached) == (645 - 480) / 16 + 20 + 45
    assert policy.choose(REQUEST, [cold, cached]) == 1
    busier = Candidate("cached", 30, num_in_flight=1, num_queued=1, pending_prefill_tokens=0, pending_output_tokens=0,
                       active_pages=31)
    assert policy.choose(REQUEST, [cold, busier]) == 0
    assert {policy.choose(REQUEST, [cold, cold, busier]) for _ in range(50)} == {0, 1}  # ties drawn at random


def test_make_policy_builds_every_configured_policy_and_nothing_else() -> None:
    assert {cls.name for cls in Policy.__subclasses__()} == set(POLICIES)
    for name in POLICIES:
        policy = make_policy(name, 1.0, 1.0, random.Random(0))
        assert policy.name == name
        assert policy.choose(REQUEST, [idle("a")]) == 0


def test_make_policy_rejects_unknown_names_and_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"^policy: .*round_robin.*'fastest'"):
        make_policy("fastest", 1.0, 1.0, random.Random(0))


def test_prefix_rejects_a_negative_load_weight() -> None:
    with pytest.raises(ValueError, match="load_weight"):
        make_policy("prefix", -0.5, 1.0, random.Random(0))


def test_an_output_token_owed_weighs_decode_weight_prompt_tokens() -> None:
    """A worker holding ten cheap cached requests (65 prompt tokens and 32 output tokens each still owed) against
    one prefilling a 1,088-token prompt, both holding the request's first page. Counted token for token the cached
    worker looks idler (970 < 1,120) and takes the request; in time, its ten requests' 320 output tokens cost
    three prompt tokens each, so the request goes to the other worker."""
    cached = Candidate("cached", 1, 10, 10, pending_prefill_tokens=650, pending_output_tokens=320, active_pages=0)
    cold = Candidate("cold", 1, 1, 1, pending_prefill_tokens=1088, pending_output_tokens=32, active_pages=0)
    assert PrefixPolicy(0.35, 1.0, random.Random(0)).choose(REQUEST, [cached, cold]) == 0
    assert PrefixPolicy(0.35, 3.0, random.Random(0)).choose(REQUEST, [cached, cold]) == 1


def test_a_new_prefix_goes_to_the_worker_owing_less_work_though_it_serves_more_requests() -> None:
    """A prompt no worker holds (a new group) between a worker serving ten cheap requests of a hot prefix and one
    prefilling a single long prompt: the first owes less work, so it takes the group, whatever the request counts
    (the simulator over 32 seeds of bench_cluster.py's workloads: joining the worker with fewer requests instead
    lost throughput on eviction and hot_prefix)."""
    policy = PrefixPolicy(0.35, 3.0, random.Random(0))
    hot = Candidate("hot", 0, 10, 10, pending_prefill_tokens=650, pending_output_tokens=0, active_pages=0)
    cold = Candidate("cold", 0, 1, 1, pending_prefill_tokens=1088, pending_output_tokens=0, active_pages=0)
    assert policy.choose(REQUEST, [hot, cold]) == 0
    assert policy.choose(REQUEST, [cold, hot]) == 1


def test_prefix_rejects_a_negative_decode_weight() -> None:
    with pytest.raises(ValueError, match="decode_weight"):
        make_policy("prefix", 0.35, -1.0, random.Random(0))
