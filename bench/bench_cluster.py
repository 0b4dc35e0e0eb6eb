"""Shared-prefix serving over OpenAI HTTP: our router's policies and the real peer routers, in one run.

``--workload`` picks the requests (``workloads``): ``groups`` (the default, the shape of SGLang's
generated-shared-prefix benchmark scaled to a 2-core CPU: ``groups`` system prompts of ``system_len`` tokens, each
followed by ``prompts_per_group`` questions of ``question_len`` tokens, shuffled, Poisson arrivals at ``rate``
requests/s), ``hot_prefix``, ``eviction`` or ``multi_turn``; an option per workload field (``--system-len``, ...)
overrides it. Every request generates ``output_len`` tokens (eos ignored). Prompts are random "word" tokens of
the model's vocabulary (a space and lowercase letters, each its own pre-token), so a prompt's text encodes back
to exactly its token ids: a contender that refuses token-id prompts (SMG's ``/v1/completions`` takes a string or
strings only) gets that text, the others the ids.

Contenders: our router under each of its policies (``prefix``, and the in-house baselines such as
``round_robin`` and ``sglang_cache_aware``), and the peers, SMG (``smg_cache_aware``, ``smg_round_robin``) and
vllm-router (``vllm_router_cache_aware``), installed by ``bench/peers/setup.sh`` in ``bench/.venv-peers``. Every
run starts a fresh 2-worker cluster (``radixserve up --detach``: cold caches, client and servers in separate
processes); a peer is started pointed at the same workers' OpenAI endpoints (their addresses from
``ListWorkers``) and stopped after the run. ``prefix_float_weights``, ``prefix_small_pool`` and
``prefix_small_pool_int8`` run our ``prefix`` router over other workers: float weights, and a KV pool too small for the
workload (``SMALL_POOL_GIB``) in float32 and in int8 (``engine.kv_cache_dtype``). Each contender gets the same
arrival schedule as streamed ``/v1/completions`` requests (``stream_options.include_usage``); TTFT is taken at the
first SSE chunk that carries a choice. Each contender runs ``--repeats`` times (default 2), all runs in one
shuffled order (``--order-seed``), because this machine's noise moves a run's throughput by 10-30%: the table gives
medians and the spread (lowest-highest) of each contender's runs. ``--seeds`` runs each contender on the arrivals
of several workload seeds (``--repeats`` times each): one arrival sequence's draw of group order and timing can
suit one routing rule by luck; a second table gives each seed's figures.

Reported per contender: prefix hit ratio (cached / prompt tokens, from ``usage.prompt_tokens_details``) and its
share of the oracle's (one unbounded cache that sees every request in arrival order), TTFT and end-to-end
p50/p99, throughput over the makespan, each worker's share of the requests (from the workers' own
``radixserve_worker_requests_finished`` counters, so it needs nothing of the router), and the HTTP router
overhead: the TTFT of a short cached request through the contender minus the same request sent straight to the
worker that served it (each pair also asks the other worker, so the serving one, known from the counters
afterwards, always has its direct twin), in pairs whose order alternates; the router process's CPU time per
request over the replay (user and system from /proc, of the process listening on the contender's HTTP port: for
ours the ``radixserve up`` process hosting the router, for a peer its own) and the two worker processes' together
(each the process listening on the worker's HTTP port); and the KV pages per GiB of pool the workers report.

    bash bench/peers/setup.sh                      # once: the peers and aiperf in bench/.venv-peers
    python bench/bench_cluster.py                  # table on stdout, JSON in bench/results/cluster.json
    python bench/bench_cluster.py --workload hot_prefix --contenders prefix vllm_router_cache_aware smg_cache_aware
                                                   # JSON in bench/results/cluster_hot_prefix.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TypeVar

import grpc
import httpx
from machine import cpu_model
from proc_cpu import cpu_seconds, listening_pid
from workloads import TOKEN_RANGE, WORKLOADS, Arrival, Workload, WorkloadSpec, make_arrivals  # noqa: F401 (re-exported)

from radixserve.cluster.base.config import POLICIES
from radixserve.cluster.base.hashing import namespace_seed, page_hashes
from radixserve.cluster.base.metrics import scrape
from radixserve.cluster.base.model_store import ModelStore
from radixserve.cluster.base.tokenizer import Tokenizer
from radixserve.cluster.control.discovery import read_targets
from radixserve.v1 import api_pb2, api_pb2_grpc
from radixserve.worker.models.loading import open_checkpoint

T = TypeVar("T")
K = TypeVar("K")

RESULTS = Path(__file__).parent / "results"
PEERS_VENV = Path(__file__).parent / ".venv-peers"
MODEL = "smollm2-135m-instruct"
PAGE_SIZE = 16
_LOCALHOST = "127.0.0.1"
_REQUEST_TIMEOUT_S = 1800.0
_FINISHED = "radixserve_worker_requests_finished_total"


@dataclass
class Outcome:
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    error: str = ""


@dataclass(frozen=True)
class Contender:
    """One line of the table: a router program under one policy, driven at its OpenAI HTTP port.

    ``router`` is ``"radixserve"`` (our router, ``policy`` one of ``POLICIES``), ``"smg"`` or ``"vllm-router"``;
    ``text_prompts`` says the router takes a prompt's text only (the text encodes to exactly its token ids);
    ``settings`` are ``--set key=value`` overrides of the cluster's config (the workers' weights, say);
    ``kv_memory_gib`` is each worker's KV pool for this contender (None: ``--kv-memory-gib``).
    """

    name: str
    router: str
    policy: str
    text_prompts: bool = False
    settings: tuple[str, ...] = ()
    kv_memory_gib: float | None = None


# A pool that evicts on the default workload. The prefix policy gives each worker about 4 of the 8 groups, and
# what a later request can reuse is its group's 1,024-token system prompt, 64 pages (questions and outputs are
# never shared): 256 pages a worker, plus the pages of the requests running. A float32 page of SmolLM2 takes
# 737,280 bytes (30 layers x 16 tokens x 3 KV heads x 64 x 4 bytes, keys and values), an int8 one 195,840 (64 + a
# 4-byte scale per head): 0.12 GiB holds 174 float32 pages (two system prompts and a few requests' own pages, so
# the other groups' prompts are evicted and computed again) and 657 int8 pages (all four with 400 to spare).
SMALL_POOL_GIB = 0.12


CONTENDERS = {c.name: c for c in [
    *(Contender(policy, "radixserve", policy) for policy in POLICIES),
    Contender("smg_cache_aware", "smg", "cache_aware", text_prompts=True),
    Contender("smg_round_robin", "smg", "round_robin", text_prompts=True),
    Contender("vllm_router_cache_aware", "vllm-router", "cache_aware"),
    # the float weights against the default (the file's own blocks, engine.quantization=auto), same router
    Contender("prefix_float_weights", "radixserve", "prefix", settings=("engine.quantization=none",)),
    # the KV pool's form where the pool is too small for the workload: float32 against int8 in the same memory
    Contender("prefix_small_pool", "radixserve", "prefix", kv_memory_gib=SMALL_POOL_GIB),
    Contender("prefix_small_pool_int8", "radixserve", "prefix", settings=("engine.kv_cache_dtype=int8",),
              kv_memory_gib=SMALL_POOL_GIB),
]}
DEFAULT_CONTENDERS = ("prefix", "sglang_cache_aware", "round_robin", "smg_cache_aware", "smg_round_robin",
                      "vllm_router_cache_aware")
PEERS = ("smg_cache_aware", "vllm_router_cache_aware")  # the targets' peers


@dataclass
class ContenderResult:
    policy: str  # the contender's name (``policy`` for the readers of earlier result files)
    hit_ratio: float
    oracle_share: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    e2e_p50_ms: float
    e2e_p99_ms: float
    requests_per_s: float
    output_tokens_per_s: float
    makespan_s: float
    worker_share: dict[str, float]
    router_overhead_p50_ms: float
    router_overhead_p99_ms: float
    kv_pages_per_gib: float  # each worker's KV pool pages (their mean, as the workers report them) per GiB
    errors: int
    router_cpu_ms_per_request: float = float("nan")  # the router process's CPU time over the replay / requests
    worker_cpu_ms_per_request: float = float("nan")  # the worker processes' CPU time over the replay / requests
    seed: int | None = None  # the workload seed the run's arrivals came from (None in files before --seeds)
    outcomes: list[dict] = field(default_factory=list)


# ---- the workload ---------------------------------------------------------------------------------------------

def oracle_hit_ratio(arrivals: list[Arrival], namespace: str) -> float:
    """Cached / prompt tokens for one unbounded page-granular cache seeing the requests in arrival order."""
    seen: set[int] = set()
    cached = total = 0
    for arrival in arrivals:
        hashes = page_hashes(arrival.token_ids, PAGE_SIZE, namespace_seed(namespace))
        hits = next((i for i, h in enumerate(hashes) if h not in seen), len(hashes))
        cached += min(hits * PAGE_SIZE, len(arrival.token_ids) - 1)  # the last token is always computed
        total += len(arrival.token_ids)
        seen.update(hashes)
    return cached / total


def load_tokenizer(model: str = MODEL) -> Tokenizer:
    """The model's tokenizer, read from its file in the model store."""
    return open_checkpoint(ModelStore().resolve(model)).tokenizer


def word_vocabulary(tokenizer: Tokenizer) -> list[int]:
    """Ids whose text is a space and lowercase letters and encodes back to that one id.

    Byte-level BPE pre-tokenizes text into such words before merging, so any sequence of these ids decodes to a
    text that encodes to exactly the same ids (``prompt_texts`` checks it for every prompt).
    """
    return [i for i in range(tokenizer.vocab_size)
            if re.fullmatch(r" [a-z]+", text := tokenizer.decode([i])) and tokenizer.encode(text) == [i]]


def prompt_texts(arrivals: list[Arrival], tokenizer: Tokenizer) -> list[str]:
    """Each arrival's prompt as text; raises SystemExit if one does not encode back to its exact token ids."""
    texts = [tokenizer.decode(a.token_ids) for a in arrivals]
    for i, (arrival, text) in enumerate(zip(arrivals, texts, strict=True)):
        if tokenizer.encode(text) != arrival.token_ids:
            raise SystemExit(f"arrival {i}: its text does not encode back to its token ids")
    return texts


# ---- processes and ports --------------------------------------------------------------------------------------

def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind((_LOCALHOST, 0))
        return probe.getsockname()[1]


def wait_until(ready: Callable[[], bool], timeout_s: float, what: str, interval_s: float = 0.25) -> None:
    """Poll ``ready`` until it returns true; raises TimeoutError naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(interval_s)
    raise TimeoutError(f"{what}: not ready within {timeout_s:.0f} s")


def stop_process(process: subprocess.Popen, grace_s: float = 30.0) -> None:
    """SIGTERM this process (by its pid, which this bench started), then SIGKILL it after ``grace_s``."""
    if process.poll() is None:
        os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(grace_s)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(10)


def _http_client(**limits: int) -> httpx.Client:
    return httpx.Client(timeout=5.0, trust_env=False, **limits)


def _answers(url: str, check: Callable[[httpx.Response], bool]) -> bool:
    """Whether GET ``url`` answers and ``check`` accepts the answer."""
    try:
        with _http_client() as client:
            return check(client.get(url))
    except httpx.HTTPError:
        return False


# ---- the cluster ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class WorkerEndpoints:
    """One worker's OpenAI base URL and its Prometheus endpoint (``host:port``)."""

    worker_id: str
    http_url: str
    metrics_address: str


