"""TLS and API keys for every server of the cluster, from one ``SecurityConfig``.

Servers: ``grpc_server`` and ``add_port`` (TLS when configured, else plaintext) for the gRPC ports, ``uvicorn_tls``
for the HTTP ports;
``require_client_certificate`` makes a server accept only clients whose certificate ``ca_file`` signed (the
workers, under ``worker_mtls``). Clients: ``grpc_channel_credentials`` for the router's calls to workers (with
its own certificate under ``worker_mtls``).

API keys: ``ApiKeys`` holds the accepted keys; ``check`` takes an ``Authorization`` header or ``authorization``
metadata value (``Bearer <key>``) and compares in constant time. ``ApiKeyInterceptor`` refuses gRPC calls without a
valid key UNAUTHENTICATED, except the methods of the open services (health, reflection); its admin methods need
an admin key (a client key there is PERMISSION_DENIED). Two kinds of key: clients' (``ApiKeys.from_config``), which
routers accept, and the cluster key (``cluster_keys``), which workers alone accept and routers send them, and which
a router's admin calls need. No key ever reaches a log line, an error message or a metric.
"""

from __future__ import annotations

import hmac
import os
import ssl
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from radixserve.cluster.base.config import SecurityConfig
from radixserve.cluster.base.grpc_util import server_options

# Services answered without a key: load balancers and orchestrators probe health without credentials.
OPEN_GRPC_SERVICES = ("grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection",
                      "grpc.reflection.v1.ServerReflection")
_BEARER = "bearer "


def _read(path: str | None, name: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise ValueError(f"security.{name}: cannot read {path!r}: {error.strerror}") from None


@dataclass(frozen=True)
class ApiKeys:
    """The accepted API keys; none means no key is required."""

    keys: frozenset[str] = frozenset()

    @classmethod
    def from_config(cls, config: SecurityConfig, environ: Mapping[str, str] = os.environ) -> ApiKeys:
        """Keys from ``api_keys_file`` (one per line, ``#`` comments and blank lines skipped) and the environment
        variable ``api_keys_env`` (comma-separated). A named file that cannot be read, or a named variable that
        is unset or holds no key, is a ValueError naming the setting (never the keys)."""
        keys: set[str] = set()
        data = _read(config.api_keys_file, "api_keys_file")
        if data is not None:
            lines = (line.strip() for line in data.decode("utf-8", "replace").splitlines())
            keys.update(line for line in lines if line and not line.startswith("#"))
        if config.api_keys_env is not None:
            from_env = {k.strip() for k in environ.get(config.api_keys_env, "").split(",") if k.strip()}
            if not from_env:
                raise ValueError(f"security.api_keys_env: the variable {config.api_keys_env} holds no key")
            keys.update(from_env)
        if (config.api_keys_file is not None or config.api_keys_env is not None) and not keys:
            raise ValueError("security.api_keys_file: holds no key")
        return cls(frozenset(keys))

    @property
    def required(self) -> bool:
        return bool(self.keys)

    def check(self, authorization: str | None) -> bool:
        """Whether ``authorization`` (``"Bearer <key>"``) carries an accepted key; always True when none is
        required."""
        if not self.keys:
            return True
        if authorization is None or not authorization.lower().startswith(_BEARER):
            return False
        given = authorization[len(_BEARER):].strip().encode()
        # Compare against every key, so the time taken says nothing about which (or whether one) matched.
        return sum(hmac.compare_digest(given, key.encode()) for key in self.keys) > 0


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without an accepted key (``authorization: Bearer <key>`` metadata) UNAUTHENTICATED, except
    to ``open_services``. ``admin_methods`` (full names, ``/package.Service/Method``) take only ``admin_keys``
    when there are any: a key of ``keys`` there is PERMISSION_DENIED."""

    def __init__(self, keys: ApiKeys, open_services: Iterable[str] = OPEN_GRPC_SERVICES,
                 admin_keys: ApiKeys = ApiKeys(), admin_methods: Iterable[str] = ()) -> None:
        self._keys = keys
        self._open = tuple(f"/{name}/" for name in open_services)
        self._admin_keys = admin_keys
        self._admin_methods = frozenset(admin_methods)

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
                                details: grpc.HandlerCallDetails) -> Any:
        if details.method.startswith(self._open):
            return await continuation(details)
        authorization = dict(details.invocation_metadata or ()).get("authorization")
        if details.method in self._admin_methods and self._admin_keys.required:
            if self._admin_keys.check(authorization):
                return await continuation(details)
            if self._keys.required and self._keys.check(authorization):
                return _refusal(await continuation(details), grpc.StatusCode.PERMISSION_DENIED,
                                "this is an admin call: it needs the cluster key, not a client's API key")
            return _refusal(await continuation(details), grpc.StatusCode.UNAUTHENTICATED, _NO_KEY)
        if self._keys.check(authorization):
            return await continuation(details)
        return _refusal(await continuation(details), grpc.StatusCode.UNAUTHENTICATED, _NO_KEY)


_NO_KEY = "missing or invalid API key: send 'authorization: Bearer <key>' metadata"


def _refusal(handler: grpc.RpcMethodHandler | None, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that answers ``code`` with ``message``."""

    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, message)

    async def refuse_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(code, message)
        yield  # pragma: no cover - abort raises

    if handler is None:
        return grpc.unary_unary_rpc_method_handler(refuse)
    deserializer, serializer = handler.request_deserializer, handler.response_serializer
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse_stream, deserializer, serializer)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse, deserializer, serializer)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse_stream, deserializer, serializer)
    return grpc.unary_unary_rpc_method_handler(refuse, deserializer, serializer)


