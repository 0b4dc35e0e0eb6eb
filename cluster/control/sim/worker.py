"""A simulated worker: the engine's own scheduler, radix cache and allocator on a roofline clock, without tensors.

Every scheduling decision is the engine's: each step is one ``worker.scheduler.Scheduler.schedule()`` (decodes,
prefill chunks, admissions reusing cached prefixes, deferral behind a prefix being prefilled, eviction, then
preemption of the newest request), applied with ``Scheduler.complete`` and ``Scheduler.finish`` as the engine
applies it. The simulator supplies what the model would: the clock (``CostModel.step_time`` of each step's
chunks and decodes) and the sampled tokens.

Token ids: a request's prompt block with id ``b`` is ``b`` repeated over the block's tokens, so equal (chained)
block ids give equal tokens; its ``k``-th generated token is ``first_generated + k``, an id above every block id
and unique to the request. The KV pool has pages of ``block_size`` tokens; the cache is a ``PageKeyedCache``
(the real ``RadixCache`` keyed by each page's last token, exact for these ids). It caches generated tokens as the
engine does: a request's finished or preempted pages stay cached, though no other request ever matches them.

A host tier (``host_blocks`` > 0, ``hosttier.HostTier``) is the scheduler's ``extend_prefix``: after the device
match, the blocks of the request that continue in host memory count as cached and are loaded over ``host_bw``
(added to the step that admits the request) instead of computed.

Decode macro-steps: a step whose batch is decodes only, of requests past their prompt, loading nothing from the
host tier, is simulated with the ``k - 1`` steps after it as one step of ``k`` (``k`` = the fewest tokens any of them still owes or has room for
in its pages), priced at its midpoint context. It is exactly ``k`` ``schedule()`` calls: in each, every running
request is given one token and needs no page, so nothing is allocated, evicted or preempted; none finishes
before the ``k``-th; no running request is in its prompt, so no waiting request's deferral changes; hence a
waiting request the first step could not admit (no room in the pool or in ``max_running_requests``) is not
admitted by the others either, and its repeated match only re-marks its own path most recently used. An arrival
during a macro-step cuts it at the end of the step then in progress, where continuous batching would admit it.

Load reports (``SimWorker.load``) are the engine's (``Engine.load``): requests in flight, the prompt tokens still
to prefill before their first token (what the engine estimated at arrival would not need computing left out:
the prefix the cache tiers held or the prompts in flight ahead of it bring), and the output budgets left; a
report taken inside a decode macro-step counts the tokens of its steps already ended, as single steps would.
"""

from __future__ import annotations

import math
import random
from array import array
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from radixserve.cluster.base.config import SchedulerConfig
from radixserve.cluster.base.hashing import namespace_seed, page_hashes
from radixserve.cluster.control.sim.costmodel import CostModel, PrefillChunk
from radixserve.cluster.control.sim.hosttier import HostTier
from radixserve.cluster.control.sim.pagecache import PageKeyedCache
from radixserve.router.routing import ReportedLoad
from radixserve.worker.kv.allocator import PageAllocator
from radixserve.worker.kv.radix_cache import KVEvent
from radixserve.worker.scheduler import ScheduledBatch, Scheduler
from radixserve.worker.sequence import KVSequence


@dataclass(frozen=True)
class WorkerConfig:
    """``num_blocks``: device KV pool size in blocks; ``scheduler``: the engine's batching limits;
    ``host_blocks``: the host tier's size in blocks (0: none); ``host_bw``: bytes/s from host to device memory;
    ``step_noise``: sigma of a log-normal factor (median 1) on each step's time, the noise of a shared machine
    (0: steps take exactly what the cost model says)."""

    num_blocks: int
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    host_blocks: int = 0
    host_bw: float = 32e9
    step_noise: float = 0.0

    def __post_init__(self) -> None:
        if self.num_blocks < 1:
            raise ValueError(f"num_blocks: must be >= 1, got {self.num_blocks}")
        if self.host_blocks < 0:
            raise ValueError(f"host_blocks: must be >= 0, got {self.host_blocks}")
        if not self.host_bw > 0:
            raise ValueError(f"host_bw: must be > 0, got {self.host_bw}")
        if not self.step_noise >= 0:
            raise ValueError(f"step_noise: must be >= 0, got {self.step_noise}")


