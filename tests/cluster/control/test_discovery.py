"""The Prometheus targets file: its content, atomic rewrites, and following the registry as workers come and go."""

from __future__ import annotations

import asyncio
from pathlib import Path

from radixserve.cluster.base.bus import InProcessBus, WorkerRecord
from radixserve.cluster.control.discovery import keep_targets, read_targets, target_groups, write_targets


def record(worker_id: str, metrics_port: int | None) -> WorkerRecord:
    return WorkerRecord(worker_id, "127.0.0.1:7000", "tiny", "inc-1", 8,
                        None if metrics_port is None else f"127.0.0.1:{metrics_port}")


def test_groups_list_the_router_then_every_worker_serving_metrics_in_id_order() -> None:
    workers = {"w2": record("w2", 9002), "w0": record("w0", 9000), "w1": record("w1", None)}
    assert target_groups(["127.0.0.1:9100"], workers) == [
        {"targets": ["127.0.0.1:9100"], "labels": {"component": "router"}},
        {"targets": ["127.0.0.1:9000", "127.0.0.1:9002"], "labels": {"component": "worker"}}]
    assert target_groups([None], {}) == []


def test_a_written_file_reads_back_by_component_and_leaves_no_scratch_file(tmp_path: Path) -> None:
    path = tmp_path / "run" / "targets.json"
    write_targets(path, target_groups(["127.0.0.1:9100"], {"w0": record("w0", 9000)}))
    assert read_targets(path) == {"router": ["127.0.0.1:9100"], "worker": ["127.0.0.1:9000"]}
    assert [p.name for p in path.parent.iterdir()] == ["targets.json"]


def test_the_file_follows_workers_joining_and_leaving(tmp_path: Path) -> None:
    path = tmp_path / "targets.json"

    async def wait_for(expected: dict[str, list[str]]) -> None:
        for _ in range(200):
            if path.exists() and read_targets(path) == expected:
                return
            await asyncio.sleep(0.01)  # the poll interval
        raise AssertionError(f"targets never became {expected}: {read_targets(path)}")

    async def main() -> None:
        bus = InProcessBus()
        await bus.announce(record("w0", 9000))
        keeper = asyncio.create_task(keep_targets(bus, path, ["127.0.0.1:9100"]))
        await wait_for({"router": ["127.0.0.1:9100"], "worker": ["127.0.0.1:9000"]})
        await bus.announce(record("w1", 9001))
        await wait_for({"router": ["127.0.0.1:9100"], "worker": ["127.0.0.1:9000", "127.0.0.1:9001"]})
        await bus.withdraw("w0")
        await wait_for({"router": ["127.0.0.1:9100"], "worker": ["127.0.0.1:9001"]})
        keeper.cancel()
        await bus.close()

    asyncio.run(asyncio.wait_for(main(), 30))
