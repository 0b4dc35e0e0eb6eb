"""The new user's path: `radixserve up --detach`, a demo request, `radixserve status`, `radixserve down`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from cluster_calls import free_port


def _radixserve(env: dict[str, str], *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "radixserve.cluster.cli", *args], env=env, text=True,
                          capture_output=True, timeout=timeout)


def test_up_generate_status_down(tmp_path: Path, smollm2_path: Path):
    home = tmp_path / "home"
    (home / "models").mkdir(parents=True)
    # The model store layout is <home>/models/<name>/<file>: share the already pulled file.
    (home / "models" / smollm2_path.parent.name).symlink_to(smollm2_path.parent)
    port = free_port()
    env = {**os.environ, "RADIXSERVE_HOME": str(home), "RADIXSERVE_TARGET": f"127.0.0.1:{port}"}
    up = _radixserve(env, "up", "--detach", "--port", str(port), "--kv-memory-gib", "0.25")
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        assert f"127.0.0.1:{port}" in up.stdout
        again = _radixserve(env, "up", "--detach", "--port", str(port), timeout=60)
        assert again.returncode == 1 and "already running" in again.stderr

        reply = _radixserve(env, "generate", "What is the capital of France?", "--max-tokens", "16", timeout=300)
        assert reply.returncode == 0, reply.stderr
        assert reply.stdout.strip(), "the demo request streamed no text"

        status = _radixserve(env, "status", timeout=60)
        assert status.returncode == 0, status.stderr
        assert "radixserve-worker-0" in status.stdout and "radixserve-worker-1" in status.stdout
        assert status.stdout.count(" up ") >= 2, status.stdout
    finally:
        down = _radixserve(env, "down", timeout=300)
    assert down.returncode == 0, down.stdout + down.stderr
    assert not (home / "run" / "cluster.json").exists()
    after = _radixserve(env, "status", timeout=60)
    assert after.returncode == 1 and "UNAVAILABLE" in after.stderr
