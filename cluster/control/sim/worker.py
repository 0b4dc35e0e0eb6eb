"""A simulated worker: the engine's radix cache and batching rules on a roofline clock, without tensors.

The KV pool is counted in blocks of the workload's ``block_size`` tokens; the cache is the real
``worker.kv.RadixCache`` over block ids (``page_size`` 1, so one cache page is one block) with its LRU eviction
and KV events. Batching follows the engine's scheduler (``worker/scheduler.py``):

- each step walks the running requests in admission order, giving one token of ``max_batch_tokens`` to each
  that finished its prefill and its next chunk to each still prefilling, then admits waiting requests in arrival
  order with what is left;
- an admitted request locks its longest cached prefix (its last prompt token is always computed); every request
  takes blocks as its prefill chunks and its output need them;
- when blocks run short, unlocked cached blocks are evicted (LRU); then, for a running request, the most
  recently admitted request is preempted (its computed prompt blocks stay cached, the rest is freed, and it
  waits to recompute its prompt and the tokens it generated, then goes on generating); a waiting request that
  does not fit stays waiting;
- computed full prompt blocks enter the cache after every prefill chunk, as in the engine, and a waiting request
  whose prompt shares the block another request is prefilling now waits for it instead of computing it again;
- generated tokens are not cached (the workloads name prompt blocks only);
- with a host tier (``host_blocks`` > 0, as SGLang's HiCache or LMCache keep KV in host DRAM), blocks evicted
  from the device go to an LRU store in host memory instead of being dropped; a prompt whose prefix continues
  there loads those blocks over ``host_bw`` (added to the step that starts its prefill) instead of computing
  them. The worker's KV events then describe both tiers: a block is ``removed`` only when neither holds it.

Time advances in steps priced by ``CostModel.step_time``. A run of decode-only steps is simulated as one
*macro-step* of ``k`` steps (``k`` = the fewest tokens any running request still owes or has room for in its
blocks) priced at its midpoint
context; an arrival during a macro-step cuts it at the end of the step then in progress, as continuous batching
would admit the newcomer there.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field

from radixserve.cluster.control.sim.costmodel import CostModel, PrefillChunk
from radixserve.worker.kv.allocator import PageAllocator
from radixserve.worker.kv.radix_cache import KVEvent, RadixCache, TreeNode

_MAX_DEFERRED = 64  # as the engine: waiting requests one step may pass over while their prefix is prefilled


@dataclass(frozen=True)
class WorkerConfig:
    """``num_blocks``: device KV pool size in blocks; ``max_batch_tokens``: tokens per step (decodes + prefill
    chunks); ``max_running``: requests admitted at once; ``host_blocks``: the host tier's size in blocks (0: none);
    ``host_bw``: bytes/s from host to device memory."""

    num_blocks: int
    max_batch_tokens: int = 8192
    max_running: int = 256
    host_blocks: int = 0
    host_bw: float = 32e9

    def __post_init__(self) -> None:
        for name in ("num_blocks", "max_batch_tokens", "max_running"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.host_blocks < 0:
            raise ValueError(f"host_blocks: must be >= 0, got {self.host_blocks}")
        if not self.host_bw > 0:
            raise ValueError(f"host_bw: must be > 0, got {self.host_bw}")


@dataclass(eq=False)
class SimSeq:
    """One request on a worker. ``cacheable`` are its full prompt blocks, the ones the cache may hold, and
    ``hashes`` their chained page hashes (how the host tier and the KV events name them)."""

    index: int
    cacheable: tuple[int, ...]
    hashes: list[int]
    input_len: int
    output_len: int
    cached_tokens: int = 0
    prefill_len: int = 0      # tokens to compute before decoding: the prompt, or more after a preemption
    context: int = 0          # tokens whose KV is computed (cached prefix included)
    remaining: int = 0        # output tokens still to generate
    started: bool = False     # its first token is out
    node: TreeNode | None = None
    num_tree_blocks: int = 0  # leading blocks held by the cache (locked through ``node``)
    num_loading: int = 0      # blocks to load from the host tier before the first prefill chunk
    blocks: list[int] = field(default_factory=list)  # every block of the request, tree-held ones first


@dataclass(frozen=True)
class Notice:
    """A request's first token (``finished`` False) or last token (``finished`` True) at ``time_s``."""

    index: int
    time_s: float
    finished: bool
    cached_tokens: int


