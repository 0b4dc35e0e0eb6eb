"""A model on disk: its architecture, tokenizer and weights, whatever the file format.

Weights contract (every loader): ``weights()`` yields ``(name, tensor)`` pairs, each tensor float32, on the CPU,
contiguous, shaped ``[out_features, in_features]`` for projections (``[vocab, hidden]`` for the embedding,
``[hidden]`` for norms), under Hugging Face Llama names::

    model.embed_tokens.weight
    model.layers.{i}.input_layernorm.weight
    model.layers.{i}.self_attn.{q,k,v,o}_proj.weight      (+ .bias when config.attention_bias)
    model.layers.{i}.post_attention_layernorm.weight
    model.layers.{i}.mlp.{gate,up,down}_proj.weight       (+ .bias when config.mlp_bias)
    model.norm.weight
    lm_head.weight                                        (absent when config.tie_word_embeddings)

Rows of ``q_proj``/``k_proj`` are in Hugging Face's rotate-half order: within each head, the first ``head_dim / 2``
rows pair with the last ``head_dim / 2`` rows for rotary embedding. Each name is yielded once; the order is the
file's.

``weights(blocks=True)`` asks for quantized tensors as the file holds them: a GGUF tensor stored in Q8_0, Q4_0 or
Q4_1 blocks then comes as a ``BlockWeight`` (the same name, shape and row order; every other tensor as above).
Formats without such blocks ignore the flag.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from radixserve.worker.kernels import blocks as block_kernels
from radixserve.worker.models.config import ModelConfig
from radixserve.cluster.base.tokenizer import Tokenizer


@dataclass(frozen=True)
class BlockWeight:
    """A 2-D weight [rows, in_features] held in GGUF blocks: ``data`` uint8 [rows, row_bytes] in ggml's layout
    (as the file stores it), ``block_type`` ggml's type id (``kernels.blocks.BLOCK_TYPES``). Sliced like a tensor
    along either dimension, columns only at block boundaries, so tensor-parallel loaders shard it as they shard
    float weights."""

    data: torch.Tensor
    block_type: int
    in_features: int

    def __post_init__(self) -> None:
        expected = block_kernels.row_bytes(self.block_type, self.in_features)
        if self.data.dtype != torch.uint8 or self.data.dim() != 2 or self.data.shape[1] != expected:
            raise ValueError(f"blocks: {tuple(self.data.shape)} {self.data.dtype} is not [rows, {expected}] uint8")

    @property
    def shape(self) -> tuple[int, int]:
        return self.data.shape[0], self.in_features

    def narrow(self, dim: int, start: int, length: int) -> BlockWeight:
        if dim == 0:
            return BlockWeight(self.data.narrow(0, start, length), self.block_type, self.in_features)
        if start % block_kernels.BLOCK_SIZE or length % block_kernels.BLOCK_SIZE:
            raise ValueError(f"blocks: columns [{start}, {start + length}) do not fall on blocks of "
                             f"{block_kernels.BLOCK_SIZE}")
        per_block = block_kernels.BLOCK_BYTES[self.block_type]
        data = self.data.narrow(1, start // block_kernels.BLOCK_SIZE * per_block,
                                length // block_kernels.BLOCK_SIZE * per_block)
        return BlockWeight(data.contiguous(), self.block_type, length)

    def dequantize(self) -> torch.Tensor:
        """The float32 [rows, in_features] weight."""
        packed = block_kernels.repack(self.data, self.block_type)
        return block_kernels.dequantize(packed, self.block_type, self.in_features)[: self.data.shape[0]]


class Checkpoint(ABC):
    """A loaded checkpoint's metadata; tensors are read lazily by ``weights()``, which may be called again."""

    def __init__(self, name: str, config: ModelConfig, tokenizer: Tokenizer) -> None:
        self.name = name
        self.config = config
        self.tokenizer = tokenizer

    @property
    def has_blocks(self) -> bool:
        """Whether ``weights(blocks=True)`` yields any ``BlockWeight`` (only GGUF files can)."""
        return False

    @abstractmethod
    def weights(self, blocks: bool = False) -> Iterator[tuple[str, torch.Tensor | BlockWeight]]:
        """Yield every weight under the contract in this module's docstring."""
