"""A model built from a checkpoint, and its log-likelihood of a token sequence (perplexity).

``build_model`` is how the engine makes its model: the checkpoint's float weights loaded, put in the linear
method's form (``models.quantization``), the remaining parameters cast to the engine's dtype. ``prompt_logits``
runs one prefill from position 0 over a private paged KV pool; ``perplexity`` scores a long text window by
window with it, as quality checks of quantized weights need.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
from collections.abc import Sequence

import torch

from radixserve.worker.kv.pool import KVPool
from radixserve.worker.models.attention import AttentionBatch
from radixserve.worker.models.checkpoint import Checkpoint
from radixserve.worker.models.llama import LlamaForCausalLM
from radixserve.worker.models.quantization import DenseMethod, LinearMethod

_PAGE_SIZE = 16


def build_model(checkpoint: Checkpoint, max_len: int, dtype: torch.dtype = torch.float32,
                device: torch.device | str = "cpu", method: LinearMethod = DenseMethod()) -> LlamaForCausalLM:
    """The checkpoint's model in eval mode, its linear layers held by ``method``."""
    with torch.device(device):
        model = LlamaForCausalLM(checkpoint.config, max_len, method=method)
    model.load_weights(checkpoint.weights(blocks=method.takes_blocks))
    for param in model.parameters():  # RoPE tables and quantized weights are buffers: they keep their dtypes
        param.data = param.data.to(dtype)
    _return_freed_memory()
    return model.eval()


def _return_freed_memory() -> None:
    """Hand the float weights that quantization freed back to the OS: glibc keeps freed small-block heap memory
    in its arenas, which an int8 engine measured as 222 MiB of resident memory it no longer used."""
    name = ctypes.util.find_library("c")
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError, TypeError):  # not glibc: nothing to trim this way
        pass


@torch.inference_mode()
def prompt_logits(model: LlamaForCausalLM, token_ids: Sequence[int]) -> torch.Tensor:
    """fp32 logits [len(token_ids), vocab] of one prefill from position 0 (row i predicts token i + 1)."""
    c = model.config
    device = model.model.norm.weight.device
    dtype = model.model.norm.weight.dtype
    num_pages = -(-len(token_ids) // _PAGE_SIZE)
    kv = KVPool(c.num_hidden_layers, num_pages, _PAGE_SIZE, c.num_key_value_heads, c.head_dim, dtype, device)
    slots = torch.arange(len(token_ids), device=device)
    batch = AttentionBatch(slots, torch.arange(num_pages, device=device).unsqueeze(0),
                           torch.zeros_like(slots), slots + 1, _PAGE_SIZE)
    hidden = model(torch.tensor(list(token_ids), device=device), slots, batch, kv)
    return model.compute_logits(hidden)


def perplexity(model: LlamaForCausalLM, token_ids: Sequence[int], window: int = 1024) -> float:
    """exp of the mean negative log-likelihood of ``token_ids``, scored in disjoint windows of ``window`` tokens,
    each from its own start (so the first token of each window is context only, never scored)."""
    if window < 2:
        raise ValueError(f"window: must be >= 2, got {window}")
    total, count = 0.0, 0
    for start in range(0, len(token_ids) - 1, window):
        chunk = list(token_ids[start:start + window])
        if len(chunk) < 2:
            break
        logprobs = torch.log_softmax(prompt_logits(model, chunk)[:-1], dim=-1)
        targets = torch.tensor(chunk[1:], device=logprobs.device)
        total -= logprobs.gather(1, targets.unsqueeze(1)).sum().item()
        count += len(chunk) - 1
    if count == 0:
        raise ValueError("token_ids: at least 2 tokens are needed")
    return math.exp(total / count)
