"""The engine: a plain Python object that serves one model from a paged KV cache with prefix reuse.

Use it synchronously (``add_request`` then ``step`` until ``has_unfinished`` is false) or from asyncio with
``generate``, which streams ``RequestOutput`` deltas. Neither needs Ray nor gRPC: the worker service and the
Ray actor are thin shells around this object.

Threading contract: one thread at a time calls ``step`` (and owns everything not listed here). From any
thread, also while ``step`` runs in another:

- ``add_request`` and ``abort`` only validate and enqueue (``add_request`` also estimates, for ``load``, how much
  of the prompt the cache or the requests ahead will hold, reading the cache without locking); ``step`` applies
  them at its start. ``add_request`` checks the id and the queue and enqueues under the engine's lock, so
  concurrent calls take one request per id and never more than the queue holds.
- ``flush_cache`` runs at once between steps, or at the end of the step in progress; its future tells how
  many pages it freed.
- ``take_events`` returns the radix cache's events in order: ``step`` moves them into a lock-protected
  buffer at its end, and between steps ``take_events`` also collects those of direct cache calls.
- ``load`` reads counters without locking: a snapshot that may be a step out of date under concurrency.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Sequence as Seq
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from prometheus_client import CollectorRegistry

from radixserve.cluster.base.config import EngineConfig
from radixserve.cluster.base.hashing import namespace_seed, page_hashes
from radixserve.cluster.base.model_store import ModelStore
from radixserve.worker import kernels
from radixserve.worker.kv.allocator import PageAllocator
from radixserve.worker.kv.pool import KVPool
from radixserve.worker.kv.radix_cache import KVEvent, RadixCache
from radixserve.worker.metrics import EngineMetrics
from radixserve.worker.models.checkpoint import Checkpoint
from radixserve.worker.models.loading import open_checkpoint
from radixserve.worker.models.quantization import make_linear_method, resolve_quantization
from radixserve.worker.models.scoring import build_model
from radixserve.worker.outputs import RequestOutput
from radixserve.worker.runner import ModelRunner
from radixserve.worker.sampler import Sampler, SamplerOutput, SamplingState
from radixserve.cluster.base.generation import ChoiceDelta, TokenLogprob
from radixserve.cluster.base.sampling_params import SamplingParams
from radixserve.worker.scheduler import ScheduledBatch, Scheduler
from radixserve.worker.stats import EngineLoad, EngineStats
from radixserve.worker.sequence import Sequence, SeqStatus
from radixserve.worker.stop_checker import StopChecker


log = logging.getLogger(__name__)


class _Sampled(NamedTuple):
    """One row of a ``SamplerOutput``."""

    token_id: int
    logprob: float | None
    top: list[tuple[int, float]] | None


class EngineOverloaded(RuntimeError):
    """The waiting queue is full; the request was not accepted."""


class RequestIdInUse(ValueError):
    """A request with this id is still in flight."""


class RequestFailed(RuntimeError):
    """A request's own work (sampling, stop checking, detokenizing) or the engine step running it failed; the
    message names the request and the cause.

    Raised by ``generate`` for that request alone; the engine goes on serving the others.
    """


@dataclass(eq=False)
class _Request:
    request_id: str
    seqs: list[Sequence]
    checkers: list[StopChecker]
    pending: list[Sequence] = field(default_factory=list)  # samples 1..n-1, admitted after sample 0's prefill
    aborted: bool = False
    error: str | None = None  # set when the request's own work failed
    # Its prompt's full pages, and how many tokens of it were cached or being computed for a request ahead when it
    # arrived (an estimate for load reports: those pages will be cached by the time it runs).
    page_hashes: list[int] = field(default_factory=list)
    num_cached_at_arrival: int = 0
    # time.monotonic() of arrival, of the first step that computed it, and of each sample's last token so far
    arrival_s: float = field(default_factory=time.monotonic)
    started_s: float | None = None
    last_token_s: dict[int, float] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return all(seq.status is SeqStatus.FINISHED for seq in self.seqs)

    def owed_tokens(self, max_model_len: int) -> tuple[int, int]:
        """Prompt tokens still to prefill before the first token, and the output budgets left of its samples."""
        leader = self.seqs[0]
        prefill = 0
        if leader.num_generated == 0 and leader.status is not SeqStatus.FINISHED:
            prefill = max(0, leader.prompt_len - max(leader.num_computed, self.num_cached_at_arrival))
        output = sum(min(seq.params.max_tokens - seq.num_generated, max_model_len - len(seq.token_ids))
                     for seq in self.seqs if seq.status is not SeqStatus.FINISHED)
        return prefill, output


class RequestStream:
    """The outputs of one request the engine took in (``Engine.submit``), in order, up to its finished one;
    ``RequestFailed`` when the request's own work or a step running it failed (after the outputs before the
    failure). ``close`` (idempotent) ends it: before the finished output, that aborts the request and frees its
    pages. Its consumer must close it however it ends."""

    def __init__(self, request_id: str, queue: asyncio.Queue[RequestOutput],
                 on_close: Callable[[str, bool], None]) -> None:
        self.request_id = request_id
        self._queue = queue
        self._on_close = on_close
        self._finished = False
        self._closed = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._finished:
            raise StopAsyncIteration
        item = await self._queue.get()
        self._finished = item.finished
        if item.error is not None:
            raise RequestFailed(item.error)
        return item

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._on_close(self.request_id, self._finished)


class Engine:
    """Serves one model. See the module docstring for the calling contract."""

    def __init__(self, config: EngineConfig, checkpoint: Checkpoint, worker_id: str = "engine"):
        """``worker_id`` labels the engine's metrics (``self.metrics``, in a registry of its own)."""
        self.config = config
        self.tokenizer = checkpoint.tokenizer
        self.model_config = checkpoint.config
        self.device = torch.device(config.device)
        dtype = getattr(torch, config.dtype)
        num_pages = self._num_pages(dtype)
        context_len = min(config.max_model_len or self.model_config.max_position_embeddings,
                          self.model_config.max_position_embeddings)
        self.max_model_len = min(context_len, num_pages * config.cache.page_size)
        self.quantization = resolve_quantization(config.quantization, checkpoint.has_blocks, config.device)
        self.model = build_model(checkpoint, self.max_model_len, dtype, self.device,
                                 make_linear_method(self.quantization))
        self.kv = KVPool(self.model_config.num_hidden_layers, num_pages, config.cache.page_size,
                         self.model_config.num_key_value_heads, self.model_config.head_dim, dtype, self.device,
                         config.kv_cache_dtype)
        self.allocator = PageAllocator(num_pages)
        self.cache = RadixCache(self.allocator, config.cache.page_size, config.hash_namespace)
        self.scheduler = Scheduler(config.scheduler, self.cache, self.allocator, config.cache.page_size)
        self.runner = ModelRunner(self.model, self.kv, self.device)
        kernels.build(self.device)
        self.sampler = Sampler(torch.Generator(device=self.device).manual_seed(config.seed))
        self.eos_token_ids = self.model_config.eos_token_ids or (self.tokenizer.eos_token_id,)
        self.stats = EngineStats()
        self.metrics = EngineMetrics(CollectorRegistry(), worker_id)
        self.metrics.bind(self.load)
        self._requests: dict[str, _Request] = {}
        self._inbox: deque[_Request] = deque()
        self._aborts: deque[_Request] = deque()
        self._streams: dict[str, asyncio.Queue[RequestOutput]] = {}
        # Guards the four fields below, which let other threads flush the cache, take its events and add requests,
        # and makes add_request's check of the id and the queue one step with its insert into _requests.
        self._lock = threading.Lock()
        self._stepping = False
        self._events: list[KVEvent] = []
        self._flushes: list[Future[int]] = []
        self._prompt_pages: Counter[int] = Counter()  # page hashes of the prompts in flight (load estimates)
        self._hash_seed = namespace_seed(config.hash_namespace)
        self._driver: asyncio.Task[None] | None = None

    @classmethod
    def from_config(cls, config: EngineConfig, worker_id: str = "engine") -> Engine:
        """Opens ``config.model`` (a model-store name or a path) and builds the engine around it."""
        return cls(config, open_checkpoint(ModelStore().resolve(config.model)), worker_id)

    def _num_pages(self, dtype: torch.dtype) -> int:
        cache = self.config.cache
        if cache.num_pages is not None:
            return cache.num_pages
        m = self.model_config
        page_bytes = KVPool.page_bytes(m.num_hidden_layers, cache.page_size, m.num_key_value_heads, m.head_dim, dtype,
                                       self.config.kv_cache_dtype)
        return max(2, int(cache.memory_gib * 2**30) // page_bytes)

    # ---- requests -------------------------------------------------------------------------------------

    def add_request(self, prompt: str | Seq[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        """Validates and enqueues a request; returns its id.

        ``prompt`` is text (tokenized as is: apply a chat template first for chat) or token ids.
        Raises ValueError naming the field for bad input, RequestIdInUse when ``request_id`` is in flight,
        EngineOverloaded when ``max_waiting_requests`` requests wait already; the id and the queue are checked and
        the request taken in at once, under the engine's lock.
        """
        params = params or SamplingParams()
        request_id = request_id if request_id is not None else uuid.uuid4().hex
        prompt_ids = self._prompt_ids(prompt)
        self._check_token_ids(params.stop_token_ids, "stop_token_ids")
        request = self._make_request(request_id, prompt_ids, params)
        request.page_hashes = page_hashes(prompt_ids[:-1], self.config.cache.page_size, self._hash_seed)
        num_cached = self.cache.cached_prefix_len(prompt_ids[:-1])  # read without the stepping thread: an estimate
        with self._lock:
            if request_id in self._requests:
                raise RequestIdInUse(f"request_id: {request_id!r} is already in flight")
            num_waiting = self._num_waiting()
            if num_waiting >= self.config.scheduler.max_waiting_requests:
                raise EngineOverloaded(f"queue full: {num_waiting} requests waiting")
            self._estimate_cached(request, num_cached)
            self._requests[request_id] = request
            self._inbox.append(request)
        return request_id

    def _estimate_cached(self, request: _Request, num_cached: int) -> None:
        """How much of the prompt will not need computing: the longer of its prefix the cache held (``num_cached``)
        and its prefix that requests ahead of it bring. Call with ``_lock`` held."""
        ahead = next((i for i, h in enumerate(request.page_hashes) if h not in self._prompt_pages),
                     len(request.page_hashes))
        self._prompt_pages.update(request.page_hashes)
        request.num_cached_at_arrival = max(num_cached, ahead * self.config.cache.page_size)

    def _num_waiting(self) -> int:
        """Requests in flight with no sample running: queued, or preempted back to the queue (lock-free, so
        possibly a step out of date while one runs)."""
        return max(0, len(self._requests) - self.scheduler.num_running_requests)

    def _forget_prompt(self, request: _Request) -> None:
        with self._lock:
            self._prompt_pages.subtract(request.page_hashes)
            for page in request.page_hashes:
                if self._prompt_pages[page] <= 0:
                    del self._prompt_pages[page]

    def _prompt_ids(self, prompt: str | Seq[int]) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        else:
            ids = list(prompt)
            self._check_token_ids(ids, "prompt_token_ids")
        if not ids:
            raise ValueError("prompt: must not be empty")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt: {len(ids)} tokens leave no room to generate within the context of "
                             f"{self.max_model_len} tokens")
        return ids

    def _check_token_ids(self, ids: Seq[int], name: str) -> None:
        vocab_size = self.model_config.vocab_size
        bad = [t for t in ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"{name}: token id {bad[0]!r} is outside the vocabulary [0, {vocab_size})")

    def _make_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> _Request:
        seqs = []
        for i in range(params.n):
            sample_params = params.for_sample(i)
            seqs.append(Sequence(
                request_id=request_id, index=i, token_ids=list(prompt_ids),
                prompt_len=len(prompt_ids), params=sample_params,
                sampling=SamplingState(sample_params, prompt_ids, self.model_config.vocab_size, self.device),
            ))
        checkers = [StopChecker(s, self.tokenizer, self.eos_token_ids, self.max_model_len) for s in seqs]
        return _Request(request_id, seqs, checkers, pending=seqs[1:])

    def abort(self, request_id: str) -> None:
        """Asks for the request in flight under ``request_id`` to end; the next ``step`` frees everything it holds
        and reports ``abort``. The abort is bound to that request: one ending meanwhile is not aborted, nor is a
        later request given the same id."""
        request = self._requests.get(request_id)
        if request is not None:
            self._aborts.append(request)

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    # ---- stepping -------------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Runs one scheduling iteration and returns the progress of every request that moved."""
        with self._lock:
            self._stepping = True
        try:
            return self._step()
        finally:
            with self._lock:
                self._stepping = False
                flushed = self._run_flushes()
                self._events.extend(self.cache.take_events())
            _resolve(flushed)

    def _step(self) -> list[RequestOutput]:
        """The outputs of every request the step moved: each request it ended (also by an abort it applied, or
        by its own failure) reports its end exactly once, here, and leaves the engine."""
        started = time.monotonic()
        touched: dict[str, _Request] = {}
        batch: ScheduledBatch[Sequence] | None = None
        try:
            self._drain_inbox(touched)
            batch = self.scheduler.schedule()
            if batch.items:
                self._run(batch, started, touched)
        except Exception as exc:  # ends the requests the step worked on; the engine goes on
            self._fail_step(exc, self._requests_of(batch), touched)
        return [self._output(request) for request in touched.values()]

    def _run(self, batch: ScheduledBatch[Sequence], started: float, touched: dict[str, _Request]) -> None:
        self._mark_started(batch, started)
        logits, sampled = self.runner.run(batch)
        self.stats.num_steps += 1
        self.stats.num_computed_tokens += batch.num_tokens
        self.scheduler.complete(batch)
        if sampled:
            self._accept(logits, sampled, touched)
        self.metrics.on_step(len(batch.items), batch.num_tokens, time.monotonic() - started)

    def _requests_of(self, batch: ScheduledBatch[Sequence] | None) -> list[_Request]:
        """The requests of ``batch``; every request in flight when the step failed before its batch was built."""
        if batch is None:
            return list(self._requests.values())
        return list({item.seq.request_id: self._requests[item.seq.request_id] for item in batch.items}.values())

    def _mark_started(self, batch: ScheduledBatch, now: float) -> None:
        for item in batch.items:
            request = self._requests[item.seq.request_id]
            if request.started_s is None:
                request.started_s = now
                self.metrics.on_scheduled(now - request.arrival_s)

    def _drain_inbox(self, touched: dict[str, _Request]) -> None:
        while self._inbox:
            request = self._inbox.popleft()
            self.scheduler.add(request.seqs[0])
        while self._aborts:
            request = self._aborts.popleft()
            if request.aborted or request.finished:
                continue
            request.aborted = True
            for seq in request.seqs:
                if seq.status is not SeqStatus.FINISHED:
                    self._finish(seq, "abort", in_scheduler=seq not in request.pending)
            request.pending.clear()
            touched[request.request_id] = request

    def _accept(self, logits: torch.Tensor, sampled: list[Sequence], touched: dict[str, _Request]) -> None:
        now = time.monotonic()
        for seq, token in zip(sampled, self._sample(logits, sampled), strict=True):
            request = self._requests[seq.request_id]
            touched[request.request_id] = request
            if request.error is not None:
                continue  # another sample of the request failed earlier in this step
            try:
                if isinstance(token, Exception):
                    raise token
                self._append(request, seq, token, now)
            except Exception as exc:
                self._fail_request(request, exc)

    def _sample(self, logits: torch.Tensor, sampled: list[Sequence]) -> list[_Sampled | Exception]:
        """One sampler row per sampled sequence.

        The batch is sampled at once; should that fail, each row is sampled alone, so that only the rows whose
        own sampling fails get their exception.
        """
        try:
            return _rows(self.sampler(logits, [seq.sampling for seq in sampled], self.eos_token_ids))
        except Exception:
            rows: list[_Sampled | Exception] = []
            for row, seq in enumerate(sampled):
                try:
                    rows.extend(_rows(self.sampler(logits[row : row + 1], [seq.sampling], self.eos_token_ids)))
                except Exception as exc:
                    rows.append(exc)
            return rows

    def _append(self, request: _Request, seq: Sequence, token: _Sampled, now: float) -> None:
        seq.token_ids.append(token.token_id)
        seq.sampling.append(token.token_id)
        self._count(seq)
        self._time_token(request, seq.index, now)
        if token.logprob is not None:
            seq.logprobs.append(TokenLogprob(token.token_id, token.logprob, tuple(token.top or ())))
        reason = request.checkers[seq.index].append(token.token_id)
        if reason is not None:
            self._finish(seq, reason, in_scheduler=True)
        if request.pending and seq.index == 0:
            self._release_pending(request)

    def _fail_request(self, request: _Request, exc: Exception) -> None:
        """Ends ``request`` with an error, its own work having failed; the others go on."""
        log.exception("request %s failed", request.request_id, exc_info=exc)
        self._end_with_error(request, f"{type(exc).__name__}: {exc}")

    def _fail_step(self, exc: Exception, requests: list[_Request], touched: dict[str, _Request]) -> None:
        """Ends with an error each of ``requests`` not finished yet (those a failed step worked on) and marks it
        touched, so that it reports its end."""
        log.exception("engine step failed; ending its %d requests", len(requests), exc_info=exc)
        for request in requests:
            if not request.finished:
                self._end_with_error(request, f"engine step failed: {type(exc).__name__}: {exc}")
                touched[request.request_id] = request

    def _end_with_error(self, request: _Request, cause: str) -> None:
        """Ends every sample of ``request`` with finish reason ``error``, freeing what it holds."""
        request.error = f"request {request.request_id!r} failed: {cause}"
        for seq in request.seqs:
            if seq.status is not SeqStatus.FINISHED:
                self._finish(seq, "error", in_scheduler=seq not in request.pending)
        request.pending.clear()

    def _count(self, seq: Sequence) -> None:
        self.stats.num_generated_tokens += 1
        if seq.num_generated == 1:  # the prompt is done: count it once, however often it was preempted
            self.stats.num_prompt_tokens += seq.prompt_len
            self.stats.num_cached_prompt_tokens += seq.num_cached_prompt_tokens

    def _time_token(self, request: _Request, index: int, now: float) -> None:
        last = request.last_token_s.get(index)
        if last is not None:
            self.metrics.on_token(now - last)
        elif not request.last_token_s:  # the request's first token (later samples' first tokens have no gap)
            started = request.started_s if request.started_s is not None else now
            self.metrics.on_first_token(now - request.arrival_s, now - started)
        request.last_token_s[index] = now

    def _release_pending(self, request: _Request) -> None:
        """Admits samples 1..n-1 once sample 0's prompt pages are in the radix cache, so they share them."""
        for seq in reversed(request.pending):
            self.scheduler.waiting.appendleft(seq)
        request.pending.clear()

    def _finish(self, seq: Sequence, reason: str, in_scheduler: bool) -> None:
        if in_scheduler:
            self.scheduler.finish(seq, reason)
        else:
            seq.status, seq.finish_reason = SeqStatus.FINISHED, reason

    def _output(self, request: _Request) -> RequestOutput:
        outputs: tuple[ChoiceDelta, ...] = ()
        if request.error is None:
            try:
                outputs = self._deltas(request)
            except Exception as exc:  # detokenizing is the request's own work too
                self._fail_request(request, exc)
        finished = request.finished
        if finished:
            del self._requests[request.request_id]
            self._forget_prompt(request)
            self.stats.num_requests_finished += 1
            self.metrics.on_finished(time.monotonic() - request.arrival_s)
        leader = request.seqs[0]
        return RequestOutput(request.request_id, outputs, leader.prompt_len, leader.num_cached_prompt_tokens,
                             finished, request.error)

    def _deltas(self, request: _Request) -> tuple[ChoiceDelta, ...]:
        """Each sample's new tokens, text and logprobs since the last output."""
        outputs = []
        for seq, checker in zip(request.seqs, request.checkers):
            new_ids = seq.token_ids[seq.prompt_len + checker.num_emitted_tokens :]
            new_logprobs = seq.logprobs[checker.num_emitted_tokens :]
            checker.num_emitted_tokens += len(new_ids)
            finished = seq.status is SeqStatus.FINISHED
            text = checker.take_text(finished)
            if new_ids or text or (finished and not checker.finish_reported):
                checker.finish_reported = finished
                outputs.append(ChoiceDelta(seq.index, tuple(new_ids), text, tuple(new_logprobs),
                                                seq.finish_reason))
        return tuple(outputs)

    def take_events(self) -> list[KVEvent]:
        """KV events (pages stored / removed) since the last call, oldest first, for the router's prefix index.

        Any thread. While a step runs, its events are not included yet: they come with the next call after it.
        """
        with self._lock:
            if not self._stepping:
                self._events.extend(self.cache.take_events())
            events, self._events = self._events, []
        return events

    def cached_page_hashes(self) -> frozenset[int]:
        """Every page hash the radix cache holds; any thread, exact between steps (a step in progress may be
        changing the tree)."""
        with self._lock:
            return self.cache.page_hashes()

    def flush_cache(self) -> Future[int]:
        """Drops every cached page no request holds; the future gives the number of pages freed.

        Any thread. Runs at once between steps, else at the end of the step in progress; the ``removed``
        events come out of ``take_events`` as usual.
        """
        future: Future[int] = Future()
        with self._lock:
            self._flushes.append(future)
            flushed = [] if self._stepping else self._run_flushes()
        _resolve(flushed)
        return future

    def _run_flushes(self) -> list[tuple[Future[int], int]]:
        """Flushes for the pending futures not cancelled; call with ``_lock`` held and no step running.

        The futures are resolved by the caller once it released the lock, so their callbacks may use the engine.
        """
        flushed = [(future, self.cache.flush()) for future in self._flushes if future.set_running_or_notify_cancel()]
        self._flushes.clear()
        return flushed

    def load(self) -> EngineLoad:
        """The current load; any thread (lock-free, so possibly a step out of date while one runs)."""
        num_free = self.allocator.num_free
        owed = [request.owed_tokens(self.max_model_len) for request in list(self._requests.values())]
        return EngineLoad(num_running=self.scheduler.num_running_requests, num_waiting=self._num_waiting(),
                          num_pending_prefill_tokens=sum(p for p, _ in owed),
                          num_pending_output_tokens=sum(o for _, o in owed),
                          num_pages_used=self.allocator.num_pages - num_free, num_pages_free=num_free,
                          # a read between two counter updates of a running step could dip below zero
                          num_pages_evictable=max(0, self.cache.num_evictable_pages),
                          num_evicted_pages=self.scheduler.num_evicted_pages,
                          num_preemptions=self.scheduler.num_preemptions, **dataclasses.asdict(self.stats))

    # ---- asyncio --------------------------------------------------------------------------------------

    def submit(self, prompt: str | Seq[int], params: SamplingParams | None = None,
               request_id: str | None = None) -> RequestStream:
        """Takes the request in now (``add_request``'s checks and errors) and returns the stream of its outputs,
        which its consumer must close however it ends. Call on the event loop: the stepping starts at its next
        turn, whether or not anyone reads the stream yet."""
        request_id = self.add_request(prompt, params, request_id)
        queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self._streams[request_id] = queue
        self._ensure_driver()
        return RequestStream(request_id, queue, self._end_stream)

    async def generate(self, prompt: str | Seq[int], params: SamplingParams | None = None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Streams the request's outputs; closing the iterator early aborts the request.

        Validation errors raise before anything is yielded; ``RequestFailed`` when the request's own work or a step
        running it fails (after the outputs before the failure). Steps run in a worker thread so the event loop stays
        responsive; one driver task serves every concurrent ``generate`` of this engine,
        and ends when nothing is left to do.
        """
        stream = self.submit(prompt, params, request_id)
        try:
            async for output in stream:
                yield output
        finally:
            stream.close()

    def _end_stream(self, request_id: str, finished: bool) -> None:
        """A stream was closed: forget it, and abort its request unless it finished."""
        self._streams.pop(request_id, None)
        if not finished:
            self.abort(request_id)
            self._ensure_driver()

    def _ensure_driver(self) -> None:
        if self._driver is None or self._driver.done():
            self._driver = asyncio.get_running_loop().create_task(self._drive())

    async def _drive(self) -> None:
        """Steps while requests or aborts are pending, then ends (``_ensure_driver`` starts it again): no task is
        left pending when the loop closes, and the check runs on the loop, so a new request is never missed."""
        while self._requests or self._aborts:
            try:
                outputs = await asyncio.to_thread(self.step)
            except Exception as exc:  # a bug: ``step`` ends what its own failures touch
                outputs = self._fail_all(exc)
            for output in outputs:
                stream = self._streams.get(output.request_id)
                if stream is not None:
                    stream.put_nowait(output)

    def _fail_all(self, exc: Exception) -> list[RequestOutput]:
        """Ends every request in flight after ``step`` raised, so that none waits for good; their final outputs."""
        touched: dict[str, _Request] = {}
        self._fail_step(exc, list(self._requests.values()), touched)
        return [self._output(request) for request in touched.values()]


def _rows(out: SamplerOutput) -> list[_Sampled]:
    return [_Sampled(*row) for row in zip(out.token_ids, out.logprobs, out.top_logprobs, strict=True)]


def _resolve(flushed: list[tuple[Future[int], int]]) -> None:
    for future, num_freed in flushed:
        future.set_result(num_freed)
