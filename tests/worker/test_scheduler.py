"""The scheduler driven directly: plain ``KVSequence``s, the real radix cache and allocator, no model or tensors."""

from __future__ import annotations

import itertools

from radixserve.cluster.base.config import SchedulerConfig
from radixserve.worker.kv.allocator import PageAllocator
from radixserve.worker.kv.radix_cache import RadixCache
from radixserve.worker.scheduler import Scheduler
from radixserve.worker.sequence import KVSequence, SeqStatus

PAGE = 4
_fresh = itertools.count(1000)  # generated token ids, never in a prompt


def make(num_pages: int = 64, budget: int = 64, running: int = 64, **kwargs) -> Scheduler[KVSequence]:
    allocator = PageAllocator(num_pages)
    config = SchedulerConfig(max_num_batched_tokens=budget, max_running_requests=running)
    return Scheduler(config, RadixCache(allocator, PAGE, "test"), allocator, PAGE, **kwargs)


def seq(request_id: str, prompt: list[int]) -> KVSequence:
    return KVSequence(request_id, list(prompt), len(prompt))


def step(scheduler: Scheduler[KVSequence], max_tokens: int = 4) -> list[tuple[str, int]]:
    """One engine step without the model: schedule, compute, sample a fresh token, finish at ``max_tokens``."""
    batch = scheduler.schedule()
    scheduler.complete(batch)
    for s, _ in batch.items:
        if s.num_computed == len(s.token_ids):
            s.token_ids.append(next(_fresh))
            if s.num_generated == max_tokens:
                scheduler.finish(s, "length")
    return [(s.request_id, n) for s, n in batch.items]


def test_max_running_requests_counts_requests_not_samples() -> None:
    scheduler = make(running=2)
    prompt = [1, 2, 3]
    for s in [seq("a", prompt), seq("a", prompt), seq("b", [4, 5, 6]), seq("c", [7, 8, 9])]:
        scheduler.add(s)
    assert step(scheduler) == [("a", 3), ("a", 3), ("b", 3)]  # two requests, three samples
    assert scheduler.num_running_requests == 2 and [s.request_id for s in scheduler.waiting] == ["c"]


def test_a_sample_of_a_running_request_is_admitted_when_the_cap_is_reached() -> None:
    scheduler = make(running=1)
    scheduler.add(seq("a", [1, 2, 3]))
    step(scheduler)
    scheduler.add(seq("b", [4, 5, 6]))
    scheduler.add(seq("a", [1, 2, 3]))
    assert step(scheduler) == [("a", 1)]  # b heads the queue and waits for the cap
    scheduler.waiting.rotate(-1)
    assert step(scheduler) == [("a", 1), ("a", 3)]


def test_decodes_come_first_then_chunks_then_admissions_with_their_cached_prefix() -> None:
    scheduler = make(budget=10)
    first = seq("a", list(range(1, 14)))  # 13 tokens: 3 full pages and one token
    scheduler.add(first)
    assert step(scheduler) == [("a", 10)]
    assert step(scheduler) == [("a", 3)]  # its second chunk; the first token is sampled
    scheduler.add(seq("b", list(range(1, 9)) + [50, 51, 52]))  # shares 2 pages
    assert step(scheduler) == [("a", 1), ("b", 3)]
    assert scheduler.running[1].num_cached_prompt_tokens == 8


def test_complete_caches_the_pages_a_chunk_finished() -> None:
    scheduler = make(budget=6)
    scheduler.add(seq("a", list(range(1, 14))))
    batch = scheduler.schedule()
    scheduler.complete(batch)
    assert scheduler.running[0].num_computed == 6 and scheduler.running[0].num_tree_pages == 1
    assert scheduler.cache.match_prefix(list(range(1, 14))).pages == scheduler.running[0].pages[:1]


