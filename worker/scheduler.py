"""Continuous (iteration-level) batching over a paged KV cache with a radix prefix cache.

Each ``schedule()`` builds one step under a token budget: every running sequence that is decoding gets
one token, sequences still prefilling get the next chunk of their prompt, and waiting sequences are
admitted in arrival order, first reusing the longest cached prefix of their tokens; a waiting sequence whose
prompt shares a page still being prefilled by a running one waits for it rather than computing it again.
When the KV pool runs short, unlocked radix-cache pages are evicted first (LRU); then the most recently
admitted running sequence is preempted: its computed full pages go into the radix cache, the rest is freed,
and it waits to be recomputed (which mostly re-matches what it just cached).

The scheduler keeps page accounting only: it works on any ``KVSequence`` and any ``PrefixCache``, and never
touches a tensor, so whatever runs the steps (the engine, the cluster simulator) gets the same decisions.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable, Sequence
from typing import Generic, NamedTuple, Protocol, TypeVar

from radixserve.cluster.base.config import SchedulerConfig
from radixserve.worker.kv.allocator import PageAllocator
from radixserve.worker.kv.radix_cache import InsertResult, MatchResult, TreeNode
from radixserve.worker.sequence import KVSequence, SeqStatus

_MAX_DEFERRED = 64  # waiting sequences one step may pass over while their prefix is being prefilled

S = TypeVar("S", bound=KVSequence)


class PrefixCache(Protocol):
    """The prefix cache the scheduler drives, with ``RadixCache``'s contract (``RadixCache`` is one)."""

    @property
    def num_evictable_pages(self) -> int: ...

    def match_prefix(self, tokens: Sequence[int]) -> MatchResult: ...

    def insert(self, tokens: Sequence[int], pages: Sequence[int]) -> InsertResult: ...

    def lock(self, node: TreeNode) -> None: ...

    def unlock(self, node: TreeNode) -> None: ...

    def evict(self, num_pages: int) -> int: ...


class ScheduledSeq(NamedTuple, Generic[S]):
    seq: S
    num_tokens: int  # tokens fed this step, from seq.num_computed


class ScheduledBatch(NamedTuple, Generic[S]):
    """Decoding sequences (one token each) first, then prefill chunks."""

    items: list[ScheduledSeq[S]]
    num_tokens: int


