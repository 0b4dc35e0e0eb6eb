"""transformers' Llama built from one of our checkpoints: the reference for parity tests and benchmarks.

Needs the ``transformers`` package (the ``test`` extra); nothing in serving imports this module.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from radixserve.worker.models.checkpoint import Checkpoint

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM


def transformers_model(checkpoint: Checkpoint, attn_implementation: str = "sdpa") -> LlamaForCausalLM:
    """A fp32 ``transformers.LlamaForCausalLM`` holding exactly the tensors ``checkpoint.weights()`` yields."""
    from transformers import LlamaConfig, LlamaForCausalLM

    c = checkpoint.config
    rope: dict[str, object] = {"rope_type": "default", "rope_theta": c.rope_theta}
    if c.rope_scaling is not None:
        s = c.rope_scaling
        rope = {"rope_type": s.kind, "rope_theta": c.rope_theta, "factor": s.factor,
                "original_max_position_embeddings": s.original_max_position_embeddings}
        if s.kind == "llama3":
            rope.update(low_freq_factor=s.low_freq_factor, high_freq_factor=s.high_freq_factor)
        if s.kind == "yarn":
            rope.update(beta_fast=s.beta_fast, beta_slow=s.beta_slow, attention_factor=s.attention_factor)
    config = LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim,
        max_position_embeddings=c.max_position_embeddings, rope_parameters=rope, rms_norm_eps=c.rms_norm_eps,
        tie_word_embeddings=c.tie_word_embeddings, attention_bias=c.attention_bias, mlp_bias=c.mlp_bias,
        attn_implementation=attn_implementation,
    )
    model = LlamaForCausalLM(config).eval()
    missing, unexpected = model.load_state_dict(dict(checkpoint.weights()), strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise ValueError(f"weights: transformers expected {missing}, did not expect {unexpected}")
    if c.tie_word_embeddings:
        model.tie_weights()
    model.generation_config.eos_token_id = None  # callers decide when to stop, like ignore_eos
    return model
