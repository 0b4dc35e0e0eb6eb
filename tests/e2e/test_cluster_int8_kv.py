"""The cluster with an int8 KV cache (``--set engine.kv_cache_dtype=int8``), started as a user starts it
(``radixserve up --detach``, its own process and Ray): the workers' pools hold the int8 page count, and the
routing and caching tests of ``test_cluster`` pass against it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from cluster_calls import workers_by_id
# Collected here too, run against this module's ``stub``: prefix routing and cache reuse, streaming == complete.
from test_cluster import (test_generate_streams_the_same_tokens_as_complete,  # noqa: F401
                          test_requests_sharing_a_prefix_land_on_one_worker_and_reuse_its_cache)

from radixserve.v1 import api_pb2_grpc
from radixserve.worker.kv.pool import KVPool
from radixserve.worker.models.loading import open_checkpoint

MEMORY_GIB = 0.25
# The shared cluster's settings (conftest.E2E_SETTINGS), with the int8 KV cache.
SETTINGS = ["pool.num_workers=2", "engine.max_model_len=4096", f"engine.cache.memory_gib={MEMORY_GIB}",
            "router.health_interval_s=0.2", "router.drain_timeout_s=5.0", "engine.kv_cache_dtype=int8"]


def _radixserve(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "radixserve.cluster.control.cli", *args], env=env, text=True,
                          capture_output=True, timeout=900)


@pytest.fixture(scope="module")
def router_address(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    home = tmp_path_factory.mktemp("int8-kv-home")
    (home / "models").mkdir()
    (home / "models" / smollm2_path.parent.name).symlink_to(smollm2_path.parent)  # the pulled file, shared
    env = {**os.environ, "RADIXSERVE_HOME": str(home)}
    settings = [arg for setting in SETTINGS for arg in ("--set", setting)]
    up = _radixserve(env, "up", "--detach", "--port", "0", "--http-port", "0", *settings)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        yield json.loads((home / "run" / "cluster.json").read_text())["router_address"]
    finally:
        down = _radixserve(env, "down")
        assert down.returncode == 0, down.stdout + down.stderr


@pytest.fixture(scope="module")
def stub(router_address: str) -> Iterator[api_pb2_grpc.GenerationStub]:
    with grpc.insecure_channel(router_address) as channel:
        grpc.channel_ready_future(channel).result(timeout=30)
        yield api_pb2_grpc.GenerationStub(channel)


def test_every_worker_holds_the_int8_pools_page_count(stub: api_pb2_grpc.GenerationStub, smollm2_path: Path):
    m = open_checkpoint(smollm2_path).config
    shape = (m.num_hidden_layers, 16, m.num_key_value_heads, m.head_dim, torch.float32)
    int8_pages = int(MEMORY_GIB * 2**30) // KVPool.page_bytes(*shape, "int8")
    float_pages = int(MEMORY_GIB * 2**30) // KVPool.page_bytes(*shape)
    workers = workers_by_id(stub).values()
    assert len(workers) == 2
    for worker in workers:
        assert worker.load.num_pages_used + worker.load.num_pages_free == int8_pages > 2 * float_pages
