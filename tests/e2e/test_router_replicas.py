"""``radixserve up --routers 2 --detach`` as a user runs it (its own process, Ray and redis-server, a private
RADIXSERVE_HOME, tiny workers): two router replicas on Redis. One router is killed with SIGKILL: the other goes
on serving and no worker keeps a page of the dead router's requests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import tiny_checkpoints
from cluster_calls import listening_pid, wait_for

from radixserve.cluster.control.client import ClusterClient
from radixserve.v1 import api_pb2, api_pb2_grpc, types_pb2, worker_pb2, worker_pb2_grpc


@dataclass(frozen=True)
class Replicas:
    router_addresses: list[str]
    home: Path


# Streams far longer than the test takes to kill their router (a tiny model's context is 256 tokens, too short:
# its streams could end first); every worker has pages for four whole ones (16,384 pages of 4 tokens, 32 MiB).
LONG_MAX_TOKENS = 16_000


@pytest.fixture(scope="module")
def long_context_hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoints.write_tiny_hf_checkpoint(tmp_path_factory.mktemp("tiny-long"),
                                                     max_position_embeddings=2 * LONG_MAX_TOKENS)


@pytest.fixture(scope="module")
def replicas(long_context_hf_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replicas]:
    home = tmp_path_factory.mktemp("replicas-home")
    env = {**os.environ, "RADIXSERVE_HOME": str(home)}
    cli = [sys.executable, "-m", "radixserve.cluster.control.cli"]
    up = [*cli, "up", "--detach", "--routers", "2", "--model", str(long_context_hf_dir), "--port", "0",
          "--http-port", "0", "--set", "engine.cache.num_pages=16384", "--set", "engine.cache.page_size=4",
          "--set", "pool.max_restarts=0", "--set", "router.health_interval_s=0.2",
          "--set", "router.drain_timeout_s=3.0"]
    try:
        subprocess.run(up, env=env, check=True, timeout=600)
        state = json.loads((home / "run" / "cluster.json").read_text())
        yield Replicas(state["router_addresses"], home)
    finally:
        subprocess.run([*cli, "down"], env=env, timeout=300)


def request(i: int, max_tokens: int = 3) -> api_pb2.GenerateRequest:
    ids = [(13 * i + j) % 290 + 5 for j in range(24)]
    return api_pb2.GenerateRequest(token_ids=api_pb2.TokenIds(ids=ids), sampling=types_pb2.SamplingOptions(
        max_tokens=max_tokens, temperature=0.0, ignore_eos=True))


def test_both_replicas_serve_and_a_client_given_both_takes_turns(replicas: Replicas) -> None:
    assert len(replicas.router_addresses) == 2 and replicas.router_addresses[1] != replicas.router_addresses[0]
    for address in replicas.router_addresses:
        with ClusterClient(address, timeout_s=30) as client:
            client.wait_ready(30)
            assert len(client.list_workers().workers) == 2
    with ClusterClient(replicas.router_addresses, timeout_s=30) as client:
        replies = [client.complete(token_ids=list(request(i).token_ids.ids)) for i in range(6)]
    assert all(r.choices[0].token_ids for r in replies)


def test_a_router_killed_with_sigkill_leaves_the_other_serving_and_no_page_leaked(replicas: Replicas) -> None:
    doomed, survivor = replicas.router_addresses
    pid = listening_pid(int(doomed.rsplit(":", 1)[1]))  # the router actor's process
    with grpc.insecure_channel(doomed) as channel:
        stub = api_pb2_grpc.GenerationStub(channel)
        streams = [stub.Generate(request(100 + i, max_tokens=LONG_MAX_TOKENS), timeout=60) for i in range(4)]
        for stream in streams:
            next(stream)  # each mid-flight on a worker, with thousands of tokens to go
        os.kill(pid, signal.SIGKILL)
        for stream in streams:  # each ends with an error status, none silently
            with pytest.raises(grpc.RpcError) as failure:
                for _ in stream:
                    pass
            assert failure.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
    with ClusterClient(survivor, timeout_s=60) as client, ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(lambda i: client.complete(token_ids=list(request(i).token_ids.ids)), range(12)))
        assert all(r.choices[0].token_ids for r in replies)
        workers = client.list_workers().workers
        wait_for(lambda: all(w.load.num_running == 0 and w.load.num_waiting == 0
                             for w in client.list_workers().workers), 20, "workers to drop the dead router's calls")
    for worker in workers:
        with grpc.insecure_channel(worker.address) as channel:
            worker_stub = worker_pb2_grpc.WorkerStub(channel)
            worker_stub.FlushCache(worker_pb2.FlushCacheRequest(), timeout=30)
            load = worker_stub.GetLoad(worker_pb2.GetLoadRequest(), timeout=30)
        assert load.num_pages_used == 0, f"{worker.worker_id} still holds {load.num_pages_used} pages"


def test_the_cli_given_both_routers_goes_on_through_the_one_left(replicas: Replicas) -> None:
    targets = ",".join(replicas.router_addresses)  # the first one was killed by the test before
    command = [sys.executable, "-m", "radixserve.cluster.control.cli"]
    status = subprocess.run([*command, "status", "--target", targets], capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stderr
    assert "w" in status.stdout and status.stdout.count("up") >= 2
    generated = subprocess.run([*command, "generate", "--raw", "hello", "--max-tokens", "3", "--target", targets],
                               capture_output=True, text=True, timeout=60)
    assert generated.returncode == 0, generated.stderr
    assert "3 tokens" in generated.stderr
