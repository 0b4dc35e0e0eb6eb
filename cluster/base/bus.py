"""The event bus that routers and workers share: the registry of workers, their KV event logs, load, routes.

``EventBus`` is the one interface; this module holds the in-process backend (the embedded default: one router
and the pool in one process, on one asyncio loop) and ``cluster.base.redis_bus`` the Redis one (several routers
and workers in any number of processes). Payloads are bytes the bus does not parse, and every method that may
need a round trip is async.

* **Registry**: ``announce`` / ``withdraw`` a ``WorkerRecord``; with a TTL the record is a heartbeat and
  expires unless announced again in time. ``watch_registry`` streams the changes, ``members`` reads the whole.
* **KV event logs**: each worker has its own log of serialized ``radixserve.v1.KvEventBatch`` messages,
  appended in its sequence order by one writer (the worker itself on a shared bus; the router relaying the
  worker's gRPC stream on the in-process bus). A snapshot entry (a reset batch) lets the log drop every entry
  before the *previous* snapshot, so a log that was ever trimmed starts with a snapshot, and a reader that has
  just read one snapshot still finds every entry after it. ``follow_kv`` reads a log from its first retained
  entry on, then live.
* **Load**: small documents, one per worker or router, that expire unless refreshed (``put_load``, ``loads``).
* **Route log**: one log the routers share, of the routing decisions each makes (``append_routes``), so that a
  replica credits a worker with a prompt another replica just sent there, long before the prefill's KV events
  say so. A live feed (``follow_routes``): a follower gets what is appended after it started; the log keeps
  only recent entries.

A consumer that must not miss state follows one pattern: watch or follow first, then read the state
(``members()``; a log's first entry is its snapshot), then apply messages; on ``Lost`` it starts over.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from types import TracebackType
from typing import Any, NamedTuple


DEFAULT_MAX_PENDING = 10_000
LOAD_KINDS = ("worker", "router")


def _require(ok: bool, name: str, expectation: str, value: object) -> None:
    if not ok:
        raise ValueError(f"{name}: must be {expectation}, got {value!r}")


def _is_address(value: object) -> bool:
    """Whether ``value`` is ``"host:port"`` with a non-empty host and a port in [1, 65535]."""
    if not isinstance(value, str):
        return False
    host, _, port = value.rpartition(":")
    return bool(host) and port.isascii() and port.isdigit() and 1 <= int(port) <= 65535


def _json_object(data: bytes, name: str) -> dict[str, Any]:
    """``data`` parsed as a JSON object; a ValueError names ``name`` when it is not one."""
    try:
        value = json.loads(data)
    except (TypeError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{name}: not valid JSON: {error}") from None
    _require(isinstance(value, dict), name, "a JSON object", value)
    return value


def _exact_keys(values: Mapping[str, Any], names: tuple[str, ...], prefix: str) -> None:
    """Raise ValueError naming the first missing or unknown key of ``values``."""
    _require(isinstance(values, Mapping), prefix.rstrip(".") or "value", "an object", values)
    for name in names:
        if name not in values:
            raise ValueError(f"{prefix}{name}: missing")
    for name in values:
        if name not in names:
            raise ValueError(f"{prefix}{name}: unknown field")


@dataclass(frozen=True)
class WorkerRecord:
    """One worker as the registry knows it: how to reach it, what it serves, how much it takes.

    ``address`` is ``"host:port"`` of its worker service. ``incarnation`` changes whenever the worker restarts
    (its cache is then empty). ``max_running_requests`` is its batch capacity. ``metrics_address`` is the
    ``"host:port"`` of its Prometheus ``/metrics`` endpoint, ``http_address`` that of its OpenAI-compatible HTTP
    API, each None if it serves none. Every field is validated on construction and a bad one raises ValueError
    naming it.
    """

    worker_id: str
    address: str
    model: str
    incarnation: str
    max_running_requests: int
    metrics_address: str | None = None
    http_address: str | None = None

    def __post_init__(self) -> None:
        for name in ("worker_id", "model", "incarnation"):
            value = getattr(self, name)
            _require(isinstance(value, str) and bool(value), name, "a non-empty string", value)
        _require(_is_address(self.address), "address", '"host:port" with a port in [1, 65535]', self.address)
        for name in ("metrics_address", "http_address"):
            value = getattr(self, name)
            _require(value is None or _is_address(value), name, 'null or "host:port" with a port in [1, 65535]', value)
        capacity = self.max_running_requests
        _require(type(capacity) is int and capacity >= 1, "max_running_requests", "an int >= 1", capacity)

    def to_bytes(self) -> bytes:
        """The record as UTF-8 JSON, read back by ``from_bytes``."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> WorkerRecord:
        """The record ``to_bytes`` wrote; ValueError names a missing, unknown or invalid field."""
        return cls.from_mapping(_json_object(data, "worker_record"))

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], prefix: str = "") -> WorkerRecord:
        """The record of a decoded JSON object; errors name the field as ``<prefix><field>``."""
        _exact_keys(values, _RECORD_FIELDS, prefix)
        try:
            return cls(**values)
        except ValueError as error:
            raise ValueError(f"{prefix}{error}") from None