@dataclass
class _Step:
    start_s: float
    end_s: float
    decodes: list[SimSeq]
    num_decode_steps: int
    decode_step_s: float
    prefills: list[tuple[SimSeq, int]]


class SimWorker:
    """A worker's queue, running set and cache; the simulator calls ``submit`` and ``finish_step``.

    Both return the end time of the step now in flight when it changed (the simulator schedules it, tagged
    with ``version``), or None when it did not. ``finish_step`` must be called at exactly that end time for the
    current version; its notices are the requests that got their first or last token in that step.
    """

    def __init__(self, config: WorkerConfig, cost: CostModel, block_size: int, namespace: str) -> None:
        self.config = config
        self._cost = cost
        self._block_size = block_size
        self._allocator = PageAllocator(config.num_blocks)
        self._cache = RadixCache(self._allocator, 1, namespace)
        self._block_load_s = cost.model.kv_bytes_per_token_per_rank * block_size / config.host_bw
        self._host: OrderedDict[int, None] = OrderedDict()  # page hash -> None, least recently used first
        self._on_device: set[int] = set()
        self._events: list[KVEvent] = []
        self._waiting: deque[SimSeq] = deque()
        self._running: list[SimSeq] = []  # admission order
        self._step: _Step | None = None
        self.version = 0
        self.num_evicted_blocks = 0
        self.num_preemptions = 0
        self._used_area = 0.0  # integral of used blocks over time
        self._peak_used = 0
        self._last_s = 0.0

    # ---- the simulator's interface -------------------------------------------------------------------

    def submit(self, seq: SimSeq, now: float) -> float | None:
        """Queue a routed request at ``now``."""
        self._waiting.append(seq)
        if self._step is None:
            return self._start(now)
        return self._cut(now)

    def finish_step(self, now: float) -> tuple[list[Notice], float | None]:
        """Apply the step ending at ``now``; start the next one if there is work."""
        step, self._step = self._step, None
        assert step is not None and step.end_s == now, "finish_step called off its step's end"
        notices = self._apply(step, now)
        return notices, self._start(now)

    def take_events(self) -> list[KVEvent]:
        """The worker's KV events since the last call, over both tiers, oldest first."""
        self._drain_cache_events()
        events, self._events = self._events, []
        return events

    def kv_use(self, end_s: float) -> tuple[float, float]:
        """Time-averaged and peak fraction of blocks in use (cached or held by requests) from 0 to ``end_s``."""
        self._account(end_s)
        mean = self._used_area / end_s / self.config.num_blocks if end_s > 0 else 0.0
        return mean, self._peak_used / self.config.num_blocks

    # ---- steps ----------------------------------------------------------------------------------------

    def _start(self, now: float) -> float | None:
        self._account(now)  # every change to the pool below happens at ``now``
        decodes, prefills, budget = self._schedule_running()
        admitted = self._admit(budget)
        prefills += admitted
        self._peak_used = max(self._peak_used, self._used())
        if not decodes and not prefills:
            return None
        decode_context = sum(s.context for s in decodes)
        if prefills:
            chunks = [PrefillChunk(n, s.context) for s, n in prefills]
            step_s = self._cost.step_time(chunks, len(decodes), decode_context) + self._load_s(admitted)
            self._step = _Step(now, now + step_s, decodes, 1, step_s, prefills)
        else:
            k = min(min(s.remaining, len(s.blocks) * self._block_size - s.context) for s in decodes)
            midpoint = decode_context + len(decodes) * (k - 1) // 2
            step_s = self._cost.step_time((), len(decodes), midpoint)
            self._step = _Step(now, now + k * step_s, decodes, k, step_s, [])
        self.version += 1
        return self._step.end_s

    def _schedule_running(self) -> tuple[list[SimSeq], list[tuple[SimSeq, int]], int]:
        """This step's work for the running requests in admission order, as the engine's scheduler picks it: one
        token per decoding request, the next chunk per prefilling one, each given blocks for it (evicting, then
        preempting the most recently admitted request). Returns the decodes, the chunks and the budget left."""
        budget = self.config.max_batch_tokens
        decodes: list[SimSeq] = []
        prefills: list[tuple[SimSeq, int]] = []
        for seq in list(self._running):
            if budget == 0:
                break
            if seq not in self._running:
                continue  # preempted while making room for an earlier request
            n = min(seq.prefill_len - seq.context, budget) if seq.context < seq.prefill_len else 1
            if not self._room_for(seq, n):
                continue  # seq itself was preempted
            budget -= n
            if seq.context < seq.prefill_len:
                prefills.append((seq, n))
            else:
                decodes.append(seq)
        return decodes, prefills, budget

    def _room_for(self, seq: SimSeq, num_tokens: int) -> bool:
        """Blocks for ``num_tokens`` more tokens of ``seq``: evict, then preempt the most recently admitted
        request; False when that was ``seq`` itself."""
        needed = -(-(seq.context + num_tokens) // self._block_size) - len(seq.blocks)
        while needed > 0:
            blocks = self._alloc_evicting(needed)
            if blocks is not None:
                seq.blocks.extend(blocks)
                return True
            victim = self._running[-1]
            self._preempt(victim)
            if victim is seq:
                return False
        return True

    def _load_s(self, admitted: list[tuple[SimSeq, int]]) -> float:
        """Seconds to bring the newly admitted requests' host-tier blocks to the device."""
        num_blocks = sum(seq.num_loading for seq, _ in admitted)
        for seq, _ in admitted:
            seq.num_loading = 0
        return num_blocks * self._block_load_s

    def _cut(self, now: float) -> float | None:
        """End a decode macro-step at the first step boundary after ``now`` (admitting there)."""
        step = self._step
        assert step is not None
        if step.prefills or step.num_decode_steps == 1:
            return None
        done = min(int((now - step.start_s) / step.decode_step_s) + 1, step.num_decode_steps)
        if done == step.num_decode_steps:
            return None
        step.num_decode_steps = done
        step.end_s = step.start_s + done * step.decode_step_s
        self.version += 1
        return step.end_s

    def _apply(self, step: _Step, now: float) -> list[Notice]:
        self._account(now)
        notices = []
        for seq in step.decodes:
            seq.context += step.num_decode_steps
            seq.remaining -= step.num_decode_steps
        for seq, n in step.prefills:
            seq.context += n
            self._cache_computed(seq)
            if seq.context == seq.prefill_len:
                seq.remaining -= 1  # the prefill's last position samples the next token
                if not seq.started:
                    seq.started = True
                    notices.append(Notice(seq.index, now, False, seq.cached_tokens))
        for seq in [s for s in self._running if s.remaining == 0]:
            self._release(seq)
            notices.append(Notice(seq.index, now, True, seq.cached_tokens))
        return notices

    # ---- admission and blocks --------------------------------------------------------------------------

    def _admit(self, budget: int) -> list[tuple[SimSeq, int]]:
        chunks: list[tuple[SimSeq, int]] = []
        deferred: list[SimSeq] = []
        while self._waiting and budget > 0 and len(self._running) < self.config.max_running:
            seq = self._waiting.popleft()
            if len(deferred) < _MAX_DEFERRED and self._prefix_in_progress(seq):
                deferred.append(seq)
                continue
            n = self._reserve(seq, budget)
            if n == 0:
                self._waiting.appendleft(seq)
                break
            self._running.append(seq)
            chunks.append((seq, n))
            budget -= n
        self._waiting.extendleft(reversed(deferred))
        return chunks

    def _prefix_in_progress(self, seq: SimSeq) -> bool:
        """Another request is prefilling the next block of ``seq``'s prompt past what the cache holds."""
        for other in self._running:
            if other.context >= other.prefill_len:
                continue
            need = other.context // self._block_size + 1
            if need <= min(len(seq.cacheable), len(other.cacheable)) and seq.cacheable[:need] == other.cacheable[:need]:
                return True
        return False

    def _reserve(self, seq: SimSeq, budget: int) -> int:
        """Lock the cached prefix and allocate blocks through the first chunk (evicting, never preempting);
        the chunk's tokens, or 0 (nothing held) when the blocks cannot be had."""
        if not seq.started:
            seq.prefill_len, seq.remaining = seq.input_len, seq.output_len
        usable = seq.cacheable[: (seq.prefill_len - 1) // self._block_size]
        match = self._cache.match_prefix(usable)
        self._cache.lock(match.node)  # before evicting, which must not take the matched prefix
        num_loading = self._host_hits(seq.hashes, len(match.pages), len(usable))
        context = (len(match.pages) + num_loading) * self._block_size
        n = min(seq.prefill_len - context, budget)
        blocks = self._alloc_evicting(-(-(context + n) // self._block_size) - len(match.pages))
        if blocks is None:
            self._cache.unlock(match.node)
            return 0
        seq.node, seq.num_tree_blocks = match.node, len(match.pages)
        seq.blocks = list(match.pages) + blocks
        seq.num_loading, seq.context = num_loading, context
        if not seq.started:
            seq.cached_tokens = context
        return n

    def _alloc_evicting(self, num_blocks: int) -> list[int] | None:
        shortfall = num_blocks - self._allocator.num_free
        if shortfall > 0:
            self.num_evicted_blocks += self._cache.evict(shortfall)
            self._drain_cache_events()  # evicted blocks reach the host tier before the next match
        return self._allocator.alloc(num_blocks)

    def _preempt(self, seq: SimSeq) -> None:
        """Send a running request back to the head of the queue, its computed prompt blocks left cached."""
        self._cache_computed(seq)
        self._release(seq)
        seq.prefill_len = max(seq.prefill_len, seq.context)  # recompute what it generated too
        seq.context = 0
        self.num_preemptions += 1
        self._waiting.appendleft(seq)

    def _host_hits(self, hashes: list[int], start: int, stop: int) -> int:
        """How many blocks from ``start`` on (before ``stop``) the host tier holds, marking them used."""
        k = start
        while k < stop and hashes[k] in self._host:
            self._host.move_to_end(hashes[k])
            k += 1
        return k - start

    def _drain_cache_events(self) -> None:
        """Turn the device cache's events into the worker's: evicted blocks move to the host tier, if any, and
        leave the worker only when that drops them too."""
        for event in self._cache.take_events():
            if event.kind == "stored":
                self._on_device.update(event.page_hashes)
                fresh = tuple(h for h in event.page_hashes if h not in self._host)
                if fresh:
                    self._events.append(KVEvent("stored", fresh))
            else:
                self._on_device.difference_update(event.page_hashes)
                if self.config.host_blocks:
                    self._demote(event.page_hashes)
                else:
                    self._events.append(event)

    def _demote(self, hashes: tuple[int, ...]) -> None:
        for page in hashes:
            self._host[page] = None
            self._host.move_to_end(page)
        dropped = []
        while len(self._host) > self.config.host_blocks:
            page, _ = self._host.popitem(last=False)
            if page not in self._on_device:
                dropped.append(page)
        if dropped:
            self._events.append(KVEvent("removed", tuple(dropped)))

    def _cache_computed(self, seq: SimSeq) -> None:
        """Hand the computed full prompt blocks to the cache and re-lock the request's prefix there."""
        num_full = min(seq.context // self._block_size, len(seq.cacheable))
        if num_full <= seq.num_tree_blocks:
            return
        result = self._cache.insert(seq.cacheable[:num_full], seq.blocks[:num_full])
        held = set(result.pages)
        self._allocator.free(b for b in seq.blocks[seq.num_tree_blocks:num_full] if b not in held)
        self._cache.lock(result.node)
        assert seq.node is not None
        self._cache.unlock(seq.node)
        seq.node, seq.num_tree_blocks = result.node, num_full
        seq.blocks[:num_full] = result.pages

    def _release(self, seq: SimSeq) -> None:
        self._running.remove(seq)
        self._allocator.free(seq.blocks[seq.num_tree_blocks:])
        assert seq.node is not None
        self._cache.unlock(seq.node)
        seq.node, seq.blocks, seq.num_tree_blocks = None, [], 0

    def _used(self) -> int:
        return self.config.num_blocks - self._allocator.num_free

    def _account(self, now: float) -> None:
        self._used_area += self._used() * (now - self._last_s)
        self._last_s = now
