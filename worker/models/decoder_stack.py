"""A step's decoder layers in one native call (the extension's ``DecoderStack``, ``kernels/decoder.cpp``).

A step runs all of a Llama model's layers in one call into the extension: the kernels the layers call one at a time
(block products, RMSNorm, rotary, cache writes, paged attention, SwiGLU), in the same order on the same tensors, so
the outputs are the same bits as the layer-by-layer path; what it removes is the Python and dispatch between them
(half of a batch-1 decode step, measured). It serves models whose linear layers all hold GGUF blocks
(``GGUFMethod``), in float32 on CPU, without biases or tensor parallelism, over a float32 or int8 KV cache:
``DecoderStack.of`` returns None for any other model.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from radixserve.worker.kernels.build import native
from radixserve.worker.kv.pool import KVPool
from radixserve.worker.models.attention import AttentionBatch
from radixserve.worker.models.quantization import GGUFMethod


class DecoderStack:
    """The native stack of a model's layers; ``forward`` is the layers' loop where ``applies``."""

    def __init__(self, stack: Any) -> None:
        self._stack = stack

    @classmethod
    def of(cls, model: nn.Module) -> DecoderStack | None:
        """The stack over a ``LlamaModel``'s layers as they hold their weights now, or None where it cannot serve
        them (this module does not import ``models.llama``, which imports it)."""
        module = native()
        layers = list(model.layers)
        if module is None or not layers or not all(_servable(layer) for layer in layers):
            return None
        attention = layers[0].self_attn
        stack = module.DecoderStack(attention.num_heads, attention.num_kv_heads, attention.head_dim,
                                    layers[0].input_layernorm.eps, attention.scale, model.rotary.cos,
                                    model.rotary.sin)
        for layer in layers:
            mlp = layer.mlp
            stack.add_layer(layer.input_layernorm.weight, layer.post_attention_layernorm.weight,
                            *(_blocks(module, linear) for linear in (layer.self_attn.qkv_proj, layer.self_attn.o_proj,
                                                                     mlp.gate_up_proj, mlp.down_proj)))
        return cls(stack)

    @staticmethod
    def applies(x: torch.Tensor, kv: KVPool) -> bool:
        """Whether the stack computes this step: float32 embeddings on CPU over a float32 or int8 cache."""
        return x.dtype == torch.float32 and x.device.type == "cpu" and kv.k[0].dtype in (torch.float32, torch.int8)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, batch: AttentionBatch,
                kv: KVPool) -> tuple[torch.Tensor, torch.Tensor]:
        """The last layer's ``(output, residual)`` for embeddings ``x`` [T, hidden] (updated in place: it becomes
        the residual stream) at ``positions`` [T] int64, as the layers' loop returns them. Positions that are not
        one per token raise ValueError naming ``positions`` (the native rotary checks them before any write)."""
        scales = (kv.k_scale, kv.v_scale) if kv.quantized else ([], [])
        return self._stack.forward(x, positions, kv.k, kv.v, *scales, batch.slot_mapping, batch.page_table,
                                   batch.query_seqs, batch.context_lens, batch.page_size)


def _servable(layer: nn.Module) -> bool:
    linears = (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj)
    norms = (layer.input_layernorm.weight, layer.post_attention_layernorm.weight)
    return (all(isinstance(linear.method, GGUFMethod) and linear.bias is None and linear.shard.size == 1
                for linear in linears)
            and all(norm.dtype == torch.float32 and norm.device.type == "cpu" for norm in norms))


def _blocks(module: Any, linear: nn.Module) -> Any:
    return module.BlockLinear(linear.blocks, linear.block_type, linear.out_features)
