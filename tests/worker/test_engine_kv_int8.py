"""``engine.kv_cache_dtype = "int8"`` on the real SmolLM2 file: the pool holds over twice the pages of float32 in
the same memory, greedy output mostly matches the float pool's, and stays independent of caching and batching."""

from __future__ import annotations

import pytest
from engine_runs import assert_all_pages_free, run_to_completion

from radixserve.cluster.base.config import CacheConfig, EngineConfig
from radixserve.cluster.base.sampling_params import SamplingParams
from radixserve.worker.engine import Engine
from radixserve.worker.models.checkpoint import Checkpoint

MEMORY_GIB = 0.25
QUESTIONS = ["What is a radix tree?", "Why does batching help throughput?", "What is a KV cache?",
             "Name a prime number larger than 10.", "What does LRU stand for?", "What is the capital of Japan?",
             "How do plants make food?", "Write a haiku about the sea.", "What is 12 times 7?",
             "Explain recursion to a child.", "Who wrote Romeo and Juliet?", "What is the boiling point of water?",
             "Give me three tips for sleeping well.", "What is a black hole?", "Translate 'good morning' to French.",
             "Why is the sky blue?"]
GREEDY = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
# Measured (AMD EPYC, AVX2): 12 of the 16 continuations are token-exact; the other four part at generated token
# 14, 6, 10 and 1, each where the float run's top two log-probabilities are within 0.22 (0.007 at the closest).
# The bound leaves room for another CPU's summation order tipping one or two more such near-ties.
MIN_AGREEING = 10


@pytest.fixture(scope="module")
def engines(smollm2_checkpoint: Checkpoint) -> dict[str, Engine]:
    return {dtype: Engine(EngineConfig(model="smollm2", kv_cache_dtype=dtype, cache=CacheConfig(memory_gib=MEMORY_GIB)),
                          smollm2_checkpoint) for dtype in ("auto", "int8")}


def chat(engine: Engine, question: str) -> list[int]:
    return engine.tokenizer.encode(engine.tokenizer.apply_chat_template([{"role": "user", "content": question}]))


def greedy(engine: Engine, prompts: list[list[int]]) -> list[list[int]]:
    for i, prompt in enumerate(prompts):
        engine.add_request(prompt, GREEDY, f"q{i}")
    done = run_to_completion(engine)
    return [done[f"q{i}"].tokens for i in range(len(prompts))]


def test_the_int8_pool_fits_over_twice_the_pages_in_the_same_memory(engines: dict[str, Engine]) -> None:
    float_pages, int8_pages = engines["auto"].kv.num_pages, engines["int8"].kv.num_pages
    print(f"pages per GiB: float32 {float_pages / MEMORY_GIB:.0f}, int8 {int8_pages / MEMORY_GIB:.0f}")
    assert engines["int8"].kv.quantized and not engines["auto"].kv.quantized
    assert int8_pages >= 2 * float_pages


def test_int8_greedy_output_matches_the_float_pool_on_most_prompts(engines: dict[str, Engine]) -> None:
    prompts = [chat(engines["auto"], q) for q in QUESTIONS]
    expected, got = greedy(engines["auto"], prompts), greedy(engines["int8"], prompts)
    agreeing = sum(a == b for a, b in zip(expected, got, strict=True))
    parted = [next(i for i, (x, y) in enumerate(zip(a, b)) if x != y) for a, b in zip(expected, got) if a != b]
    print(f"int8 KV: {agreeing} of {len(prompts)} greedy continuations token-exact; the others part at {parted}")
    assert agreeing >= MIN_AGREEING
    assert_all_pages_free(engines["int8"])


def test_int8_greedy_output_does_not_depend_on_caching_or_batching(engines: dict[str, Engine]) -> None:
    engine = engines["int8"]
    prompts = [chat(engine, q) for q in QUESTIONS[:4]]
    engine.cache.flush()
    batched = greedy(engine, prompts)  # uncached, together
    for prompt, expected in zip(prompts, batched):  # alone, each with its prompt now cached
        engine.add_request(prompt, GREEDY, "alone")
        done = run_to_completion(engine)["alone"]
        assert done.num_cached_tokens > 0 and done.tokens == expected
    assert_all_pages_free(engine)
