"""Frozen, validated configuration dataclasses.

Every config validates itself in ``__post_init__`` and raises ``ValueError`` naming the offending field.
Configs compose: ``EngineConfig`` holds a ``CacheConfig`` and a ``SchedulerConfig``; ``ClusterConfig`` holds the
pool, the engine every worker runs and the router, and is filled from a TOML file (its tables mirror the
nesting: ``[pool]``, ``[engine]``, ``[engine.cache]``, ...) and then CLI flags, over the embedded defaults.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

from radixserve.cluster.base.urls import redact_url

DEFAULT_MODEL = "smollm2-135m-instruct"
_DTYPES = ("float32", "bfloat16", "float16")
QUANTIZATIONS = ("auto", "none", "int8", "int4", "gguf")  # worker.models.quantization's linear methods
KV_CACHE_DTYPES = ("auto", "int8")  # worker.kv.pool's forms: the engine's dtype, or int8 with per-head scales
T = TypeVar("T")


def require(ok: bool, name: str, message: str) -> None:
    """Raise ``ValueError("<name>: <message>")`` unless ``ok``: the field-named errors configs raise."""
    if not ok:
        raise ValueError(f"{name}: {message}")


@dataclass(frozen=True)
class CacheConfig:
    """The paged KV pool: ``page_size`` tokens a page; ``num_pages`` pages, or as many as fit ``memory_gib``."""

    page_size: int = 16
    num_pages: int | None = None
    memory_gib: float = 1.0

    def __post_init__(self) -> None:
        require(self.page_size >= 1, "page_size", f"must be >= 1, got {self.page_size}")
        require(self.num_pages is None or self.num_pages >= 2, "num_pages", f"must be >= 2, got {self.num_pages}")
        require(self.memory_gib > 0, "memory_gib", f"must be > 0, got {self.memory_gib}")


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous batching limits.

    ``max_num_batched_tokens`` bounds the tokens one step feeds the model (decode tokens plus prefill chunks);
    a prompt longer than the budget left in a step is prefilled in chunks. ``max_running_requests`` bounds the
    batch; ``max_waiting_requests`` bounds the requests waiting, queued with no sample running (further ones are
    refused), so a worker holds at most ``max_running_requests + max_waiting_requests`` requests.
    """

    max_num_batched_tokens: int = 512
    max_running_requests: int = 64
    max_waiting_requests: int = 4096

    def __post_init__(self) -> None:
        require(self.max_num_batched_tokens >= 1, "max_num_batched_tokens", "must be >= 1")
        require(self.max_running_requests >= 1, "max_running_requests", "must be >= 1")
        require(self.max_waiting_requests >= 1, "max_waiting_requests", "must be >= 1")