class Cluster:
    """``radixserve up --detach`` in a private RADIXSERVE_HOME on free ports, stopped by ``down``; with ``routers``
    above 1, that many router replicas on Redis (``http_urls``: one per replica, ``http_url`` the first's);
    ``settings`` are more ``--set key=value`` overrides."""

    def __init__(self, policy: str, kv_memory_gib: float, routers: int = 1, settings: Sequence[str] = ()) -> None:
        self._home = tempfile.TemporaryDirectory(prefix="radixserve-bench-")
        self.kv_memory_gib = kv_memory_gib
        models = Path(self._home.name) / "models"
        models.mkdir()
        model_dir = ModelStore().resolve(MODEL).parent
        (models / model_dir.name).symlink_to(model_dir)
        self._env = {**os.environ, "RADIXSERVE_HOME": self._home.name}
        ports, http_ports = [free_port() for _ in range(routers)], [free_port() for _ in range(routers)]
        self.target = f"{_LOCALHOST}:{ports[0]}"
        self.http_urls = [f"http://{_LOCALHOST}:{p}" for p in http_ports]
        self.http_url = self.http_urls[0]
        self._args = ["up", "--detach", "--port", str(ports[0]), "--policy", policy, "--kv-memory-gib",
                      str(kv_memory_gib), "--set", "engine.max_model_len=4096", "--set", f"router.http_port={http_ports[0]}"]
        if routers > 1:
            self._args += ["--routers", str(routers), "--set", f"router.replica_ports={ports}",
                           "--set", f"router.replica_http_ports={http_ports}"]
        for setting in settings:
            self._args += ["--set", setting]

    @property
    def home(self) -> Path:
        return Path(self._home.name)

    @property
    def targets_path(self) -> Path:
        """The Prometheus targets file ``up`` keeps for this cluster."""
        return self.home / "run" / "prometheus_targets.json"

    def workers(self, timeout_s: float = 30.0) -> list[WorkerEndpoints]:
        """Every worker's endpoints, by worker id: HTTP addresses from ListWorkers, metrics from the targets file
        (waited for until it lists them all)."""
        with grpc.insecure_channel(self.target) as channel:
            listed = api_pb2_grpc.GenerationStub(channel).ListWorkers(api_pb2.ListWorkersRequest(), timeout=10)
        wait_until(lambda: len(self._metrics_addresses()) >= len(listed.workers), timeout_s, "the targets file")
        metrics = {_worker_label(address): address for address in self._metrics_addresses()}
        return [WorkerEndpoints(w.worker_id, f"http://{w.http_address}", metrics[w.worker_id])
                for w in sorted(listed.workers, key=lambda w: w.worker_id)]

    def kv_pages_per_gib(self, timeout_s: float = 30.0) -> float:
        """The workers' KV pool pages (their mean, from their load reports, waited for until every worker has
        one) per GiB of ``kv_memory_gib``: measured, so it says what the pool's form fits."""
        def pages() -> list[int]:
            with grpc.insecure_channel(self.target) as channel:
                listed = api_pb2_grpc.GenerationStub(channel).ListWorkers(api_pb2.ListWorkersRequest(), timeout=10)
            return [w.load.num_pages_used + w.load.num_pages_free for w in listed.workers]
        wait_until(lambda: all(pages()), timeout_s, "the workers' load reports")
        return statistics.mean(pages()) / self.kv_memory_gib

    def _metrics_addresses(self) -> list[str]:
        try:
            return read_targets(self.targets_path).get("worker", [])
        except (OSError, ValueError):  # not written yet
            return []

    def _cli(self, *args: str) -> None:
        subprocess.run([sys.executable, "-m", "radixserve.cluster.control.cli", *args], env=self._env, check=True,
                       stdout=subprocess.DEVNULL, timeout=900)

    def __enter__(self) -> Cluster:
        self._cli(*self._args)
        return self

    def __exit__(self, *exc: object) -> None:
        self._cli("down")
        self._home.cleanup()


