"""A local ``redis-server`` for the Redis bus: what ``radixserve up`` starts when ``bus.url`` is not set, and what
the tests run against.

The server listens on 127.0.0.1 only, with persistence off (``--save "" --appendonly no``): a restart empties it,
and the bus is built to recover from that (workers announce themselves again, logs restart with a snapshot). Its
working directory and log file (``redis.log``) are in the directory given.

The server dies with the process that started it, however that one ends (a crash, SIGKILL): on Linux it gets
SIGTERM when the starting thread exits (``prctl(PR_SET_PDEATHSIG)``), so start it from a thread that lives as
long as the server should (the main thread). ``radixserve up --detach`` starts it from the detached cluster
process, which the server then outlives by nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
import signal
import sys
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

import redis

DEFAULT_BINARY = "redis-server"
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0
_HOST = "127.0.0.1"
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` giving the child SIGTERM when the thread that forked it exits; None off Linux. The libc
    function is looked up here, before the fork: the child only calls it (and exits if the parent is already gone)."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True).prctl
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)
    return preexec


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind((_HOST, 0))
        return probe.getsockname()[1]


class LocalRedisServer:
    """One ``redis-server`` process in ``directory``, on ``port`` (None: a free one, chosen at the first start).

    ``start()`` returns once the process answers on its port (at most ``START_TIMEOUT_S``) and raises
    RuntimeError with the end of its log if it does not; ``start()`` after ``stop()`` or ``kill()`` restarts it
    on the same port. ``stop()`` sends SIGTERM and SIGKILL after ``STOP_TIMEOUT_S``; ``kill()`` sends SIGKILL at
    once (a crash, for fault tests). Both wait for the process and do nothing when it is not running. As a
    context manager it starts and stops.
    """

    def __init__(self, directory: Path, port: int | None = None, binary: str = DEFAULT_BINARY) -> None:
        resolved = shutil.which(binary)
        if resolved is None:
            raise FileNotFoundError(f"{binary}: not found; the Redis bus needs a redis-server (the bootstrap, "
                                    "deploy/bootstrap.sh, installs Debian's redis-server package)")
        self._binary = resolved
        self._directory = Path(directory)
        self._port = port
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("redis-server: not started yet, no port chosen")
        return self._port

    @property
    def url(self) -> str:
        return f"redis://{_HOST}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        """The process id while it runs, else None."""
        return None if self._process is None else self._process.pid

    @property
    def log_path(self) -> Path:
        return self._directory / "redis.log"

    def start(self) -> None:
        if self._process is not None:
            raise RuntimeError(f"redis-server: already running (pid {self._process.pid})")
        self._directory.mkdir(parents=True, exist_ok=True)
        if self._port is None:
            self._port = _free_port()
        command = [self._binary, "--bind", _HOST, "--port", str(self._port), "--save", "", "--appendonly", "no",
                   "--daemonize", "no", "--dir", str(self._directory), "--logfile", str(self.log_path)]
        self._process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL, preexec_fn=_die_with_parent())
        try:
            self._wait_until_answering()
        except BaseException:
            self.kill()
            raise

    def stop(self) -> None:
        self._end(signal.SIGTERM, STOP_TIMEOUT_S)

    def kill(self) -> None:
        self._end(signal.SIGKILL, STOP_TIMEOUT_S)

    def __enter__(self) -> LocalRedisServer:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.stop()

    def _wait_until_answering(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        client = redis.Redis(host=_HOST, port=self.port, socket_timeout=0.5, socket_connect_timeout=0.5)
        try:
            while time.monotonic() < deadline:
                if self._process.poll() is not None:
                    raise RuntimeError(f"redis-server: exited with status {self._process.returncode} on start; "
                                       f"{self._log_tail()}")
                try:
                    # Another server may hold the port: only our own process counts.
                    if client.info("server")["process_id"] == self._process.pid:
                        return
                except (redis.ConnectionError, redis.TimeoutError):
                    pass
                time.sleep(0.02)
        finally:
            client.close()
        raise RuntimeError(f"redis-server: no answer on port {self.port} within {START_TIMEOUT_S} s; "
                           f"{self._log_tail()}")

    def _end(self, signum: signal.Signals, timeout_s: float) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        process.send_signal(signum)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout_s)

    def _log_tail(self, num_lines: int = 5) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()[-num_lines:]
        except OSError:
            return f"no log at {self.log_path}"
        return f"the end of {self.log_path}:\n" + "\n".join(lines)