@dataclass(frozen=True)
class EngineConfig:
    """One engine: which model, where it runs, its KV pool and scheduler.

    ``model`` is a model name from the model store or a path to a GGUF file or a Hugging Face directory.
    ``max_model_len`` caps prompt + output tokens (default: the model's context length).
    ``namespace`` prefixes every page hash (default: ``model``).
    ``seed`` seeds the draws of requests that bring no seed of their own, so one engine given the same requests
    in the same order samples the same tokens. ``quantization`` is how the linear layers hold their weights
    (``worker.models.quantization``): ``"none"`` (``dtype``), ``"int8"`` (weight-only, per output row),
    ``"int4"`` (weight-only, per group of inputs) or ``"gguf"`` (a GGUF file's own Q8_0 / Q4_0 / Q4_1 blocks);
    quantized methods run on CPU. ``"auto"``, the default, is ``"gguf"`` for a GGUF file on CPU and ``"none"``
    otherwise: on the default model ``gguf`` decodes and prefills faster than the float weights
    (bench/bench_engine.py) and serves the shared-prefix cluster benchmark's requests 28% faster
    (bench/bench_cluster.py), within the perplexity bounds (bench/bench_quality.py).
    ``kv_cache_dtype`` is how the KV pool holds keys and values (``worker.kv.pool``): ``"auto"`` in ``dtype``,
    ``"int8"`` as int8 with one float32 scale per token and KV head (symmetric, max |x| / 127), which fits
    about 3.8x the pages of float32 into ``cache.memory_gib`` at a head dim of 64.
    """

    model: str = DEFAULT_MODEL
    device: str = "cpu"
    dtype: str = "float32"
    quantization: str = "auto"
    kv_cache_dtype: str = "auto"
    max_model_len: int | None = None
    seed: int = 0
    namespace: str | None = None
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    def __post_init__(self) -> None:
        require(bool(self.model), "model", "must not be empty")
        require(self.dtype in _DTYPES, "dtype", f"must be one of {_DTYPES}, got {self.dtype!r}")
        require(self.quantization in QUANTIZATIONS, "quantization",
                f"must be one of {QUANTIZATIONS}, got {self.quantization!r}")
        require(self.quantization in ("auto", "none") or self.device == "cpu", "quantization",
                f"{self.quantization!r} runs on CPU only for now, got device {self.device!r}")
        require(self.kv_cache_dtype in KV_CACHE_DTYPES, "kv_cache_dtype",
                f"must be one of {KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}")
        require(self.max_model_len is None or self.max_model_len >= 2, "max_model_len", "must be >= 2")
        require(0 <= self.seed < 2**63, "seed", f"must be in [0, 2**63), got {self.seed}")

    @property
    def hash_namespace(self) -> str:
        return self.namespace if self.namespace is not None else self.model


POLICIES = ("prefix", "round_robin", "least_load", "random", "power_of_two", "sglang_cache_aware", "dynamo_kv")


@dataclass(frozen=True)
class RouterConfig:
    """The router: where it listens, how it routes, how it watches workers.

    ``policy`` is one of ``POLICIES``. The ``prefix`` policy sends a request to the worker with the least
    estimated work before its first token: the prompt tokens it would have to prefill (those not cached there)
    plus ``load_weight`` times the work still owed there (uncached prompts before their first token and output
    budgets not yet streamed, an output token counting as ``decode_weight`` prompt tokens, from this router's
    accounting or the worker's own load report, the larger). ``decode_weight`` 3 is about a CPU's cost of a
    decode token against a prefill token (2.7x measured on AMD EPYC); with the simulator's step-time noise, 2.7-3.4
    keep the ``groups`` and ``eviction`` workloads' throughput and raise ``hot_prefix``'s by 4-12% over 1, which let
    the hot prefix's worker look idle under cheap cached requests and gave it the cold groups too. A
    cached prefix therefore keeps attracting its requests until its worker's pending work exceeds another's by
    more than the prefill it would save divided by ``load_weight`` (about 2.9x at the default 0.35). The
    default was chosen with the simulator: on the cluster benchmark's shared-prefix workload with the real
    machine's step-time noise, 0.35 gives the best throughput and TTFT p99 of 0.25 / 0.35 / 0.5 (1.0 splits
    groups across workers whose KV pools cannot hold the extra prefixes, and evictions follow), and on the
    Mooncake trace it keeps the hit ratio and TTFT p99 of 0.5. The prefix index learns from the workers' KV events; a routed request also counts its
    pages as held by the chosen worker for ``pending_ttl_s`` (the gap until its events arrive) or, while that
    worker's events are not flowing, for ``approx_ttl_s``. ``health_interval_s`` paces load polling and probing
    of unanswering workers.
    ``max_message_bytes`` caps one request message (a gRPC message, an HTTP body: larger ones are refused,
    RESOURCE_EXHAUSTED / 413); ``drain_timeout_s`` bounds a graceful shutdown. ``port`` serves gRPC
    (radixserve.v1 and KServe v2), ``http_port`` the OpenAI-compatible HTTP API (None: no HTTP), both on ``host``.
    ``replicas`` routers run over one shared bus (more than one needs ``bus.backend = "redis"``): replica ``i``
    listens on ``replica_ports[i]`` and ``replica_http_ports[i]`` when those are listed (one per replica), else
    on ``port + i`` and ``http_port + i`` (0 stays 0: a free port each).
    """

    host: str = "127.0.0.1"
    port: int = 50051
    http_port: int | None = 8000
    policy: str = "prefix"
    load_weight: float = 0.35
    decode_weight: float = 3.0
    pending_ttl_s: float = 30.0
    approx_ttl_s: float = 300.0
    health_interval_s: float = 0.5
    max_message_bytes: int = 4 * 2**20
    drain_timeout_s: float = 30.0
    seed: int = 0
    replicas: int = 1
    replica_ports: tuple[int, ...] = ()
    replica_http_ports: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        require(0 <= self.port < 65536, "port", f"must be in [0, 65535], got {self.port}")
        require(type(self.replicas) is int and self.replicas >= 1, "replicas", f"must be >= 1, got {self.replicas}")
        for name in ("replica_ports", "replica_http_ports"):
            ports = getattr(self, name)
            require(len(ports) in (0, self.replicas), name, f"must list one port per replica ({self.replicas}) "
                    f"or none, got {len(ports)}")
            require(all(0 <= p < 65536 for p in ports), name, "ports must be in [0, 65535]")
        require(not self.replica_http_ports or self.http_port is not None, "replica_http_ports",
                "needs http_port (None turns HTTP off)")
        require(self.http_port is None or 0 <= self.http_port < 65536, "http_port",
                f"must be in [0, 65535], got {self.http_port}")
        require(self.policy in POLICIES, "policy", f"must be one of {POLICIES}, got {self.policy!r}")
        require(self.load_weight >= 0, "load_weight", "must be >= 0")
        require(self.decode_weight >= 0, "decode_weight", "must be >= 0")
        for name in ("pending_ttl_s", "approx_ttl_s", "health_interval_s", "drain_timeout_s"):
            require(getattr(self, name) > 0, f"{name}", "must be > 0")
        require(self.max_message_bytes >= 1024, "max_message_bytes", "must be >= 1024")


