"""The engine's radix cache keyed by one token per page: the scheduler's prefix cache at a cost per page.

``PageKeyedCache`` is the real ``RadixCache`` with ``page_size`` 1 whose key for each page of ``page_size`` tokens
is the page's last token; only ``match_prefix``, ``cached_prefix_len`` and ``insert``, the calls that take tokens,
translate. That is
exact whenever a page's last token, with the pages before it, fixes the page's tokens, which the simulator's token
ids guarantee (``worker.SimSeq``): then every match, insert, lock and eviction, and every page and node, is the one
a ``RadixCache`` over the whole tokens with ``page_size`` tokens a page would give, while matching a 512-token page
costs one key, not 512. KV events name a page by the chained hash of the keys up to it:
``page_hashes(keys, 1, namespace_seed(namespace))``.
"""

from __future__ import annotations

from collections.abc import Sequence

from radixserve.worker.kv.allocator import PageAllocator
from radixserve.worker.kv.radix_cache import InsertResult, MatchResult, RadixCache


class PageKeyedCache(RadixCache):
    """A ``RadixCache`` (pages from ``allocator``, events under ``namespace``) over pages of ``page_size`` tokens."""

    def __init__(self, allocator: PageAllocator, page_size: int, namespace: str) -> None:
        super().__init__(allocator, 1, namespace)
        self._tokens_per_page = page_size

    def keys(self, tokens: Sequence[int]) -> Sequence[int]:
        """The key of each full page of ``tokens``: its last token."""
        return tokens[self._tokens_per_page - 1 :: self._tokens_per_page]

    def match_prefix(self, tokens: Sequence[int]) -> MatchResult:
        return super().match_prefix(self.keys(tokens))

    def cached_prefix_len(self, tokens: Sequence[int]) -> int:
        return super().cached_prefix_len(self.keys(tokens)) * self._tokens_per_page

    def insert(self, tokens: Sequence[int], pages: Sequence[int]) -> InsertResult:
        if len(tokens) != len(pages) * self._tokens_per_page:
            raise ValueError(f"tokens: length {len(tokens)} != len(pages) * page_size = "
                             f"{len(pages)} * {self._tokens_per_page}")
        return super().insert(self.keys(tokens), pages)
