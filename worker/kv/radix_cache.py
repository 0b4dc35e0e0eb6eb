"""Radix prefix cache: a tree over token ids whose nodes own KV pages, with LRU eviction.

The tree is page-granular. Every node's key is a whole number of pages and the node owns one KV page
per ``page_size`` tokens of it (page ``i`` holds ``key[i * page_size:(i + 1) * page_size]``); children
are keyed by their first page, so a split only ever happens at a page boundary.

Ownership: pages the tree adopts in ``insert`` belong to it until ``evict``/``flush`` hands them back
to the allocator. A node with ``lock_count > 0`` (every ancestor of a locked node has one too) is never
trimmed or removed; an unlocked node may be trimmed or removed by any ``evict``, so hold a lock on a
node for as long as its pages or the node itself are in use.

Splits keep node identity at the end: when a node is split, the object passed around keeps the lower
part (it still ends at the same token position, its ``key_len`` and ``parent`` change) and a new node
takes the upper part with the same lock count, so a held ``lock``/``unlock`` pair stays balanced.

Every change to the cached page set is recorded as a ``KVEvent`` carrying chained page hashes
(``radixserve.cluster.base.hashing``): the hash of page ``k`` of a cached sequence equals
``page_hashes(tokens, page_size, namespace_seed(namespace))[k]``, which the router recomputes.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from radixserve.cluster.base.hashing import namespace_seed, page_hashes
from radixserve.worker.kv.allocator import PageAllocator

_EVENT_KINDS = ("stored", "removed")
_HEAP_SLACK = 64  # stale heap entries tolerated beyond 2 per node before compaction


@dataclass(frozen=True)
class KVEvent:
    """Pages entered (``stored``) or left (``removed``) the cache, named by their chained hashes."""

    kind: Literal["stored", "removed"]
    page_hashes: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.kind not in _EVENT_KINDS:
            raise ValueError(f"kind: must be one of {_EVENT_KINDS}, got {self.kind!r}")


class TreeNode:
    """A run of whole cached pages. Read-only to callers: ``lock_count``, ``parent``, ``key_len``."""

    __slots__ = ("_key", "_pages", "_hashes", "_children", "_parent", "_lock_count", "_last_access", "_id")

    def __init__(
        self,
        node_id: int,
        parent: TreeNode | None,
        key: tuple[int, ...],
        pages: list[int],
        hashes: list[int],
        last_access: int = 0,
        lock_count: int = 0,
    ) -> None:
        self._id = node_id  # creation order; breaks ties in access time
        self._parent = parent  # None for the root and for nodes removed from the tree
        self._key = key
        self._pages = pages
        self._hashes = hashes
        self._children: dict[tuple[int, ...], TreeNode] = {}
        self._lock_count = lock_count
        self._last_access = last_access

    @property
    def lock_count(self) -> int:
        """Locks held on this node or a descendant; > 0 means never evicted."""
        return self._lock_count

    @property
    def parent(self) -> TreeNode | None:
        """The node before this one; None for the root and for evicted nodes."""
        return self._parent

    @property
    def key_len(self) -> int:
        """Tokens in this node's own key (a multiple of page_size), not counting its ancestors."""
        return len(self._key)


@dataclass(frozen=True)
class MatchResult:
    """The cached pages of the longest whole-page prefix, and the node ending exactly there."""

    pages: list[int]
    node: TreeNode


@dataclass(frozen=True)
class InsertResult:
    """The tree's pages for the whole inserted key; the first ``num_existing_pages`` were cached before."""

    num_existing_pages: int
    pages: list[int]
    node: TreeNode


_HeapEntry = tuple[int, int, TreeNode]  # (last_access, node id, node)


