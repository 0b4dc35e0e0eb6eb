from __future__ import annotations

from dataclasses import replace

import pytest

from radixserve.cluster.base.config import POLICIES
from radixserve.cluster.control.sim.simulator import SimConfig, _Simulation, simulate, ttft_floor
from radixserve.cluster.control.sim.worker import Notice, WorkerConfig
from radixserve.cluster.control.sim.workload import SimRequest, Workload, shared_prefix

BLOCK = 4
PREFIX = tuple(range(1, 9))  # 8 blocks, 32 tokens
SMALL = SimConfig(num_workers=2, num_blocks=64, max_batch_tokens=256, kv_event_lag_s=0.0)


def request(at: float, blocks: tuple[int, ...], output_len: int = 2, input_len: int | None = None) -> SimRequest:
    return SimRequest(at, blocks, input_len or len(blocks) * BLOCK, output_len)


def workload(*requests: SimRequest) -> Workload:
    return Workload("crafted", BLOCK, tuple(requests))


def test_hit_counts_of_a_hand_computed_trace_on_one_worker() -> None:
    trace = workload(request(0, (1, 2, 3)),                       # cold
                     request(10, (1, 2, 4)),                      # shares 2 blocks
                     request(20, (1, 2, 3)),                      # same prompt: its last token is computed
                     request(30, (1, 2, 3, 5), input_len=13))     # 3 full blocks cached, then 1 token
    run = simulate(trace, replace(SMALL, num_workers=1))
    assert [o.cached_tokens for o in run.outcomes] == [0, 8, 8, 12]
    assert all(o.finish_s >= o.first_token_s > o.arrival_s for o in run.outcomes)


def test_an_evicted_prefix_is_forgotten_by_the_worker_and_the_router() -> None:
    trace = workload(request(0, PREFIX + (100,)),
                     request(10, (1,) + tuple(range(200, 262)), output_len=4),  # needs all 64 blocks
                     request(20, PREFIX + (101,)))
    run = simulate(trace, replace(SMALL, num_workers=1))
    assert [o.cached_tokens for o in run.outcomes] == [0, 4, 4]  # only block 1 survived the second request
    assert run.workers[0].num_evicted_blocks == 8 + 8  # the prefix for the second request, its blocks for the third


def test_a_host_tier_keeps_evicted_blocks_and_serves_them_back() -> None:
    trace = workload(request(0, PREFIX + (100,)),
                     request(10, (1,) + tuple(range(200, 262)), output_len=4),
                     request(20, PREFIX + (101,)))
    run = simulate(trace, replace(SMALL, num_workers=1, host_kv_gib=1.0))
    assert [o.cached_tokens for o in run.outcomes] == [0, 4, 32]


def test_a_hot_prefix_stays_on_its_worker_until_the_backlog_outweighs_the_prefill_saved() -> None:
    burst = [request(10, PREFIX + (100 + i,)) for i in range(12)]
    run = simulate(workload(request(0, PREFIX + (99,)), *burst), replace(SMALL, policy="prefix", load_weight=1.0,
                                                                             decode_weight=1.0))
    holder = run.outcomes[0].worker
    # Each burst request prefills 4 tokens on the holder, 36 elsewhere, and owes 2 output tokens (at 1 each): the holder
    # takes requests while 4 + its backlog (6 per request) <= 36, i.e. 6 of them; then the other worker, holding
    # the prefix by routing from then on, takes turns with it.
    placed = ["h" if o.worker == holder else "o" for o in run.outcomes[1:]]
    assert placed == ["h"] * 6 + ["o", "h"] * 3
    assert [o.cached_tokens for o in run.outcomes[1:7]] == [32] * 6


@pytest.mark.parametrize("policy, expected", [("sglang_cache_aware", ["h"] * 12), ("round_robin", ["o", "h"] * 6)])
def test_peer_and_simple_policies_follow_their_rules_on_a_hot_prefix(policy: str, expected: list[str]) -> None:
    burst = [request(10, PREFIX + (100 + i,)) for i in range(12)]
    run = simulate(workload(request(0, PREFIX + (99,)), *burst), replace(SMALL, policy=policy))
    holder = run.outcomes[0].worker
    assert ["h" if o.worker == holder else "o" for o in run.outcomes[1:]] == expected


@pytest.mark.parametrize("policy", ["prefix", "least_load", "sglang_cache_aware", "dynamo_kv"])
def test_a_cold_request_goes_to_the_idle_worker(policy: str) -> None:
    busy = request(0, tuple(range(1, 40)), output_len=50)
    cold = request(0.001, tuple(range(300, 309)))
    run = simulate(workload(busy, cold), replace(SMALL, policy=policy))
    assert run.outcomes[0].worker != run.outcomes[1].worker


def test_the_simulation_is_deterministic_for_a_seed() -> None:
    trace = shared_prefix(groups=4, prompts_per_group=6, system_len=64, question_len=8, output_len=4, rate=50.0)
    for policy in ("prefix", "random", "power_of_two", "dynamo_kv"):
        config = replace(SMALL, policy=policy, num_blocks=128, seed=3)
        first, second = simulate(trace, config), simulate(trace, config)
        assert first.outcomes == second.outcomes and first.workers == second.workers
    runs = {simulate(trace, replace(SMALL, policy="random", num_blocks=128, seed=s)).outcomes for s in range(4)}
    assert len(runs) > 1


