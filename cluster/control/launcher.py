"""``radixserve up`` / ``down``: start Ray, the worker pool and the routers from one ``ClusterConfig``.

With ``bus.backend = "redis"`` the workers and ``router.replicas`` routers (Ray actors, ``cluster.routers``)
share the Redis server at ``bus.url``; without a URL ``up`` starts a local ``redis-server`` (persistence off)
and stops it when the cluster stops. Otherwise one router runs in this process on the in-process bus.

``ClusterRunner`` runs everything on one asyncio loop in a background thread, so the same code serves the
foreground command (which waits for Ctrl-C or SIGTERM, then drains) and tests that start a cluster in-process.
``up --detach`` re-runs ``up`` in a new session with its output in a log file and returns once the router
answers; the running cluster is described by a state file (``$RADIXSERVE_HOME/run/cluster.json``), which
``down`` uses to stop it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from radixserve.cluster.base.bus import EventBus
from radixserve.cluster.base.buses import make_bus
from radixserve.cluster.control.discovery import keep_targets, write_targets
from radixserve.cluster.base.config import ClusterConfig, load_cluster_config
from radixserve.cluster.base.heap import freeze_startup_heap
from radixserve.cluster.base.loop_thread import LoopThread
from radixserve.cluster.base.model_store import ModelStore, radixserve_home
from radixserve.cluster.base.security import ApiKeys
from radixserve.cluster.base.urls import redact_url

log = logging.getLogger(__name__)

_DETACH_TIMEOUT_S = 900.0
_DOWN_MARGIN_S = 60.0


@dataclass(frozen=True)
class ClusterState:
    """What ``up`` records for ``down`` and clients: the serving process and where it listens (``http_address``:
    the router's OpenAI-compatible HTTP API, empty without one)."""

    pid: int
    router_address: str
    ray_address: str
    log_path: str
    targets_path: str
    http_address: str = ""
    router_addresses: tuple[str, ...] = ()  # every replica's, the first being ``router_address``

    @staticmethod
    def path() -> Path:
        return radixserve_home() / "run" / "cluster.json"

    def save(self) -> None:
        path = self.path()
        path.parent.mkdir(parents=True, exist_ok=True)
        scratch = path.with_suffix(".tmp")
        scratch.write_text(json.dumps(self.__dict__))
        os.replace(scratch, path)

    @classmethod
    def load(cls) -> ClusterState | None:
        """The recorded cluster if its process is still alive, else None (a stale file is removed)."""
        try:
            values = json.loads(cls.path().read_text())
            state = cls(**{**values, "router_addresses": tuple(values.get("router_addresses", ()))})
        except (OSError, ValueError, TypeError):
            return None
        if not _alive(state.pid):
            cls.path().unlink(missing_ok=True)
            return None
        return state


class ClusterRunner:
    """Ray, the worker pool and the router, on a private event loop thread. ``start`` and ``stop`` block."""

    def __init__(self, config: ClusterConfig) -> None:
        self.config = config
        self._key_file: Path | None = None  # the cluster key this runner generated, kept for `status`
        self.router_address = ""
        self.router_addresses: list[str] = []
        self.http_address = ""
        self.ray_address = ""
        self.bus_config = config.bus  # with the URL of the local Redis once started
        self._redis: Any = None
        self._routers: Any = None
        self._loop = LoopThread("radixserve-cluster")
        self._bus: EventBus | None = None
        self._pool: Any = None
        self._router: Any = None
        self._targets_task: asyncio.Task[None] | None = None
        self._owns_ray = False
        self._api_keys = ApiKeys()
        sd_file = config.metrics.sd_file
        self.targets_path = Path(sd_file) if sd_file else radixserve_home() / "run" / "prometheus_targets.json"

    def start(self, progress: Callable[[str], None] = lambda _: None) -> str:
        """Start everything; returns the router's address. Raises ValueError for a bad config or model."""
        import ray

        from radixserve.cluster.control.pool import RAY_NAMESPACE

        ModelStore().resolve(self.config.engine.model)  # fail before starting anything
        self._api_keys = ApiKeys.from_config(self.config.security)  # read once, here: remote workers lack our env
        if self.config.security.client_keys and self.config.security.cluster_key is None:
            self.config = _with_new_cluster_key(self.config)
            self._key_file = cluster_key_path()
        timer = _Timer(progress)
        if self.config.bus.backend == "redis" and self.config.bus.url is None:
            self._start_redis(timer)
        pool = self.config.pool
        self._owns_ray = pool.ray_address is None and not ray.is_initialized()
        timer.step("starting Ray" if self._owns_ray else f"joining Ray at {pool.ray_address}")
        if ray.is_initialized():  # this process already has a Ray (an embedding program, a test session)
            self.ray_address = ray.get_runtime_context().gcs_address
        else:
            context = ray.init(**_ray_init_args(self.config), namespace=RAY_NAMESPACE)
            self.ray_address = context.address_info.get("gcs_address", "")
        self._loop.start()
        timer.step(f"starting {pool.num_workers} workers ({self.config.engine.model}; the first start of a "
                   f"machine also builds the native kernels, about 40 s on 2 cores)")
        self._run(self._start_pool(timer))
        replicas = self.config.router.replicas
        bus_url = redact_url(self.bus_config.url or "")
        timer.step(f"starting {replicas} routers on Redis at {bus_url}" if self._bus_shared else "starting the router")
        found = self._run(self._start_routers(timer))
        self.router_addresses = [f.address for f in found]
        self.router_address = self.router_addresses[0]
        timer.step(f"routers listening on {', '.join(self.router_addresses)} (policy {self.config.router.policy})")
        if found[0].http_address is not None:
            self.http_address = found[0].http_address
            scheme = "https" if self.config.security.tls else "http"
            timer.step("OpenAI-compatible HTTP API at " + ", ".join(f"{scheme}://{f.http_address}" for f in found))
        timer.step(f"metrics: routers at {', '.join(str(f.metrics_address) for f in found)}; Prometheus targets in "
                   f"{self.targets_path}")
        return self.router_address

    @property
    def _bus_shared(self) -> bool:
        return self.bus_config.backend != "inprocess"

    def _start_redis(self, timer: _Timer) -> None:
        from radixserve.cluster.control.redis_server import LocalRedisServer

        self._redis = LocalRedisServer(radixserve_home() / "run" / "redis")
        self._redis.start()
        self.bus_config = dataclasses.replace(self.config.bus, url=self._redis.url)
        timer.step(f"started redis-server at {redact_url(self._redis.url)} (pid {self._redis.pid}, persistence off)")

    def stop(self, progress: Callable[[str], None] = lambda _: None) -> None:
        """Drain the router, then the workers, then stop Ray if this runner started it. Also after a ``start``
        that failed part way: each step that fails is logged and the next ones still run, so the local
        redis-server and Ray never outlive a failed ``up``."""
        import ray

        timer = _Timer(progress)
        if self._targets_task is not None:
            self._step("stopping the targets file", lambda: self._run(self._stop_targets(self._targets_task)))
        if self._router is not None or self._routers is not None:
            timer.step("draining the routers")
            self._step("draining the routers", lambda: self._run(
                self._router.stop() if self._router is not None else self._routers.stop()))
        if self._pool is not None:
            timer.step("draining the workers")
            self._step("draining the workers", lambda: self._run(self._pool.stop(self.config.router.drain_timeout_s)))
        if self._bus is not None:
            self._step("closing the bus", lambda: self._run(self._bus.close()))
        if self._redis is not None:
            timer.step("stopping redis-server")
            self._step("stopping redis-server", self._redis.stop)
        self._loop.stop()
        if self._owns_ray:
            timer.step("stopping Ray")
            self._step("stopping Ray", ray.shutdown)
        if self._key_file is not None:
            self._key_file.unlink(missing_ok=True)
        timer.step("stopped")

    @staticmethod
    def _step(what: str, action: Callable[[], Any]) -> None:
        try:
            action()
        except Exception:
            log.exception("%s failed; going on with the rest of the stop", what)

    def _run(self, coroutine: Any) -> Any:
        if not self._loop.running:  # start failed before the loop ran: nothing of it is on the loop
            coroutine.close()
            return None
        return self._loop.call(coroutine)

    async def _stop_targets(self, task: asyncio.Task[None]) -> None:
        """Stop following the registry and empty the targets file: a stopped cluster leaves nothing to alert on."""
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        write_targets(self.targets_path, [])

    async def _start_pool(self, timer: _Timer) -> None:
        from radixserve.cluster.control.pool import WorkerPool

        self._bus = make_bus(self.bus_config)
        self._pool = WorkerPool(self.config, self._bus, self.bus_config)
        await self._pool.start(timer.step)

    async def _start_routers(self, timer: _Timer) -> list[Any]:
        from radixserve.cluster.control.routers import RouterAddresses, RouterPool, router_name
        from radixserve.router.server import Router

        assert self._bus is not None
        if self._bus_shared:
            self._routers = RouterPool(self.config, self.bus_config, self._api_keys)
            found = await self._routers.start(timer.step)
        else:
            metrics = self.config.metrics
            self._router = Router(self.config.router, self._bus, metrics.host, metrics.router_port,
                                  self.config.security, self._api_keys, router_name(0), self.bus_config)
            await self._router.start()
            found = [RouterAddresses(self._router.address, self._router.http_address, self._router.metrics_address)]
        self._targets_task = asyncio.create_task(keep_targets(self._bus, self.targets_path,
                                                              [f.metrics_address for f in found]))
        return found


def _with_new_cluster_key(config: ClusterConfig) -> ClusterConfig:
    """``config`` with a fresh cluster key, also kept (mode 0600) in ``cluster_key_path()`` while the cluster
    runs, for ``radixserve status`` on this machine."""
    key = secrets.token_urlsafe(32)
    path = cluster_key_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(key)
    return dataclasses.replace(config, security=dataclasses.replace(config.security, cluster_key=key))


def cluster_key_path() -> Path:
    """Where ``up`` keeps the cluster key it generated while the cluster runs."""
    return radixserve_home() / "run" / "cluster.key"


class _Timer:
    def __init__(self, progress: Callable[[str], None]) -> None:
        self._progress = progress
        self._started = time.monotonic()

    def step(self, message: str) -> None:
        self._progress(f"[{time.monotonic() - self._started:6.1f} s] {message}")


def _ray_init_args(config: ClusterConfig) -> dict[str, Any]:
    pool = config.pool
    if pool.ray_address is not None:
        return {"address": pool.ray_address, "logging_level": "WARNING"}
    # A local Ray gets enough CPUs for every worker even on a smaller machine (the OS then shares the cores).
    num_cpus = max(os.cpu_count() or 1, int(pool.num_workers * pool.num_cpus_per_worker + 0.999))
    return {"num_cpus": num_cpus, "include_dashboard": False, "logging_level": "WARNING",
            "object_store_memory": 256 * 2**20}


# ---- commands ---------------------------------------------------------------------------------------------

def add_launcher_commands(subparsers: argparse._SubParsersAction) -> None:
    up = subparsers.add_parser("up", help="start Ray, the workers and the router (Ctrl-C drains and stops)")
    up.add_argument("--config", default=None, help="a TOML file ([pool], [engine], [engine.cache], [router], ...)")
    up.add_argument("--workers", type=int, dest="pool.num_workers", help="number of workers")
    up.add_argument("--routers", type=int, dest="router.replicas",
                    help="number of router replicas (more than one runs them on Redis: bus.backend=redis)")
    up.add_argument("--model", dest="engine.model", help="model-store name or path to a .gguf / HF directory")
    up.add_argument("--policy", dest="router.policy", help="routing policy")
    up.add_argument("--host", dest="router.host", help="router listen address")
    up.add_argument("--port", type=int, dest="router.port", help="router gRPC port")
    up.add_argument("--http-port", type=int, dest="router.http_port",
                    help="router OpenAI-compatible HTTP port (0: a free one; default 8000)")
    up.add_argument("--address", dest="pool.ray_address", help="join this Ray cluster instead of starting one")
    up.add_argument("--kv-memory-gib", type=float, dest="engine.cache.memory_gib", help="KV cache per worker")
    up.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="any setting by its dotted name, value in TOML syntax (e.g. router.load_weight=0.5)")
    up.add_argument("--detach", action="store_true", help="run in the background; stop with `radixserve down`")
    up.set_defaults(func=run_up)
    down = subparsers.add_parser("down", help="drain and stop the cluster started by `radixserve up --detach`")
    down.set_defaults(func=run_down)