_RECORD_FIELDS = tuple(f.name for f in dataclasses.fields(WorkerRecord))


class ChangeKind(StrEnum):
    """What a ``RegistryChange`` did to the registry."""

    JOINED = "joined"    # a worker id the registry did not hold
    UPDATED = "updated"  # a known worker id announced with a different record (e.g. a new incarnation)
    LEFT = "left"        # withdrawn; the record is the one it had


@dataclass(frozen=True)
class RegistryChange:
    """One change of the registry, as ``EventBus.watch_registry`` delivers it."""

    kind: ChangeKind
    record: WorkerRecord

    def to_bytes(self) -> bytes:
        """The change as UTF-8 JSON, read back by ``from_bytes``."""
        return json.dumps({"kind": str(self.kind), "record": dataclasses.asdict(self.record)}, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> RegistryChange:
        """The change ``to_bytes`` wrote; ValueError names a bad field (``kind``, ``record.<field>``)."""
        values = _json_object(data, "registry_change")
        _exact_keys(values, ("kind", "record"), "")
        kinds = tuple(str(k) for k in ChangeKind)
        _require(values["kind"] in kinds, "kind", f"one of {kinds}", values["kind"])
        return cls(ChangeKind(values["kind"]), WorkerRecord.from_mapping(values["record"], "record."))


class Lost(NamedTuple):
    """Stands where messages of a subscription were missed: ``count`` it dropped because its consumer fell too far
    behind, plus, when its backend could not read for a while (``Subscription.mark_lost``), an unknown number."""

    count: int


class Subscription:
    """A stream of messages for one consumer (registry changes, a KV event log), as an async iterator.

    Iteration yields each payload (``bytes``) in publish order. A subscription holds at most ``max_pending``
    unread messages; publishing to a full one drops its oldest message instead of waiting, so a slow consumer
    never blocks publishers. Dropped messages are reported by one ``Lost(count)`` item standing exactly where
    they were: what precedes and what follows it are contiguous runs, and a consumer that sees it must resync.
    Iteration ends once the subscription is closed (``close()``, leaving its ``async with`` block, or closing
    the bus); messages still unread are then discarded. Use it from the loop that runs its bus.

    Backends create subscriptions and feed them with ``push``.
    """

    def __init__(self, topic: str, max_pending: int, on_close: Callable[[Subscription], None]) -> None:
        _require(type(max_pending) is int and max_pending >= 1, "max_pending", "an int >= 1", max_pending)
        self.topic = topic  # what it follows, for its backend: "registry", "routes", or the worker id of a KV log
        self._pending: collections.deque[bytes] = collections.deque(maxlen=max_pending)
        self._num_lost = 0
        self._gap = False  # the backend missed messages it cannot count
        self._closed = False
        self._wakeup = asyncio.Event()
        self._on_close = on_close

    def push(self, payload: bytes) -> None:
        """Queue ``payload`` without waiting, dropping the oldest unread message when full; ignored once closed."""
        if self._closed:
            return
        if len(self._pending) == self._pending.maxlen:
            self._num_lost += 1  # the deque drops its oldest item on append
        self._pending.append(payload)
        self._wakeup.set()

    def mark_lost(self) -> None:
        """Mark that the backend missed messages it cannot count (its source was unreachable).

        The unread messages are dropped too (they are counted), so one ``Lost`` comes next and what follows it
        is contiguous; ignored once closed.
        """
        if self._closed:
            return
        self._num_lost += len(self._pending)
        self._pending.clear()
        self._gap = True
        self._wakeup.set()

    def close(self) -> None:
        """Stop receiving and end iteration (a consumer waiting for a message wakes up); idempotent."""
        if self._closed:
            return
        self._closed = True
        self._pending.clear()
        self._num_lost = 0
        self._gap = False
        self._wakeup.set()
        self._on_close(self)

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> bytes | Lost:
        while True:
            if self._closed:
                raise StopAsyncIteration
            if self._num_lost or self._gap:
                lost, self._num_lost, self._gap = Lost(self._num_lost), 0, False
                return lost
            if self._pending:
                return self._pending.popleft()
            self._wakeup.clear()
            await self._wakeup.wait()

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        traceback: TracebackType | None) -> None:
        self.close()