@pytest.mark.parametrize("policy", POLICIES)
def test_no_policy_beats_the_ttft_floor_and_a_lone_request_meets_it(policy: str) -> None:
    trace = shared_prefix(groups=3, prompts_per_group=8, system_len=96, question_len=12, output_len=6, rate=400.0)
    config = replace(SMALL, policy=policy, num_blocks=128, device="a100")
    run = simulate(trace, config)
    floors = ttft_floor(trace, config)
    ttfts = [o.first_token_s - o.arrival_s for o in run.outcomes]
    assert all(t >= f for t, f in zip(ttfts, floors, strict=True))
    assert sum(t > f * 1.01 for t, f in zip(ttfts, floors, strict=True)) > 0  # the burst does queue somewhere
    lone = workload(request(0, tuple(range(1, 9))))
    first = simulate(lone, config).outcomes[0]
    assert first.first_token_s - first.arrival_s == pytest.approx(ttft_floor(lone, config)[0])


def test_follow_up_turns_arrive_think_time_after_their_parent_finishes() -> None:
    first = request(0, (1, 2, 3))
    follow = SimRequest(0.0, (1, 2, 3, 4, 5), 20, 2, after=0, think_s=2.5)
    run = simulate(workload(first, follow), replace(SMALL, num_workers=1))
    assert run.outcomes[1].arrival_s == pytest.approx(run.outcomes[0].finish_s + 2.5)
    assert run.outcomes[1].cached_tokens == 12


def test_a_request_larger_than_a_workers_pool_is_refused_up_front() -> None:
    with pytest.raises(ValueError, match=r"^num_blocks: request 0 needs 66 blocks"):
        simulate(workload(request(0, tuple(range(1, 65)), output_len=8)), SMALL)


def test_generated_token_ids_must_fit_above_the_block_ids() -> None:
    with pytest.raises(ValueError, match=r"^requests: need 4 generated token ids above block id 4294967293"):
        simulate(workload(request(0, (2**32 - 3,)), request(1, (7,))), SMALL)


@pytest.mark.parametrize("field, value", [("num_workers", 0), ("policy", "fastest"), ("device", "tpu"),
                                          ("model", "gpt-5"), ("host_kv_gib", -1.0), ("num_blocks", 0),
                                          ("max_batch_tokens", 0), ("max_running", 0), ("num_routers", 0),
                                          ("load_interval_s", 0.0), ("health_interval_s", -1.0)])
def test_config_errors_name_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"^{field}: "):
        SimConfig(**{field: value})


def test_a_request_preempted_in_its_own_prefill_reports_no_cached_tokens() -> None:
    # The long prompt is prefilled in 7-token chunks beside the short request's decodes; when the short one needs a
    # block the pool has not got, the long one (admitted last) is preempted mid-prompt, its computed blocks left
    # cached. Re-admitted, it matches the 5 of them still cached: its own work, not a cache hit.
    trace = workload(request(0, (1,), output_len=24), request(0.0001, tuple(range(10, 20)), output_len=1))
    run = simulate(trace, replace(SMALL, num_workers=1, num_blocks=12, max_batch_tokens=8))
    assert run.workers[0].num_preemptions == 1
    assert [o.cached_tokens for o in run.outcomes] == [0, 0]


def test_step_noise_makes_workers_drift_apart_reproducibly() -> None:
    workload = shared_prefix(groups=4, prompts_per_group=6, system_len=2048, question_len=64, output_len=32,
                             rate=50.0, seed=3)
    exact = simulate(workload, SimConfig(num_workers=2, policy="round_robin", seed=1))
    noisy = [simulate(workload, SimConfig(num_workers=2, policy="round_robin", step_noise=0.3, seed=1))
             for _ in range(2)]
    assert noisy[0].outcomes == noisy[1].outcomes  # the same seed draws the same noise
    assert noisy[0].outcomes != exact.outcomes
    with pytest.raises(ValueError, match="^step_noise"):
        WorkerConfig(num_blocks=8, step_noise=-0.1)


def test_the_routers_view_of_a_worker_shrinks_as_its_requests_stream_tokens() -> None:
    # Output budgets leave WorkerLoad as tokens stream (as the real router counts them): once every request has
    # finished, nothing is left owed on any worker.
    workload = shared_prefix(groups=2, prompts_per_group=4, system_len=512, question_len=32, output_len=40,
                             rate=20.0, seed=4)
    simulation = _Simulation(workload, SimConfig(num_workers=2, seed=0), None)
    loads = simulation._routers[0].loads
    seen: list[int] = []
    original = simulation._notice

    def notice(w: int, n: Notice) -> None:
        before = loads[w].pending_output_tokens
        original(w, n)
        if not n.finished:
            seen.append(before - loads[w].pending_output_tokens)
    simulation._notice = notice  # type: ignore[method-assign]
    simulation.run()
    assert seen and all(delta > 0 for delta in seen)
    assert all(load.pending_tokens == 0 and load.num_in_flight == 0 for load in loads)


