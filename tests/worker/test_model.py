"""Our Llama against Hugging Face transformers' implementation on the same weights (fp32)."""

from __future__ import annotations

from pathlib import Path

import pytest
import tiny_checkpoints
import torch
from engine_runs import run_to_completion
from transformers import LlamaForCausalLM as HFLlama

from radixserve.cluster.base.config import CacheConfig, EngineConfig
from radixserve.worker.engine import Engine
from radixserve.worker.models.checkpoint import Checkpoint
from radixserve.worker.models.loading import open_checkpoint
from radixserve.worker.models.config import ModelConfig
from radixserve.worker.models.layers import ColumnLinear, RowLinear, Shard
from radixserve.worker.models.llama import LlamaForCausalLM
from radixserve.worker.models.scoring import build_model, prompt_logits
from radixserve.worker.models.reference import transformers_model
from radixserve.cluster.base.sampling_params import SamplingParams

LOGITS_ATOL = 1e-3


def our_logits(checkpoint: Checkpoint, token_ids: list[int]) -> torch.Tensor:
    """Logits [T, vocab] of one prefill from position 0 through our model and a fresh paged KV pool."""
    return prompt_logits(build_model(checkpoint, checkpoint.config.max_position_embeddings), token_ids)


def hf_logits(model: HFLlama, token_ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.tensor([token_ids])).logits[0].float()


def hf_greedy(model: HFLlama, token_ids: list[int], num_tokens: int) -> list[int]:
    """transformers' greedy continuation; the reference model treats eos as an ordinary token."""
    with torch.inference_mode():
        out = model.generate(torch.tensor([token_ids]), attention_mask=torch.ones(1, len(token_ids), dtype=torch.long),
                             max_new_tokens=num_tokens, do_sample=False)
    return out[0, len(token_ids):].tolist()


def engine_greedy(checkpoint: Checkpoint, token_ids: list[int], num_tokens: int) -> list[int]:
    engine = Engine(EngineConfig(model=checkpoint.name, quantization="none", cache=CacheConfig(num_pages=256)), checkpoint)
    request_id = engine.add_request(token_ids, SamplingParams(max_tokens=num_tokens, temperature=0, ignore_eos=True))
    return run_to_completion(engine)[request_id].tokens


def prompt_ids(checkpoint: Checkpoint) -> list[int]:
    text = checkpoint.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Explain why a radix tree helps an LLM server reuse work."}])
    return checkpoint.tokenizer.encode(text)


ROPE_VARIANTS = [
    None,
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
]