class RadixCache:
    """Prefix cache over one namespace (model, adapter) whose pages come from ``allocator``."""

    def __init__(self, allocator: PageAllocator, page_size: int, namespace: str) -> None:
        if page_size < 1:
            raise ValueError(f"page_size: must be >= 1, got {page_size}")
        self._allocator = allocator
        self._page_size = page_size
        self._seed = namespace_seed(namespace)
        self._root = TreeNode(0, None, (), [], [])
        self._next_id = 1
        self._clock = 0
        # Candidates for eviction, with lazy invalidation: an entry counts only while its node is
        # still in the tree, an unlocked leaf, and not accessed since the entry was pushed.
        self._heap: list[_HeapEntry] = []
        self._num_nodes = 0
        self._num_cached_pages = 0
        self._num_locked_pages = 0
        self._events: list[KVEvent] = []

    @property
    def num_cached_pages(self) -> int:
        """Pages owned by the tree."""
        return self._num_cached_pages

    @property
    def num_locked_pages(self) -> int:
        """Pages in nodes with a lock count > 0."""
        return self._num_locked_pages

    @property
    def num_evictable_pages(self) -> int:
        """Pages in unlocked nodes: exactly what ``flush`` would free."""
        return self._num_cached_pages - self._num_locked_pages

    def page_hashes(self) -> frozenset[int]:
        """The chained hash of every page in the tree: what a router's index should hold for this cache."""
        hashes: set[int] = set()
        stack = [self._root]
        while stack:
            node = stack.pop()
            hashes.update(node._hashes)
            stack.extend(node._children.values())
        return frozenset(hashes)

    def match_prefix(self, tokens: Sequence[int]) -> MatchResult:
        """The longest cached prefix of ``tokens`` (Python ints) in whole pages; marks it most recently used.

        Tokens past the last full page are ignored. A match ending inside a node splits it so that
        ``result.node`` ends exactly at the match; ``result.node`` is the root when nothing matched.
        """
        key = tuple(tokens[: len(tokens) // self._page_size * self._page_size])
        node, pages = self._descend(key)
        self._touch(node)
        return MatchResult(pages, node)

    def cached_prefix_len(self, tokens: Sequence[int]) -> int:
        """How many leading tokens of ``tokens`` (whole pages) the cache holds; changes nothing (no split, no LRU
        touch), so it suits estimates such as load reports."""
        ps = self._page_size
        key = tuple(tokens[: len(tokens) // ps * ps])
        node, pos = self._root, 0
        while pos + ps <= len(key):
            child = node._children.get(key[pos : pos + ps])
            if child is None:
                break
            num_same = self._num_same_pages(child._key, key, pos)
            pos += num_same * ps
            if num_same < len(child._pages):
                break
            node = child
        return pos

    def insert(self, tokens: Sequence[int], pages: Sequence[int]) -> InsertResult:
        """Cache ``tokens`` (Python ints) whose KV is in ``pages``; marks the key most recently used.

        Requires ``len(tokens) == len(pages) * page_size``. The leading ``result.num_existing_pages``
        pages were already cached and keep the tree's pages: each caller page ``pages[i]`` that differs
        from ``result.pages[i]`` is still the caller's to free. The rest of ``pages`` is adopted as a
        new node, reported in one ``stored`` event.
        """
        if len(tokens) != len(pages) * self._page_size:
            raise ValueError(
                f"tokens: length {len(tokens)} != len(pages) * page_size = {len(pages)} * {self._page_size}"
            )
        key = tuple(tokens)
        node, tree_pages = self._descend(key)
        num_existing_pages = len(tree_pages)
        if num_existing_pages < len(pages):
            node = self._add_leaf(node, key[num_existing_pages * self._page_size :], list(pages[num_existing_pages:]))
            tree_pages.extend(node._pages)
        self._touch(node)
        return InsertResult(num_existing_pages, tree_pages, node)

    def lock(self, node: TreeNode) -> None:
        """Protect ``node`` and its ancestors from eviction until the matching ``unlock``."""
        self._check_in_tree(node)
        while node is not self._root:
            if node._lock_count == 0:
                self._num_locked_pages += len(node._pages)
            node._lock_count += 1
            node = node._parent

    def unlock(self, node: TreeNode) -> None:
        """Release one ``lock(node)``; ValueError if ``node`` holds no lock."""
        self._check_in_tree(node)
        if node is not self._root and node._lock_count == 0:
            raise ValueError("node: unlock without a matching lock")
        while node is not self._root:
            assert node._lock_count > 0, "an ancestor holds fewer locks than its descendant"
            node._lock_count -= 1
            if node._lock_count == 0:
                self._num_locked_pages -= len(node._pages)
                self._offer(node)
            node = node._parent

    def evict(self, num_pages: int) -> int:
        """Free ``min(num_pages, num_evictable_pages)`` pages from least recently used unlocked leaves.

        A leaf owning more pages than still needed loses only its tail pages and stays cached.
        Each removed run of pages is reported in one ``removed`` event. Returns the pages freed.
        """
        if num_pages < 0:
            raise ValueError(f"num_pages: must be >= 0, got {num_pages}")
        num_freed = 0
        while num_freed < num_pages and self._heap:
            entry = heapq.heappop(self._heap)
            if self._is_current(entry):
                num_freed += self._drop_tail(entry[2], num_pages - num_freed)
        return num_freed

    def flush(self) -> int:
        """Evict every unlocked page; returns how many were freed."""
        return self.evict(self.num_evictable_pages)

    def take_events(self) -> list[KVEvent]:
        """The events since the last call, oldest first; clears them."""
        events, self._events = self._events, []
        return events

    def _descend(self, key: tuple[int, ...]) -> tuple[TreeNode, list[int]]:
        """The node ending at the longest cached whole-page prefix of ``key`` (split if needed), and its pages."""
        ps = self._page_size
        node, pos, pages = self._root, 0, []
        while pos + ps <= len(key):
            child = node._children.get(key[pos : pos + ps])
            if child is None:
                break
            num_same = self._num_same_pages(child._key, key, pos)
            if num_same < len(child._pages):
                child = self._split(child, num_same)
            pages.extend(child._pages)
            pos += child.key_len
            node = child
        return node, pages

    def _num_same_pages(self, node_key: tuple[int, ...], key: tuple[int, ...], pos: int) -> int:
        """Leading whole pages of ``node_key`` equal to ``key[pos:]``; the first is known equal."""
        ps = self._page_size
        limit = min(len(node_key), len(key) - pos) // ps
        num_same = 1
        while num_same < limit and node_key[num_same * ps : (num_same + 1) * ps] == key[
            pos + num_same * ps : pos + (num_same + 1) * ps
        ]:
            num_same += 1
        return num_same

    def _split(self, node: TreeNode, num_pages: int) -> TreeNode:
        """Move ``node``'s first ``num_pages`` pages into a new parent node, which is returned."""
        cut = num_pages * self._page_size
        upper = TreeNode(
            self._new_id(),
            node._parent,
            node._key[:cut],
            node._pages[:num_pages],
            node._hashes[:num_pages],
            node._last_access,
            node._lock_count,
        )
        node._parent._children[node._key[: self._page_size]] = upper
        node._key, node._pages, node._hashes = node._key[cut:], node._pages[num_pages:], node._hashes[num_pages:]
        upper._children[node._key[: self._page_size]] = node
        node._parent = upper
        self._num_nodes += 1
        return upper

    def _add_leaf(self, parent: TreeNode, key: tuple[int, ...], pages: list[int]) -> TreeNode:
        parent_hash = parent._hashes[-1] if parent._hashes else self._seed  # only the root has no pages
        hashes = page_hashes(key, self._page_size, parent_hash)
        node = TreeNode(self._new_id(), parent, key, pages, hashes)
        parent._children[key[: self._page_size]] = node
        self._num_nodes += 1
        self._num_cached_pages += len(pages)
        self._events.append(KVEvent("stored", tuple(hashes)))
        return node

    def _drop_tail(self, node: TreeNode, max_pages: int) -> int:
        """Free up to ``max_pages`` of unlocked leaf ``node``'s tail pages; removes it if none remain."""
        num_dropped = min(max_pages, len(node._pages))
        num_kept = len(node._pages) - num_dropped
        self._allocator.free(node._pages[num_kept:])
        self._events.append(KVEvent("removed", tuple(node._hashes[num_kept:])))
        self._num_cached_pages -= num_dropped
        if num_kept:
            node._key = node._key[: num_kept * self._page_size]
            node._pages, node._hashes = node._pages[:num_kept], node._hashes[:num_kept]
            self._offer(node)  # its heap entry was just popped
        else:
            parent = node._parent
            del parent._children[node._key[: self._page_size]]
            node._parent = None
            self._num_nodes -= 1
            self._offer(parent)
        return num_dropped

    def _touch(self, node: TreeNode) -> None:
        """Mark the path from the root to ``node`` most recently used."""
        self._clock += 1
        walk: TreeNode | None = node
        while walk is not None:
            walk._last_access = self._clock
            walk = walk._parent
        self._offer(node)

    def _offer(self, node: TreeNode) -> None:
        """Queue ``node`` for eviction if it is an unlocked leaf (the root never is a candidate)."""
        if node is self._root or node._children or node._lock_count:
            return
        heapq.heappush(self._heap, (node._last_access, node._id, node))
        if len(self._heap) > 2 * self._num_nodes + _HEAP_SLACK:
            self._compact_heap()

    def _compact_heap(self) -> None:
        """Drop stale and duplicate entries, so the heap stays O(nodes) however often leaves are touched."""
        current = {entry[1]: entry for entry in self._heap if self._is_current(entry)}
        self._heap = list(current.values())
        heapq.heapify(self._heap)

    def _is_current(self, entry: _HeapEntry) -> bool:
        last_access, _, node = entry
        return (
            node._parent is not None
            and not node._children
            and node._lock_count == 0
            and node._last_access == last_access
        )

    def _check_in_tree(self, node: TreeNode) -> None:
        if node is not self._root and node._parent is None:
            raise ValueError("node: no longer in the cache (evicted)")

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id - 1