def test_a_one_token_chunk_caches_the_page_it_completes() -> None:
    # Regression: only chunks of more than one token entered the radix cache, so a follower sharing the whole
    # prompt matched one page less when the prompt's last chunk was a single token.
    scheduler = make(budget=7)
    prompt = list(range(1, 9))  # 8 tokens: 2 full pages
    scheduler.add(seq("a", prompt))
    assert step(scheduler, max_tokens=20) == [("a", 7)]
    assert step(scheduler, max_tokens=20) == [("a", 1)]  # the last prompt token completes page 2
    assert scheduler.cache.match_prefix(prompt).pages == scheduler.running[0].pages[:2]
    scheduler.add(seq("b", prompt + [30]))
    assert step(scheduler, max_tokens=20) == [("a", 1), ("b", 1)]
    assert scheduler.running[1].num_cached_prompt_tokens == 8


def test_a_prompt_waits_for_the_page_another_is_prefilling() -> None:
    scheduler = make(budget=8)
    shared = list(range(1, 13))
    scheduler.add(seq("a", shared + [20]))
    step(scheduler)  # a computed 8 of its 13 tokens
    scheduler.add(seq("b", shared + [30]))
    assert step(scheduler) == [("a", 5)]  # a is still prefilling page 3 of b's prompt
    assert step(scheduler) == [("a", 1), ("b", 1)]  # b matched all 3 pages
    assert scheduler.running[1].num_cached_prompt_tokens == 12


def test_the_newest_request_is_preempted_and_recomputes_from_what_it_cached() -> None:
    scheduler = make(num_pages=6, budget=8)
    scheduler.add(seq("old", [1, 2, 3, 4]))
    step(scheduler, max_tokens=20)
    scheduler.add(seq("new", list(range(10, 26))))  # 16 tokens: 4 pages, then 1 more to generate into
    for _ in range(3):
        step(scheduler, max_tokens=20)
    assert scheduler.num_preemptions == 0
    while scheduler.num_preemptions == 0:
        step(scheduler, max_tokens=20)
    new = scheduler.waiting[0]
    assert new.request_id == "new" and new.status is SeqStatus.WAITING and new.num_preemptions == 1
    assert new.pages == [] and new.num_computed == 0
    assert len(scheduler.cache.match_prefix(new.token_ids).pages) >= 1  # what it computed stayed cached


def test_a_request_preempted_in_its_own_prefill_reports_no_cached_tokens() -> None:
    scheduler = make(num_pages=12, budget=8)
    scheduler.add(seq("short", [1, 2, 3, 4]))
    scheduler.add(seq("long", list(range(10, 50))))
    while not scheduler.num_preemptions:
        step(scheduler, max_tokens=24)
    long = scheduler.waiting[0]
    while long.status is not SeqStatus.RUNNING:
        step(scheduler, max_tokens=24)
    assert long.num_tree_pages > 0  # re-admitted onto the pages it cached itself
    assert long.num_cached_prompt_tokens == 0


def test_a_request_that_cannot_be_admitted_evicts_nothing() -> None:
    scheduler = make(num_pages=6, budget=64)
    scheduler.add(seq("a", list(range(1, 9))))
    step(scheduler, max_tokens=1)  # finished: its 2 pages stay cached
    scheduler.add(seq("big", list(range(100, 128))))  # needs 7 pages while 4 are free and 2 evictable
    scheduler.add(seq("hold", [7, 7, 7]))
    step(scheduler)
    assert scheduler.num_evicted_pages == 0
    assert len(scheduler.cache.match_prefix(list(range(1, 9))).pages) == 2


def test_pages_from_a_lower_tier_count_as_cached_and_enter_the_cache_after_the_chunk() -> None:
    calls = []

    def host(s: KVSequence, start: int, stop: int) -> int:
        calls.append((start, stop))
        return stop - start

    scheduler = make(extend_prefix=host)
    scheduler.add(seq("a", list(range(1, 11))))  # 10 tokens: 2 full pages below its last token
    assert step(scheduler) == [("a", 2)]
    a = scheduler.running[0]
    assert calls == [(0, 2)] and a.num_cached_prompt_tokens == 8 and len(a.pages) == 3
    assert a.num_tree_pages == 2  # the loaded pages entered the radix cache with the chunk