class BusUnavailable(Exception):
    """The bus could not be reached (a Redis outage); the call had no effect and may be retried."""


class EventBus(ABC):
    """The registry, the KV event logs and the load documents; see the module docstring.

    ``shared`` says whether other processes reach this bus: then workers announce themselves, append their own
    KV events and publish their own load; otherwise the pool announces them and the router relays their events.
    ``connected`` is False from a call that failed with ``BusUnavailable`` until one succeeds (always True
    in process). After ``close()`` every subscription ends and the other methods raise ``RuntimeError``. Bad
    arguments raise ValueError naming them; any call that needs the backend may raise ``BusUnavailable``.
    """

    shared: bool = False
    _closed: bool = False

    @property
    def connected(self) -> bool:
        return True

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("bus: closed")

    # ---- registry ---------------------------------------------------------------------------------------

    @abstractmethod
    def watch_registry(self, max_pending: int = DEFAULT_MAX_PENDING) -> Subscription:
        """Every later change of the registry, each a ``RegistryChange`` (``to_bytes``); ``Lost`` where some
        were missed (then read ``members()`` again). A record whose TTL ran out arrives as ``left``.

        A shared bus learns the changes by reading the registry, so: a watcher may also get ``joined`` for
        records that were there before it subscribed (``updated`` / ``left`` for ones it never saw), and changes
        undone between two reads are not seen; a record that expired is reported ``left`` once it has been
        missing for ``BusConfig.worker_ttl_s`` of reads that succeeded (so that the registry may come back after
        a restart of the backend); while the backend is unreachable no change arrives.
        """

    @abstractmethod
    async def announce(self, record: WorkerRecord, ttl_s: float | None = None) -> None:
        """Add ``record`` or replace the record of its ``worker_id`` (a change: ``joined`` or ``updated``).

        With ``ttl_s`` the record expires ``ttl_s`` seconds after this call unless announced again: a
        heartbeat. Announcing an unchanged record only renews it.
        """

    @abstractmethod
    async def withdraw(self, worker_id: str) -> None:
        """Remove the worker (a ``left`` change carrying its last record); an unknown id is ignored."""

    @abstractmethod
    async def members(self) -> dict[str, WorkerRecord]:
        """The registry now: worker id to record (a copy)."""

    # ---- KV event logs ----------------------------------------------------------------------------------

    @abstractmethod
    async def append_kv(self, worker_id: str, payload: bytes, snapshot: bool = False) -> None:
        """Append one serialized ``KvEventBatch`` to the worker's log, in the writer's sequence order.

        A ``snapshot`` (a reset batch) lets the log drop every entry before the previous snapshot.
        """

    @abstractmethod
    async def append_kv_live(self, worker_id: str, payloads: Sequence[bytes]) -> None:
        """Append live (non-snapshot) batches to the worker's log, in order, as one call (one round trip on a
        shared bus: a writer that fell behind catches up at once)."""

    @abstractmethod
    def follow_kv(self, worker_id: str, max_pending: int = DEFAULT_MAX_PENDING) -> Subscription:
        """The worker's log from its first retained entry on, then each entry as it is appended.

        ``Lost`` stands where entries were missed (the reader fell behind, the backend was unreachable); the
        subscription then goes on with later entries, and a reader that needs every entry closes it and follows
        the log again (from its first retained entry, a snapshot once the log was trimmed). Entries are
        delivered as the bytes appended; an entry the backend cannot read as one (a foreign writer's) is
        delivered as ``b""``, which parses as no valid batch.
        """

    @abstractmethod
    async def kv_log_length(self, worker_id: str) -> int:
        """The number of entries the worker's log retains (0 for a log never written)."""

    # ---- route log --------------------------------------------------------------------------------------

    @abstractmethod
    async def append_routes(self, payload: bytes) -> None:
        """Append one entry (a serialized ``radixserve.v1.RouteHints``) to the routers' shared route log."""

    @abstractmethod
    async def follow_routes(self, max_pending: int = DEFAULT_MAX_PENDING) -> Subscription:
        """Every entry of the route log appended after this returns, in order, and nothing from before (the log
        is a live feed); ``Lost`` stands where entries were missed, and the subscription goes on after it."""

    # ---- load -------------------------------------------------------------------------------------------

    @abstractmethod
    async def put_load(self, kind: str, name: str, payload: bytes, ttl_s: float) -> None:
        """Publish the load document of worker or router ``name`` (``kind`` in ``LOAD_KINDS``), replacing its
        previous one; it expires ``ttl_s`` seconds after this call."""

    @abstractmethod
    async def loads(self, kind: str) -> dict[str, bytes]:
        """Every unexpired load document of ``kind``: name to payload."""

    @abstractmethod
    async def close(self) -> None:
        """End every subscription and release the backend; idempotent."""


