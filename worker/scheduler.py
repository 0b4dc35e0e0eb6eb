"""Continuous (iteration-level) batching over a paged KV cache with a radix prefix cache.

Each ``schedule()`` builds one step under a token budget: every running sequence that is decoding gets
one token, sequences still prefilling get the next chunk of their prompt, and waiting sequences are
admitted in arrival order, first reusing the longest cached prefix of their tokens; a waiting sequence whose
prompt shares a page still being prefilled by a running one waits for it rather than computing it again.
When the KV pool runs
short, unlocked radix-cache pages are evicted first (LRU); then the most recently admitted running sequence
is preempted: its computed full pages go into the radix cache, the rest is freed, and it waits to be
recomputed (which mostly re-matches what it just cached).
"""

from __future__ import annotations

from collections import deque
from typing import NamedTuple

from radixserve.cluster.base.config import SchedulerConfig
from radixserve.worker.kv.allocator import PageAllocator
from radixserve.worker.kv.radix_cache import RadixCache
from radixserve.worker.sequence import Sequence, SeqStatus

_MAX_DEFERRED = 64  # waiting sequences one step may pass over while their prefix is being prefilled


class ScheduledSeq(NamedTuple):
    seq: Sequence
    num_tokens: int  # tokens fed this step, from seq.num_computed


class ScheduledBatch(NamedTuple):
    """Decoding sequences (one token each) first, then prefill chunks."""

    items: list[ScheduledSeq]
    num_tokens: int


class Scheduler:
    """Owns the waiting queue, the running set and every sequence's pages and cache locks."""

    def __init__(self, config: SchedulerConfig, cache: RadixCache, allocator: PageAllocator, page_size: int):
        self.config = config
        self.cache = cache
        self.allocator = allocator
        self.page_size = page_size
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.num_evicted_pages = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self) -> ScheduledBatch:
        """Picks this step's work and makes sure every picked sequence has pages for its new tokens."""
        budget = self.config.max_num_batched_tokens
        decodes: list[ScheduledSeq] = []
        prefills: list[ScheduledSeq] = []
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

    def _admit(self, budget: int, prefills: list[ScheduledSeq], decodes: list[ScheduledSeq]) -> None:
        deferred: list[Sequence] = []
        while self.waiting and budget > 0 and len(self.running) < self.config.max_running_requests:
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
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            budget -= num_tokens
            (decodes if num_tokens == 1 else prefills).append(ScheduledSeq(seq, num_tokens))
        self.waiting.extendleft(reversed(deferred))

    def _prefix_in_progress(self, seq: Sequence) -> bool:
        """Whether a running sequence is still prefilling at least one more full page of ``seq``'s prompt.

        Admitting ``seq`` now would compute that page twice; waiting lets it match the page once the other
        sequence's chunk is cached (chunks enter the radix cache as they complete).
        """
        for other in self.running:
            if other.num_computed >= other.prompt_len:
                continue
            need = (other.num_computed // self.page_size + 1) * self.page_size
            if need <= min(len(seq.token_ids) - 1, other.prompt_len) and seq.token_ids[:need] == other.token_ids[:need]:
                return True
        return False

    def _match(self, seq: Sequence) -> None:
        # Leave at least one token uncached: its logits are needed to sample.
        match = self.cache.match_prefix(seq.token_ids[: len(seq.token_ids) - 1])
        self.cache.lock(match.node)
        seq.node = match.node
        seq.pages = list(match.pages)
        seq.num_tree_pages = len(match.pages)
        seq.num_computed = len(match.pages) * self.page_size
        if seq.num_preemptions == 0:  # re-admitted, it would match the pages it computed itself
            seq.num_cached_prompt_tokens = seq.num_computed

    def _pages_needed(self, seq: Sequence, num_tokens: int) -> int:
        total = -(-(seq.num_computed + num_tokens) // self.page_size)
        return max(0, total - len(seq.pages))

    def _allocate(self, seq: Sequence, num_tokens: int, preempt: bool) -> bool:
        """Pages for ``num_tokens`` more tokens of ``seq``, evicting the radix cache first; with ``preempt``,
        then preempting the most recently admitted running sequences (possibly ``seq`` itself: False)."""
        needed = self._pages_needed(seq, num_tokens)
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

    def preempt(self, seq: Sequence) -> None:
        """Moves a running sequence back to the head of the queue, caching what it computed."""
        self.running.remove(seq)
        self.cache_computed(seq)
        self._release(seq)
        seq.status = SeqStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def cache_computed(self, seq: Sequence) -> None:
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

    def _release(self, seq: Sequence) -> None:
        """Frees the sequence's own pages and unpins its cached prefix; its KV state is reset."""
        self.allocator.free(seq.pages[seq.num_tree_pages :])
        if seq.node is not None:
            self.cache.unlock(seq.node)
        seq.node = None
        seq.pages = []
        seq.num_tree_pages = 0
        seq.num_computed = 0

    def finish(self, seq: Sequence, reason: str) -> None:
        """Ends a sequence (finished or aborted), caching its computed pages and freeing the rest."""
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
            self.cache_computed(seq)
            self._release(seq)
        elif seq.status is SeqStatus.WAITING:
            self.waiting.remove(seq)
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason
