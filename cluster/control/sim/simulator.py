"""The simulation loop: requests arrive, the router's own code picks a worker, simulated workers serve them.

Routing runs the real ``router.prefix_index.PrefixIndex`` (on the simulated clock), the real policies of
``router.policies`` and the router's own in-flight accounting (``router.routing``), in ``num_routers`` replicas
(``routers.SimRouter``) that take the arriving requests in turn, round-robin. Each index learns of cached and
evicted blocks only through the simulated workers' KV events, delivered to every router ``kv_event_lag_s`` after
the change. Each router sees each worker's load report as of its last poll (every ``health_interval_s``) and,
with ``shared_load``, the other routers' in-flight figures as of their last publication (every
``load_interval_s``); router ``r`` of ``N`` polls and publishes ``r / N`` of an interval after router 0, which
does so at whole multiples of it. With ``share_routes`` each routing decision reaches the other routers' indexes
``kv_event_lag_s`` after it is made, as routed credit (``router.route_hints``). A request is routed when it arrives: at its ``arrival_s``, or ``think_s`` after
the request it follows finished. Every request ends (the loop runs until no event is left; a request that could
never fit a worker's KV pool is refused up front with a ValueError).

The simulation is deterministic for a workload and a config: events at equal times run in the order they were
scheduled, and the only randomness is the policy's, seeded by ``seed``.
"""

from __future__ import annotations

import heapq
import itertools
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from radixserve.cluster.base.config import POLICIES, BusConfig, RouterConfig, SchedulerConfig, require
from radixserve.cluster.base.hashing import namespace_seed, page_hashes
from radixserve.cluster.control.sim.costmodel import DEVICES, MODELS, CostModel
from radixserve.cluster.control.sim.report import PolicyStats, Progress, RequestOutcome, WorkerStats, summarize
from radixserve.cluster.control.sim.routers import Sampled, SimRouter, peer_load
from radixserve.cluster.control.sim.workload import BLOCK_ID_LIMIT, Workload, oracle_cached_tokens, oracle_hit_ratio
from radixserve.cluster.control.sim.worker import Notice, SimSeq, SimWorker, WorkerConfig
from radixserve.router.policies import RouteRequest
from radixserve.router.routing import ReportedLoad
from radixserve.worker.kv.radix_cache import KVEvent

_NAMESPACE = "sim"