def grpc_server_credentials(config: SecurityConfig,
                            require_client_certificate: bool = False) -> grpc.ServerCredentials | None:
    """TLS credentials for a gRPC server, None without ``cert_file`` (plaintext)."""
    if not config.tls:
        return None
    key, cert = _read(config.key_file, "key_file"), _read(config.cert_file, "cert_file")
    assert key is not None and cert is not None  # SecurityConfig pairs them
    roots = _read(config.ca_file, "ca_file") if require_client_certificate else None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=roots,
                                       require_client_auth=require_client_certificate)


def grpc_channel_credentials(config: SecurityConfig) -> grpc.ChannelCredentials | None:
    """Credentials for the router's channels to workers: None when the workers speak plaintext; under
    ``worker_mtls`` the router's own certificate goes with them."""
    if not config.tls:
        return None
    roots = _read(config.ca_file, "ca_file")
    if not config.worker_mtls:
        return grpc.ssl_channel_credentials(root_certificates=roots)
    return grpc.ssl_channel_credentials(root_certificates=roots, private_key=_read(config.key_file, "key_file"),
                                        certificate_chain=_read(config.cert_file, "cert_file"))


def uvicorn_tls(config: SecurityConfig, require_client_certificate: bool = False) -> dict[str, Any]:
    """The ``uvicorn.Config`` arguments for TLS (none without ``cert_file``)."""
    if not config.tls:
        return {}
    options: dict[str, Any] = {"ssl_certfile": config.cert_file, "ssl_keyfile": config.key_file}
    if require_client_certificate:
        options.update(ssl_ca_certs=config.ca_file, ssl_cert_reqs=ssl.CERT_REQUIRED)
    return options


def grpc_server(max_message_bytes: int, keys: ApiKeys, admin_keys: ApiKeys = ApiKeys(),
                admin_methods: Iterable[str] = ()) -> grpc.aio.Server:
    """A gRPC server refusing messages over ``max_message_bytes`` and calls without an accepted key (see
    ``ApiKeyInterceptor`` for ``admin_keys`` and ``admin_methods``)."""
    interceptors = ([ApiKeyInterceptor(keys, admin_keys=admin_keys, admin_methods=admin_methods)]
                    if keys.required or admin_keys.required else [])
    return grpc.aio.server(options=server_options(max_message_bytes), interceptors=interceptors)


def add_port(server: grpc.aio.Server, address: str, config: SecurityConfig,
             require_client_certificate: bool = False) -> int:
    """Listen on ``address`` with TLS when configured; returns the bound port (0: the port was not free)."""
    credentials = grpc_server_credentials(config, require_client_certificate)
    if credentials is None:
        return server.add_insecure_port(address)
    return server.add_secure_port(address, credentials)


def cluster_keys(config: SecurityConfig) -> ApiKeys:
    """The cluster key as the one key workers accept (none: workers take calls without a key). API keys without
    a cluster key are a ValueError naming ``security.cluster_key``: workers must not be left open, nor take
    clients' keys."""
    if config.cluster_key is not None:
        return ApiKeys(frozenset({config.cluster_key}))
    if config.client_keys:
        raise ValueError("security.cluster_key: required with API keys (workers accept only the cluster key; "
                         "`radixserve up` generates one)")
    return ApiKeys()


def call_metadata(keys: ApiKeys) -> tuple[tuple[str, str], ...]:
    """The metadata a process sends with its own calls to servers sharing ``keys`` (one of them)."""
    if not keys.required:
        return ()
    return (("authorization", f"Bearer {min(keys.keys)}"),)