@dataclass(frozen=True)
class PoolConfig:
    """The worker pool: how many engines, where Ray runs them.

    ``ray_address`` None starts a local Ray; otherwise it is joined (``"auto"`` or ``host:port``).
    ``num_gpus_per_worker`` None asks Ray for one GPU per worker when the engine runs on CUDA, none otherwise.
    ``worker_port`` 0 lets each worker pick a free port for its gRPC service, ``worker_http_port`` for its
    OpenAI-compatible HTTP API (None: none), ``worker_session_port`` for its framed Session (the routers' path to
    it, ``worker.session_tcp``; None: none, and the routers use the gRPC Session; a TLS cluster never has one).
    A worker that dies is restarted by Ray up to ``max_restarts`` times (-1: always).
    """

    num_workers: int = 2
    ray_address: str | None = None
    worker_host: str = "127.0.0.1"
    worker_port: int = 0
    worker_http_port: int | None = 0
    worker_session_port: int | None = 0
    num_cpus_per_worker: float = 1.0
    num_gpus_per_worker: float | None = None
    max_restarts: int = -1

    def __post_init__(self) -> None:
        require(self.num_workers >= 1, "num_workers", f"must be >= 1, got {self.num_workers}")
        require(self.num_cpus_per_worker > 0, "num_cpus_per_worker", "must be > 0")
        require(self.num_gpus_per_worker is None or self.num_gpus_per_worker >= 0, "num_gpus_per_worker",
                 "must be >= 0")
        require(self.max_restarts >= -1, "max_restarts", "must be >= -1")
        require(0 <= self.worker_port < 65536, "worker_port", "must be in [0, 65535]")
        for name in ("worker_http_port", "worker_session_port"):
            port = getattr(self, name)
            require(port is None or 0 <= port < 65536, name, "must be in [0, 65535]")


