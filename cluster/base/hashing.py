"""Page hashing shared by the worker's KV events and the router's prefix index.

Contract: a prompt of token ids is cut into pages of ``page_size`` tokens; only full pages get a hash.
The hash of page ``i`` is a 64-bit digest of the hash of page ``i - 1`` and the page's token ids
(little-endian uint32), so one hash names a whole prefix. The first page chains from a seed derived
from the namespace (model id, adapter), so equal tokens under different models never collide.
Python's salted ``hash()`` is never used: digests are equal across processes and machines.
"""

from __future__ import annotations

import hashlib
import sys
from array import array
from collections.abc import Sequence

_DIGEST_BYTES = 8


def _digest(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=_DIGEST_BYTES).digest(), "little")


def namespace_seed(namespace: str) -> int:
    """The parent hash of a namespace's first page."""
    return _digest(b"radixserve/v1/" + namespace.encode("utf-8"))


def page_hashes(tokens: Sequence[int], page_size: int, parent: int) -> list[int]:
    """Chained hashes of the full pages of ``tokens``, the first chained from ``parent``.

    ``parent`` is ``namespace_seed(ns)`` for a prompt's first page, or the hash of the page before
    ``tokens[0]``. A trailing partial page is ignored.
    """
    if page_size < 1:
        raise ValueError(f"page_size must be >= 1, got {page_size}")
    num_pages = len(tokens) // page_size
    words = array("I", tokens[: num_pages * page_size])  # C unsigned int: 4 bytes wherever CPython runs
    if sys.byteorder == "big":
        words.byteswap()
    raw = words.tobytes()
    page_bytes = page_size * 4
    hashes: list[int] = []
    for i in range(num_pages):
        parent = _digest(parent.to_bytes(_DIGEST_BYTES, "little") + raw[i * page_bytes : (i + 1) * page_bytes])
        hashes.append(parent)
    return hashes
