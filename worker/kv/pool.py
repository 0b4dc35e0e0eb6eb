"""The KV tensor pool: per layer, one key and one value tensor indexed by cache slot.

Slot ``page * page_size + offset`` holds the key/value of one token; pages are handed out by the
``PageAllocator`` and owned by the radix cache or a running request. The pool holds them in the engine's dtype
(``kv_cache_dtype = "auto"``) or in int8 with a float32 scale per slot and KV head (``"int8"``, ``kv.int8``);
``write`` quantizes a step's rows, and attention reads either form in place (``kernels.paged_attention``).
"""

from __future__ import annotations

import torch

from radixserve.cluster.base.config import KV_CACHE_DTYPES
from radixserve.worker.kv import int8

_SCALE_DTYPE = torch.float32


class KVPool:
    """``k[layer]`` and ``v[layer]``: [num_pages * page_size, num_kv_heads, head_dim] tensors, in ``dtype``, or in
    int8 when ``kv_cache_dtype`` is ``"int8"``; then ``k_scale[layer]`` and ``v_scale[layer]`` are their float32
    scales [num_pages * page_size, num_kv_heads] (None otherwise)."""

    def __init__(self, num_layers: int, num_pages: int, page_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str, kv_cache_dtype: str = "auto") -> None:
        if kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype: must be one of {KV_CACHE_DTYPES}, got {kv_cache_dtype!r}")
        self.num_pages = num_pages
        self.page_size = page_size
        self.quantized = kv_cache_dtype == "int8"
        shape = (num_pages * page_size, num_kv_heads, head_dim)
        storage = torch.int8 if self.quantized else dtype
        self.k = _zeros(num_layers, shape, storage, device)
        self.v = _zeros(num_layers, shape, storage, device)
        self.k_scale = _zeros(num_layers, shape[:2], _SCALE_DTYPE, device) if self.quantized else None
        self.v_scale = _zeros(num_layers, shape[:2], _SCALE_DTYPE, device) if self.quantized else None

    @staticmethod
    def page_bytes(num_layers: int, page_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                   kv_cache_dtype: str = "auto") -> int:
        """Bytes one page takes across all layers, keys and values (and their scales when int8)."""
        if kv_cache_dtype == "int8":
            head_bytes = head_dim * torch.int8.itemsize + _SCALE_DTYPE.itemsize
        else:
            head_bytes = head_dim * dtype.itemsize
        return 2 * num_layers * page_size * num_kv_heads * head_bytes

    def write(self, layer: int, slot_mapping: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Stores a step's keys and values k/v [T, Hkv, D] at the slots ``slot_mapping`` [T] of ``layer``,
        quantized when int8."""
        if not self.quantized:
            self.k[layer].index_copy_(0, slot_mapping, k)
            self.v[layer].index_copy_(0, slot_mapping, v)
            return
        for cache, scales, x in ((self.k[layer], self.k_scale[layer], k), (self.v[layer], self.v_scale[layer], v)):
            values, row_scales = int8.quantize(x)
            cache.index_copy_(0, slot_mapping, values)
            scales.index_copy_(0, slot_mapping, row_scales)

    def copy_page(self, src: int, dst: int, num_tokens: int) -> None:
        """Copies the first ``num_tokens`` slots of page ``src`` into page ``dst`` in every layer (with their
        scales when int8)."""
        s, d = src * self.page_size, dst * self.page_size
        for cache in (*self.k, *self.v, *(self.k_scale or ()), *(self.v_scale or ())):
            cache[d : d + num_tokens] = cache[s : s + num_tokens]


def _zeros(num_layers: int, shape: tuple[int, ...], dtype: torch.dtype,
           device: torch.device | str) -> list[torch.Tensor]:
    return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