@dataclass(frozen=True)
class MetricsConfig:
    """Where the processes serve Prometheus ``/metrics`` and where ``up`` lists them for Prometheus.

    ``router_port`` and ``worker_port`` 0 let each process pick a free port. ``sd_file`` is the Prometheus
    file-based service discovery file (default ``$RADIXSERVE_HOME/run/prometheus_targets.json``), rewritten as
    workers come and go.
    """

    host: str = "127.0.0.1"
    router_port: int = 0
    worker_port: int = 0
    sd_file: str | None = None

    def __post_init__(self) -> None:
        for name in ("router_port", "worker_port"):
            port = getattr(self, name)
            require(0 <= port < 65536, name, f"must be in [0, 65535], got {port}")
        require(self.sd_file is None or bool(self.sd_file), "sd_file", "must not be empty")


@dataclass(frozen=True)
class SecurityConfig:
    """TLS and API keys for every listening port but the metrics ones.

    ``cert_file`` and ``key_file`` (PEM, both or neither): every server (the router's gRPC and HTTP, each worker's
    gRPC and HTTP) speaks TLS only, with this certificate. ``ca_file`` (PEM): the authority the router trusts when
    it calls workers (default: the system's). ``worker_mtls``: workers accept only clients presenting a
    certificate signed by ``ca_file``, and the router presents ``cert_file``. API keys, one per line in
    ``api_keys_file`` and/or comma-separated in the environment variable named ``api_keys_env``: when any is
    given, every API call must carry one (``Authorization: Bearer <key>`` over HTTP, ``authorization`` metadata
    ``Bearer <key>`` over gRPC); health endpoints stay open. Keys are never logged nor exported as metrics.

    ``cluster_key``: the credential of the cluster's own calls. Workers accept it alone on both their ports (client
    keys are refused: a worker's API is internal), routers send it to workers, and a router's ``ListWorkers`` (an
    admin call: it hands out the workers' addresses) needs it. Required with API keys; ``radixserve up``
    generates one per cluster when none is given. It is left out of the config's repr and never printed.
    """

    cert_file: str | None = None
    key_file: str | None = None
    ca_file: str | None = None
    worker_mtls: bool = False
    api_keys_file: str | None = None
    api_keys_env: str | None = None
    cluster_key: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        require((self.cert_file is None) == (self.key_file is None), "key_file",
                "cert_file and key_file go together (both or neither)")
        require(not self.worker_mtls or (self.cert_file is not None and self.ca_file is not None), "worker_mtls",
                "needs cert_file, key_file and ca_file")
        for name in ("cert_file", "key_file", "ca_file", "api_keys_file", "api_keys_env", "cluster_key"):
            require(getattr(self, name) is None or bool(getattr(self, name)), name, "must not be empty")

    @property
    def tls(self) -> bool:
        return self.cert_file is not None

    @property
    def client_keys(self) -> bool:
        """Whether API keys are configured (read by ``cluster.base.security.ApiKeys.from_config``)."""
        return self.api_keys_file is not None or self.api_keys_env is not None


BUS_BACKENDS = ("inprocess", "redis")


@dataclass(frozen=True)
class BusConfig:
    """The event bus: worker registry, KV event logs and shared load (``cluster.base.bus``).

    ``backend`` ``"inprocess"`` (the embedded default: one router, inside the launcher's process) or ``"redis"``:
    the Redis server at ``url`` (``redis://host:port/db``; None: ``up`` starts a local ``redis-server`` on a free
    port with persistence off and stops it on ``down``), under keys prefixed ``namespace:``, so clusters can share
    a server. On Redis, a worker's record expires ``worker_ttl_s`` after its last heartbeat (sent every quarter
    of it); workers and routers publish their load every ``load_interval_s``; a worker appends a snapshot of its
    cache to its KV event log every ``snapshot_interval_batches`` batches, and the log keeps what follows the
    previous snapshot. With ``share_routes`` router replicas tell each other every routing decision over the
    bus (``router.route_hints``), so that a prompt one of them sent counts at once as cached on its worker for all.
    """

    backend: str = "inprocess"
    url: str | None = None
    namespace: str = "radixserve"
    worker_ttl_s: float = 5.0
    load_interval_s: float = 0.1
    snapshot_interval_batches: int = 256
    share_routes: bool = True

    def __post_init__(self) -> None:
        require(self.backend in BUS_BACKENDS, "backend", f"must be one of {BUS_BACKENDS}, got {self.backend!r}")
        require(self.url is None or self.url.startswith(("redis://", "rediss://", "unix://")), "url",
                f"must be a redis://, rediss:// or unix:// URL, got {redact_url(self.url or '')!r}")
        require(self.url is None or self.backend == "redis", "url", 'is only read with backend = "redis"')
        require(bool(self.namespace) and ":" not in self.namespace, "namespace", "must be non-empty, without ':'")
        for name in ("worker_ttl_s", "load_interval_s"):
            require(getattr(self, name) > 0, name, "must be > 0")
        require(type(self.snapshot_interval_batches) is int and self.snapshot_interval_batches >= 1,
                "snapshot_interval_batches", "must be an int >= 1")


