"""Prometheus file-based service discovery: the file ``radixserve up`` keeps listing every /metrics endpoint.

The file is a JSON list of target groups, one for the routers (``component="router"``) and one for the workers
(``component="worker"``), rewritten atomically (write, then rename) whenever the registry changes, so Prometheus
never reads half a file. On the in-process bus a worker that crashed stays listed (its record stays in the
registry while Ray restarts it), so its ``up`` series reads 0 rather than vanishing; on Redis its record expires
with its heartbeat and it leaves the file until it announces itself again. A worker withdrawn by ``down``
leaves the file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from radixserve.cluster.base.bus import BusUnavailable, EventBus, WorkerRecord


def target_groups(router_addresses: Sequence[str | None],
                  workers: Mapping[str, WorkerRecord]) -> list[dict[str, object]]:
    """The file's content: the routers' endpoints and each worker's (sorted by worker id), where served."""
    worker_targets = [workers[w].metrics_address for w in sorted(workers) if workers[w].metrics_address]
    groups: list[dict[str, object]] = []
    router_targets = [address for address in router_addresses if address]
    if router_targets:
        groups.append({"targets": router_targets, "labels": {"component": "router"}})
    if worker_targets:
        groups.append({"targets": worker_targets, "labels": {"component": "worker"}})
    return groups


def write_targets(path: Path, groups: list[dict[str, object]]) -> None:
    """Replace ``path`` with ``groups`` as JSON, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_name(path.name + ".tmp")
    scratch.write_text(json.dumps(groups, indent=2))
    os.replace(scratch, path)


def read_targets(path: Path) -> dict[str, list[str]]:
    """The endpoints a targets file lists, by component (``{"router": [...], "worker": [...]}``)."""
    found: dict[str, list[str]] = {}
    for group in json.loads(path.read_text()):
        found.setdefault(group["labels"]["component"], []).extend(group["targets"])
    return found


async def keep_targets(bus: EventBus, path: Path, router_addresses: Sequence[str | None]) -> None:
    """Write the targets file now and again after every registry change; runs until cancelled. While the bus is
    unreachable the file stays as it was."""
    async with bus.watch_registry() as changes:
        await _rewrite(bus, path, router_addresses)
        async for _ in changes:
            await _rewrite(bus, path, router_addresses)


async def _rewrite(bus: EventBus, path: Path, router_addresses: Sequence[str | None]) -> None:
    try:
        write_targets(path, target_groups(router_addresses, await bus.members()))
    except BusUnavailable:
        pass