def check_load_key(kind: object, name: object) -> None:
    """Raise ValueError unless ``kind`` is one of ``LOAD_KINDS`` and ``name`` a non-empty string."""
    _require(kind in LOAD_KINDS, "kind", f"one of {LOAD_KINDS}", kind)
    _require(isinstance(name, str) and bool(name), "name", "a non-empty string", name)


def check_ttl(ttl_s: object, name: str = "ttl_s") -> None:
    _require(isinstance(ttl_s, (int, float)) and not isinstance(ttl_s, bool) and ttl_s > 0, name, "a number > 0",
             ttl_s)


def check_payload(payload: object) -> None:
    _require(isinstance(payload, bytes), "payload", "bytes", type(payload).__name__)


def check_worker_id(worker_id: object) -> None:
    _require(isinstance(worker_id, str) and bool(worker_id), "worker_id", "a non-empty string", worker_id)


def check_announce(record: object, ttl_s: object) -> None:
    """Raise ValueError unless ``record`` is a ``WorkerRecord`` and ``ttl_s`` None or a number > 0."""
    _require(isinstance(record, WorkerRecord), "record", "a WorkerRecord", record)
    if ttl_s is not None:
        check_ttl(ttl_s)


class _KvLog:
    """One worker's log in process: entries in order, the position of its last snapshot, its followers."""

    def __init__(self) -> None:
        self.entries: list[bytes] = []
        self.last_snapshot: int | None = None  # index of the newest snapshot entry
        self.followers: list[Subscription] = []

    def append(self, payload: bytes, snapshot: bool) -> None:
        if snapshot:
            if self.last_snapshot is not None:  # keep from the previous snapshot on
                del self.entries[:self.last_snapshot]
            self.last_snapshot = len(self.entries)
        self.entries.append(payload)
        for follower in tuple(self.followers):
            follower.push(payload)


