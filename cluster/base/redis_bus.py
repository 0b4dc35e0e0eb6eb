"""The event bus on a Redis server (redis-py's asyncio client): one view for any number of processes.

Key layout, every key under ``<namespace>:``:

* ``worker:<id>``: a worker's record (``WorkerRecord.to_bytes``), expiring with the TTL of its last announce;
  ``workers``: the set of announced ids (an id whose record is gone is dropped from it when the registry is
  read); ``left:<id>``: a tombstone ``withdraw`` leaves for ``worker_ttl_s``, by which watchers tell a withdrawn
  worker (reported ``left`` at once) from a record that is merely missing.
* ``kv:<id>``: a worker's KV event log, a stream whose entries have one field ``batch``; ``kvsnap:<id>``: the id of
  its newest snapshot entry. Appending a snapshot trims the stream to start at the previous snapshot; append,
  trim and pointer update are one Lua script, so they are atomic and a restarted writer trims right.
* ``load:<kind>:<name>``: a load document, expiring with its TTL; ``loads:<kind>``: the set of names (pruned
  when read).
* ``routes``: the routers' route log, a stream whose entries have one field ``hints``, capped at about
  ``ROUTE_LOG_MAX_ENTRIES`` entries (Redis trims it approximately, on append).

Faults. Sockets time out after about a second and calls are not retried: a connection error, a timeout, or a
server that cannot serve now (loading its data, read-only, out of memory) fails the call with ``BusUnavailable``
and sets ``connected`` False until a call succeeds; the client reconnects by itself on later calls.

* Watchers: one task per bus reads the registry every min(``worker_ttl_s`` / 4, 0.25) s and pushes the
  differences from what it read before. While Redis is unreachable nothing arrives (and no ``Lost``: the view
  resumes where it was). A record gone without a tombstone (its TTL ran out, or a restart without persistence
  emptied Redis) is reported ``left`` only once it has been missing from reads that succeeded for
  ``worker_ttl_s``: live workers announce themselves again within a quarter of that.
* Followers (of KV logs and of the route log): one task per bus ``XREAD``s every followed stream after its
  followers' last ids, blocking at most
  100 ms (so a new follower waits at most that long for its first entries). On an error every follower that had
  received entries gets one ``Lost``; the task retries with a backoff up to 0.5 s and then goes on after each
  follower's last id (entry ids after a restart are larger than before it). A follower whose last entry was
  trimmed away (it fell a snapshot interval behind) also gets a ``Lost``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import (ConnectionError as RedisConnectionError, OutOfMemoryError, ReadOnlyError, RedisError,
                              TimeoutError as RedisTimeoutError)

from radixserve.cluster.base.bus import (DEFAULT_MAX_PENDING, BusUnavailable, ChangeKind, EventBus,
                                         RegistryChange, Subscription, WorkerRecord, check_announce, check_load_key,
                                         check_payload, check_ttl, check_worker_id)
from radixserve.cluster.base.config import BusConfig

log = logging.getLogger(__name__)
T = TypeVar("T")

SOCKET_TIMEOUT_S = 1.0
READ_BLOCK_MS = 100
READ_COUNT = 1000  # entries per stream and read
ROUTE_LOG_MAX_ENTRIES = 10_000  # the route log is a live feed: followers read within milliseconds
MIN_BACKOFF_S = 0.05
MAX_BACKOFF_S = 0.5
MAX_POLL_INTERVAL_S = 0.25
# Errors that mean the server cannot be reached or cannot serve now (BusyLoadingError is a ConnectionError).
_UNAVAILABLE = (RedisConnectionError, RedisTimeoutError, ReadOnlyError, OutOfMemoryError, OSError)

# KEYS[1]: a set of names; ARGV[1]: the prefix of their keys. Returns name, value, name, value, ... for the names
# whose key exists and removes the others from the set, atomically, so that a name added meanwhile stays.
_READ_INDEX = """
local result = {}
for _, name in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local value = redis.call('GET', ARGV[1] .. name)
  if value then
    result[#result + 1] = name
    result[#result + 1] = value
  else
    redis.call('SREM', KEYS[1], name)
  end
end
return result
"""

# KEYS[1]: a KV log stream, KEYS[2]: the id of its newest snapshot; ARGV[1]: the payload, ARGV[2]: "1" for a
# snapshot, which trims the stream to start at the previous snapshot and becomes the newest.
_APPEND_KV = """
local id = redis.call('XADD', KEYS[1], '*', 'batch', ARGV[1])
if ARGV[2] == '1' then
  local previous = redis.call('GET', KEYS[2])
  if previous then
    redis.call('XTRIM', KEYS[1], 'MINID', previous)
  end
  redis.call('SET', KEYS[2], id)
end
return id
"""


def _ms(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))


def _entry_id(value: bytes) -> tuple[int, int]:
    """A stream entry id (``b"<ms>-<seq>"``) as a tuple that orders like the ids."""
    ms, _, seq = value.partition(b"-")
    return int(ms), int(seq)


@dataclass
class _Follower:
    """A ``follow_kv`` or ``follow_routes`` subscription: its stream, the entry field that holds the payload,
    and how far it has read."""

    subscription: Subscription
    key: str
    field: bytes
    last_id: bytes = b"0-0"
    # It received entries since it started or its last Lost: losing some now is a gap to report.
    contiguous: bool = False


class _StreamRead(NamedTuple):
    """What one read got of a stream: the entries after ``start``, and its first retained entry's id as
    read just before (None: it was empty)."""

    start: bytes
    first: bytes | None
    entries: list[tuple[bytes, dict[bytes, bytes]]]


class _RegistryView:
    """The registry as a bus's watchers know it: the records last read, and since when a missing one is missing."""

    def __init__(self, grace_s: float) -> None:
        self.records: dict[str, WorkerRecord] = {}
        self._grace_s = grace_s
        self._missing_since: dict[str, float] = {}

    def missing(self, current: dict[str, WorkerRecord]) -> list[str]:
        return sorted(self.records.keys() - current.keys())

    def update(self, current: dict[str, WorkerRecord], withdrawn: set[str], now: float) -> list[RegistryChange]:
        """The changes from the records known to ``current`` (a successful read at ``now``); a missing record
        leaves if it is in ``withdrawn`` or has been missing for the grace period."""
        changes = []
        for worker_id in sorted(current):
            record, previous = current[worker_id], self.records.get(worker_id)
            self._missing_since.pop(worker_id, None)
            if record != previous:
                self.records[worker_id] = record
                changes.append(RegistryChange(ChangeKind.JOINED if previous is None else ChangeKind.UPDATED, record))
        for worker_id in self.missing(current):
            since = self._missing_since.setdefault(worker_id, now)
            if worker_id in withdrawn or now - since >= self._grace_s:
                del self._missing_since[worker_id]
                changes.append(RegistryChange(ChangeKind.LEFT, self.records.pop(worker_id)))
        return changes


class RedisBus(EventBus):
    """The bus on the Redis server at ``config.url``, under ``config.namespace``; see the module docstring.

    It connects lazily, on the first call. Subscriptions are fed by tasks on the loop of the first
    ``watch_registry`` / ``follow_kv`` call: use the bus from one loop.
    """

    shared = True

    def __init__(self, config: BusConfig) -> None:
        if config.url is None:
            raise ValueError("bus.url: RedisBus needs the URL of a Redis server")
        self._config = config
        # No retries: an outage must surface at once, and a retried XADD could append twice. RESP2, because
        # with RESP3 redis-py skips its check that a pooled connection is still open (it may hold maintenance
        # notifications), so the first call after a server restart would fail on a dead socket.
        self._redis = redis.Redis.from_url(config.url, socket_timeout=SOCKET_TIMEOUT_S,
                                           socket_connect_timeout=SOCKET_TIMEOUT_S, retry=Retry(NoBackoff(), 0),
                                           protocol=2)
        self._read_index = self._redis.register_script(_READ_INDEX)
        self._append_kv = self._redis.register_script(_APPEND_KV)
        self._connected = True
        self._watchers: list[Subscription] = []
        self._followers: dict[Subscription, _Follower] = {}
        self._followed = asyncio.Event()  # set when a follower is added, to wake an idle reader
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._warned: set[str] = set()

    @property
    def connected(self) -> bool:
        return self._connected

    # ---- registry ---------------------------------------------------------------------------------------

    def watch_registry(self, max_pending: int = DEFAULT_MAX_PENDING) -> Subscription:
        self._check_open()
        subscription = Subscription("registry", max_pending, self._watchers.remove)
        self._watchers.append(subscription)
        self._start("registry", self._poll_registry)
        return subscription

    async def announce(self, record: WorkerRecord, ttl_s: float | None = None) -> None:
        self._check_open()
        check_announce(record, ttl_s)
        worker_id = record.worker_id
        pipe = self._redis.pipeline(transaction=True)
        pipe.set(self._key("worker", worker_id), record.to_bytes(), px=None if ttl_s is None else _ms(ttl_s))
        pipe.sadd(self._key("workers"), worker_id)
        pipe.delete(self._key("left", worker_id))
        await self._call(pipe.execute())

    async def withdraw(self, worker_id: str) -> None:
        self._check_open()
        check_worker_id(worker_id)
        pipe = self._redis.pipeline(transaction=True)
        pipe.delete(self._key("worker", worker_id))
        pipe.srem(self._key("workers"), worker_id)
        pipe.set(self._key("left", worker_id), b"", px=_ms(self._config.worker_ttl_s))
        await self._call(pipe.execute())

    async def members(self) -> dict[str, WorkerRecord]:
        self._check_open()
        return await self._call(self._read_members())

    # ---- KV event logs ----------------------------------------------------------------------------------

    async def append_kv(self, worker_id: str, payload: bytes, snapshot: bool = False) -> None:
        self._check_open()
        check_worker_id(worker_id)
        check_payload(payload)
        keys = [self._key("kv", worker_id), self._key("kvsnap", worker_id)]
        await self._call(self._append_kv(keys=keys, args=[payload, b"1" if snapshot else b"0"]))

    async def append_kv_live(self, worker_id: str, payloads: Sequence[bytes]) -> None:
        self._check_open()
        check_worker_id(worker_id)
        for payload in payloads:
            check_payload(payload)
        keys = [self._key("kv", worker_id), self._key("kvsnap", worker_id)]
        pipe = self._redis.pipeline(transaction=False)  # executed in order, in one round trip
        for payload in payloads:
            await self._append_kv(keys=keys, args=[payload, b"0"], client=pipe)  # queued, not sent
        await self._call(pipe.execute())

    def follow_kv(self, worker_id: str, max_pending: int = DEFAULT_MAX_PENDING) -> Subscription:
        self._check_open()
        check_worker_id(worker_id)
        subscription = Subscription(worker_id, max_pending, self._forget)
        self._follow(_Follower(subscription, self._key("kv", worker_id), b"batch"))
        return subscription

    async def kv_log_length(self, worker_id: str) -> int:
        self._check_open()
        check_worker_id(worker_id)
        return await self._call(self._redis.xlen(self._key("kv", worker_id)))

    # ---- route log --------------------------------------------------------------------------------------

    async def append_routes(self, payload: bytes) -> None:
        self._check_open()
        check_payload(payload)
        await self._call(self._redis.xadd(self._key("routes"), {b"hints": payload}, maxlen=ROUTE_LOG_MAX_ENTRIES,
                                          approximate=True))

    async def follow_routes(self, max_pending: int = DEFAULT_MAX_PENDING) -> Subscription:
        self._check_open()
        subscription = Subscription("routes", max_pending, self._forget)  # checks max_pending first
        key = self._key("routes")
        newest = await self._call(self._redis.xrevrange(key, "+", "-", count=1))
        self._follow(_Follower(subscription, key, b"hints", newest[0][0] if newest else b"0-0"))
        return subscription

    # ---- load -------------------------------------------------------------------------------------------

    async def put_load(self, kind: str, name: str, payload: bytes, ttl_s: float) -> None:
        self._check_open()
        check_load_key(kind, name)
        check_payload(payload)
        check_ttl(ttl_s)
        pipe = self._redis.pipeline(transaction=True)
        pipe.set(self._key("load", kind, name), payload, px=_ms(ttl_s))
        pipe.sadd(self._key("loads", kind), name)
        await self._call(pipe.execute())

    async def loads(self, kind: str) -> dict[str, bytes]:
        self._check_open()
        check_load_key(kind, "-")
        pairs = await self._call(self._read_pairs(self._key("loads", kind), self._key("load", kind, "")))
        return {name.decode(): value for name, value in pairs}

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        tasks = tuple(self._tasks.values())
        for task in tasks:
            task.cancel()
        # Closing the connections also ends a read that a cancellation did not reach (redis-py may turn one into
        # an error, which the tasks survive; they stop on seeing the bus closed).
        await self._redis.aclose()
        if tasks:
            await asyncio.wait(tasks, timeout=2 * SOCKET_TIMEOUT_S)
        for subscription in (*self._watchers, *self._followers):
            subscription.close()

    # ---- internals --------------------------------------------------------------------------------------

    def _key(self, *parts: str) -> str:
        return ":".join((self._config.namespace, *parts))

    async def _call(self, operation: Awaitable[T]) -> T:
        """``operation``'s result; an error that means Redis cannot serve now becomes ``BusUnavailable``, except
        when the calling task is being cancelled: then it stays a cancellation, so that loops retrying on
        ``BusUnavailable`` still stop when cancelled."""
        try:
            result = await operation
        except _UNAVAILABLE as error:
            task = asyncio.current_task()
            if task is not None and task.cancelling():  # redis-py turned our cancellation into a connection error
                raise asyncio.CancelledError() from error
            self._connected = False
            raise BusUnavailable(f"bus: Redis unavailable: {error}") from None
        self._connected = True
        return result

    def _start(self, name: str, loop: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Start the background task ``name`` running ``loop()`` unless it runs already."""
        if name not in self._tasks:
            self._tasks[name] = asyncio.get_running_loop().create_task(loop(), name=f"bus-{name}")

    def _warn_once(self, key: str, message: str, *args: object) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message, *args)

    async def _read_pairs(self, index: str, prefix: str) -> list[tuple[bytes, bytes]]:
        flat = await self._read_index(keys=[index], args=[prefix])
        return list(zip(flat[::2], flat[1::2]))

    async def _read_members(self) -> dict[str, WorkerRecord]:
        members = {}
        for name, data in await self._read_pairs(self._key("workers"), self._key("worker", "")):
            worker_id = name.decode()
            try:
                members[worker_id] = WorkerRecord.from_bytes(data)
            except ValueError as error:  # a foreign writer's record: the worker is not usable
                self._warn_once(f"record:{worker_id}", "bus: skipping the unreadable record of %r: %s",
                                worker_id, error)
        return members

    async def _withdrawn(self, worker_ids: list[str]) -> set[str]:
        """Those of ``worker_ids`` that have a withdraw tombstone."""
        if not worker_ids:
            return set()
        tombstones = await self._redis.mget([self._key("left", worker_id) for worker_id in worker_ids])
        return {worker_id for worker_id, tombstone in zip(worker_ids, tombstones) if tombstone is not None}

    async def _poll_registry(self) -> None:
        view = _RegistryView(self._config.worker_ttl_s)
        interval_s = min(self._config.worker_ttl_s / 4, MAX_POLL_INTERVAL_S)
        while not self._closed:
            try:
                current = await self._call(self._read_members())
                withdrawn = await self._call(self._withdrawn(view.missing(current)))
            except (BusUnavailable, RedisError) as error:  # no change is known: try again next round
                log.debug("bus: registry read failed: %s", error)
            else:
                for change in view.update(current, withdrawn, time.monotonic()):
                    payload = change.to_bytes()
                    for subscription in tuple(self._watchers):
                        subscription.push(payload)
            await asyncio.sleep(interval_s)

    def _follow(self, follower: _Follower) -> None:
        self._followers[follower.subscription] = follower
        self._followed.set()
        self._start("streams", self._read_followed)

    def _forget(self, subscription: Subscription) -> None:
        self._followers.pop(subscription, None)

    async def _read_followed(self) -> None:
        backoff_s = MIN_BACKOFF_S
        failing = False
        while not self._closed:
            if not self._followers:
                self._followed.clear()
                await self._followed.wait()
                continue
            try:
                reads = await self._call(self._read_streams())
            except (BusUnavailable, RedisError) as error:
                if self._closed:
                    return
                if not failing:
                    log.warning("bus: reading the streams failed, retrying: %s", error)
                failing = True
                self._interrupt_followers()
                await asyncio.sleep(backoff_s)
                backoff_s = min(2 * backoff_s, MAX_BACKOFF_S)
                continue
            failing, backoff_s = False, MIN_BACKOFF_S
            for key, read in reads.items():
                self._deliver(key, read)

    async def _read_streams(self) -> dict[str, _StreamRead]:
        """One read of every followed stream after the least last id of its followers, by stream key (the
        streams with new entries only)."""
        positions: dict[str, bytes] = {}
        for follower in self._followers.values():
            key = follower.key
            if key not in positions or _entry_id(follower.last_id) < _entry_id(positions[key]):
                positions[key] = follower.last_id
        pipe = self._redis.pipeline(transaction=False)
        for key in positions:
            pipe.xrange(key, "-", "+", count=1)
        pipe.xread(positions, count=READ_COUNT, block=READ_BLOCK_MS)
        *heads, read = await pipe.execute()
        firsts = {key: head[0][0] if head else None for key, head in zip(positions, heads)}
        return {key: _StreamRead(positions[key], firsts[key], entries)
                for key, entries in ((key.decode(), entries) for key, entries in read)}

    def _deliver(self, key: str, read: _StreamRead) -> None:
        """Push what ``read`` got of stream ``key`` to each of its followers after that follower's last id."""
        for follower in tuple(self._followers.values()):
            last = _entry_id(follower.last_id)
            if follower.key != key or last < _entry_id(read.start):
                continue  # another stream, or a follower added during the read: the next one starts at its last id
            if follower.contiguous and read.first is not None and _entry_id(read.first) > last:
                self._interrupt(follower)  # its last entry was trimmed: it may have missed the ones after it
            for entry_id, fields in read.entries:
                if _entry_id(entry_id) > last:
                    follower.subscription.push(self._payload(follower, fields))
                    follower.last_id, follower.contiguous = entry_id, True

    def _payload(self, follower: _Follower, fields: dict[bytes, bytes]) -> bytes:
        payload = fields.get(follower.field)
        if payload is None:
            self._warn_once(follower.key, "bus: an entry of %r has no %r field (a foreign writer?); delivering "
                            "it as b''", follower.key, follower.field.decode())
            return b""
        return payload

    def _interrupt_followers(self) -> None:
        for follower in tuple(self._followers.values()):
            if follower.contiguous:
                self._interrupt(follower)

    @staticmethod
    def _interrupt(follower: _Follower) -> None:
        follower.subscription.mark_lost()
        follower.contiguous = False
