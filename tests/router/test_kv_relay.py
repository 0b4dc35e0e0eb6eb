"""The router's relay of a worker's KV events into the in-process bus (``WorkerClient`` with ``relay``): the log
it writes stays bounded, and a reader starting on it late learns the worker's cache (real worker servers over tiny
engines, no Ray)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from conditions import until
from router_cluster import cluster

from radixserve.cluster.base.config import BusConfig
from radixserve.cluster.base.hashing import namespace_seed, page_hashes
from radixserve.v1 import api_pb2, types_pb2
from radixserve.worker.models.checkpoint import Checkpoint
from radixserve.worker.models.loading import open_checkpoint

TIMEOUT_S = 30.0
INTERVAL = 4
PROMPTS = [list(range(first, first + 12)) for first in range(5, 245, 12)]  # 20 prompts of 3 pages each


@pytest.fixture(scope="module")
def checkpoint(tiny_hf_dir: Path) -> Checkpoint:
    return open_checkpoint(tiny_hf_dir)


def test_the_relayed_log_stays_bounded_and_a_late_reader_learns_the_cache(checkpoint: Checkpoint) -> None:
    async def main() -> None:
        async with cluster(checkpoint, num_workers=1, num_pages=512,
                           bus_config=BusConfig(snapshot_interval_batches=INTERVAL)) as c:
            index, client = c.router.index, c.router.workers.clients["w0"]
            hashes = [page_hashes(prompt[:-1], 4, namespace_seed("tiny")) for prompt in PROMPTS]
            for prompt, pages in zip(PROMPTS, hashes):
                await c.stub.Complete(api_pb2.GenerateRequest(
                    token_ids=api_pb2.TokenIds(ids=prompt),
                    sampling=types_pb2.SamplingOptions(max_tokens=1, temperature=0)), timeout=TIMEOUT_S)
                await until(lambda p=pages: index.match(p, ["w0"])["w0"] == len(p), "the prompt's pages indexed")
            # Each prompt's pages came in batches of their own: far more batches than the interval.
            assert await c.bus.kv_log_length("w0") <= 2 * INTERVAL + 2
            client.relearn()  # a reader starting on the log now, as after a worker's restart
            await until(lambda: client.events_live and all(
                index.match(p, ["w0"])["w0"] == len(p) for p in hashes), "the late reader to learn every page")
    asyncio.run(asyncio.wait_for(main(), 120))
