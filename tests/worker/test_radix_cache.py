from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from radixserve.cluster.base.hashing import namespace_seed, page_hashes
from radixserve.worker.kv.allocator import PageAllocator
from radixserve.worker.kv.radix_cache import KVEvent, MatchResult, RadixCache, TreeNode

PS = 2
NS = "test-model"
SEED = namespace_seed(NS)


def make(num_pages: int = 32) -> tuple[PageAllocator, RadixCache]:
    allocator = PageAllocator(num_pages)
    return allocator, RadixCache(allocator, PS, NS)


def hash_of(tokens: list[int]) -> int:
    """What the router computes for the last page of ``tokens``."""
    return page_hashes(tokens, PS, SEED)[-1]


def insert_new(allocator: PageAllocator, cache: RadixCache, tokens: list[int]) -> TreeNode:
    return cache.insert(tokens, allocator.alloc(len(tokens) // PS)).node


def depth(node: TreeNode) -> int:
    """Tokens from the root to the end of ``node``."""
    num_tokens = 0
    while node.parent is not None:
        num_tokens += node.key_len
        node = node.parent
    return num_tokens


def walk(cache: RadixCache) -> dict[tuple[int, ...], tuple[int, int, int, int]]:
    """Brute force over the tree: cached prefix -> (page, hash, lock count, last access); checks structure."""
    ps = cache._page_size
    found: dict[tuple[int, ...], tuple[int, int, int, int]] = {}
    stack = [(cache._root, ())]
    while stack:
        node, prefix = stack.pop()
        for first_page, child in node._children.items():
            assert child.parent is node
            assert child.key_len > 0 and child.key_len % ps == 0
            assert child._key[:ps] == first_page
            assert len(child._pages) == len(child._hashes) == child.key_len // ps
            if node is not cache._root:
                assert child.lock_count <= node.lock_count
            for i, (page, page_hash) in enumerate(zip(child._pages, child._hashes)):
                found[prefix + child._key[: (i + 1) * ps]] = (page, page_hash, child.lock_count, child._last_access)
            stack.append((child, prefix + child._key))
    return found


def test_insert_then_match_ignores_the_partial_last_page() -> None:
    allocator, cache = make()
    pages = allocator.alloc(3)
    result = cache.insert([1, 1, 2, 2, 3, 3], pages)
    assert (result.num_existing_pages, result.pages) == (0, pages)
    match = cache.match_prefix([1, 1, 2, 2, 3])
    assert match.pages == pages[:2]
    assert depth(match.node) == 4
    assert cache.num_cached_pages == 3 and cache.num_evictable_pages == 3 and cache.num_locked_pages == 0


def test_miss_returns_the_root_and_locking_it_is_a_no_op() -> None:
    allocator, cache = make()
    insert_new(allocator, cache, [1, 1])
    match = cache.match_prefix([2, 2, 1, 1])
    assert match.pages == [] and match.node.parent is None
    cache.lock(match.node)
    cache.unlock(match.node)
    assert cache.num_locked_pages == 0
    assert cache.flush() == 1


def test_split_in_the_middle_of_a_locked_node() -> None:
    allocator, cache = make()
    pages = allocator.alloc(3)
    leaf = cache.insert([1, 1, 2, 2, 3, 3], pages).node
    cache.lock(leaf)
    match = cache.match_prefix([1, 1, 2, 2, 9, 9])
    upper = match.node
    assert match.pages == pages[:2]
    assert upper is not leaf and leaf.parent is upper
    assert (upper.key_len, leaf.key_len, depth(leaf)) == (4, 2, 6)  # the held node still ends where it did
    assert upper.lock_count == leaf.lock_count == 1
    assert (cache.num_locked_pages, cache.num_evictable_pages) == (3, 0)
    assert cache.evict(3) == 0
    cache.unlock(leaf)
    assert upper.lock_count == leaf.lock_count == 0
    assert (cache.num_locked_pages, cache.num_evictable_pages) == (0, 3)
    cache.take_events()
    branch = [1, 1, 2, 2, 4, 4]  # hangs off the split point: its hash chains from the upper part
    cache.insert(branch, pages[:2] + allocator.alloc(1))
    assert cache.take_events() == [KVEvent("stored", (hash_of(branch),))]


def test_insert_over_a_prefix_cached_under_other_pages() -> None:
    allocator, cache = make(8)
    first = allocator.alloc(2)
    cache.insert([1, 1, 2, 2], first)
    second = allocator.alloc(3)
    result = cache.insert([1, 1, 2, 2, 3, 3], second)
    assert result.num_existing_pages == 2
    assert result.pages == first + second[2:]
    allocator.free(second[:2])  # not adopted: still the caller's
    assert allocator.num_free + cache.num_cached_pages == 8
    shorter = allocator.alloc(1)
    result = cache.insert([1, 1], shorter)  # ends inside a node: splits it
    assert (result.num_existing_pages, result.pages, depth(result.node)) == (1, first[:1], 2)
    allocator.free(shorter)
    assert cache.flush() == 3 and allocator.num_free == 8


def test_evict_trims_only_the_tail_of_a_leaf() -> None:
    allocator, cache = make(4)
    tokens = [1, 1, 2, 2, 3, 3]
    pages = allocator.alloc(3)
    node = cache.insert(tokens, pages).node
    cache.take_events()
    assert cache.evict(1) == 1
    assert node.key_len == 4 and node.parent is not None
    assert cache.take_events() == [KVEvent("removed", (hash_of(tokens),))]
    assert allocator.alloc(1) == [pages[2]]  # the freed page is the tail page
    assert cache.num_cached_pages == 2
    assert cache.evict(1) == 1  # the trimmed leaf is still a candidate
    assert cache.match_prefix(tokens).pages == pages[:1]


def test_evict_takes_least_recently_used_leaves_and_then_their_parents() -> None:
    allocator, cache = make()
    insert_new(allocator, cache, [1, 1, 2, 2])
    insert_new(allocator, cache, [1, 1, 3, 3])  # splits: [1 1] -> {[2 2], [3 3]}
    insert_new(allocator, cache, [5, 5])
    cache.take_events()
    assert cache.evict(4) == 4
    order = [[1, 1, 2, 2], [1, 1, 3, 3], [1, 1], [5, 5]]  # the bare parent is older than [5 5]
    assert cache.take_events() == [KVEvent("removed", (hash_of(tokens),)) for tokens in order]


def test_a_parent_is_as_recent_as_its_latest_descendant() -> None:
    allocator, cache = make()
    insert_new(allocator, cache, [1, 1, 2, 2])
    other = insert_new(allocator, cache, [5, 5])
    cache.lock(other)
    insert_new(allocator, cache, [1, 1, 3, 3])  # splits off the parent [1 1], used after [5 5]
    assert cache.evict(2) == 2  # both children; [5 5] is locked
    cache.unlock(other)
    cache.take_events()
    assert cache.evict(1) == 1
    assert cache.take_events() == [KVEvent("removed", (hash_of([5, 5]),))]


def test_match_refreshes_recency() -> None:
    allocator, cache = make()
    insert_new(allocator, cache, [1, 1, 2, 2])
    insert_new(allocator, cache, [3, 3, 4, 4])
    cache.match_prefix([1, 1, 2, 2])
    cache.take_events()
    assert cache.evict(2) == 2
    assert cache.take_events() == [KVEvent("removed", (hash_of([3, 3]), hash_of([3, 3, 4, 4])))]


def test_locked_pages_are_never_evicted() -> None:
    allocator, cache = make()
    kept = cache.insert([1, 1, 2, 2], allocator.alloc(2))
    cache.lock(kept.node)
    cache.insert([1, 1, 3, 3, 4, 4], kept.pages[:1] + allocator.alloc(2))
    assert (cache.num_locked_pages, cache.num_evictable_pages) == (2, 2)
    assert cache.evict(10) == 2
    assert cache.flush() == 0
    assert cache.match_prefix([1, 1, 2, 2, 3, 3]).pages == kept.pages
    cache.unlock(kept.node)
    assert cache.flush() == 2 and allocator.num_free == 32


def test_stored_hashes_equal_what_the_router_computes() -> None:
    allocator, cache = make()
    first, second = [1, 2, 3, 4, 5, 6], [1, 2, 7, 7, 8, 8, 9]
    insert_new(allocator, cache, first)
    cache.insert(second[:6], cache.match_prefix(second).pages + allocator.alloc(2))
    assert cache.take_events() == [
        KVEvent("stored", tuple(page_hashes(first, PS, SEED))),
        KVEvent("stored", tuple(page_hashes(second, PS, SEED)[1:])),
    ]
    other = RadixCache(PageAllocator(4), PS, "other-model")
    other.insert(first[:2], [0])
    assert other.take_events()[0].page_hashes != (hash_of(first[:2]),)


def test_eviction_candidates_stay_bounded_under_repeated_hits() -> None:
    allocator, cache = make()
    insert_new(allocator, cache, [1, 1, 2, 2])
    node = cache.match_prefix([1, 1]).node
    for _ in range(2000):
        cache.match_prefix([1, 1, 2, 2])
        cache.lock(node)
        cache.unlock(node)
    assert len(cache._heap) <= 2 * 2 + 64 + 1
    assert cache.flush() == 2


def test_invalid_use_raises() -> None:
    allocator, cache = make()
    with pytest.raises(ValueError, match="tokens"):
        cache.insert([1, 1, 2], allocator.alloc(2))
    with pytest.raises(ValueError, match="num_pages"):
        cache.evict(-1)
    with pytest.raises(ValueError, match="page_size"):
        RadixCache(allocator, 0, NS)
    with pytest.raises(ValueError, match="kind"):
        KVEvent("evicted", ())  # type: ignore[arg-type]
    node = insert_new(allocator, cache, [1, 1])
    with pytest.raises(ValueError, match="node"):
        cache.unlock(node)
    cache.flush()
    with pytest.raises(ValueError, match="node"):
        cache.lock(node)


MAX_PAGES = 12


class CacheMachine(RuleBasedStateMachine):
    """Drives the cache and a brute-force model keyed by page-aligned token prefixes."""

    @initialize(page_size=st.sampled_from([2, 3]), num_pages=st.integers(8, 48))
    def setup(self, page_size: int, num_pages: int) -> None:
        self.ps = page_size
        self.allocator = PageAllocator(num_pages)
        self.cache = RadixCache(self.allocator, page_size, NS)
        self.ref_page: dict[tuple[int, ...], int] = {}
        self.ref_hash: dict[tuple[int, ...], int] = {}
        self.ref_access: dict[tuple[int, ...], int] = {}
        self.ref_num_children: dict[tuple[int, ...], int] = {(): 0}
        self.clock = 0
        self.locks: list[tuple[TreeNode, tuple[int, ...]]] = []  # held locks: node, the prefix it ends
        self.held: list[int] = []  # allocated by the test, never given to the tree
        self.event_hashes: set[int] = set()
        self.history: list[tuple[int, ...]] = []

    # --- the reference model ---

    def ref_lock_count(self, prefix: tuple[int, ...]) -> int:
        return sum(1 for _, held in self.locks if held[: len(prefix)] == prefix and len(held) >= len(prefix))

    def ref_match(self, tokens: tuple[int, ...]) -> list[tuple[int, ...]]:
        prefixes = [tokens[:end] for end in range(self.ps, len(tokens) + 1, self.ps)]
        num_cached = next((i for i, prefix in enumerate(prefixes) if prefix not in self.ref_page), len(prefixes))
        return prefixes[:num_cached]

    def ref_touch(self, prefixes: list[tuple[int, ...]]) -> None:
        self.clock += 1
        for prefix in prefixes:
            self.ref_access[prefix] = self.clock

    def ref_insert(self, tokens: tuple[int, ...], pages: list[int]) -> tuple[int, list[int]]:
        hashes = page_hashes(tokens, self.ps, SEED)
        prefixes = [tokens[: (k + 1) * self.ps] for k in range(len(pages))]
        num_existing = len(self.ref_match(tokens))
        for prefix, page, page_hash in list(zip(prefixes, pages, hashes))[num_existing:]:
            self.ref_page[prefix], self.ref_hash[prefix] = page, page_hash
            self.ref_num_children[prefix] = 0
            self.ref_num_children[prefix[: -self.ps]] += 1
        self.ref_touch(prefixes)
        return num_existing, [self.ref_page[prefix] for prefix in prefixes]

    def ref_evict(self, num_pages: int) -> list[tuple[int, ...]]:
        """Page by page: the least recently used unlocked leaf page (so a leaf's tail goes first)."""
        victims = []
        for _ in range(num_pages):
            leaves = sorted(
                (self.ref_access[p], p)
                for p in self.ref_page
                if self.ref_num_children[p] == 0 and self.ref_lock_count(p) == 0
            )
            if not leaves:
                break
            assert len(leaves) == 1 or leaves[0][0] < leaves[1][0], "the model needs a unique LRU leaf"
            victim = leaves[0][1]
            for table in (self.ref_page, self.ref_hash, self.ref_access, self.ref_num_children):
                del table[victim]
            self.ref_num_children[victim[: -self.ps]] -= 1
            victims.append(victim)
        return victims

    # --- driving both ---

    def draw_tokens(self, data: st.DataObject, whole_pages: bool) -> tuple[int, ...]:
        base: tuple[int, ...] = ()
        if self.history and data.draw(st.integers(0, 3), label="extend a previous sequence") > 0:
            seq = data.draw(st.sampled_from(self.history))
            base = seq[: data.draw(st.integers(0, len(seq)))]
        tokens = (base + tuple(data.draw(st.lists(st.integers(0, 3), max_size=4 * self.ps))))[: MAX_PAGES * self.ps]
        return tokens[: len(tokens) // self.ps * self.ps] if whole_pages else tokens

    def replay(self, events: list[KVEvent]) -> None:
        for event in events:
            for page_hash in event.page_hashes:
                if event.kind == "stored":
                    assert page_hash not in self.event_hashes
                    self.event_hashes.add(page_hash)
                else:
                    self.event_hashes.remove(page_hash)

    def match(self, tokens: tuple[int, ...]) -> MatchResult:
        result = self.cache.match_prefix(list(tokens))
        prefixes = self.ref_match(tokens)
        assert result.pages == [self.ref_page[p] for p in prefixes]
        assert depth(result.node) == len(prefixes) * self.ps
        self.ref_touch(prefixes)
        return result

    def lock(self, node: TreeNode, prefix: tuple[int, ...]) -> None:
        self.cache.lock(node)
        self.locks.append((node, prefix))

    def evict(self, num_pages: int, flush: bool = False) -> None:
        """``cache.evict(num_pages)``, or ``cache.flush()`` with num_pages >= the cached pages."""
        self.replay(self.cache.take_events())
        victims = self.ref_evict(num_pages)
        assert (self.cache.flush() if flush else self.cache.evict(num_pages)) == len(victims)
        events = self.cache.take_events()
        assert all(event.kind == "removed" for event in events)
        removed_tail_first = [h for event in events for h in reversed(event.page_hashes)]
        assert removed_tail_first == [page_hashes(v, self.ps, SEED)[-1] for v in victims]
        self.replay(events)

    def alloc(self, num_pages: int) -> list[int] | None:
        if self.allocator.num_free < num_pages:
            self.evict(num_pages - self.allocator.num_free)
        num_free = self.allocator.num_free
        pages = self.allocator.alloc(num_pages)
        assert (pages is None) == (num_free < num_pages)
        return pages

    @rule(data=st.data(), lock=st.booleans())
    def match_prefix(self, data: st.DataObject, lock: bool) -> None:
        tokens = self.draw_tokens(data, whole_pages=False)
        node = self.match(tokens).node
        if lock:
            self.lock(node, tokens[: depth(node)])

    @rule(data=st.data(), reuse_prefix=st.booleans(), lock=st.booleans())
    def insert(self, data: st.DataObject, reuse_prefix: bool, lock: bool) -> None:
        """As the engine does (match, lock, allocate the rest, insert, unlock) or with all-fresh pages."""
        tokens = self.draw_tokens(data, whole_pages=True)
        prefix_pages: list[int] = []
        if reuse_prefix:
            prefix = self.match(tokens)
            prefix_pages = prefix.pages
            prefix_lock = (prefix.node, tokens[: len(prefix_pages) * self.ps])
            self.lock(*prefix_lock)
        fresh = self.alloc(len(tokens) // self.ps - len(prefix_pages))
        if fresh is not None:
            self.insert_pages(tokens, prefix_pages + fresh, lock)
        if reuse_prefix:
            self.locks.remove(prefix_lock)
            self.cache.unlock(prefix_lock[0])

    def insert_pages(self, tokens: tuple[int, ...], pages: list[int], lock: bool) -> None:
        result = self.cache.insert(list(tokens), pages)
        assert (result.num_existing_pages, result.pages) == self.ref_insert(tokens, pages)
        assert depth(result.node) == len(tokens)
        self.allocator.free(mine for mine, tree in zip(pages, result.pages) if mine != tree)
        self.history = [tokens, *self.history[:15]]
        if lock:
            self.lock(result.node, tokens)

    @precondition(lambda self: self.locks)
    @rule(data=st.data())
    def unlock(self, data: st.DataObject) -> None:
        node, _ = self.locks.pop(data.draw(st.integers(0, len(self.locks) - 1)))
        self.cache.unlock(node)

    @rule(num_pages=st.integers(0, 45))
    def evict_pages(self, num_pages: int) -> None:
        self.evict(num_pages)

    @rule()
    def flush(self) -> None:
        self.evict(len(self.ref_page), flush=True)
        assert self.cache.num_evictable_pages == 0

    @rule(num_pages=st.integers(1, 4))
    def hold_pages(self, num_pages: int) -> None:
        pages = self.alloc(num_pages)
        self.held.extend(pages or [])

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def release_pages(self, data: st.DataObject) -> None:
        num_pages = data.draw(st.integers(1, len(self.held)))
        self.allocator.free(self.held[:num_pages])
        del self.held[:num_pages]

    @invariant()
    def matches_the_model(self) -> None:
        self.replay(self.cache.take_events())
        tree = walk(self.cache)
        # The clock is specified as one tick per match/insert call, so the model's clock is the tree's.
        assert tree == {
            p: (self.ref_page[p], self.ref_hash[p], self.ref_lock_count(p), self.ref_access[p]) for p in self.ref_page
        }
        tree_pages = [page for page, _, _, _ in tree.values()]
        assert len(set(tree_pages)) == len(tree_pages)
        assert not set(tree_pages) & set(self.held)
        assert len(tree_pages) + len(self.held) + self.allocator.num_free == self.allocator.num_pages
        num_locked = sum(1 for _, _, lock_count, _ in tree.values() if lock_count)
        assert self.cache.num_cached_pages == len(tree_pages)
        assert self.cache.num_locked_pages == num_locked
        assert self.cache.num_evictable_pages == len(tree_pages) - num_locked
        assert self.event_hashes == set(self.ref_hash.values())
        assert all(depth(node) == len(prefix) for node, prefix in self.locks)

    def teardown(self) -> None:
        for node, _ in self.locks:
            self.cache.unlock(node)
        self.allocator.free(self.held)
        self.cache.flush()
        assert self.allocator.num_free == self.allocator.num_pages
        assert self.cache.num_cached_pages == 0 and self.cache.num_locked_pages == 0


TestCacheMachine = CacheMachine.TestCase
TestCacheMachine.settings = settings(max_examples=200, stateful_step_count=50, deadline=None)