def _worker_label(metrics_address: str) -> str:
    """The ``worker`` label of the worker whose ``/metrics`` is at ``metrics_address``."""
    return next(iter(scrape_finished([metrics_address])))


def scrape_finished(metrics_addresses: Sequence[str]) -> dict[str, float]:
    """``radixserve_worker_requests_finished_total`` of each worker, by its ``worker`` label."""
    return {s.labels["worker"]: s.value for address in metrics_addresses for s in scrape(address)
            if s.name == _FINISHED}


def settled_finished(workers: Sequence[WorkerEndpoints], expected_total: float,
                     timeout_s: float = 5.0) -> dict[str, float]:
    """The workers' finished counts once they add up to ``expected_total`` (or whatever they are at the timeout:
    a request that failed before reaching a worker is never counted)."""
    deadline = time.monotonic() + timeout_s
    while True:
        counts = scrape_finished([w.metrics_address for w in workers])
        if sum(counts.values()) >= expected_total or time.monotonic() > deadline:
            return counts
        time.sleep(0.05)


# ---- the peer routers -----------------------------------------------------------------------------------------

def peer_command(contender: Contender, port: int, metrics_port: int, worker_urls: Sequence[str]) -> list[str]:
    """The command line that starts a peer router on 127.0.0.1:``port`` routing to ``worker_urls``."""
    python = str(PEERS_VENV / "bin" / "python")
    common = ["--host", _LOCALHOST, "--port", str(port), "--worker-urls", *worker_urls, "--policy", contender.policy,
              "--prometheus-host", _LOCALHOST, "--prometheus-port", str(metrics_port)]
    if contender.router == "smg":
        return [python, "-m", "smg", "launch", *common, "--log-level", "warn"]
    if contender.router == "vllm-router":
        return [python, "-m", "vllm_router.launch_router", *common, "--log-level", "warning"]
    raise ValueError(f"router: {contender.router!r} is not a peer")


def _peer_ready(contender: Contender, url: str, num_workers: int) -> bool:
    """SMG registers workers after it binds, so it is ready when ``/workers`` lists them all healthy;
    vllm-router binds only once its workers answer ``/health``."""
    if contender.router == "smg":
        def all_healthy(response: httpx.Response) -> bool:
            workers = response.json().get("workers", []) if response.status_code == 200 else []
            return len(workers) == num_workers and all(w.get("is_healthy") for w in workers)
        return _answers(f"{url}/workers", all_healthy)
    return _answers(f"{url}/health", lambda response: response.status_code == 200)


@contextlib.contextmanager
def peer_router(contender: Contender, workers: Sequence[WorkerEndpoints], log_path: Path,
                timeout_s: float = 120.0) -> Iterator[str]:
    """A peer router routing to ``workers``, its log in ``log_path``; yields its base URL, stops it on exit."""
    if not (PEERS_VENV / "bin" / "python").exists():
        raise SystemExit(f"{PEERS_VENV} is missing: run `bash bench/peers/setup.sh` first")
    port = free_port()
    url = f"http://{_LOCALHOST}:{port}"
    command = peer_command(contender, port, free_port(), [w.http_url for w in workers])
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        wait_until(lambda: process.poll() is not None or _peer_ready(contender, url, len(workers)), timeout_s,
                   contender.name)
        if process.poll() is not None:
            raise RuntimeError(f"{contender.name} exited with status {process.returncode}; see {log_path}")
        yield url
    finally:
        stop_process(process)


# ---- the HTTP driver ------------------------------------------------------------------------------------------

def _async_client(max_connections: int) -> httpx.AsyncClient:
    return httpx.AsyncClient(trust_env=False, timeout=httpx.Timeout(_REQUEST_TIMEOUT_S, connect=10.0),
                             limits=httpx.Limits(max_connections=max_connections,
                                                 max_keepalive_connections=max_connections))


def completion_body(prompt: list[int] | str, max_tokens: int) -> dict[str, object]:
    """A greedy streamed ``/v1/completions`` request that generates exactly ``max_tokens`` tokens, usage included."""
    return {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}


async def stream_completion(client: httpx.AsyncClient, url: str, body: dict[str, object]) -> Outcome:
    """POST ``body`` to ``url``/v1/completions and read its SSE stream to ``[DONE]``.

    TTFT is at the first chunk that carries a choice (the usage chunk carries none); the usage is the last
    chunk's. An HTTP error or an ``error`` object in the stream ends it with ``Outcome.error`` set.
    """
    outcome, sent = Outcome(), time.perf_counter()
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
            if response.status_code != 200:
                answer = (await response.aread()).decode(errors="replace")
                outcome.error = f"HTTP {response.status_code}: {answer[:300]}"
            else:
                await _read_events(response, outcome, sent)
    except httpx.HTTPError as error:
        outcome.error = f"{type(error).__name__}: {error}"
    outcome.e2e_s = time.perf_counter() - sent
    return outcome