@dataclass(eq=False)
class SimSeq(KVSequence):
    """Request ``index`` of the workload on a worker, generating ``output_len`` tokens from ``first_generated`` on
    (see the module docstring). ``hashes``: chained hashes of its leading pages, how the host tier names them;
    ``num_loading``: pages to bring from the host tier before the step that admits it runs;
    ``num_cached_at_arrival``: the prompt tokens the worker estimated, when it arrived, it would not compute."""

    index: int
    output_len: int
    first_generated: int
    hashes: list[int]
    num_loading: int = 0
    num_cached_at_arrival: int = 0

    @classmethod
    def of_blocks(cls, index: int, block_ids: tuple[int, ...], input_len: int, output_len: int, block_size: int,
                  first_generated: int, hashes: list[int]) -> SimSeq:
        """The request whose prompt is ``input_len`` tokens of blocks ``block_ids``; ``hashes`` those of its full
        prompt blocks. Its tokens are an ``array`` of uint32, which slices and compares at memory speed."""
        prompt = np.repeat(np.asarray(block_ids, dtype=np.uint32), block_size)[:input_len]
        return cls(str(index), array("I", prompt.tobytes()), input_len, index=index, output_len=output_len,
                   first_generated=first_generated, hashes=hashes)

    def append_generated(self, num_tokens: int) -> None:
        """Appends its next ``num_tokens`` generated tokens."""
        start = self.first_generated + self.num_generated
        self.token_ids.extend(range(start, start + num_tokens))


@dataclass(frozen=True)
class Notice:
    """Request ``index`` generated ``num_tokens`` tokens in the step that ended at ``time_s``; ``first``: its first
    token is among them; ``finished``: its last is."""

    index: int
    time_s: float
    num_tokens: int
    first: bool
    finished: bool
    cached_tokens: int


@dataclass
class _Step:
    start_s: float
    end_s: float
    batch: ScheduledBatch[SimSeq]
    num_decode_steps: int
    decode_step_s: float


