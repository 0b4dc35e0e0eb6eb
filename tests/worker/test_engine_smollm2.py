"""Greedy exactness of the engine on the real SmolLM2 file: cached, chunked and batched runs agree token for token,
with the float weights and with the file's own blocks (``gguf``). The block kernel and the attention kernel compute
each token's result in one fixed order whatever the step holds, so under ``gguf`` the runs agree bit for bit; the
float GEMM's blocking follows the batch, so under ``none`` they agree in the tokens, not in every last bit."""

from __future__ import annotations

import pytest
from engine_runs import assert_all_pages_free, run_to_completion

from radixserve.cluster.base.config import CacheConfig, EngineConfig, SchedulerConfig
from radixserve.worker.engine import Engine
from radixserve.worker.models.checkpoint import Checkpoint
from radixserve.cluster.base.sampling_params import SamplingParams

SYSTEM = ("You are a concise assistant for a team that runs a large language model serving cluster. Answer in "
          "plain words, prefer short sentences, and say so when you are not sure. The team cares about latency, "
          "throughput and cost, and about reusing the key-value cache of prompts that share a prefix.")
QUESTIONS = ["What is a radix tree?", "Why does batching help throughput?", "Name a prime number larger than 10.",
             "What is the capital of Japan?"]
GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module", params=["none", "gguf"])
def engine(smollm2_checkpoint: Checkpoint, request: pytest.FixtureRequest) -> Engine:
    config = EngineConfig(model="smollm2", quantization=request.param, cache=CacheConfig(memory_gib=0.5),
                          scheduler=SchedulerConfig(max_num_batched_tokens=512))
    return Engine(config, smollm2_checkpoint)


def chat(engine: Engine, question: str) -> list[int]:
    text = engine.tokenizer.apply_chat_template([{"role": "system", "content": SYSTEM},
                                                 {"role": "user", "content": question}])
    return engine.tokenizer.encode(text)


def alone(engine: Engine, prompt: list[int]) -> tuple[list[int], int]:
    engine.add_request(prompt, GREEDY, "alone")
    done = run_to_completion(engine)["alone"]
    return done.tokens, done.num_cached_tokens


def test_smollm2_greedy_output_does_not_depend_on_caching_chunking_or_batching(engine: Engine) -> None:
    prompts = [chat(engine, q) for q in QUESTIONS]
    uncached = []
    for prompt in prompts:
        engine.cache.flush()
        tokens, num_cached = alone(engine, prompt)
        assert num_cached == 0
        uncached.append(tokens)

    engine.cache.flush()
    alone(engine, prompts[0])
    for prompt, expected in zip(prompts, uncached):  # the system prompt (at least) is now cached
        tokens, num_cached = alone(engine, prompt)
        assert num_cached >= 48 and tokens == expected

    engine.cache.flush()
    engine.scheduler.config = SchedulerConfig(max_num_batched_tokens=13)  # prefill in 13-token chunks
    assert alone(engine, prompts[1])[0] == uncached[1]
    engine.scheduler.config = SchedulerConfig(max_num_batched_tokens=512)

    engine.cache.flush()
    others = [SamplingParams(max_tokens=8 + i % 17, temperature=0.9, top_p=0.95, seed=i)
              for i in range(32 - len(prompts))]  # a batch of 32
    for i, prompt in enumerate(prompts):
        engine.add_request(prompt, GREEDY, f"greedy-{i}")
    for i, params in enumerate(others):
        engine.add_request(chat(engine, f"Write a line about the number {i}."), params, f"other-{i}")
    done = run_to_completion(engine)
    assert len(done) == 32
    for i, expected in enumerate(uncached):
        assert done[f"greedy-{i}"].tokens == expected, QUESTIONS[i]
    assert_all_pages_free(engine)