async def _read_events(response: httpx.Response, outcome: Outcome, sent: float) -> None:
    """Reads the events up to ``[DONE]``, then the body to its end, as the async openai client does over HTTP/1.1
    (``drain_response_async``): a response left unread closes its connection, and every request would pay a new
    one."""
    lines = response.aiter_lines()
    async for line in lines:
        if not line.startswith("data:"):
            continue
        data = line[len("data:"):].strip()
        if data == "[DONE]":
            async for _ in lines:
                pass
            return
        chunk = json.loads(data)
        if "error" in chunk:
            outcome.error = f"stream error: {json.dumps(chunk['error'])[:300]}"
            return
        if not outcome.ttft_s and chunk.get("choices"):
            outcome.ttft_s = time.perf_counter() - sent
        if chunk.get("usage"):
            usage = chunk["usage"]
            outcome.prompt_tokens = usage.get("prompt_tokens", 0)
            outcome.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
            outcome.completion_tokens = usage.get("completion_tokens", 0)


async def replay(url: str | Sequence[str], arrivals: list[Arrival], output_len: int,
                 texts: Sequence[str] | None = None) -> tuple[list[Outcome], float]:
    """Send every arrival at its time (``Arrival``: from the start, or after the answer it follows; its text when
    ``texts`` is given, else its token ids) to the OpenAI server
    at ``url`` (several: arrival i to the (i mod n)-th, a client taking turns between routers); returns the
    outcomes and the makespan (first send to last finish)."""
    prompts: Sequence[list[int] | str] = texts if texts is not None else [a.token_ids for a in arrivals]
    urls = [url] if isinstance(url, str) else list(url)
    answered = [asyncio.Event() for _ in arrivals]
    async with _async_client(len(arrivals)) as client:
        start = time.perf_counter()

        async def send(i: int, arrival: Arrival, prompt: list[int] | str) -> Outcome:
            if arrival.after is None:
                await asyncio.sleep(max(0.0, start + arrival.at_s - time.perf_counter()))
            else:
                await answered[arrival.after].wait()
                await asyncio.sleep(arrival.at_s)
            try:
                return await stream_completion(client, urls[i % len(urls)], completion_body(prompt, output_len))
            finally:
                answered[i].set()

        outcomes = await asyncio.gather(*(send(i, a, p) for i, (a, p) in enumerate(zip(arrivals, prompts,
                                                                                         strict=True))))
        return list(outcomes), time.perf_counter() - start


# ---- router overhead ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Probe:
    """The overhead probe: a short prompt as token ids and as the text that encodes to exactly them."""

    token_ids: list[int]
    text: str


def make_probe(vocabulary: Sequence[int], tokenizer: Tokenizer) -> Probe:
    """Two pages and a token of word tokens (the last token is always computed, so two pages are cached)."""
    ids = list(vocabulary[:2 * PAGE_SIZE + 1])
    text = tokenizer.decode(ids)
    if tokenizer.encode(text) != ids:
        raise SystemExit("the overhead probe's text does not encode back to its token ids")
    return Probe(ids, text)


async def router_overhead(url: str, workers: Sequence[WorkerEndpoints], num_pairs: int, probe: Probe,
                          text: bool) -> list[float]:
    """Paired TTFT differences (through ``url`` minus straight to the worker that served it), seconds.

    The probe is cached on every worker first. Each pair sends it through the router and straight to every worker,
    the router's part first in even pairs and last in odd ones, so a drift in the machine's load cancels out; the
    workers' finished counters, read before and after the routed request, say which worker served it.
    """
    routed_body = completion_body(probe.text if text else probe.token_ids, 1)
    direct_body = completion_body(probe.token_ids, 1)
    expected = sum(settled_finished(workers, 0).values()) + len(workers)
    diffs: list[float] = []
    async with _async_client(4) as client:
        for worker in workers:
            await stream_completion(client, worker.http_url, direct_body)

        async def direct_all(order: Sequence[WorkerEndpoints]) -> dict[str, Outcome]:
            return {w.worker_id: await stream_completion(client, w.http_url, direct_body) for w in order}

        for i in range(num_pairs):
            routed_first = i % 2 == 0
            direct = {} if routed_first else await direct_all(list(reversed(workers)))
            expected += len(direct)
            before = settled_finished(workers, expected)
            routed = await stream_completion(client, url, routed_body)
            expected += 1
            after = settled_finished(workers, expected)
            if routed_first:
                direct = await direct_all(workers)
                expected += len(direct)
            serving = max(after, key=lambda wid: after[wid] - before.get(wid, 0.0))
            if not routed.error and not direct[serving].error:  # a failed request shows in the run's errors
                diffs.append(routed.ttft_s - direct[serving].ttft_s)
    return diffs


# ---- one run --------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def front_door(contender: Contender, cluster: Cluster, workers: Sequence[WorkerEndpoints]) -> Iterator[str]:
    """The base URL the contender serves: our router's HTTP port, or a peer router started for this run (its log in
    the temporary directory, ``radixserve-bench-<contender>.log``, kept after the run)."""
    if contender.router == "radixserve":
        yield cluster.http_url
    else:
        with peer_router(contender, workers, Path(tempfile.gettempdir()) / f"radixserve-bench-{contender.name}.log") \
                as url:
            yield url