class InProcessBus(EventBus):
    """The bus inside one process and one asyncio loop: every caller and consumer must run on that loop."""

    def __init__(self) -> None:
        self._watchers: list[Subscription] = []
        self._members: dict[str, WorkerRecord] = {}
        self._expiries: dict[str, asyncio.TimerHandle] = {}
        self._logs: dict[str, _KvLog] = {}
        self._loads: dict[tuple[str, str], tuple[bytes, float]] = {}  # (kind, name) -> (payload, expiry)
        self._route_followers: list[Subscription] = []

    def watch_registry(self, max_pending: int = DEFAULT_MAX_PENDING) -> Subscription:
        self._check_open()
        subscription = Subscription("registry", max_pending, self._watchers.remove)
        self._watchers.append(subscription)
        return subscription

    async def announce(self, record: WorkerRecord, ttl_s: float | None = None) -> None:
        self._check_open()
        check_announce(record, ttl_s)
        self._renew(record.worker_id, ttl_s)
        previous = self._members.get(record.worker_id)
        if previous == record:
            return
        self._members[record.worker_id] = record
        self._notify(ChangeKind.JOINED if previous is None else ChangeKind.UPDATED, record)

    async def withdraw(self, worker_id: str) -> None:
        self._check_open()
        check_worker_id(worker_id)
        self._remove(worker_id)

    async def members(self) -> dict[str, WorkerRecord]:
        self._check_open()
        return dict(self._members)

    async def append_kv(self, worker_id: str, payload: bytes, snapshot: bool = False) -> None:
        self._check_open()
        check_worker_id(worker_id)
        check_payload(payload)
        self._logs.setdefault(worker_id, _KvLog()).append(payload, bool(snapshot))

    async def append_kv_live(self, worker_id: str, payloads: Sequence[bytes]) -> None:
        for payload in payloads:
            await self.append_kv(worker_id, payload)

    def follow_kv(self, worker_id: str, max_pending: int = DEFAULT_MAX_PENDING) -> Subscription:
        self._check_open()
        check_worker_id(worker_id)
        log = self._logs.setdefault(worker_id, _KvLog())
        subscription = Subscription(worker_id, max_pending, log.followers.remove)
        for payload in log.entries:
            subscription.push(payload)
        log.followers.append(subscription)
        return subscription

    async def kv_log_length(self, worker_id: str) -> int:
        self._check_open()
        check_worker_id(worker_id)
        log = self._logs.get(worker_id)
        return 0 if log is None else len(log.entries)

    async def append_routes(self, payload: bytes) -> None:
        self._check_open()
        check_payload(payload)
        for follower in tuple(self._route_followers):
            follower.push(payload)

    async def follow_routes(self, max_pending: int = DEFAULT_MAX_PENDING) -> Subscription:
        self._check_open()
        subscription = Subscription("routes", max_pending, self._route_followers.remove)
        self._route_followers.append(subscription)
        return subscription

    async def put_load(self, kind: str, name: str, payload: bytes, ttl_s: float) -> None:
        self._check_open()
        check_load_key(kind, name)
        check_payload(payload)
        check_ttl(ttl_s)
        self._loads[(kind, name)] = (payload, time.monotonic() + ttl_s)

    async def loads(self, kind: str) -> dict[str, bytes]:
        self._check_open()
        check_load_key(kind, "-")
        now = time.monotonic()
        return {name: payload for (k, name), (payload, expiry) in self._loads.items() if k == kind and expiry > now}

    async def close(self) -> None:
        self._closed = True
        for handle in self._expiries.values():
            handle.cancel()
        self._expiries.clear()
        for subscription in (*self._watchers, *self._route_followers,
                             *(f for log in self._logs.values() for f in log.followers)):
            subscription.close()

    def _renew(self, worker_id: str, ttl_s: float | None) -> None:
        handle = self._expiries.pop(worker_id, None)
        if handle is not None:
            handle.cancel()
        if ttl_s is not None:
            self._expiries[worker_id] = asyncio.get_running_loop().call_later(ttl_s, self._remove, worker_id)

    def _remove(self, worker_id: str) -> None:
        handle = self._expiries.pop(worker_id, None)
        if handle is not None:
            handle.cancel()
        record = self._members.pop(worker_id, None)
        if record is not None and not self._closed:
            self._notify(ChangeKind.LEFT, record)

    def _notify(self, kind: ChangeKind, record: WorkerRecord) -> None:
        payload = RegistryChange(kind, record).to_bytes()
        for subscription in tuple(self._watchers):
            subscription.push(payload)
