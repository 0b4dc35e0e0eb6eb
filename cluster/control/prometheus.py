"""A local Prometheus server for tests and benchmarks: scrapes a radixserve cluster and evaluates alert rules.

``PrometheusServer`` runs the ``prometheus`` binary on a free port of 127.0.0.1 with one scrape job,
``radixserve``, whose targets come from a file_sd file (the one ``radixserve up`` writes), and answers PromQL
through the HTTP API. It uses urllib only.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any, TypeVar

import yaml

from radixserve.cluster.base.config import require

T = TypeVar("T")
JOB = "radixserve"
# Error types of the query API that mean the expression itself is wrong (does not parse, or cannot be evaluated).
_EXPRESSION_ERRORS = ("bad_data", "execution")


class PrometheusServer:
    """A ``prometheus`` process scraping the targets in ``sd_file`` every ``scrape_interval_s`` seconds and
    evaluating ``rule_files`` every ``evaluation_interval_s`` seconds.

    ``start`` makes a temporary directory (config, TSDB, log), launches the binary and returns once it is ready;
    ``stop`` ends it and removes the directory. Use it as a context manager to do both. ``url`` is
    ``http://127.0.0.1:<port>`` while it runs.
    """

    def __init__(self, sd_file: str | Path, rule_files: Sequence[str | Path] = (), scrape_interval_s: float = 1.0,
                 evaluation_interval_s: float = 1.0, binary: str = "prometheus", ready_timeout_s: float = 30.0,
                 request_timeout_s: float = 10.0) -> None:
        require(scrape_interval_s >= 0.001, "scrape_interval_s", f"must be >= 0.001, got {scrape_interval_s}")
        require(evaluation_interval_s >= 0.001, "evaluation_interval_s",
                f"must be >= 0.001, got {evaluation_interval_s}")
        require(ready_timeout_s > 0, "ready_timeout_s", f"must be > 0, got {ready_timeout_s}")
        require(request_timeout_s > 0, "request_timeout_s", f"must be > 0, got {request_timeout_s}")
        self.sd_file = Path(sd_file).resolve()
        self.rule_files = [Path(path).resolve() for path in rule_files]
        self.scrape_interval_s = scrape_interval_s
        self.evaluation_interval_s = evaluation_interval_s
        self.binary = binary
        self.ready_timeout_s = ready_timeout_s
        self.request_timeout_s = request_timeout_s
        self._dir: Path | None = None
        self._log: IO[bytes] | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._address = ""

    @property
    def url(self) -> str:
        """The server's base URL. Raises RuntimeError unless started."""
        if self._process is None:
            raise RuntimeError("PrometheusServer is not started")
        return f"http://{self._address}"

    def config(self) -> dict[str, Any]:
        """The Prometheus configuration ``start`` writes: global intervals, the rule files, the one job."""
        return {
            "global": {"scrape_interval": _duration(self.scrape_interval_s),
                       "evaluation_interval": _duration(self.evaluation_interval_s)},
            "rule_files": [str(path) for path in self.rule_files],
            "scrape_configs": [{"job_name": JOB, "file_sd_configs": [
                {"files": [str(self.sd_file)], "refresh_interval": _duration(self.scrape_interval_s)}]}],
        }

    def start(self) -> PrometheusServer:
        """Launch Prometheus and wait for ``/-/ready``. Raises RuntimeError if it exits first and TimeoutError if
        it is not ready within ``ready_timeout_s`` (both with the end of its log), having cleaned up."""
        if self._process is not None:
            raise RuntimeError("PrometheusServer is already started")
        self._dir = Path(tempfile.mkdtemp(prefix="radixserve-prometheus-"))
        config_path = self._dir / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(self.config(), sort_keys=False))
        self._address = f"127.0.0.1:{_free_port()}"
        self._log = open(self._dir / "prometheus.log", "wb")
        try:
            self._process = subprocess.Popen(
                [self.binary, f"--config.file={config_path}", f"--storage.tsdb.path={self._dir / 'data'}",
                 f"--web.listen-address={self._address}", "--web.enable-lifecycle"],
                stdout=self._log, stderr=subprocess.STDOUT)
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self._process.returncode}:\n{self._log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1.0):
                    return
            except OSError:  # not listening yet, or 503 while it starts
                time.sleep(0.05)
        raise TimeoutError(f"prometheus at {self._address} not ready after {self.ready_timeout_s} s:\n"
                           f"{self._log_tail()}")

    def _log_tail(self, num_chars: int = 4000) -> str:
        assert self._dir is not None
        return (self._dir / "prometheus.log").read_text(errors="replace")[-num_chars:]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """The instant query ``expr`` at unix time ``at`` (default: now), as the API's result rows
        ``{"metric": {...}, "value": [time, "value"]}``; a scalar or string result is one row with no labels.
        Raises ValueError with Prometheus' error text when ``expr`` does not parse or cannot be evaluated."""
        params = {"query": expr} if at is None else {"query": expr, "time": f"{at:.3f}"}
        data = self._api("/api/v1/query", params)
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
        """The range query ``expr`` from ``start`` to ``end`` (unix times) every ``step`` seconds, as rows
        ``{"metric": {...}, "values": [[time, "value"], ...]}``. Raises ValueError as ``query`` does."""
        return self._api("/api/v1/query_range", {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}",
                                                 "step": f"{step:.3f}"})["result"]

    def rules(self) -> list[dict[str, Any]]:
        """Every rule of every loaded group as ``/api/v1/rules`` reports it (``name``, ``query``, ``health``:
        "unknown" before its first evaluation, then "ok" or "err"), with ``lastError`` ("" when none)."""
        return [{"lastError": "", **rule} for group in self._api("/api/v1/rules")["groups"]
                for rule in group["rules"]]

    def alerts(self) -> list[dict[str, Any]]:
        """The pending and firing alerts, as ``/api/v1/alerts`` reports them (``labels``, ``state``, ...)."""
        return self._api("/api/v1/alerts")["alerts"]

    def wait_for(self, predicate: Callable[[], T], timeout_s: float, interval_s: float = 0.1) -> T:
        """Call ``predicate`` every ``interval_s`` seconds until it returns a true value, and return that value.
        Raises TimeoutError after ``timeout_s`` seconds; exceptions from ``predicate`` propagate."""
        deadline = time.monotonic() + timeout_s
        while not (value := predicate()):
            if time.monotonic() >= deadline:
                raise TimeoutError(f"condition not met within {timeout_s} s (last value {value!r})")
            time.sleep(interval_s)
        return value

    def _api(self, path: str, params: dict[str, str] | None = None) -> Any:
        data = urllib.parse.urlencode(params).encode() if params is not None else None
        try:
            with urllib.request.urlopen(f"{self.url}{path}", data=data, timeout=self.request_timeout_s) as response:
                body = json.load(response)
        except urllib.error.HTTPError as error:  # API errors come with a JSON body naming the error
            try:
                body = json.load(error)
            except json.JSONDecodeError:
                raise RuntimeError(f"{path}: HTTP {error.code} {error.reason}") from error
        if body["status"] == "success":
            return body["data"]
        message = f"{path}: {body['errorType']}: {body['error']}"
        raise ValueError(message) if body["errorType"] in _EXPRESSION_ERRORS else RuntimeError(message)

    def stop(self) -> None:
        """End Prometheus (terminate, then kill if it has not exited within 10 s) and remove its directory.
        Idempotent."""
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process = None
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> PrometheusServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def _duration(seconds: float) -> str:
    """``seconds`` as a Prometheus duration in whole milliseconds (``1500ms``)."""
    return f"{round(seconds * 1000)}ms"


def _free_port() -> int:
    """A TCP port of 127.0.0.1 free now (another process may take it before Prometheus binds it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