@dataclass(frozen=True)
class ClusterConfig:
    """Everything ``radixserve up`` starts: the pool, the engine each worker runs, the routers, their metrics, how
    they are secured, and the bus they share."""

    pool: PoolConfig = field(default_factory=PoolConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    bus: BusConfig = field(default_factory=BusConfig)

    def __post_init__(self) -> None:
        require(self.router.replicas == 1 or self.bus.backend == "redis", "bus.backend",
                f'must be "redis" for {self.router.replicas} router replicas (they share one view through it)')


def build_config(cls: type[T], values: Mapping[str, Any], prefix: str = "") -> T:
    """Build the config dataclass ``cls`` from nested mappings (a parsed TOML file).

    Nested configs are nested tables. An unknown key or a value of the wrong type raises ValueError naming the
    dotted key (``"engine.cache.page_size"``).
    """
    if not isinstance(values, Mapping):
        raise ValueError(f"{prefix.rstrip('.') or 'config'}: must be a table")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if key not in known:
            raise ValueError(f"{name}: unknown setting (known: {', '.join(sorted(known))})")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = build_config(hint, value, f"{name}.")
        else:
            kwargs[key] = _coerce(name, hint, value)
    try:
        return cls(**kwargs)
    except ValueError as error:  # the dataclass names the field; say where it sits in the file
        raise ValueError(f"{prefix}{error}") from None


def with_overrides(config: T, overrides: Mapping[str, Any]) -> T:
    """A copy of ``config`` with dotted keys replaced (``{"policy": "random"}``), validated again."""
    tree = _as_tree(config)
    for dotted, value in overrides.items():
        node = tree
        *parents, leaf = dotted.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                raise ValueError(f"{dotted}: unknown setting")
            node = node[part]
        if leaf not in node or isinstance(node[leaf], dict):
            raise ValueError(f"{dotted}: unknown setting")
        node[leaf] = value
    return build_config(type(config), tree)


def load_cluster_config(path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> ClusterConfig:
    """The embedded defaults, then the TOML file at ``path`` (if any), then ``overrides`` (dotted keys)."""
    config = ClusterConfig()
    if path is not None:
        try:
            with open(path, "rb") as file:
                config = build_config(ClusterConfig, tomllib.load(file))
        except (OSError, tomllib.TOMLDecodeError) as error:
            raise ValueError(f"config: cannot read {str(path)!r}: {error}") from error
    return with_overrides(config, overrides or {})


def _as_tree(config: Any) -> dict[str, Any]:
    return {f.name: _as_tree(v) if dataclasses.is_dataclass(v := getattr(config, f.name)) else v
            for f in fields(config)}


def _coerce(name: str, hint: Any, value: Any) -> Any:
    """Check ``value`` against a field's annotation (bool, int, float, str, ``tuple[int, ...]`` from a list, or
    ``X | None``)."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if value is None and type(None) in options:
        return None
    for option in options:
        if typing.get_origin(option) is tuple and isinstance(value, (list, tuple)):
            if all(type(item) is int for item in value):
                return tuple(value)
            raise ValueError(f"{name}: must be a list of ints, got {value!r}")
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if option in (bool, int, str) and type(value) is option:
            return value
    expected = " or ".join("null" if o is type(None) else "a list of ints" if typing.get_origin(o) is tuple
                           else o.__name__ for o in options)
    raise ValueError(f"{name}: must be {expected}, got {value!r}")
