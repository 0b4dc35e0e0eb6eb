"""The KV tensor pool: per layer, one key and one value tensor indexed by cache slot.

Slot ``page * page_size + offset`` holds the key/value of one token; pages are handed out by the
``PageAllocator`` and owned by the radix cache or a running request.
"""

from __future__ import annotations

import torch


class KVPool:
    """``k[layer]`` and ``v[layer]``: [num_pages * page_size, num_kv_heads, head_dim] tensors."""

    def __init__(self, num_layers: int, num_pages: int, page_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        self.num_pages = num_pages
        self.page_size = page_size
        shape = (num_pages * page_size, num_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    @staticmethod
    def page_bytes(num_layers: int, page_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        """Bytes one page takes across all layers, keys and values."""
        return 2 * num_layers * page_size * num_kv_heads * head_dim * dtype.itemsize

    def copy_page(self, src: int, dst: int, num_tokens: int) -> None:
        """Copies the first ``num_tokens`` slots of page ``src`` into page ``dst`` in every layer."""
        s, d = src * self.page_size, dst * self.page_size
        for cache in (*self.k, *self.v):
            cache[d : d + num_tokens] = cache[s : s + num_tokens]
