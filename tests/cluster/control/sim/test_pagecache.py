from __future__ import annotations

import random
from array import array

import pytest

from radixserve.cluster.base.config import SchedulerConfig
from radixserve.cluster.control.sim.pagecache import PageKeyedCache
from radixserve.worker.kv.allocator import PageAllocator
from radixserve.worker.kv.radix_cache import RadixCache
from radixserve.worker.scheduler import Scheduler
from radixserve.worker.sequence import KVSequence

PAGE = 4
GENERATED = 10_000  # generated token ids start above every block id


def prompts(rng: random.Random, n: int) -> list[list[int]]:
    """Chained block ids (each prompt a prefix of an earlier one plus fresh blocks), as the simulator's tokens:
    block ``b`` is ``b`` repeated, the last block possibly partial."""
    chains: list[list[int]] = [[]]
    fresh = iter(range(1, GENERATED))
    result = []
    for _ in range(n):
        base = rng.choice(chains)
        chain = base[: rng.randint(0, min(len(base), 4))] + [next(fresh) for _ in range(rng.randint(1, 3))]
        chains.append(chain)
        tokens = [b for b in chain for _ in range(PAGE)]
        result.append(tokens[: len(tokens) - rng.randrange(PAGE)])
    return result


def run(cache_type: type, seed: int) -> list[object]:
    """Every decision of a scheduler under memory pressure, on a cache of ``cache_type``."""
    rng = random.Random(seed)
    work = prompts(rng, 40)
    outputs = [rng.randint(1, 16) for _ in work]
    allocator = PageAllocator(14)  # a request needs up to 10 pages
    scheduler = Scheduler(SchedulerConfig(max_num_batched_tokens=16, max_running_requests=6),
                          cache_type(allocator, PAGE, "test"), allocator, PAGE)
    seqs = [KVSequence(str(i), array("I", p), len(p)) for i, p in enumerate(work)]
    trace: list[object] = []
    next_generated = GENERATED
    for t in range(2000):
        if t % 2 == 0 and t // 2 < len(seqs):
            scheduler.add(seqs[t // 2])
        batch = scheduler.schedule()
        scheduler.complete(batch)
        trace.append([(s.request_id, n, tuple(s.pages)) for s, n in batch.items])
        for s, _ in batch.items:
            if s.num_computed == len(s.token_ids):
                s.token_ids.append(next_generated)
                next_generated += 1
                if s.num_generated == outputs[int(s.request_id)]:
                    scheduler.finish(s, "length")
    trace.append([(s.num_cached_prompt_tokens, s.num_preemptions, s.status) for s in seqs])
    trace.append((scheduler.num_evicted_pages, scheduler.num_preemptions, allocator.num_free))
    return trace


@pytest.mark.parametrize("seed", range(4))
def test_the_page_keyed_cache_makes_every_decision_the_token_keyed_one_makes(seed: int) -> None:
    keyed = run(PageKeyedCache, seed)
    assert keyed == run(RadixCache, seed)
    evicted, preempted, _ = keyed[-1]
    assert evicted > 0 and preempted > 0  # the run did put the pool under pressure
    assert all(status.value == "finished" for *_, status in keyed[-2])
