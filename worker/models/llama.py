"""A Llama-family decoder over a paged KV cache: grouped-query attention, RoPE, RMSNorm, SwiGLU.

Q/K/V and gate/up projections are fused; ``load_weights`` maps Hugging Face parameter names onto the
fused parameters through each parameter's ``weight_loader``. Built with a ``Shard``, each rank holds its share
of the heads and of the MLP (column-parallel Q/K/V and gate/up, row-parallel O and down); embedding, norms and
LM head are replicated. Built with a ``LinearMethod`` (``models.quantization``), every linear layer, the
embedding and the LM head hold their weights in its form once ``load_weights`` has filled them.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import torch
from torch import nn

from radixserve.worker import kernels
from radixserve.worker.kv.pool import KVPool
from radixserve.worker.models.attention import AttentionBatch, paged_attention
from radixserve.worker.models.checkpoint import BlockWeight
from radixserve.worker.models.config import ModelConfig
from radixserve.worker.models.decoder_stack import DecoderStack
from radixserve.worker.models.layers import ColumnLinear, RMSNorm, RowLinear, Shard, VocabEmbedding
from radixserve.worker.models.quantization import DenseMethod, LinearMethod
from radixserve.worker.models.rope import RotaryEmbedding

# Hugging Face name fragment -> (our fused parameter fragment, shard id within it)
_FUSED = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int, shard: Shard, method: LinearMethod):
        super().__init__()
        self.layer_id = layer_id
        self.num_heads = shard.split(config.num_attention_heads, "num_attention_heads")
        self.num_kv_heads = shard.split(config.num_key_value_heads, "num_key_value_heads")
        self.head_dim = config.head_dim
        q_size, kv_size = config.num_attention_heads * self.head_dim, config.num_key_value_heads * self.head_dim
        self.qkv_proj = ColumnLinear(config.hidden_size, [q_size, kv_size, kv_size], config.attention_bias, shard,
                                     method)
        self.o_proj = RowLinear(q_size, config.hidden_size, config.attention_bias, shard, method)
        self.qk_v_sizes = [(self.num_heads + self.num_kv_heads) * self.head_dim, self.num_kv_heads * self.head_dim]
        self.scale = self.head_dim**-0.5

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rotary: RotaryEmbedding,
                batch: AttentionBatch, kv: KVPool) -> torch.Tensor:
        num_tokens = x.shape[0]
        qk, v = self.qkv_proj(x).split(self.qk_v_sizes, dim=-1)
        qk = rotary(positions, qk.view(num_tokens, self.num_heads + self.num_kv_heads, self.head_dim))
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)  # [T, Hq, D], [T, Hkv, D]
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        out = paged_attention(q, k, v, kv, self.layer_id, batch, self.scale)
        return self.o_proj(out.view(num_tokens, -1))


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig, shard: Shard, method: LinearMethod):
        super().__init__()
        size = config.intermediate_size
        self.gate_up_proj = ColumnLinear(config.hidden_size, [size, size], config.mlp_bias, shard, method)
        self.down_proj = RowLinear(size, config.hidden_size, config.mlp_bias, shard, method)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(kernels.silu_mul(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int, shard: Shard, method: LinearMethod):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, layer_id, shard, method)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config, shard, method)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, positions: torch.Tensor,
                rotary: RotaryEmbedding, batch: AttentionBatch, kv: KVPool) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual stream is carried unsummed: this layer's input is ``x + residual`` (``residual`` None
        on the first layer), its output ``(mlp_out, residual)``; the next norm adds them, in place."""
        if residual is None:
            residual, hidden = x, self.input_layernorm(x)
        else:
            hidden, residual = self.input_layernorm(x, residual)
        hidden, residual = self.post_attention_layernorm(
            self.self_attn(hidden, positions, rotary, batch, kv), residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, max_len: int, shard: Shard, method: LinearMethod):
        super().__init__()
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size, method)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling, max_len)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i, shard, method)
                                    for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, token_ids: torch.Tensor, positions: torch.Tensor, batch: AttentionBatch, kv: KVPool) -> torch.Tensor:
        x = self.embed_tokens(token_ids).to(self.norm.weight.dtype)  # [T, hidden], in the model's dtype
        if self.decoder_stack is not None and self.decoder_stack.applies(x, kv):
            x, residual = self.decoder_stack.forward(x, positions, batch, kv)  # the loop below in one native call
        else:
            residual = None
            for layer in self.layers:
                x, residual = layer(x, residual, positions, self.rotary, batch, kv)
        return self.norm(x, residual)[0]

    @functools.cached_property
    def decoder_stack(self) -> DecoderStack | None:
        """The layers as one native call (``models.decoder_stack``), built on first use, once the weights are loaded
        and cast; None where it cannot serve this model."""
        return DecoderStack.of(self)


class LlamaForCausalLM(nn.Module):
    """The decoder plus LM head. ``forward`` returns final hidden states [T, hidden] for the step's
    tokens; ``compute_logits`` turns the selected rows into fp32 logits [N, vocab].

    ``shard`` places this model in a tensor-parallel group: it loads only its rank's slices. Running such a shard
    needs the group's all-reduce after each row-parallel layer, which no runner provides yet, so ``forward``
    refuses when ``shard.size`` > 1.
    """

    def __init__(self, config: ModelConfig, max_len: int, shard: Shard = Shard(),
                 method: LinearMethod = DenseMethod()):
        super().__init__()
        self.config = config
        self.shard = shard
        self.model = LlamaModel(config, max_len, shard, method)
        self.lm_head = (None if config.tie_word_embeddings
                        else ColumnLinear(config.hidden_size, [config.vocab_size], method=method))

    def forward(self, token_ids: torch.Tensor, positions: torch.Tensor, batch: AttentionBatch, kv: KVPool) -> torch.Tensor:
        if self.shard.size > 1:
            raise NotImplementedError("forward of a tensor-parallel shard: no runner all-reduces across ranks yet")
        return self.model(token_ids, positions, batch, kv)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.lm_head is None:
            return self.model.embed_tokens.logits(hidden).float()
        return self.lm_head(hidden).float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor | BlockWeight]]) -> None:
        """Copies Hugging Face-named tensors into the parameters (every parameter must be filled once), then
        lets each layer's ``LinearMethod`` put its weight in the method's form."""
        params = dict(self.named_parameters())
        expected = {name: 0 for name in params}
        for hf_name, tensor in weights:
            name, shard_id = _our_name(hf_name)
            if name not in params:
                raise ValueError(f"weights: unexpected checkpoint tensor {hf_name!r}")
            param = params[name]
            param.weight_loader(param, tensor, shard_id)  # each loader casts to its parameter's dtype
            expected[name] += 1
        missing = [n for n, count in expected.items() if count != getattr(params[n], "num_shards", 1)]
        if missing:
            raise ValueError(f"weights: checkpoint lacks tensors for {missing[:5]}")
        for module in self.modules():
            method = getattr(module, "method", None)
            if isinstance(method, LinearMethod):
                method.process_weights_after_loading(module)


def _our_name(hf_name: str) -> tuple[str, int]:
    for fragment, (fused, shard_id) in _FUSED.items():
        if f".{fragment}." in hf_name:
            return hf_name.replace(fragment, fused), shard_id
    return hf_name, 0