def config_from_args(args: argparse.Namespace) -> ClusterConfig:
    """The TOML file (if any), then ``--set`` pairs, then the named flags, over the embedded defaults.
    ``--routers N`` above 1 puts the cluster on Redis unless a bus backend is set."""
    overrides: dict[str, Any] = {}
    for pair in args.set:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"--set: expected KEY=VALUE, got {pair!r}")
        overrides[key.strip()] = _toml_value(key.strip(), value)
    overrides.update({k: v for k, v in vars(args).items() if "." in k and v is not None})
    replicas = overrides.get("router.replicas")
    if isinstance(replicas, int) and replicas > 1 and "bus.backend" not in overrides \
            and load_cluster_config(args.config).bus.backend == "inprocess":
        overrides["bus.backend"] = "redis"
    return load_cluster_config(args.config, overrides)


def _toml_value(key: str, text: str) -> Any:
    import tomllib

    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare word is a string


def run_up(args: argparse.Namespace) -> int:
    try:
        config = config_from_args(args)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    running = ClusterState.load()
    if running is not None:
        print(f"error: a cluster is already running (pid {running.pid}, router {running.router_address}); "
              "stop it with `radixserve down`", file=sys.stderr)
        return 1
    if args.detach:
        return _detach(args.argv)
    return _foreground(config)


