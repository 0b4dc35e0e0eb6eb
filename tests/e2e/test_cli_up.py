"""The new user's path: `radixserve up --detach`, a demo request, `radixserve status` and `top`, `radixserve down`."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from radixserve.cluster.control.launcher import _alive


def _radixserve(env: dict[str, str], *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "radixserve.cluster.control.cli", *args], env=env, text=True,
                          capture_output=True, timeout=timeout)


def test_up_generate_status_down(tmp_path: Path, smollm2_path: Path):
    home = tmp_path / "home"
    (home / "models").mkdir(parents=True)
    # The model store layout is <home>/models/<name>/<file>: share the already pulled file.
    (home / "models" / smollm2_path.parent.name).symlink_to(smollm2_path.parent)
    env = {**os.environ, "RADIXSERVE_HOME": str(home)}  # the commands find the cluster through its state file
    up = _radixserve(env, "up", "--detach", "--port", "0", "--http-port", "0", "--kv-memory-gib", "0.25")
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        state = json.loads((home / "run" / "cluster.json").read_text())
        router_address, http_address = state["router_address"], state["http_address"]
        assert f"cluster up: router at {router_address}, OpenAI-compatible HTTP at {http_address}" in up.stdout
        assert httpx.get(f"http://{http_address}/health").status_code == 200
        again = _radixserve(env, "up", "--detach", "--port", "0", timeout=60)
        assert again.returncode == 1 and "already running" in again.stderr

        reply = _radixserve(env, "generate", "What is the capital of France?", "--max-tokens", "16", timeout=300)
        assert reply.returncode == 0, reply.stderr
        assert reply.stdout.strip(), "the demo request streamed no text"

        status = _radixserve(env, "status", timeout=60)
        assert status.returncode == 0, status.stderr
        assert "radixserve-worker-0" in status.stdout and "radixserve-worker-1" in status.stdout
        assert status.stdout.count(" up ") >= 2, status.stdout
        assert "from /metrics" in status.stdout and "1 requests ok" in status.stdout  # the demo request, counted

        top = _radixserve(env, "top", "--iterations", "1", timeout=60)
        assert top.returncode == 0, top.stderr
        assert "radixserve-worker-0" in top.stdout and "radixserve-worker-1" in top.stdout
        targets = json.loads((home / "run" / "prometheus_targets.json").read_text())
        assert [len(group["targets"]) for group in targets] == [1, 2]
    finally:
        down = _radixserve(env, "down", timeout=300)
    assert down.returncode == 0, down.stdout + down.stderr
    assert not (home / "run" / "cluster.json").exists()
    assert json.loads((home / "run" / "prometheus_targets.json").read_text()) == []  # nothing left to scrape
    assert "draining the workers" in (home / "run" / "cluster.log").read_text()  # drained, not killed by Ray's handler
    after = _radixserve({**env, "RADIXSERVE_TARGET": router_address}, "status", timeout=60)
    assert after.returncode == 1 and "UNAVAILABLE" in after.stderr


def test_up_that_fails_after_starting_redis_leaves_no_redis_server_running(tmp_path: Path, tiny_gguf_path: Path):
    env = {**os.environ, "RADIXSERVE_HOME": str(tmp_path / "home")}
    with socket.socket() as taken:  # the first router's port, in use
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        up = _radixserve(env, "up", "--model", str(tiny_gguf_path), "--workers", "1", "--routers", "2",
                         "--port", str(port), "--http-port", "0", "--set", "engine.max_model_len=256",
                         timeout=900)
    started = re.search(r"started redis-server at redis://127\.0\.0\.1:(\d+)/0 \(pid (\d+)", up.stdout)
    assert started is not None, up.stdout + up.stderr
    redis_port, redis_pid = int(started[1]), int(started[2])
    try:
        assert not _alive(redis_pid), "the failed `up` left its redis-server running"
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", redis_port), timeout=2).close()
        assert up.returncode == 1, up.stdout + up.stderr
        assert "error:" in up.stderr and "stopping redis-server" in up.stdout
    finally:
        if _alive(redis_pid):
            os.kill(redis_pid, signal.SIGKILL)  # ours: started by the `up` above