def run_shuffled(keys: Sequence[K], repeats: int, seed: int, run_one: Callable[[K], T]) -> list[T]:
    """``run_one(key)`` ``repeats`` times for each of ``keys`` (contender names, or (name, workload seed) pairs),
    all in one order shuffled by ``seed``, so that a noisy machine's drift spreads over every contender; a
    progress line on stderr per run."""
    order = [key for key in keys for _ in range(repeats)]
    random.Random(seed).shuffle(order)
    results = []
    for i, key in enumerate(order, start=1):
        print(f"run {i}/{len(order)}: {key} ...", file=sys.stderr, flush=True)
        results.append(run_one(key))
    return results


def serving_pid(url: str) -> int:
    """The pid of the process serving ``url`` (``http://host:port``): the one listening on its port (for our router,
    the ``radixserve up`` process that hosts it; for a worker, its actor's process)."""
    return listening_pid(int(url.rpartition(":")[2]))


def run_contender(contender: Contender, arrivals: list[Arrival], texts: Sequence[str], probe: Probe,
                  w: WorkloadSpec, args: argparse.Namespace, oracle: float) -> ContenderResult:
    """One run on a fresh cluster: the replay, then the overhead pairs, through the contender's front door (a peer
    routes to the workers itself; our router then runs round_robin, unused). The router process's and the worker
    processes' CPU time (user and system, from /proc) are read before and after the replay."""
    cluster_policy = contender.policy if contender.router == "radixserve" else "round_robin"
    kv_memory_gib = contender.kv_memory_gib or args.kv_memory_gib
    with Cluster(cluster_policy, kv_memory_gib, settings=contender.settings) as cluster:
        workers = cluster.workers()
        kv_pages_per_gib = cluster.kv_pages_per_gib()
        with front_door(contender, cluster, workers) as url:
            before = settled_finished(workers, 0)
            pid = serving_pid(url)
            worker_pids = [serving_pid(worker.http_url) for worker in workers]
            cpu_before = cpu_seconds(pid)
            workers_cpu_before = sum(map(cpu_seconds, worker_pids))
            outcomes, makespan = asyncio.run(replay(url, arrivals, w.output_len,
                                                    texts if contender.text_prompts else None))
            router_cpu_s = cpu_seconds(pid) - cpu_before
            workers_cpu_s = sum(map(cpu_seconds, worker_pids)) - workers_cpu_before
            after = settled_finished(workers, sum(before.values()) + len(arrivals))
            overhead = asyncio.run(router_overhead(url, workers, args.overhead_pairs, probe, contender.text_prompts))
    served = {wid: after[wid] - before.get(wid, 0.0) for wid in after}
    result = summarize_run(contender.name, outcomes, makespan, served, overhead, oracle, kv_pages_per_gib)
    result.router_cpu_ms_per_request = _ms(router_cpu_s / len(arrivals))
    result.worker_cpu_ms_per_request = _ms(workers_cpu_s / len(arrivals))
    return result


def summarize_run(name: str, outcomes: list[Outcome], makespan: float, served: dict[str, float],
                  overhead: list[float], oracle: float, kv_pages_per_gib: float) -> ContenderResult:
    """One run's figures; ``served`` is the requests each worker finished during the replay."""
    done = [o for o in outcomes if not o.error]
    hit_ratio = sum(o.cached_tokens for o in done) / max(1, sum(o.prompt_tokens for o in done))
    total_served = max(1.0, sum(served.values()))
    return ContenderResult(
        policy=name, hit_ratio=hit_ratio, oracle_share=hit_ratio / oracle,
        ttft_p50_ms=_ms(quantile([o.ttft_s for o in done], 0.5)), ttft_p99_ms=_ms(quantile([o.ttft_s for o in done], 0.99)),
        e2e_p50_ms=_ms(quantile([o.e2e_s for o in done], 0.5)), e2e_p99_ms=_ms(quantile([o.e2e_s for o in done], 0.99)),
        requests_per_s=len(done) / makespan, output_tokens_per_s=sum(o.completion_tokens for o in done) / makespan,
        makespan_s=makespan, worker_share={wid: n / total_served for wid, n in sorted(served.items())},
        router_overhead_p50_ms=_ms(quantile(overhead, 0.5)), router_overhead_p99_ms=_ms(quantile(overhead, 0.99)),
        kv_pages_per_gib=kv_pages_per_gib, errors=len(outcomes) - len(done), outcomes=[asdict(o) for o in outcomes])


def peer_versions() -> dict[str, str]:
    """The installed versions of the peer routers in bench/.venv-peers (empty when it is missing)."""
    python = PEERS_VENV / "bin" / "python"
    if not python.exists():
        return {}
    script = ("import importlib.metadata as m; import json; "
              "print(json.dumps({p: m.version(p) for p in ('smg', 'vllm-router', 'sglang-router', 'aiperf')}))")
    return json.loads(subprocess.run([str(python), "-c", script], capture_output=True, text=True, check=True,
                                     timeout=60).stdout)


def quantile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _ms(seconds: float) -> float:
    return seconds * 1000


# ---- the report -----------------------------------------------------------------------------------------------

