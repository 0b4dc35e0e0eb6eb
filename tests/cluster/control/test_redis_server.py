"""``LocalRedisServer`` (a real redis-server): it dies with the process that started it, however that process ends."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from radixserve.cluster.control.launcher import _alive

DEADLINE_S = 30.0

_CHILD = """
import sys, time
from pathlib import Path
from radixserve.cluster.control.redis_server import LocalRedisServer
server = LocalRedisServer(Path(sys.argv[1]))
server.start()
print(server.pid, flush=True)
time.sleep(600)  # the parent of redis-server lives on until the test kills it (600 s only bounds it)
"""


def wait_gone(pid: int) -> bool:
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.05)  # the poll interval
    return False


def test_a_redis_server_whose_starting_process_is_killed_goes_away(tmp_path: Path) -> None:
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    redis_pid = None
    try:
        assert child.stdout is not None
        redis_pid = int(child.stdout.readline())
        assert _alive(redis_pid)
        child.send_signal(signal.SIGKILL)
        child.wait(DEADLINE_S)
        assert wait_gone(redis_pid), "the redis-server outlived the process that started it"
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(DEADLINE_S)
        if redis_pid is not None and _alive(redis_pid):
            os.kill(redis_pid, signal.SIGKILL)  # ours: started by our child
