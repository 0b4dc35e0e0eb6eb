"""A step's layers in one native call (``models.decoder_stack``) give the layer-by-layer path's bits."""

from __future__ import annotations

import pytest
import torch
from engine_runs import run_to_completion

from radixserve.cluster.base.config import CacheConfig, EngineConfig, SchedulerConfig
from radixserve.cluster.base.sampling_params import SamplingParams
from radixserve.worker.engine import Engine
from radixserve.worker.models.attention import AttentionBatch
from radixserve.worker.models.checkpoint import Checkpoint
from radixserve.worker.models.decoder_stack import DecoderStack

PROMPTS = [[17, 402, 9, 3311, 88, 1204, 5], [640, 23, 23, 871, 4000, 12, 99, 5012, 7, 310, 6, 222, 1450],
           [77, 5, 4001, 16, 900]]
GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, logprobs=0)


def _engine(checkpoint: Checkpoint, quantization: str, kv_cache_dtype: str = "auto") -> Engine:
    return Engine(EngineConfig(model="smollm2", quantization=quantization, kv_cache_dtype=kv_cache_dtype,
                               cache=CacheConfig(memory_gib=0.1),
                               scheduler=SchedulerConfig(max_num_batched_tokens=256)), checkpoint)


def _run(engine: Engine) -> list[tuple[list[int], list[float]]]:
    engine.cache.flush()
    ids = [engine.add_request(prompt, GREEDY) for prompt in PROMPTS]
    done = run_to_completion(engine)
    return [(done[i].tokens, [entry.logprob for entry in done[i].samples[0].logprobs]) for i in ids]


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8"])
def test_the_stack_gives_the_layer_loops_tokens_and_log_probabilities_bit_for_bit(
        smollm2_checkpoint: Checkpoint, monkeypatch: pytest.MonkeyPatch, kv_cache_dtype: str) -> None:
    engine = _engine(smollm2_checkpoint, "gguf", kv_cache_dtype)
    model = engine.model.model
    stack = model.decoder_stack
    assert stack is not None
    calls = []
    original = stack.forward
    monkeypatch.setattr(stack, "forward", lambda *args: calls.append(args[0].shape[0]) or original(*args))
    fused = _run(engine)
    # the prefill of the three prompts in one step, then their decode steps, all went through it
    assert calls == [sum(map(len, PROMPTS))] + [len(PROMPTS)] * (GREEDY.max_tokens - 1)
    model.__dict__["decoder_stack"] = None  # the layer loop only
    assert _run(engine) == fused


def test_the_stack_serves_only_models_held_in_blocks(smollm2_checkpoint: Checkpoint) -> None:
    assert _engine(smollm2_checkpoint, "none").model.model.decoder_stack is None
    assert DecoderStack.of(_engine(smollm2_checkpoint, "gguf").model.model) is not None


def test_the_stack_refuses_caches_that_do_not_match_its_layers(smollm2_checkpoint: Checkpoint) -> None:
    engine = _engine(smollm2_checkpoint, "gguf")
    stack = engine.model.model.decoder_stack._stack
    x, empty = torch.zeros(1, 576), torch.zeros(1, dtype=torch.int64)
    with pytest.raises(RuntimeError, match="caches: "):
        stack.forward(x, empty, engine.kv.k[:2], engine.kv.v[:2], [], [], empty, torch.zeros(1, 1, dtype=torch.int64),
                      empty, torch.ones(1, dtype=torch.int64), engine.kv.page_size)


@pytest.mark.parametrize("num_positions", [1, 3])
def test_the_stack_refuses_positions_that_do_not_match_the_tokens(smollm2_checkpoint: Checkpoint,
                                                                  num_positions: int) -> None:
    # Regression: the native stack read a position for each token however many there were.
    engine = _engine(smollm2_checkpoint, "gguf")
    stack = engine.model.model.decoder_stack
    tokens = 2
    batch = AttentionBatch(slot_mapping=torch.arange(tokens), page_table=torch.zeros(1, 1, dtype=torch.int64),
                           query_seqs=torch.zeros(tokens, dtype=torch.int64),
                           context_lens=torch.arange(1, tokens + 1), page_size=engine.kv.page_size)
    with pytest.raises(ValueError, match=f"^positions: {num_positions} for {tokens} tokens"):
        stack.forward(torch.zeros(tokens, 576), torch.arange(num_positions), batch, engine.kv)