SUMMARY_FIELDS = ("hit_ratio", "oracle_share", "ttft_p50_ms", "ttft_p99_ms", "e2e_p50_ms", "e2e_p99_ms",
                  "requests_per_s", "output_tokens_per_s", "router_overhead_p50_ms", "router_overhead_p99_ms",
                  "kv_pages_per_gib", "router_cpu_ms_per_request", "worker_cpu_ms_per_request")


def summarize(results: list[ContenderResult]) -> dict[str, dict[str, object]]:
    """Per contender, in first-run order: the median of each figure over its runs, the runs' lowest and highest,
    the larger worker share of each run, and the errors summed."""
    by_name: dict[str, list[ContenderResult]] = {}
    for r in results:
        by_name.setdefault(r.policy, []).append(r)
    summary: dict[str, dict[str, object]] = {}
    for name, runs in by_name.items():
        row: dict[str, object] = {"runs": len(runs), "errors": sum(r.errors for r in runs),
                                  "max_worker_share": [max(r.worker_share.values(), default=0.0) for r in runs]}
        for figure in SUMMARY_FIELDS:
            values = [getattr(r, figure) for r in runs]
            row[figure] = statistics.median(values)
            row[figure + "_range"] = [min(values), max(values)]
        summary[name] = row
    return summary


def print_table(summary: dict[str, dict], oracles: dict[int, float]) -> None:
    """The summary's table, the oracle's hit ratio of each workload seed above it and the targets below."""
    ratios = ", ".join(f"{oracle:.3f}" + (f" (seed {seed})" if len(oracles) > 1 else "")
                       for seed, oracle in oracles.items())
    print(f"\noracle hit ratio: {ratios}; medians over each contender's runs, (lowest-highest) beside\n")
    print("| contender | runs | hit ratio | of oracle | TTFT p50 | TTFT p99 | e2e p50 | e2e p99 | req/s "
          "| busier worker's share | HTTP router overhead p50 / p99 | router CPU / request | workers' CPU / request "
          "| KV pages / GiB | errors |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in summary.items():
        def spread(figure: str, fmt: str, scale: float = 1.0) -> str:
            low, high = r[figure + "_range"]
            return f"{r[figure] * scale:{fmt}} ({low * scale:{fmt}}-{high * scale:{fmt}})"
        shares = ", ".join(f"{v:.0%}" for v in r["max_worker_share"])
        print(f"| {name} | {r['runs']} | {spread('hit_ratio', '.3f')} | {r['oracle_share']:.0%} | "
              f"{spread('ttft_p50_ms', ',.1f', 1e-3)} s | {spread('ttft_p99_ms', ',.1f', 1e-3)} s | "
              f"{r['e2e_p50_ms'] / 1000:,.1f} s | {r['e2e_p99_ms'] / 1000:,.1f} s | {spread('requests_per_s', '.3f')} | "
              f"{shares} | {r['router_overhead_p50_ms']:.2f} / {r['router_overhead_p99_ms']:.2f} ms | "
              f"{spread('router_cpu_ms_per_request', '.2f')} ms | {spread('worker_cpu_ms_per_request', '.0f')} ms | "
              f"{r['kv_pages_per_gib']:,.0f} | {r['errors']} |")
    print("\ntargets (medians): " + "; ".join(target_lines(summary)))


def print_seed_table(results: list[ContenderResult], seeds: Sequence[int]) -> None:
    """Per workload seed, each contender's median req/s and TTFT p99 over its runs of that seed."""
    print("\n| contender | " + " | ".join(f"seed {seed}: req/s, TTFT p99" for seed in seeds) + " |")
    print("|---|" + "---|" * len(seeds))
    for name in dict.fromkeys(r.policy for r in results):
        cells = []
        for seed in seeds:
            runs = [r for r in results if r.policy == name and r.seed == seed]
            cells.append(f"{statistics.median(r.requests_per_s for r in runs):.3f}, "
                         f"{statistics.median(r.ttft_p99_ms for r in runs) / 1000:.1f} s")
        print(f"| {name} | " + " | ".join(cells) + " |")


def target_lines(summary: dict[str, dict]) -> list[str]:
    """The targets for ``prefix`` that the summary can check: against the oracle, its own overhead, round_robin,
    SGLang's rule, and each peer (ahead on throughput and TTFT p99, at least level on hit ratio)."""
    prefix = summary.get("prefix")
    if prefix is None:
        return []
    lines = [f"prefix hit ratio {prefix['oracle_share']:.0%} of oracle (>= 90%: {_met(prefix['oracle_share'] >= 0.9)})",
             f"HTTP router overhead p50 {prefix['router_overhead_p50_ms']:.2f} ms (<= 2 ms: "
             f"{_met(prefix['router_overhead_p50_ms'] <= 2)})"]
    if "round_robin" in summary:
        ratio = prefix["requests_per_s"] / summary["round_robin"]["requests_per_s"]
        lines.append(f"throughput {ratio:.2f}x round_robin (>= 1.5x: {_met(ratio >= 1.5)})")
    for peer in ("sglang_cache_aware", *PEERS):
        if peer in summary:
            lines.append(_peer_line(prefix, peer, summary[peer]))
    return lines


def _peer_line(prefix: dict, name: str, peer: dict) -> str:
    ratio = prefix["requests_per_s"] / peer["requests_per_s"]
    p99 = prefix["ttft_p99_ms"] / peer["ttft_p99_ms"]
    hits = prefix["hit_ratio"] - peer["hit_ratio"]
    return (f"vs {name}: throughput {ratio:.2f}x (> 1.0x: {_met(ratio > 1.0)}), TTFT p99 {p99:.2f}x "
            f"(< 1.0x: {_met(p99 < 1.0)}), hit ratio {hits * 100:+.1f} pp (>= 0: {_met(round(hits, 3) >= 0)})")


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def add_workload_args(parser: argparse.ArgumentParser) -> None:
    """One option per ``Workload`` field (``--system-len``, ...), its default the field's."""
    for name, default in asdict(Workload()).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default)


