"""The engine end to end on a tiny random model: prefix reuse, chunking, batching, memory pressure, input checks."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from engine_runs import assert_all_pages_free, collect, prompts, run_to_completion

from radixserve.cluster.base.hashing import namespace_seed, page_hashes
from radixserve.cluster.base.config import CacheConfig, EngineConfig, SchedulerConfig
from radixserve.worker.engine import Engine, EngineOverloaded, RequestIdInUse
from radixserve.worker.models.checkpoint import Checkpoint
from radixserve.worker.models.loading import open_checkpoint
from radixserve.cluster.base.sampling_params import SamplingParams

PAGE = 4


@pytest.fixture(scope="module")
def checkpoint(tiny_hf_dir: Path) -> Checkpoint:
    return open_checkpoint(tiny_hf_dir)


def make_engine(checkpoint: Checkpoint, num_pages: int = 512, budget: int = 256, running: int = 64,
                waiting: int = 4096) -> Engine:
    config = EngineConfig(model="tiny", cache=CacheConfig(page_size=PAGE, num_pages=num_pages),
                          scheduler=SchedulerConfig(max_num_batched_tokens=budget, max_running_requests=running,
                                                    max_waiting_requests=waiting))
    return Engine(config, checkpoint)


GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)


def solo(checkpoint: Checkpoint, prompt: list[int], params: SamplingParams = GREEDY, **engine_args) -> list[int]:
    engine = make_engine(checkpoint, **engine_args)
    rid = engine.add_request(prompt, params)
    return run_to_completion(engine)[rid].tokens


def test_cached_prefix_gives_the_same_greedy_output(checkpoint: Checkpoint) -> None:
    engine = make_engine(checkpoint)
    [prompt] = prompts(1, 61)
    first = run_to_completion(engine) if engine.add_request(prompt, GREEDY, "a") else None
    engine.add_request(prompt, GREEDY, "b")
    second = run_to_completion(engine)
    assert first["a"].num_cached_tokens == 0
    assert second["b"].num_cached_tokens == 60  # whole pages, leaving the last prompt token to compute
    assert second["b"].tokens == first["a"].tokens
    assert (engine.stats.num_prompt_tokens, engine.stats.num_cached_prompt_tokens) == (2 * 61, 60)
    # A prompt that shares only a prefix reuses it and still matches a cold engine.
    branch = prompt[:40] + prompts(1, 9, seed=1)[0]
    engine.add_request(branch, GREEDY, "c")
    warm = run_to_completion(engine)["c"]
    assert warm.num_cached_tokens == 40
    assert warm.tokens == solo(checkpoint, branch)
    assert_all_pages_free(engine)


def test_requests_arriving_together_compute_their_shared_prefix_once(checkpoint: Checkpoint) -> None:
    [shared] = prompts(1, 96, seed=11)
    tails = prompts(3, 5, seed=12)
    engine = make_engine(checkpoint, budget=32)  # the shared prefix takes three steps to prefill
    for i, tail in enumerate(tails):
        engine.add_request(shared + tail, GREEDY, str(i))
    done = run_to_completion(engine)
    # The first computes the prefix; the others wait for its pages instead of computing them alongside.
    assert [done[str(i)].num_cached_tokens for i in range(3)] == [0, 96, 96]
    decode_tokens = 3 * (GREEDY.max_tokens - 1)
    assert engine.stats.num_computed_tokens == 96 + 3 * 5 + decode_tokens
    for i, tail in enumerate(tails):
        assert done[str(i)].tokens == solo(checkpoint, shared + tail)
    assert_all_pages_free(engine)


@pytest.mark.parametrize("budget", [1, 7, 16])
def test_chunked_prefill_gives_the_same_greedy_output(checkpoint: Checkpoint, budget: int) -> None:
    [prompt] = prompts(1, 83, seed=2)
    assert solo(checkpoint, prompt, budget=budget) == solo(checkpoint, prompt, budget=512)


def mixed_params(i: int) -> SamplingParams:
    kinds = [
        SamplingParams(max_tokens=20, temperature=0, ignore_eos=True),
        SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, seed=i, ignore_eos=True),
        SamplingParams(max_tokens=16, temperature=1.0, top_k=20, min_p=0.05, seed=i, repetition_penalty=1.2),
        SamplingParams(max_tokens=8, temperature=0, logprobs=2, frequency_penalty=0.5, presence_penalty=0.3),
        SamplingParams(max_tokens=14, temperature=0.7, n=2, seed=i, ignore_eos=True),
    ]
    return kinds[i % len(kinds)]


def test_a_batch_of_32_mixed_requests_matches_each_run_alone(checkpoint: Checkpoint) -> None:
    batch_prompts = prompts(32, (1, 90), seed=3)
    batch_prompts[5] = batch_prompts[0][:50] + batch_prompts[5]  # some shared prefixes too
    batch_prompts[10] = list(batch_prompts[0])
    engine = make_engine(checkpoint, budget=64)
    for i, prompt in enumerate(batch_prompts):
        engine.add_request(prompt, mixed_params(i), str(i))
    together = run_to_completion(engine)
    for i, prompt in enumerate(batch_prompts):
        alone_engine = make_engine(checkpoint)
        alone_engine.add_request(prompt, mixed_params(i), "x")
        alone = run_to_completion(alone_engine)["x"]
        for index, sample in alone.samples.items():
            assert together[str(i)].samples[index].token_ids == sample.token_ids, f"request {i} sample {index}"
    assert engine.stats.num_cached_prompt_tokens > 0
    assert_all_pages_free(engine)


def test_distinct_prefixes_needing_ten_times_the_pool_all_complete_correctly(checkpoint: Checkpoint) -> None:
    num_pages = 48
    work = prompts(40, (40, 60), seed=4)
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    pages_needed = sum(-(-(len(p) + params.max_tokens) // PAGE) for p in work)
    assert pages_needed >= 10 * num_pages
    engine = make_engine(checkpoint, num_pages=num_pages, budget=32)
    for i, prompt in enumerate(work):
        engine.add_request(prompt, params, str(i))
    done = run_to_completion(engine)
    removed = sum(len(e.page_hashes) for e in engine.take_events() if e.kind == "removed")
    assert removed > 0  # the radix cache was evicted to make room
    reference = make_engine(checkpoint, num_pages=4096)
    for i, prompt in enumerate(work):
        reference.add_request(prompt, params, str(i))
    expected = run_to_completion(reference)
    assert {k: v.tokens for k, v in done.items()} == {k: v.tokens for k, v in expected.items()}
    assert_all_pages_free(engine)


def test_running_requests_are_preempted_and_recomputed_when_the_pool_runs_dry(checkpoint: Checkpoint) -> None:
    work = prompts(8, 20, seed=5)
    params = SamplingParams(max_tokens=40, temperature=0.9, seed=7, ignore_eos=True)
    # Each request ends up with 15 pages; 8 of them cannot all run in 40.
    engine = make_engine(checkpoint, num_pages=40, budget=256)
    for i, prompt in enumerate(work):
        engine.add_request(prompt, params, str(i))
    done = run_to_completion(engine)
    assert engine.scheduler.num_preemptions > 0
    for i, prompt in enumerate(work):
        assert done[str(i)].tokens == solo(checkpoint, prompt, params), f"request {i}"
    assert_all_pages_free(engine)


def test_abort_frees_everything_the_request_held(checkpoint: Checkpoint) -> None:
    engine = make_engine(checkpoint, num_pages=64, running=1)
    [running_prompt, waiting_prompt] = prompts(2, 30, seed=6)
    engine.add_request(running_prompt, SamplingParams(max_tokens=200, temperature=0, ignore_eos=True), "run")
    engine.add_request(waiting_prompt, GREEDY, "wait")
    done: dict = {}
    for _ in range(5):
        collect(engine.step(), done)
    assert engine.allocator.num_free < 64
    engine.abort("run")
    engine.abort("wait")
    engine.abort("never-existed")
    collect(engine.step(), done)
    assert done["run"].samples[0].finish_reason == "abort"
    assert done["wait"].samples[0].finish_reason == "abort" and done["wait"].finished
    assert not engine.has_unfinished()
    assert_all_pages_free(engine)


BAD_REQUESTS = [
    ("prompt", "", {}),
    ("prompt", [], {}),
    ("prompt", [5] * 256, {}),  # the tiny model's context is 256 tokens
    ("prompt_token_ids", [5, 300_000], {}),
    ("prompt_token_ids", [-1, 5], {}),
    ("stop_token_ids", [5], {"stop_token_ids": [10**6]}),
]


@pytest.mark.parametrize("field,prompt,params", BAD_REQUESTS, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD_REQUESTS)])
def test_bad_requests_name_the_field_and_the_engine_keeps_serving(checkpoint: Checkpoint, field: str,
                                                                 prompt: object, params: dict) -> None:
    engine = make_engine(checkpoint)
    engine.add_request([7, 8, 9], GREEDY, "good")
    with pytest.raises(ValueError, match=f"^{field}"):
        engine.add_request(prompt, SamplingParams(**params))
    assert run_to_completion(engine)["good"].tokens == solo(checkpoint, [7, 8, 9])


@pytest.mark.parametrize("field,value", [("max_tokens", 0), ("top_p", 0.0), ("top_p", 1.5), ("temperature", -1.0)])
def test_bad_sampling_params_name_the_field(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=f"^{field}"):
        SamplingParams(**{field: value})


def test_duplicate_request_ids_and_a_full_queue_are_refused(checkpoint: Checkpoint) -> None:
    engine = make_engine(checkpoint, waiting=2)
    engine.add_request([5, 6], GREEDY, "a")
    with pytest.raises(ValueError, match="^request_id"):
        engine.add_request([5, 6], GREEDY, "a")
    engine.add_request([5, 6], GREEDY, "b")
    with pytest.raises(EngineOverloaded):
        engine.add_request([5, 6], GREEDY, "c")
    assert set(run_to_completion(engine)) == {"a", "b"}


def test_concurrent_adds_accept_one_request_per_id_and_never_more_than_the_queue_holds(
        checkpoint: Checkpoint) -> None:
    # Regression: the id and the queue size were checked outside the lock, long before the insert.
    engine = make_engine(checkpoint, waiting=3)
    num_threads = 12
    barrier = threading.Barrier(num_threads)

    def add(request_id: str) -> bool:
        barrier.wait(30)
        try:
            engine.add_request([5, 6, 7], GREEDY, request_id)
        except (RequestIdInUse, EngineOverloaded):
            return False
        return True

    with ThreadPoolExecutor(num_threads) as pool:
        for round_ in range(4):
            assert sum(pool.map(add, [f"same-{round_}"] * num_threads)) == 1
            run_to_completion(engine)
            accepted = sum(pool.map(add, [f"{round_}-{i}" for i in range(num_threads)]))
            assert accepted == 3 and engine.load().num_waiting == 3
            run_to_completion(engine)


def test_max_waiting_requests_bounds_the_requests_not_running(checkpoint: Checkpoint) -> None:
    engine = make_engine(checkpoint, running=1, waiting=1)
    long = SamplingParams(max_tokens=50, temperature=0, ignore_eos=True)
    engine.add_request([5, 6, 7], long, "running")
    engine.step()
    engine.add_request([5, 6, 8], long, "waiting")  # the queue holds one waiting request besides the running one
    with pytest.raises(EngineOverloaded):
        engine.add_request([5, 6, 9], long, "refused")
    engine.step()
    load = engine.load()
    assert (load.num_running, load.num_waiting) == (1, 1)
    assert set(run_to_completion(engine)) == {"running", "waiting"}


def test_an_abort_meant_for_a_request_does_not_end_a_later_one_reusing_its_id(checkpoint: Checkpoint) -> None:
    # Regression: aborts were queued by id, so one that reached an ending request during its last step ended the
    # next request given the same id.
    engine = make_engine(checkpoint)
    run = engine.runner.run

    def run_and_abort(batch):  # type: ignore[no-untyped-def]  # another thread aborts while the step runs
        engine.abort("x")
        return run(batch)

    engine.runner.run = run_and_abort  # type: ignore[method-assign]
    engine.add_request([5, 6, 7], SamplingParams(max_tokens=1, temperature=0), "x")
    assert run_to_completion(engine)["x"].samples[0].finish_reason == "length"  # it ended in that step anyway
    engine.runner.run = run  # type: ignore[method-assign]
    engine.add_request([5, 6, 7], GREEDY, "x")
    again = run_to_completion(engine)["x"].samples[0]
    assert again.finish_reason == "length" and len(again.token_ids) == GREEDY.max_tokens


def test_stop_strings_stop_tokens_and_lengths(checkpoint: Checkpoint) -> None:
    [prompt] = prompts(1, 12, seed=8)
    params = SamplingParams(max_tokens=48, temperature=0, ignore_eos=True)
    engine = make_engine(checkpoint)
    engine.add_request(prompt, params, "free")
    free = run_to_completion(engine)["free"].samples[0]
    assert free.finish_reason == "length" and len(free.token_ids) == 48
    assert free.text == checkpoint.tokenizer.decode(free.token_ids)
    stop = free.text[len(free.text) // 2:][:3]
    assert stop.strip()
    engine.add_request(prompt, SamplingParams(max_tokens=48, temperature=0, ignore_eos=True, stop=[stop]), "s")
    stopped = run_to_completion(engine)["s"].samples[0]
    assert stopped.finish_reason == "stop"
    assert stopped.text == free.text[: free.text.index(stop)]
    stop_id = free.token_ids[10]
    engine.add_request(prompt, SamplingParams(max_tokens=48, temperature=0, stop_token_ids=[stop_id]), "t")
    by_id = run_to_completion(engine)["t"].samples[0]
    assert by_id.finish_reason == "stop"
    assert by_id.token_ids == free.token_ids[: free.token_ids.index(stop_id) + 1]
    engine.add_request(prompt, SamplingParams(max_tokens=48, temperature=0, min_tokens=20,
                                              stop_token_ids=[stop_id]), "m")
    assert len(run_to_completion(engine)["m"].tokens) > 20


def test_n_samples_share_the_prompt_pages_and_are_reproducible(checkpoint: Checkpoint) -> None:
    [prompt] = prompts(1, 50, seed=9)
    params = SamplingParams(max_tokens=10, temperature=1.0, n=4, seed=123, ignore_eos=True)
    engine = make_engine(checkpoint)
    engine.add_request(prompt, params, "n")
    first = run_to_completion(engine)["n"]
    # Sample 0 prefills 50 tokens; samples 1-3 reuse its 12 whole pages (48 tokens) and compute 2 each.
    assert engine.stats.num_computed_tokens == 50 + 3 * 2 + 4 * (10 - 1)
    outputs = [first.samples[i].token_ids for i in range(4)]
    assert len({tuple(o) for o in outputs}) == 4
    engine.add_request(prompt, params, "again")
    again = run_to_completion(engine)["again"]
    assert [again.samples[i].token_ids for i in range(4)] == outputs


def test_logprobs_come_from_the_raw_distribution(checkpoint: Checkpoint) -> None:
    engine = make_engine(checkpoint)
    engine.add_request([5, 6, 7, 8], SamplingParams(max_tokens=6, temperature=0, logprobs=3, ignore_eos=True), "l")
    sample = run_to_completion(engine)["l"].samples[0]
    assert [lp.token_id for lp in sample.logprobs] == sample.token_ids
    for lp in sample.logprobs:
        assert len(lp.top) == 3 and lp.top[0] == (lp.token_id, pytest.approx(lp.logprob))
        assert [v for _, v in lp.top] == sorted((v for _, v in lp.top), reverse=True)
        assert lp.logprob <= 0


def test_kv_events_name_the_pages_the_cache_holds(checkpoint: Checkpoint) -> None:
    engine = make_engine(checkpoint)
    [prompt] = prompts(1, 30, seed=10)
    engine.add_request(prompt, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True), "e")
    tokens = prompt + run_to_completion(engine)["e"].tokens
    stored = [h for e in engine.take_events() if e.kind == "stored" for h in e.page_hashes]
    # All computed tokens (the last sampled one has no KV) in whole pages, hashed as the router will.
    assert stored == page_hashes(tokens[:-1], PAGE, namespace_seed("tiny"))
    engine.cache.flush()
    removed = engine.take_events()
    assert {e.kind for e in removed} == {"removed"}
    assert sorted(h for e in removed for h in e.page_hashes) == sorted(stored)


def test_async_generate_streams_concurrently_and_cancellation_aborts(checkpoint: Checkpoint) -> None:
    engine = make_engine(checkpoint)
    [p1, p2, p3] = prompts(3, 25, seed=11)

    async def stream(prompt: list[int], limit: int | None = None) -> list[int]:
        tokens: list[int] = []
        agen = engine.generate(prompt, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))
        async for output in agen:
            tokens += output.outputs[0].token_ids if output.outputs else []
            if limit is not None and len(tokens) >= limit:
                await agen.aclose()
                break
        return tokens

    async def main() -> tuple[list[int], list[int], list[int]]:
        with pytest.raises(ValueError, match="^prompt"):
            await anext(engine.generate([], GREEDY))
        results = await asyncio.gather(stream(p1), stream(p2), stream(p3, limit=3))
        for _ in range(100):  # let the driver apply the abort
            if not engine.has_unfinished():
                break
            await asyncio.sleep(0.01)  # the poll interval
        return results

    a, b, c = asyncio.run(main())
    assert a == solo(checkpoint, p1, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))
    assert b == solo(checkpoint, p2, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))
    assert 3 <= len(c) < 30
    assert not engine.has_unfinished()
    assert_all_pages_free(engine)


def metric(engine: Engine, name: str) -> float:
    value = engine.metrics.registry.get_sample_value(f"radixserve_worker_{name}", {"worker": "engine"})
    assert value is not None, name
    return value


def test_metrics_time_every_request_and_agree_with_the_engine_counters(checkpoint: Checkpoint) -> None:
    engine = make_engine(checkpoint, budget=32)
    work = prompts(6, (30, 50), seed=8)
    for i, prompt in enumerate(work):
        engine.add_request(prompt, GREEDY, str(i))
    engine.add_request(work[0], SamplingParams(max_tokens=5, n=2, temperature=0.7, seed=1, ignore_eos=True), "n2")
    run_to_completion(engine)
    num_requests = len(work) + 1
    for name in ("time_to_first_token_seconds", "queue_time_seconds", "prefill_time_seconds",
                 "e2e_request_latency_seconds"):
        assert metric(engine, f"{name}_count") == num_requests, name
    # queue time + prefill time = TTFT, request by request, so also summed
    assert metric(engine, "queue_time_seconds_sum") + metric(engine, "prefill_time_seconds_sum") == \
        pytest.approx(metric(engine, "time_to_first_token_seconds_sum"))
    # one inter-token gap per token after each sample's first: 24 tokens x 6 greedy, then 5 x 2 samples
    assert metric(engine, "inter_token_latency_seconds_count") == 6 * 23 + 2 * 4
    stats = engine.stats
    assert metric(engine, "step_duration_seconds_count") == metric(engine, "steps_total") == stats.num_steps
    assert metric(engine, "step_tokens_sum") == metric(engine, "computed_tokens_total") == stats.num_computed_tokens
    assert metric(engine, "prefix_cache_hit_tokens_total") == stats.num_cached_prompt_tokens > 0
    assert metric(engine, "prefix_cache_query_tokens_total") == stats.num_prompt_tokens
    assert metric(engine, "generated_tokens_total") == 6 * 24 + 2 * 5
    assert metric(engine, "requests_finished_total") == num_requests
    assert (metric(engine, "running_requests"), metric(engine, "waiting_requests")) == (0, 0)
    assert metric(engine, "kv_used_pages") + metric(engine, "kv_free_pages") == 512


def test_metrics_count_evictions_and_preemptions_under_memory_pressure(checkpoint: Checkpoint) -> None:
    engine = make_engine(checkpoint, num_pages=40, budget=256)
    for i, prompt in enumerate(prompts(8, 20, seed=5)):
        engine.add_request(prompt, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True), str(i))
    run_to_completion(engine)
    assert metric(engine, "preemptions_total") == engine.scheduler.num_preemptions > 0
    assert metric(engine, "kv_evicted_pages_total") == engine.scheduler.num_evicted_pages > 0


def test_a_request_preempted_in_its_own_prefill_reports_no_cached_tokens(checkpoint: Checkpoint) -> None:
    # Regression: re-admission after a preemption re-matched the pages the request had computed itself and
    # counted them as cache hits. Cached prompt tokens are those found at first admission: none for cold prompts.
    [a, b] = prompts(1, 16, seed=21)[0], prompts(1, 48, seed=22)[0]
    # 14 pages: "a" decoding and "b" prefilling 3 tokens a step run the pool dry, and "b" (admitted last) yields.
    engine = make_engine(checkpoint, num_pages=14, budget=4)
    engine.add_request(a, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True), "a")
    engine.add_request(b, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True), "b")
    done = run_to_completion(engine)
    assert engine.scheduler.num_preemptions > 0
    assert {rid: c.num_cached_tokens for rid, c in done.items()} == {"a": 0, "b": 0}
    assert (engine.stats.num_prompt_tokens, engine.stats.num_cached_prompt_tokens) == (64, 0)
    assert_all_pages_free(engine)


def test_a_request_that_cannot_be_admitted_evicts_nothing(checkpoint: Checkpoint) -> None:
    # Regression: admission evicted up to its shortfall before knowing the allocation would succeed, so a
    # request too big for what is free plus evictable flushed the cache (and told every router) on every step.
    engine = make_engine(checkpoint, num_pages=40, budget=128)
    [cached, running, big] = prompts(1, 17, seed=22)[0], prompts(1, 40, seed=23)[0], prompts(1, 150, seed=24)[0]
    engine.add_request(cached, SamplingParams(max_tokens=1, temperature=0), "cached")
    run_to_completion(engine)
    assert engine.cache.num_evictable_pages == 4
    engine.add_request(running, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True), "running")
    engine.step()  # its prefill: 10 pages held, 26 free, 4 evictable
    engine.add_request(big, SamplingParams(max_tokens=1, temperature=0), "big")  # its first chunk needs 32 pages
    engine.take_events()
    while "running" in engine._requests:
        engine.step()
        assert engine.scheduler.num_evicted_pages == 0
        assert engine.load().num_waiting == 1  # "big" could not be admitted meanwhile
    assert not [e for e in engine.take_events() if e.kind == "removed"]
    done = run_to_completion(engine)
    assert done["big"].finished
    assert_all_pages_free(engine)


def test_the_load_report_counts_the_work_requests_still_owe(checkpoint: Checkpoint) -> None:
    engine = make_engine(checkpoint, budget=16)
    [cached, cold] = prompts(2, 41, seed=25)
    engine.add_request(cached, SamplingParams(max_tokens=1, temperature=0), "warm")
    run_to_completion(engine)  # 40 of its tokens are now cached
    engine.add_request(cached[:40] + cold[:9], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True), "hit")
    engine.add_request(cold, SamplingParams(max_tokens=5, temperature=0, n=2, ignore_eos=True), "miss")
    load = engine.load()  # not taken in yet: the prompts less the prefix cached when they arrived
    assert (load.num_pending_prefill_tokens, load.num_pending_output_tokens) == (9 + 41, 8 + 2 * 5)
    engine.step()  # both taken in; 16 tokens of prefill: the hit's 9 and 7 of the miss's 41
    load = engine.load()
    assert load.num_pending_prefill_tokens == 41 - 7
    assert load.num_pending_output_tokens == 7 + 2 * 5  # the hit sampled its first token
    run_to_completion(engine)
    assert (engine.load().num_pending_prefill_tokens, engine.load().num_pending_output_tokens) == (0, 0)
    # Requests behind one that will compute their shared prefix owe only their own part: 41 + 2 * 9, not 3 * 49.
    [shared] = prompts(1, 40, seed=26)
    for i, tail in enumerate(prompts(3, 9, seed=27)):
        engine.add_request(shared + tail, SamplingParams(max_tokens=1, temperature=0), f"group-{i}")
    assert engine.load().num_pending_prefill_tokens == 49 + 2 * 9
    run_to_completion(engine)
    assert engine._prompt_pages == {}  # every finished request forgot its pages
