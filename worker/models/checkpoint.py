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
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator

import torch

from radixserve.worker.models.config import ModelConfig
from radixserve.cluster.base.tokenizer import Tokenizer


class Checkpoint(ABC):
    """A loaded checkpoint's metadata; tensors are read lazily by ``weights()``, which may be called again."""

    def __init__(self, name: str, config: ModelConfig, tokenizer: Tokenizer) -> None:
        self.name = name
        self.config = config
        self.tokenizer = tokenizer

    @abstractmethod
    def weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield every weight under the contract in this module's docstring."""