def workload_from_args(args: argparse.Namespace) -> Workload:
    """The ``Workload`` that ``add_workload_args``' options describe."""
    return Workload(**{name: getattr(args, name) for name in asdict(Workload())})


def _workload_fields() -> dict[str, type]:
    """Every field of any workload in ``WORKLOADS``, with its type."""
    return {name: type(default) for spec in WORKLOADS.values() for name, default in asdict(spec).items()}


def add_workload_options(parser: argparse.ArgumentParser) -> None:
    """``--workload`` (a name in ``WORKLOADS``) and one option per field of any workload (``--system-len``, ...),
    each overriding that field of the chosen workload when given."""
    parser.add_argument("--workload", choices=list(WORKLOADS), default=Workload.name)
    for name, kind in _workload_fields().items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=None,
                            help="(workloads: " + ", ".join(w for w, spec in WORKLOADS.items() if name in asdict(spec))
                            + ")")


def workload_from_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> WorkloadSpec:
    """The chosen workload with the given field options; a parser error names an option it does not have."""
    spec = WORKLOADS[args.workload]
    given = {name: getattr(args, name) for name in _workload_fields() if getattr(args, name) is not None}
    for name in given.keys() - asdict(spec).keys():
        parser.error(f"--{name.replace('_', '-')}: the {spec.name} workload has no such field")
    try:
        return dataclasses.replace(spec, **given)
    except ValueError as error:
        parser.error(str(error))


def default_out(workload: WorkloadSpec) -> Path:
    """``results/cluster.json`` for ``groups`` (the file the simulator's fidelity check reads), else
    ``results/cluster_<workload>.json``."""
    return RESULTS / ("cluster.json" if workload.name == Workload.name else f"cluster_{workload.name}.json")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_workload_options(parser)
    parser.add_argument("--contenders", "--policies", nargs="+", default=list(DEFAULT_CONTENDERS),
                        choices=list(CONTENDERS))
    parser.add_argument("--repeats", type=int, default=2, help="runs of each contender, all in one shuffled order")
    parser.add_argument("--order-seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, nargs="+",
                        help="workload seeds: each contender runs --repeats times on each seed's arrivals (default: "
                        "the workload's own seed); one arrival sequence favours whichever rule its draw suits")
    parser.add_argument("--kv-memory-gib", type=float, default=0.3,
                        help="KV cache per worker (0.3 GiB, 6.5k tokens, holds about 6 of the 8 groups' prompts)")
    parser.add_argument("--overhead-pairs", type=int, default=60)
    parser.add_argument("--out", type=Path, help="the JSON result (default: results/cluster_<workload>.json; "
                        "results/cluster.json for groups)")
    args = parser.parse_args()
    workload = workload_from_options(parser, args)
    out = args.out or default_out(workload)
    tokenizer = load_tokenizer()
    vocabulary = word_vocabulary(tokenizer)
    probe = make_probe(vocabulary, tokenizer)
    seeds = args.seeds or [workload.seed]
    specs = {seed: dataclasses.replace(workload, seed=seed) for seed in seeds}
    arrivals = {seed: spec.arrivals(vocabulary) for seed, spec in specs.items()}
    texts = {seed: prompt_texts(arrivals[seed], tokenizer) for seed in seeds}
    oracles = {seed: oracle_hit_ratio(arrivals[seed], MODEL) for seed in seeds}

    def run_one(key: tuple[str, int]) -> ContenderResult:
        name, seed = key
        result = run_contender(CONTENDERS[name], arrivals[seed], texts[seed], probe, specs[seed], args, oracles[seed])
        result.seed = seed
        return result

    results = run_shuffled([(name, seed) for name in args.contenders for seed in seeds], args.repeats,
                           args.order_seed, run_one)
    summary = summarize(results)
    print_table(summary, oracles)
    if len(seeds) > 1:
        print_seed_table(results, seeds)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"workload_name": workload.name, "workload": asdict(workload),
                               "kv_memory_gib": args.kv_memory_gib, "seeds": seeds,
                               "oracle_hit_ratio": oracles[seeds[0]],
                               "oracle_hit_ratios": {str(seed): oracle for seed, oracle in oracles.items()},
                               "cpu": cpu_model(), "peers": peer_versions(),
                               "contenders": {n: asdict(CONTENDERS[n]) for n in args.contenders},
                               "order": [r.policy for r in results], "summary": summary,
                               "results": [asdict(r) for r in results]}, indent=1))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
