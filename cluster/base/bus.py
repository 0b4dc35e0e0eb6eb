"""The event bus: topics of bytes messages, and the registry of workers, shared by routers and workers.

Workers announce themselves in the registry and publish their KV events; routers watch the registry topic to
learn membership and feed ``KV_EVENTS_TOPIC`` into their prefix index. ``EventBus`` is the one interface; this
module holds the in-process backend (the embedded default, one asyncio loop). Payloads are bytes and every
method that may need a round trip is async, so a Redis Streams backend implements the same interface.

A consumer that must not miss state follows one pattern: subscribe, then read the state (``members()``, or a
worker's reset batch), then apply messages; on ``Lost`` it reads the state again.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import TracebackType
from typing import Any, NamedTuple

REGISTRY_TOPIC = "radixserve.registry"
"""Carries a ``RegistryChange`` (``to_bytes``) for each announce or withdraw that changed the registry."""

KV_EVENTS_TOPIC = "radixserve.kv_events"
"""Carries serialized ``radixserve.v1.KvEventBatch`` messages from every worker."""

DEFAULT_MAX_PENDING = 10_000


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
    """One change of the registry, as published on ``REGISTRY_TOPIC``."""

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
    """Stands where ``count`` messages of a subscription were dropped because it fell too far behind."""

    count: int


class Subscription:
    """The messages of one topic published since subscribing, for one consumer, as an async iterator.

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
        self.topic = topic
        self._pending: collections.deque[bytes] = collections.deque(maxlen=max_pending)
        self._num_lost = 0
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

    def close(self) -> None:
        """Stop receiving and end iteration (a consumer waiting for a message wakes up); idempotent."""
        if self._closed:
            return
        self._closed = True
        self._pending.clear()
        self._num_lost = 0
        self._wakeup.set()
        self._on_close(self)

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> bytes | Lost:
        while True:
            if self._closed:
                raise StopAsyncIteration
            if self._num_lost:
                lost, self._num_lost = Lost(self._num_lost), 0
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


class EventBus(ABC):
    """Topics of bytes messages and a registry of workers.

    ``publish`` hands a payload to every subscription of its topic open at that moment, in publish order, and
    never waits on a subscriber. ``subscribe`` returns a subscription that receives every later message.
    ``announce`` and ``withdraw`` change the registry and publish the change on ``REGISTRY_TOPIC``; a call that
    changes nothing publishes nothing. After ``close()`` every subscription ends and the other methods raise
    ``RuntimeError``. Bad arguments raise ValueError naming them.
    """

    @abstractmethod
    async def publish(self, topic: str, payload: bytes) -> None:
        """Deliver ``payload`` to the current subscribers of ``topic``."""

    @abstractmethod
    def subscribe(self, topic: str, max_pending: int = DEFAULT_MAX_PENDING) -> Subscription:
        """A subscription to what is published on ``topic`` from now on, holding at most ``max_pending`` unread."""

    @abstractmethod
    async def announce(self, record: WorkerRecord) -> None:
        """Add ``record`` or replace the record of its ``worker_id`` (publishing ``joined`` or ``updated``)."""

    @abstractmethod
    async def withdraw(self, worker_id: str) -> None:
        """Remove the worker (publishing ``left`` with its last record); an unknown id is ignored."""

    @abstractmethod
    async def members(self) -> dict[str, WorkerRecord]:
        """The registry now: worker id to record (a copy)."""

    @abstractmethod
    async def close(self) -> None:
        """End every subscription and release the backend; idempotent."""


def _check_topic(topic: object) -> None:
    _require(isinstance(topic, str) and bool(topic), "topic", "a non-empty string", topic)


class InProcessBus(EventBus):
    """The bus inside one process and one asyncio loop: every caller and consumer must run on that loop."""

    def __init__(self) -> None:
        self._subscriptions: dict[str, list[Subscription]] = {}
        self._members: dict[str, WorkerRecord] = {}
        self._closed = False

    async def publish(self, topic: str, payload: bytes) -> None:
        self._check_open()
        _check_topic(topic)
        _require(isinstance(payload, bytes), "payload", "bytes", type(payload).__name__)
        for subscription in tuple(self._subscriptions.get(topic, ())):
            subscription.push(payload)

    def subscribe(self, topic: str, max_pending: int = DEFAULT_MAX_PENDING) -> Subscription:
        self._check_open()
        _check_topic(topic)
        subscription = Subscription(topic, max_pending, self._forget)
        self._subscriptions.setdefault(topic, []).append(subscription)
        return subscription

    async def announce(self, record: WorkerRecord) -> None:
        self._check_open()
        _require(isinstance(record, WorkerRecord), "record", "a WorkerRecord", record)
        previous = self._members.get(record.worker_id)
        if previous == record:
            return
        self._members[record.worker_id] = record
        kind = ChangeKind.JOINED if previous is None else ChangeKind.UPDATED
        await self.publish(REGISTRY_TOPIC, RegistryChange(kind, record).to_bytes())

    async def withdraw(self, worker_id: str) -> None:
        self._check_open()
        record = self._members.pop(worker_id, None)
        if record is not None:
            await self.publish(REGISTRY_TOPIC, RegistryChange(ChangeKind.LEFT, record).to_bytes())

    async def members(self) -> dict[str, WorkerRecord]:
        self._check_open()
        return dict(self._members)

    async def close(self) -> None:
        self._closed = True
        for subscriptions in tuple(self._subscriptions.values()):
            for subscription in tuple(subscriptions):
                subscription.close()

    def _forget(self, subscription: Subscription) -> None:
        subscriptions = self._subscriptions[subscription.topic]
        subscriptions.remove(subscription)
        if not subscriptions:
            del self._subscriptions[subscription.topic]

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("bus: closed")


_BACKENDS: dict[str, Callable[[], EventBus]] = {"inprocess": InProcessBus}


def make_bus(kind: str = "inprocess") -> EventBus:
    """A new bus of backend ``kind`` (``"inprocess"``); an unknown kind raises ValueError ``"bus: ..."``."""
    try:
        backend = _BACKENDS[kind]
    except (KeyError, TypeError):
        raise ValueError(f"bus: unknown kind {kind!r} (known: {', '.join(_BACKENDS)})") from None
    return backend()