class SimWorker:
    """A worker's scheduler and cache tiers; the simulator calls ``submit`` and ``finish_step``.

    Both return the end time of the step now in flight when it changed (the simulator schedules it, tagged
    with ``version``), or None when it did not. ``finish_step`` must be called at exactly that end time for the
    current version; its notices are the requests that generated tokens in that step.
    """

    def __init__(self, config: WorkerConfig, cost: CostModel, block_size: int, namespace: str,
                 rng: random.Random | None = None) -> None:
        """``rng`` draws the step-time noise (``config.step_noise``), one generator per worker."""
        self.config = config
        self._cost = cost
        self._rng = rng or random.Random(0)
        self._block_size = block_size
        self._allocator = PageAllocator(config.num_blocks)
        self._cache = PageKeyedCache(self._allocator, block_size, namespace)
        self._host = HostTier(config.host_blocks)
        self._seed = namespace_seed(namespace)
        self._block_load_s = cost.model.kv_bytes_per_token_per_rank * block_size / config.host_bw
        extend = self._load_from_host if config.host_blocks else None
        self._scheduler: Scheduler[SimSeq] = Scheduler(config.scheduler, self._cache, self._allocator, block_size,
                                                       extend)
        self._step: _Step | None = None
        self._prompt_pages: Counter[int] = Counter()  # the full prompt pages of the requests in flight
        self.version = 0
        self._used_area = 0.0  # integral of used blocks over time
        self._peak_used = 0
        self._last_s = 0.0

    @property
    def num_evicted_blocks(self) -> int:
        return self._scheduler.num_evicted_pages

    @property
    def num_preemptions(self) -> int:
        return self._scheduler.num_preemptions

    # ---- the simulator's interface -------------------------------------------------------------------

    def submit(self, seq: SimSeq, now: float) -> float | None:
        """Queue a routed request at ``now``."""
        self._estimate_cached(seq)
        self._scheduler.add(seq)
        if self._step is None:
            return self._start(now)
        return self._cut(now)

    def finish_step(self, now: float) -> tuple[list[Notice], float | None]:
        """Apply the step ending at ``now``; start the next one if there is work."""
        step, self._step = self._step, None
        assert step is not None and step.end_s == now, "finish_step called off its step's end"
        notices = self._apply(step, now)
        return notices, self._start(now)

    def load(self, at_s: float) -> ReportedLoad:
        """The load report the engine would send at ``at_s`` (see the module docstring): a time from the last
        ``submit`` or ``finish_step`` call to the end of the step in flight."""
        seqs = [*self._scheduler.running, *self._scheduler.waiting]
        prefill = sum(max(0, seq.prompt_len - max(seq.num_computed, seq.num_cached_at_arrival))
                      for seq in seqs if seq.num_generated == 0)
        output = sum(seq.output_len - seq.num_generated for seq in seqs) - self._decoded_by(at_s)
        return ReportedLoad(len(seqs), prefill, output)

    def take_events(self) -> list[KVEvent]:
        """The worker's KV events since the last call, over both tiers, oldest first."""
        self._host.absorb(self._cache.take_events())
        return self._host.take_events()

    def kv_use(self, end_s: float) -> tuple[float, float]:
        """Time-averaged and peak fraction of blocks in use (cached or held by requests) from 0 to ``end_s``."""
        self._account(end_s)
        mean = self._used_area / end_s / self.config.num_blocks if end_s > 0 else 0.0
        return mean, self._peak_used / self.config.num_blocks

    # ---- steps ----------------------------------------------------------------------------------------

    def _start(self, now: float) -> float | None:
        self._account(now)  # every change to the pool below happens at ``now``
        batch = self._scheduler.schedule()
        self._peak_used = max(self._peak_used, self._used())
        if not batch.items:
            return None
        chunks: list[PrefillChunk] = []
        num_decodes = decode_context = num_loading = 0
        for seq, n in batch.items:
            if n == 1:
                num_decodes += 1
                decode_context += seq.num_computed
            else:
                chunks.append(PrefillChunk(n, seq.num_computed))
            num_loading += seq.num_loading
            seq.num_loading = 0  # brought in by this step
        k = 1 if chunks or num_loading else self._decode_run(batch)
        midpoint = decode_context + num_decodes * (k - 1) // 2
        step_s = self._cost.step_time(chunks, num_decodes, midpoint) + num_loading * self._block_load_s
        if self.config.step_noise:  # a macro-step's k steps draw one factor of the spread of their mean
            step_s *= self._rng.lognormvariate(0.0, self.config.step_noise / k**0.5)
        self._step = _Step(now, now + k * step_s, batch, k, step_s)
        self.version += 1
        return self._step.end_s

    def _decode_run(self, batch: ScheduledBatch[SimSeq]) -> int:
        """The steps from ``batch`` on that are one macro-step (see the module docstring): the fewest tokens any
        request owes or has room for, or 1 when ``batch`` has a request still in its prompt."""
        if any(seq.num_computed < seq.prompt_len for seq, _ in batch.items):
            return 1
        return min(min(len(seq.pages) * self._block_size - seq.num_computed, seq.output_len - seq.num_generated)
                   for seq, _ in batch.items)

    def _cut(self, now: float) -> float | None:
        """End a decode macro-step at the first step boundary after ``now`` (admitting there)."""
        step = self._step
        assert step is not None
        if step.num_decode_steps == 1:
            return None
        done = min(int((now - step.start_s) / step.decode_step_s) + 1, step.num_decode_steps)
        if done == step.num_decode_steps:
            return None
        step.num_decode_steps = done
        step.end_s = step.start_s + done * step.decode_step_s
        self.version += 1
        return step.end_s

    def _apply(self, step: _Step, now: float) -> list[Notice]:
        """The step's effect, as the engine applies one: its tokens computed, a token sampled for each sequence
        computed to its end, finished ones handed back to the scheduler. A macro-step first fast-forwards its
        other steps, which change nothing else."""
        self._account(now)
        skipped = step.num_decode_steps - 1
        if skipped:
            for seq, _ in step.batch.items:
                seq.num_computed += skipped
                seq.append_generated(skipped)
        self._scheduler.complete(step.batch)
        notices = []
        for seq, _ in step.batch.items:
            if seq.num_computed < len(seq.token_ids):
                continue  # a prefill chunk short of the prompt's end samples nothing
            seq.append_generated(1)
            finished = seq.num_generated == seq.output_len
            if finished:
                self._scheduler.finish(seq, "length")
                self._forget_prompt(seq)
            notices.append(Notice(seq.index, now, skipped + 1, seq.num_generated == 1, finished,
                                  seq.num_cached_prompt_tokens))
        return notices

    def _decoded_by(self, at_s: float) -> int:
        """The tokens the decode macro-step in flight generated in its steps that ended before ``at_s``."""
        step = self._step
        if step is None or step.num_decode_steps == 1:
            return 0
        ended = math.ceil((at_s - step.start_s) / step.decode_step_s) - 1
        return min(max(ended, 0), step.num_decode_steps - 1) * len(step.batch.items)

    # ---- load estimates, as the engine's ---------------------------------------------------------------

    def _estimate_cached(self, seq: SimSeq) -> None:
        """``seq.num_cached_at_arrival`` as ``Engine._estimate_cached`` sets it: the longer of the prompt's prefix
        the cache tiers hold (the host tier's count: the scheduler will load them) and the prefix the prompts in
        flight here bring. Touches nothing the scheduler sees."""
        pages = self._prompt_pages_of(seq)
        ahead = next((i for i, page in enumerate(pages) if page not in self._prompt_pages), len(pages))
        self._prompt_pages.update(pages)
        self._host.absorb(self._cache.take_events())  # the blocks the device evicted are in host memory now
        on_device = self._cache.cached_prefix_len(seq.token_ids[: seq.prompt_len - 1]) // self._block_size
        held = on_device + self._host.held(pages, on_device, len(pages))
        seq.num_cached_at_arrival = max(held, ahead) * self._block_size

    def _forget_prompt(self, seq: SimSeq) -> None:
        pages = self._prompt_pages_of(seq)
        self._prompt_pages.subtract(pages)
        for page in pages:
            if self._prompt_pages[page] <= 0:
                del self._prompt_pages[page]

    def _prompt_pages_of(self, seq: SimSeq) -> list[int]:
        """The hashes of the full pages of its prompt less the last token, as the engine hashes a prompt."""
        return seq.hashes[: (seq.prompt_len - 1) // self._block_size]

    # ---- the host tier ---------------------------------------------------------------------------------

    def _load_from_host(self, seq: SimSeq, start: int, stop: int) -> int:
        """The scheduler's ``extend_prefix``: the pages from ``start`` on the host tier holds, to load."""
        self._host.absorb(self._cache.take_events())  # the blocks the device just evicted are in host memory now
        seq.num_loading = self._host.hits(self._page_hashes(seq, stop), start, stop)
        return seq.num_loading

    def _page_hashes(self, seq: SimSeq, num_pages: int) -> list[int]:
        """``seq.hashes`` extended to its first ``num_pages`` pages (past the prompt after a preemption)."""
        hashes = seq.hashes
        if len(hashes) < num_pages:
            keys = self._cache.keys(seq.token_ids)[len(hashes) : num_pages]
            seq.hashes = hashes = hashes + page_hashes(keys, 1, hashes[-1] if hashes else self._seed)
        return hashes

    def _used(self) -> int:
        return self.config.num_blocks - self._allocator.num_free

    def _account(self, now: float) -> None:
        self._used_area += self._used() * (now - self._last_s)
        self._last_s = now