def _foreground(config: ClusterConfig) -> int:
    stop = threading.Event()
    runner = ClusterRunner(config)
    say = lambda message: print(message, flush=True)  # noqa: E731
    try:
        runner.start(say)
    except Exception as error:  # a bad config or model, a port in use, a Ray actor that failed to start, ...
        print(f"error: {error}", file=sys.stderr)
        runner.stop(say)
        return 2 if isinstance(error, ValueError) else 1
    except BaseException:  # Ctrl-C while starting
        runner.stop(say)
        raise
    freeze_startup_heap()
    for signum in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which installs a SIGTERM handler of its own
        signal.signal(signum, lambda *_: stop.set())
    state = ClusterState(os.getpid(), runner.router_address, runner.ray_address,
                         os.environ.get("RADIXSERVE_LOG", ""), str(runner.targets_path), runner.http_address,
                         tuple(runner.router_addresses))
    state.save()
    say("ready: try `radixserve generate \"Hello\"` or `radixserve status`; Ctrl-C (or `radixserve down`) stops")
    try:
        while not stop.wait(0.5):
            pass
        say("shutting down: draining requests in flight")
        runner.stop(say)
    finally:
        ClusterState.path().unlink(missing_ok=True)
    return 0


def _detach(argv: Sequence[str]) -> int:
    log_path = radixserve_home() / "run" / "cluster.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "radixserve.cluster.control.cli", *[a for a in argv if a != "--detach"]]
    with open(log_path, "w") as log:
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 start_new_session=True, env={**os.environ, "RADIXSERVE_LOG": str(log_path)})
    print(f"starting in the background (pid {child.pid}, log {log_path}) ...", flush=True)
    shown = 0
    deadline = time.monotonic() + _DETACH_TIMEOUT_S
    while time.monotonic() < deadline:
        shown = _echo_new_lines(log_path, shown)
        state = ClusterState.load()
        if state is not None and state.pid == child.pid:
            http = f", OpenAI-compatible HTTP at {state.http_address}" if state.http_address else ""
            print(f"cluster up: router at {state.router_address}{http}; stop it with `radixserve down`")
            return 0
        if child.poll() is not None:
            _echo_new_lines(log_path, shown)
            print(f"error: the cluster exited with status {child.returncode}; see {log_path}", file=sys.stderr)
            return 1
        time.sleep(0.5)
    child.terminate()
    print(f"error: the cluster did not come up within {_DETACH_TIMEOUT_S:.0f} s; see {log_path}", file=sys.stderr)
    return 1


def _echo_new_lines(path: Path, num_shown: int) -> int:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return num_shown
    for line in lines[num_shown:]:
        if line.startswith("["):  # progress lines; Ray's own chatter stays in the log
            print(f"  {line}", flush=True)
    return len(lines)


def run_down(args: argparse.Namespace) -> int:
    state = ClusterState.load()
    if state is None:
        print("no cluster is running")
        return 0
    os.kill(state.pid, signal.SIGTERM)
    print(f"stopping the cluster (pid {state.pid}): draining requests in flight ...", flush=True)
    deadline = time.monotonic() + load_cluster_config().router.drain_timeout_s + _DOWN_MARGIN_S
    while _alive(state.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _alive(state.pid):
        os.kill(state.pid, signal.SIGKILL)
        print("the cluster did not stop in time; killed it", file=sys.stderr)
    ClusterState.path().unlink(missing_ok=True)
    print("stopped")
    return 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (our own exited child not yet reaped) is not alive
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True