# The hot prefix of tests/router/test_routing.py: a 2,048-token prefix (32 blocks of 64 tokens), 64-token suffixes,
# 32 output tokens, two workers. A first request caches the prefix on one worker (the holder, known to every
# router's index through its KV events); at t = 10 s a burst of requests sharing it arrives 1 us apart, too fast
# for the holder to finish any (its first step alone reads the weights for milliseconds) and within one load poll
# (every 0.5 s; the last one saw an idle cluster), so the workers' reports add nothing.
HOT = 64
HOT_PREFIX = tuple(range(1, 33))


def hot_prefix(num_burst: int, spacing_s: float = 1e-6) -> Workload:
    first = SimRequest(0.0, HOT_PREFIX + (1000,), 33 * HOT, 32)
    burst = [SimRequest(10.0 + k * spacing_s, HOT_PREFIX + (2000 + k,), 33 * HOT, 32) for k in range(num_burst)]
    return Workload("hot prefix", HOT, (first, *burst))


def taken_by_holder(**config: object) -> int:
    """How many burst requests went to the holder before the first went elsewhere: all still in flight there."""
    run = simulate(hot_prefix(160), replace(SimConfig(num_workers=2, load_interval_s=1e-7), **config))
    holder = run.outcomes[0].worker
    return next(k for k, o in enumerate(run.outcomes[1:]) if o.worker != holder)


def test_with_shared_load_a_hot_prefix_spreads_at_the_same_total_in_flight_as_with_one_router() -> None:
    # One router: the holder keeps the prefix while its pending work (160 tokens a request: 64 to prefill, 32 to
    # generate at decode_weight 3 each) exceeds the idle worker's by at most 2,048 / 0.35 tokens, for 37 requests
    # in flight, as in the router's own test. Two routers taking turns, publishing every 0.1 us (arrivals 1 us
    # apart): each sees its own 18 or 19 plus the other's published ones, the same 37, and the 38th goes to the
    # other worker.
    assert taken_by_holder() == 37
    assert taken_by_holder(num_routers=2) == 37
    # Without shared load each router counts only its own: it lets the holder take 37 of them, 74 in all (the
    # 75th, router 1's 38th, leaves).
    assert taken_by_holder(num_routers=2, shared_load=False) == 74
    # What a router published is up to load_interval_s old: a burst within one interval (the default 0.1 s)
    # looks to each router like its own traffic alone, as without shared load.
    assert taken_by_holder(num_routers=2, load_interval_s=0.1) == 74


def test_the_workers_load_reports_count_every_routers_traffic_once_polled() -> None:
    # Shared load off, but each router polls the workers every 0.1 us: the holder's report (its queue, prefill owed
    # net of the prefix it caches) counts both routers' requests, and the prefix spreads at 37 again.
    assert taken_by_holder(num_routers=2, shared_load=False, health_interval_s=1e-7) == 37


def test_with_shared_routes_a_prefix_still_in_its_prefill_draws_the_next_request_through_another_router() -> None:
    # Request 0 (router 0) starts a 2,048-token prefill; request 1 shares its prefix and arrives through router 1
    # 10 ms later, after router 0's hint (5 ms) but long before the prefill's KV events. With shared routes it
    # follows request 0; without, router 1 sees only request 0's load there and sends it to the idle worker.
    prefix = tuple(range(1, 33))
    trace = Workload("pair", HOT, (SimRequest(0.0, prefix + (1000,), 33 * HOT, 4),
                                   SimRequest(0.01, prefix + (2000,), 33 * HOT, 4)))

    def workers(share_routes: bool) -> list[int]:
        config = SimConfig(num_workers=2, num_routers=2, load_interval_s=1e-4, kv_event_lag_s=0.005,
                           share_routes=share_routes)
        run = simulate(trace, config)
        assert run.outcomes[0].first_token_s > 0.01  # the prefill outlasts the gap
        return [o.worker for o in run.outcomes]

    shared, alone = workers(True), workers(False)
    assert shared[0] == shared[1]
    assert alone[0] != alone[1]


def test_one_router_routes_alike_with_shared_load_on_or_off() -> None:
    trace = shared_prefix(groups=4, prompts_per_group=8, system_len=256, question_len=16, output_len=8, rate=200.0)
    config = replace(SMALL, num_blocks=256, kv_event_lag_s=0.005, num_routers=1)
    on, off = (simulate(trace, replace(config, shared_load=shared_load)) for shared_load in (True, False))
    assert on.outcomes == off.outcomes and on.workers == off.workers


def test_several_routers_are_deterministic_for_a_seed() -> None:
    trace = shared_prefix(groups=4, prompts_per_group=8, system_len=256, question_len=16, output_len=8, rate=200.0)
    for shared_load in (True, False):
        config = replace(SMALL, num_workers=3, num_blocks=256, num_routers=3, shared_load=shared_load, seed=2,
                         load_interval_s=0.003, health_interval_s=0.01)
        first, second = simulate(trace, config), simulate(trace, config)
        assert first.outcomes == second.outcomes and first.workers == second.workers