@dataclass(frozen=True)
class SimConfig:
    """One simulated cluster. ``num_blocks`` overrides the KV pool per worker that the cost model derives from
    device memory; ``tensor_parallel`` overrides the model preset's; ``host_kv_gib`` per worker of host DRAM keeps
    blocks evicted from the device, loaded back at ``host_bw`` bytes/s (PCIe); the router fields mirror
    ``RouterConfig``; ``max_batch_tokens`` and ``max_running`` are each worker's ``SchedulerConfig`` limits
    (``max_num_batched_tokens``, ``max_running_requests``); ``step_noise`` is each worker's step-time noise
    (``WorkerConfig.step_noise``), drawn from a generator per worker seeded by ``seed``. ``num_routers`` router
    replicas share the arrivals; ``shared_load``: each sees what the others publish of their in-flight load
    every ``load_interval_s`` (``BusConfig``); ``share_routes``: each credits the others' routing decisions
    (``BusConfig.share_routes``); each polls the workers' load every ``health_interval_s``. Router 0
    draws its ties from ``seed``, so one router routes as the simulator always did; router ``r`` from
    ``"<seed>:router-<r>"``."""

    num_workers: int = 8
    policy: str = "prefix"
    device: str = "h100"
    model: str = "llama-3-8b"
    tensor_parallel: int | None = None
    kv_memory_fraction: float = 0.9
    num_blocks: int | None = None
    max_batch_tokens: int = 8192
    max_running: int = 256
    host_kv_gib: float = 0.0
    host_bw: float = 32e9
    load_weight: float = RouterConfig.load_weight
    decode_weight: float = RouterConfig.decode_weight
    step_noise: float = 0.0
    kv_event_lag_s: float = 0.005
    pending_ttl_s: float = 30.0
    approx_ttl_s: float = 300.0
    num_routers: int = 1
    shared_load: bool = True
    share_routes: bool = BusConfig.share_routes
    load_interval_s: float = BusConfig.load_interval_s
    health_interval_s: float = RouterConfig.health_interval_s
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("num_workers", "max_batch_tokens", "max_running", "num_routers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.policy not in POLICIES:
            raise ValueError(f"policy: must be one of {POLICIES}, got {self.policy!r}")
        if self.device not in DEVICES:
            raise ValueError(f"device: must be one of {sorted(DEVICES)}, got {self.device!r}")
        if self.model not in MODELS:
            raise ValueError(f"model: must be one of {sorted(MODELS)}, got {self.model!r}")
        if self.tensor_parallel is not None and self.tensor_parallel < 1:
            raise ValueError(f"tensor_parallel: must be >= 1, got {self.tensor_parallel}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks: must be >= 1, got {self.num_blocks}")
        if self.host_kv_gib < 0:
            raise ValueError(f"host_kv_gib: must be >= 0, got {self.host_kv_gib}")
        if self.kv_event_lag_s < 0:
            raise ValueError(f"kv_event_lag_s: must be >= 0, got {self.kv_event_lag_s}")
        for name in ("load_interval_s", "health_interval_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)}")

    def cost_model(self) -> CostModel:
        model = MODELS[self.model]
        if self.tensor_parallel is not None:
            model = replace(model, tensor_parallel=self.tensor_parallel)
        return CostModel(DEVICES[self.device], model, self.kv_memory_fraction)

    def scheduler_config(self) -> SchedulerConfig:
        """The batching limits each worker's scheduler runs under."""
        return SchedulerConfig(max_num_batched_tokens=self.max_batch_tokens, max_running_requests=self.max_running)


@dataclass(frozen=True)
class SimRun:
    """Every request's outcome (in workload order) and each worker's figures, with the wall time taken."""

    config: SimConfig
    outcomes: tuple[RequestOutcome, ...]
    workers: tuple[WorkerStats, ...]
    wall_s: float


def simulate(workload: Workload, config: SimConfig, progress: Progress | None = None) -> SimRun:
    """Run ``workload`` through the cluster of ``config``; ``progress`` advances once per finished request."""
    started = time.monotonic()
    simulation = _Simulation(workload, config, progress)
    outcomes, workers = simulation.run()
    return SimRun(config, outcomes, workers, time.monotonic() - started)


def ttft_floor(workload: Workload, config: SimConfig) -> list[float]:
    """A lower bound on each request's TTFT under any routing policy on ``config``'s workers, in workload order.

    The request alone on an idle worker, its uncached suffix prefilled in one step after the prefix the unbounded
    oracle would hold (``oracle_cached_tokens``): no cluster caches more of a prompt, chunking and batching only add
    weight reads and step overheads, and queueing only adds time. A percentile of these bounds the same percentile
    of any run's TTFTs from below.
    """
    cost = config.cost_model()
    return [cost.prefill_time(request.input_len - cached, cached)
            for request, cached in zip(workload.requests, oracle_cached_tokens(workload), strict=True)]


def compare(workload: Workload, configs: Sequence[SimConfig],
            on_run: Callable[[PolicyStats], None] | None = None) -> list[PolicyStats]:
    """Simulate each config on ``workload`` (one progress line per run on stderr) and summarize each run."""
    oracle = oracle_hit_ratio(workload)
    results = []
    for config in configs:
        label = f"{config.policy} x{config.num_workers}"
        if config.num_routers > 1:
            label += f", {config.num_routers} routers, shared load {'on' if config.shared_load else 'off'}"
            label += "" if config.share_routes else ", routes not shared"
        with Progress(len(workload.requests), label) as progress:
            run = simulate(workload, config, progress)
        stats = summarize(config.policy, run.outcomes, run.workers, oracle, run.wall_s)
        results.append(stats)
        if on_run is not None:
            on_run(stats)
    return results


class _Simulation:
    def __init__(self, workload: Workload, config: SimConfig, progress: Progress | None) -> None:
        self._workload = workload
        self._config = config
        self._progress = progress
        self._block_size = workload.block_size
        cost = config.cost_model()
        num_blocks = config.num_blocks or cost.kv_capacity_tokens // self._block_size
        _check_fits(workload, num_blocks)
        block_bytes = cost.model.kv_bytes_per_token_per_rank * self._block_size
        host_blocks = int(config.host_kv_gib * 2**30 // block_bytes)
        worker_config = WorkerConfig(num_blocks, config.scheduler_config(), host_blocks, config.host_bw,
                                     config.step_noise)
        self._workers = [SimWorker(worker_config, cost, self._block_size, _NAMESPACE,
                                   random.Random(f"{config.seed}:{w}")) for w in range(config.num_workers)]
        self._ids = [f"worker-{i}" for i in range(config.num_workers)]
        self.now = 0.0
        num_routers = config.num_routers
        self._routers = [self._router(r) for r in range(num_routers)]
        # _polls[w][r]: worker w's load as router r last polled it
        self._polls = [[Sampled(worker.load, config.health_interval_s, r * config.health_interval_s / num_routers)
                        for r in range(num_routers)] for worker in self._workers]
        self._num_arrived = 0
        self._router_of: list[int] = [0] * len(workload.requests)
        self._seed = namespace_seed(_NAMESPACE)
        self._first_generated = _first_generated(workload)
        self._events: list[tuple[float, int, Callable[[], None]]] = []
        self._num_scheduled = 0
        self._followers: dict[int, list[int]] = {}
        self._arrival_s: dict[int, float] = {}  # followers: when they were released
        self._first_token_s: list[float] = [0.0] * len(workload.requests)
        self._outcomes: list[RequestOutcome | None] = [None] * len(workload.requests)

    def run(self) -> tuple[tuple[RequestOutcome, ...], tuple[WorkerStats, ...]]:
        for i, request in enumerate(self._workload.requests):
            if request.after < 0:
                self._at(request.arrival_s, lambda i=i: self._arrive(i))
            else:
                self._followers.setdefault(request.after, []).append(i)
        while self._events:
            self.now, _, action = heapq.heappop(self._events)
            action()
        outcomes = tuple(o for o in self._outcomes if o is not None)
        assert len(outcomes) == len(self._outcomes), "a request never finished"
        end_s = max(o.finish_s for o in outcomes)
        served = Counter(o.worker for o in outcomes)
        return outcomes, tuple(self._worker_stats(w, end_s, served[w]) for w in range(len(self._workers)))

    def _router(self, r: int) -> SimRouter:
        config = self._config
        rng = random.Random(config.seed if r == 0 else f"{config.seed}:router-{r}")
        return SimRouter(self._ids, config.policy, config.load_weight, config.decode_weight, rng, config.pending_ttl_s,
                         config.approx_ttl_s, lambda: self.now, config.load_interval_s,
                         r * config.load_interval_s / config.num_routers)

    def _at(self, time_s: float, action: Callable[[], None]) -> None:
        heapq.heappush(self._events, (time_s, self._num_scheduled, action))
        self._num_scheduled += 1

    def _arrive(self, i: int) -> None:
        request = self._workload.requests[i]
        cacheable = request.block_ids[: request.input_len // self._block_size]
        hashes = page_hashes(cacheable, 1, self._seed)
        route = RouteRequest(request.input_len, request.output_len, self._block_size)
        r = self._router_of[i] = self._num_arrived % len(self._routers)
        self._num_arrived += 1
        reports = [polls[r].value(self.now) for polls in self._polls]
        w = self._routers[r].route(route, hashes, str(i), reports, self._peers(r), self.now).worker
        if self._config.share_routes and len(self._routers) > 1:
            self._at(self.now + self._config.kv_event_lag_s, lambda: self._share_route(r, w, hashes))
        seq = SimSeq.of_blocks(i, request.block_ids, request.input_len, request.output_len, self._block_size,
                               self._first_generated[i], hashes)
        self._changing(w)
        self._schedule_step(w, self._workers[w].submit(seq, self.now))

    def _share_route(self, r: int, w: int, hashes: Sequence[int]) -> None:
        """Router ``r``'s decision to send ``hashes`` to worker ``w`` reaches the other routers."""
        for k, router in enumerate(self._routers):
            if k != r:
                router.credit(self._ids[w], hashes)

    def _peers(self, r: int) -> list[ReportedLoad] | None:
        """What the routers other than ``r`` last published, summed per worker; None without shared load."""
        if not self._config.shared_load:
            return None
        return peer_load([router.published(self.now) for k, router in enumerate(self._routers) if k != r])

    def _changing(self, w: int) -> None:
        """Worker ``w``'s load is about to change: the polls since the last change see it as it was."""
        for poll in self._polls[w]:
            poll.changing(self.now)

    def _schedule_step(self, w: int, end_s: float | None) -> None:
        worker = self._workers[w]
        if end_s is not None:
            version = worker.version
            self._at(end_s, lambda: self._step(w, version))
        events = worker.take_events()
        if events:
            self._at(self.now + self._config.kv_event_lag_s, lambda: self._apply_events(w, events))

    def _step(self, w: int, version: int) -> None:
        worker = self._workers[w]
        if version != worker.version:
            return  # the step was cut short; its replacement is scheduled
        self._changing(w)
        notices, end_s = worker.finish_step(self.now)
        for notice in notices:
            self._notice(w, notice)
        self._schedule_step(w, end_s)

    def _notice(self, w: int, notice: Notice) -> None:
        """The routing router's view of a request's progress, as its streamed tokens tell the real router."""
        i = notice.index
        self._routers[self._router_of[i]].notice(w, str(i), notice.num_tokens, notice.first, notice.finished,
                                                 self.now)
        if notice.first:
            self._first_token_s[i] = notice.time_s
        if not notice.finished:
            return
        request = self._workload.requests[i]
        arrival_s = self._arrival_s.get(i, request.arrival_s)
        self._outcomes[i] = RequestOutcome(w, arrival_s, self._first_token_s[i], notice.time_s, request.input_len,
                                           notice.cached_tokens, request.output_len)
        for follower in self._followers.get(i, ()):
            at = notice.time_s + self._workload.requests[follower].think_s
            self._arrival_s[follower] = at
            self._at(at, lambda f=follower: self._arrive(f))
        if self._progress is not None:
            self._progress.advance()

    def _apply_events(self, w: int, events: list[KVEvent]) -> None:
        for router in self._routers:
            router.apply_events(self._ids[w], events)

    def _worker_stats(self, w: int, end_s: float, num_requests: int) -> WorkerStats:
        worker = self._workers[w]
        kv_mean, kv_peak = worker.kv_use(end_s)
        return WorkerStats(num_requests, kv_mean, kv_peak, worker.num_evicted_blocks, worker.num_preemptions)


def _check_fits(workload: Workload, num_blocks: int) -> None:
    block_size = workload.block_size
    for i, request in enumerate(workload.requests):
        needed = -(-(request.input_len + request.output_len) // block_size)
        if needed > num_blocks:
            raise ValueError(f"num_blocks: request {i} needs {needed} blocks of {block_size} tokens, more than a "
                             f"worker's KV pool of {num_blocks}")


def _first_generated(workload: Workload) -> list[int]:
    """Each request's first generated token id: ids above every block id, a run of ``output_len`` per request."""
    base = max(max(r.block_ids) for r in workload.requests) + 1
    starts = list(itertools.accumulate((r.output_len for r in workload.requests), initial=base))
    require(starts[-1] <= BLOCK_ID_LIMIT, "requests",
            f"need {starts[-1] - base} generated token ids above block id {base - 1}, past 2**32")
    return starts[:-1]