@pytest.mark.parametrize("rope_scaling", ROPE_VARIANTS, ids=["default", "linear", "llama3", "yarn"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_tiny_hf_checkpoint_matches_transformers(tmp_path: Path, rope_scaling: dict | None, tied: bool) -> None:
    directory = tiny_checkpoints.write_tiny_hf_checkpoint(tmp_path, rope_scaling=rope_scaling,
                                                          tie_word_embeddings=tied, attention_bias=tied)
    checkpoint = open_checkpoint(directory)
    reference = transformers_model(checkpoint)
    ids = prompt_ids(checkpoint)
    torch.testing.assert_close(our_logits(checkpoint, ids), hf_logits(reference, ids), atol=LOGITS_ATOL, rtol=0)
    assert engine_greedy(checkpoint, ids, 64) == hf_greedy(reference, ids, 64)


def test_tiny_gguf_checkpoint_matches_transformers_on_the_original_weights(tiny_hf_dir: Path,
                                                                          tiny_gguf_path: Path) -> None:
    reference = transformers_model(open_checkpoint(tiny_hf_dir))  # weights as transformers saved them
    checkpoint = open_checkpoint(tiny_gguf_path)  # the same weights, Q/K permuted by the GGUF writer
    ids = prompt_ids(checkpoint)
    torch.testing.assert_close(our_logits(checkpoint, ids), hf_logits(reference, ids), atol=LOGITS_ATOL, rtol=0)
    assert engine_greedy(checkpoint, ids, 64) == hf_greedy(reference, ids, 64)


def test_smollm2_matches_transformers(smollm2_checkpoint: Checkpoint) -> None:
    smollm2 = smollm2_checkpoint
    reference = transformers_model(smollm2)
    ids = prompt_ids(smollm2)
    torch.testing.assert_close(our_logits(smollm2, ids), hf_logits(reference, ids), atol=LOGITS_ATOL, rtol=0)
    assert engine_greedy(smollm2, ids, 64) == hf_greedy(reference, ids, 64)


def test_smollm2_answers_sensibly(smollm2_checkpoint: Checkpoint) -> None:
    smollm2 = smollm2_checkpoint
    # Logit parity alone would not catch a wrong Q/K un-permutation shared by both models.
    text = smollm2.tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    answer = smollm2.tokenizer.decode(engine_greedy(smollm2, smollm2.tokenizer.encode(text), 16))
    assert "Paris" in answer


def test_sharded_linear_loaders_reassemble_the_full_layer() -> None:
    torch.manual_seed(0)
    q, k, x = torch.randn(8, 6), torch.randn(4, 6), torch.randn(3, 6)
    ranks = [ColumnLinear(6, [8, 4], shard=Shard(r, 2)) for r in range(2)]
    for layer in ranks:
        layer.weight.weight_loader(layer.weight, q, 0)
        layer.weight.weight_loader(layer.weight, k, 1)
    outs = [layer(x).split([4, 2], dim=-1) for layer in ranks]
    full_q = torch.cat([o[0] for o in outs], dim=-1)
    full_k = torch.cat([o[1] for o in outs], dim=-1)
    torch.testing.assert_close(full_q, x @ q.T)
    torch.testing.assert_close(full_k, x @ k.T)

    w, h = torch.randn(5, 8), torch.randn(3, 8)
    rows = [RowLinear(8, 5, shard=Shard(r, 2)) for r in range(2)]
    for r, layer in enumerate(rows):
        layer.weight.weight_loader(layer.weight, w)
    partial = sum(layer(h[:, r * 4:(r + 1) * 4]) for r, layer in enumerate(rows))
    torch.testing.assert_close(partial, h @ w.T)


def test_a_model_built_for_a_rank_loads_that_ranks_slices(tiny_hf_dir: Path) -> None:
    # Regression: Shard was never passed to the layers, so every rank of a group would load rank 0's slices.
    checkpoint = open_checkpoint(tiny_hf_dir)
    c = checkpoint.config
    full = LlamaForCausalLM(c, max_len=64)
    full.load_weights(checkpoint.weights())
    ranks = []
    for rank in range(2):
        model = LlamaForCausalLM(c, max_len=64, shard=Shard(rank, 2))
        model.load_weights(checkpoint.weights())
        ranks.append(dict(model.named_parameters()))
    head = c.head_dim
    q, kv = c.num_attention_heads * head, c.num_key_value_heads * head
    for name, param in full.named_parameters():
        parts = [r[name] for r in ranks]
        if name.endswith("qkv_proj.weight"):  # each rank: its q heads, then its k and v heads
            splits = [p.split([q // 2, kv // 2, kv // 2]) for p in parts]
            for i, whole in enumerate(param.split([q, kv, kv])):
                torch.testing.assert_close(torch.cat([s[i] for s in splits]), whole)
        elif name.endswith("gate_up_proj.weight"):
            size = c.intermediate_size
            for i, whole in enumerate(param.split([size, size])):
                torch.testing.assert_close(torch.cat([p.split(size // 2)[i] for p in parts]), whole)
        elif name.endswith(("o_proj.weight", "down_proj.weight")):
            torch.testing.assert_close(torch.cat(parts, dim=1), param)
        else:  # replicated: embedding, norms
            for part in parts:
                torch.testing.assert_close(part, param)
    with pytest.raises(NotImplementedError):
        LlamaForCausalLM(c, max_len=64, shard=Shard(1, 2))(torch.zeros(1, dtype=torch.long), None, None, None)


def test_load_weights_rejects_incomplete_or_unknown_tensors(tiny_hf_dir: Path) -> None:
    checkpoint = open_checkpoint(tiny_hf_dir)
    model = LlamaForCausalLM(checkpoint.config, max_len=64)
    weights = dict(checkpoint.weights())
    weights.pop("model.layers.0.self_attn.k_proj.weight")
    with pytest.raises(ValueError, match="weights"):
        model.load_weights(weights.items())
    weights = dict(checkpoint.weights(), **{"model.extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="weights"):
        model.load_weights(weights.items())


def test_model_config_rejects_bad_heads() -> None:
    with pytest.raises(ValueError, match="num_key_value_heads"):
        ModelConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=3,
                    num_key_value_heads=2, head_dim=4, max_position_embeddings=8)