class Scheduler(Generic[S]):
    """Owns the waiting queue, the running set and every sequence's pages and cache locks.

    ``max_running_requests`` bounds the distinct requests running (a request's samples count once).
    ``extend_prefix(seq, start, stop)``, when given, is a slower KV tier (host memory) below the cache: after the
    cache matched ``start`` pages of an admitted ``seq``, it returns how many of the pages ``start .. stop - 1``
    of ``seq.token_ids`` it holds, consecutively from ``start``. Those count as cached and computed: the
    scheduler gives them pages with the first chunk, and the caller brings their KV in before that chunk runs.
    """

    def __init__(self, config: SchedulerConfig, cache: PrefixCache, allocator: PageAllocator, page_size: int,
                 extend_prefix: Callable[[S, int, int], int] | None = None):
        self.config = config
        self.cache = cache
        self.allocator = allocator
        self.page_size = page_size
        self.extend_prefix = extend_prefix
        self.waiting: deque[S] = deque()
        self.running: list[S] = []
        self._running_requests: Counter[str] = Counter()  # running sequences per request id
        self.num_preemptions = 0
        self.num_evicted_pages = 0

    @property
    def num_running_requests(self) -> int:
        """Distinct requests with a running sequence."""
        return len(self._running_requests)

    def add(self, seq: S) -> None:
        self.waiting.append(seq)

    def schedule(self) -> ScheduledBatch[S]:
        """Picks this step's work and makes sure every picked sequence has pages for its new tokens."""
        budget = self.config.max_num_batched_tokens
        decodes: list[ScheduledSeq[S]] = []
        prefills: list[ScheduledSeq[S]] = []
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not SeqStatus.RUNNING:
                continue  # preempted while making room for an earlier sequence
            num_tokens = min(seq.num_uncomputed, budget)
            if not self._allocate(seq, num_tokens, preempt=True):
                continue  # seq itself was preempted
            budget -= num_tokens
            (decodes if num_tokens == 1 else prefills).append(ScheduledSeq(seq, num_tokens))
        self._admit(budget, prefills, decodes)
        items = decodes + prefills
        return ScheduledBatch(items, sum(item.num_tokens for item in items))

    def complete(self, batch: ScheduledBatch[S]) -> None:
        """Records that ``batch`` was computed: each sequence's ``num_computed`` advances by its tokens, and the
        full pages a prefill chunk (of any length, one token too) completed enter the radix cache (later prompts
        match them from the next step). A decode step's pages enter it when the sequence ends or is preempted."""
        for seq, num_tokens in batch.items:
            decode = num_tokens == 1 and seq.num_computed >= seq.prompt_len
            seq.num_computed += num_tokens
            if not decode and seq.status is SeqStatus.RUNNING:
                self.cache_computed(seq)

    def _admit(self, budget: int, prefills: list[ScheduledSeq[S]], decodes: list[ScheduledSeq[S]]) -> None:
        deferred: list[S] = []
        while self.waiting and budget > 0 and self._may_run(self.waiting[0]):
            seq = self.waiting.popleft()
            if len(deferred) < _MAX_DEFERRED and self._prefix_in_progress(seq):
                deferred.append(seq)
                continue
            self._match(seq)
            num_tokens = min(seq.num_uncomputed, budget)
            if not self._allocate(seq, num_tokens, preempt=False):
                self._release(seq)
                self.waiting.appendleft(seq)
                break
            self._start_running(seq)
            budget -= num_tokens
            (decodes if num_tokens == 1 else prefills).append(ScheduledSeq(seq, num_tokens))
        self.waiting.extendleft(reversed(deferred))

    def _may_run(self, seq: S) -> bool:
        """Whether ``max_running_requests`` lets ``seq`` run: its request runs already, or fewer requests do."""
        return (seq.request_id in self._running_requests
                or len(self._running_requests) < self.config.max_running_requests)

    def _prefix_in_progress(self, seq: S) -> bool:
        """Whether a running sequence is still prefilling at least one more full page of ``seq``'s prompt.

        Admitting ``seq`` now would compute that page twice; waiting lets it match the page once the other
        sequence's chunk is cached (chunks enter the radix cache as they complete).
        """
        for other in self.running:
            if other.num_computed >= other.prompt_len:
                continue
            need = (other.num_computed // self.page_size + 1) * self.page_size
            if need <= min(len(seq.token_ids) - 1, other.prompt_len) and _same_prefix(seq, other, need):
                return True
        return False

    def _match(self, seq: S) -> None:
        # Leave at least one token uncached: its logits are needed to sample.
        limit = len(seq.token_ids) - 1
        match = self.cache.match_prefix(seq.token_ids[:limit])
        self.cache.lock(match.node)
        seq.node = match.node
        seq.pages = list(match.pages)
        seq.num_tree_pages = num_pages = len(match.pages)
        if self.extend_prefix is not None:
            num_pages += self.extend_prefix(seq, num_pages, limit // self.page_size)
        seq.num_computed = num_pages * self.page_size
        if seq.num_preemptions == 0:  # re-admitted, it would match the pages it computed itself
            seq.num_cached_prompt_tokens = seq.num_computed

    def _allocate(self, seq: S, num_tokens: int, preempt: bool) -> bool:
        """Pages for ``num_tokens`` more tokens of ``seq``, evicting the radix cache first; with ``preempt``,
        then preempting the most recently admitted running sequences (possibly ``seq`` itself: False)."""
        needed = -(-(seq.num_computed + num_tokens) // self.page_size) - len(seq.pages)
        if needed <= 0:
            return True  # most decode steps
        while True:
            pages = self._alloc_evicting(needed)
            if pages is not None:
                seq.pages.extend(pages)
                return True
            if not preempt:
                return False
            victim = self.running[-1]
            self.preempt(victim)
            if victim is seq:
                return False

    def _alloc_evicting(self, num_pages: int) -> list[int] | None:
        """``num_pages`` pages, evicting the radix cache's shortfall only when that makes the allocation succeed
        (a failed allocation evicts nothing)."""
        shortfall = num_pages - self.allocator.num_free
        if shortfall > self.cache.num_evictable_pages:
            return None
        if shortfall > 0:
            self.num_evicted_pages += self.cache.evict(shortfall)
        return self.allocator.alloc(num_pages)

    def preempt(self, seq: S) -> None:
        """Moves a running sequence back to the head of the queue, caching what it computed."""
        self._stop_running(seq)
        self.cache_computed(seq)
        self._release(seq)
        seq.status = SeqStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def cache_computed(self, seq: S) -> None:
        """Hands the full pages of the computed tokens to the radix cache and re-pins them there."""
        num_full = seq.num_computed // self.page_size
        if num_full <= seq.num_tree_pages:
            return
        result = self.cache.insert(seq.token_ids[: num_full * self.page_size], seq.pages[:num_full])
        tree_pages = set(result.pages)
        self.allocator.free(p for p in seq.pages[seq.num_tree_pages : num_full] if p not in tree_pages)
        self.cache.lock(result.node)
        self.cache.unlock(seq.node)
        seq.node = result.node
        seq.pages[:num_full] = result.pages
        seq.num_tree_pages = num_full

    def _release(self, seq: S) -> None:
        """Frees the sequence's own pages and unpins its cached prefix; its KV state is reset."""
        self.allocator.free(seq.pages[seq.num_tree_pages :])
        if seq.node is not None:
            self.cache.unlock(seq.node)
        seq.node = None
        seq.pages = []
        seq.num_tree_pages = 0
        seq.num_computed = 0

    def _start_running(self, seq: S) -> None:
        seq.status = SeqStatus.RUNNING
        self.running.append(seq)
        self._running_requests[seq.request_id] += 1

    def _stop_running(self, seq: S) -> None:
        self.running.remove(seq)
        self._running_requests[seq.request_id] -= 1
        if not self._running_requests[seq.request_id]:
            del self._running_requests[seq.request_id]

    def finish(self, seq: S, reason: str) -> None:
        """Ends a sequence (finished or aborted), caching its computed pages and freeing the rest."""
        if seq.status is SeqStatus.RUNNING:
            self._stop_running(seq)
            self.cache_computed(seq)
            self._release(seq)
        elif seq.status is SeqStatus.WAITING:
            self.waiting.remove(seq)
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason


def _same_prefix(seq: KVSequence, other: KVSequence, num_tokens: int) -> bool:
    """Whether the two sequences' first ``num_tokens`` tokens are equal (the last of them compared first: a cheap
    test that settles most mismatches before the copies)."""
    a, b = seq.token_ids, other.token_ids
    return a[num_tokens - 1] == b[num_tokens - 1] and a[:num_tokens] == b[:num_tokens]
