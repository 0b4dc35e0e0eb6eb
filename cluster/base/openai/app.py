"""The OpenAI-compatible HTTP API over any ``GenerationBackend``: ``create_app`` builds its FastAPI app.

Endpoints: ``POST /v1/chat/completions`` and ``POST /v1/completions`` (streamed as server-sent events when
``stream`` is true: ``data: <chunk>`` events, then ``data: [DONE]``), ``GET /v1/models``, ``GET /version`` and
``GET /health`` (200 while ``backend.ready()``, else 503); a backend may add its own routes (``routes``).
``GET /openapi.json`` is the OpenAPI document (the request bodies are ``protocol``'s models), ``GET /docs`` its
interactive page; both are open, like ``/health``.

A generation request goes through, in order: the API key (401, when keys are configured; ``/health`` is open),
the body's size (413 over ``max_body_bytes``, before anything is parsed), the schema (400 naming the field:
``protocol``), the model (404 unless ``model`` is the served model's name; 503 while none is served), then the
backend, whose ``GenerationError`` becomes the status ``http_status`` gives (400, 429, 503, ...) with its field
renamed to this API's. A failure after a stream's first event is sent as a last ``data: {"error": ...}`` event
before ``[DONE]``. Every error answer is OpenAI's error object (``errors``); unknown paths are 404 in that shape.

A client that goes away (closes the stream, or disconnects while waiting for a whole answer) closes the
backend's stream, which ends the request wherever it runs and frees its pages. ``on_refused(method, status)``
hears of requests refused before the backend saw them (to count them).

The generation endpoints are the hot path: a POST to either is served by plain ASGI code (``_Api``), with one
task per request beside the one serving it (the disconnect watch), rather than through FastAPI's routing,
dependencies and middleware; everything else (other paths, other methods, and the error shapes) is FastAPI's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from radixserve.cluster.base.generation import (GenerationBackend, GenerationDelta, GenerationError,
                                                GenerationRequest, ServedModel, Status, fold)
from radixserve.cluster.base.openai.convert import ApiFormat, ChatFormat, CompletionFormat
from radixserve.cluster.base.openai.errors import ApiError, from_generation_error
from radixserve.cluster.base.openai.protocol import ModelCard, ModelList
from radixserve.cluster.base.security import ApiKeys
from radixserve.cluster.base.version import radixserve_version

log = logging.getLogger(__name__)
COUNTED_METHODS = (ChatFormat.method, CompletionFormat.method)  # the methods generation requests are counted as
_FORMATS: dict[str, type[ApiFormat[Any]]] = {"/v1/chat/completions": ChatFormat, "/v1/completions": CompletionFormat}
_DONE = b"data: [DONE]\n\n"
_EVENT_STREAM_HEADERS = [(b"cache-control", b"no-cache"), (b"content-type", b"text/event-stream; charset=utf-8")]


@dataclass(frozen=True)
class HttpOptions:
    """``max_body_bytes``: the largest request body accepted; ``api_keys``: the keys every call but ``/health``
    must carry (``Authorization: Bearer <key>``), none required when empty."""

    max_body_bytes: int = 4 * 2**20
    api_keys: ApiKeys = field(default_factory=ApiKeys)


class _ClientGone(Exception):
    """The client disconnected before its answer was ready."""


def create_app(backend: GenerationBackend, options: HttpOptions = HttpOptions(),
               on_refused: Callable[[str, Status], None] | None = None, routes: APIRouter | None = None) -> ASGIApp:
    """The API over ``backend``; ``routes`` are served too, behind the same API key check."""
    app = FastAPI(title="radixserve", version=radixserve_version(), redoc_url=None)
    front = _FrontEnd(backend, options, on_refused)
    guarded = [Depends(front.authorize)]
    app.add_api_route("/v1/models", front.models, methods=["GET"], dependencies=guarded)
    app.add_api_route("/version", front.version, methods=["GET"], dependencies=guarded)
    app.add_api_route("/health", front.health, methods=["GET"])
    if routes is not None:
        app.include_router(routes, dependencies=guarded)
    app.add_exception_handler(ApiError, _api_error)  # type: ignore[arg-type]
    app.add_exception_handler(HTTPException, _routing_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _internal_error)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return _Api(app, front)


class _Api:
    """A request to a generation endpoint served by ``front`` (other methods than POST: 405), any other by the
    FastAPI ``app``."""

    def __init__(self, app: FastAPI, front: _FrontEnd) -> None:
        self.app = app
        self._front = front

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = _FORMATS.get(scope["path"]) if scope["type"] == "http" else None
        if kind is None:
            await self.app(scope, receive, send)
            return
        if scope["method"] != "POST":
            refusal = HTTPException(405, headers={"Allow": "POST"})
            await (await _routing_error(Request(scope), refusal))(scope, receive, send)
            return
        started = False

        async def send_once_started(message: Message) -> None:
            nonlocal started
            started = True
            await send(message)

        try:
            await self._front.serve(scope, receive, kind, send_once_started)
        except _ClientGone:
            pass
        except ApiError as error:  # raised before the answer started
            await JSONResponse(error.body(), status_code=error.http_code)(scope, receive, send)
        except Exception:
            if started:  # the client can hear no more; uvicorn logs it and closes the connection
                raise
            log.exception("a %s request failed", kind.method)
            await _INTERNAL_ERROR(scope, receive, send)


_GENERATION_RESPONSES = {
    "200": {"description": "The answer; server-sent events (text/event-stream) when the request's stream is true"},
    "400": {"description": "An invalid request: OpenAI's error object, whose param names the field"},
}


def _request_body(kind: type[ApiFormat[Any]]) -> dict[str, Any]:
    """The OpenAPI request body of an endpoint whose body ``kind.parse`` validates (not FastAPI)."""
    schema = {"$ref": f"#/components/schemas/{kind.schema.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document of ``app`` plus the generation endpoints, which ``_Api`` serves outside FastAPI's
    routing, with their request models among its schemas."""
    if app.openapi_schema is None:
        document = get_openapi(title=app.title, version=app.version, routes=app.routes)
        schemas = document.setdefault("components", {}).setdefault("schemas", {})
        paths = document.setdefault("paths", {})
        for path, kind in _FORMATS.items():
            schema = kind.schema.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(schema.pop("$defs", {}))
            schemas[kind.schema.__name__] = schema
            paths[path] = {"post": {"operationId": kind.method.replace(".", "_"), **_request_body(kind),
                                    "responses": _GENERATION_RESPONSES}}
        app.openapi_schema = document
    return app.openapi_schema


class _FrontEnd:
    def __init__(self, backend: GenerationBackend, options: HttpOptions,
                 on_refused: Callable[[str, Status], None] | None) -> None:
        self._backend = backend
        self._options = options
        self._on_refused = on_refused
        self._created = int(time.time())

    async def authorize(self, request: Request) -> None:
        self._authorize(request.headers.get("authorization"))

    def _authorize(self, authorization: str | None) -> None:
        if not self._options.api_keys.check(authorization):
            raise ApiError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key", status=Status.UNAUTHENTICATED)

    async def models(self) -> ModelList:
        served = self._backend.served_model()
        cards = [] if served is None else [ModelCard(id=served.name, created=self._created,
                                                     max_model_len=served.max_model_len)]
        return ModelList(data=cards)

    async def version(self) -> dict[str, str]:
        return {"version": radixserve_version()}

    async def health(self) -> JSONResponse:
        if self._backend.ready():
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "unavailable"}, status_code=503)

    async def serve(self, scope: Scope, receive: Receive, kind: type[ApiFormat[Any]], send: Send) -> None:
        """Answer one generation request on ``send``. Raises ``ApiError`` before anything was sent, and
        ``_ClientGone`` when the client went away (the backend's stream then closed).

        Starlette's ``Request`` stays off this path: the key is read from the raw headers and the body from
        ``receive`` (each saves a layer of objects on every request)."""
        self._authorize(_header(scope, b"authorization"))
        api, generation = await self._accept(receive, kind)
        with _DisconnectWatch(receive):
            deltas = self._backend.generate(generation, kind.method)
            try:
                if not api.streaming:
                    whole = JSONResponse(api.whole(await fold(deltas)).model_dump())
                else:
                    first = await anext(deltas, None)
            except GenerationError as error:
                raise from_generation_error(error, api.field_name) from None
            if not api.streaming:
                await whole(scope, receive, send)
                return
            await send({"type": "http.response.start", "status": 200, "headers": _EVENT_STREAM_HEADERS})
            async with contextlib.aclosing(_events(api, first, deltas)) as events:
                async for piece in events:
                    await send({"type": "http.response.body", "body": piece, "more_body": piece is not _DONE})

    async def _accept(self, receive: Receive,
                      kind: type[ApiFormat[Any]]) -> tuple[ApiFormat[Any], GenerationRequest]:
        """The request's format and neutral request; errors are counted as refused."""
        try:
            body = kind.parse(await _read_body(receive, self._options.max_body_bytes))
            api = kind(body, self._served(body.model))
            try:
                return api, api.generation_request()
            except GenerationError as error:
                raise from_generation_error(error, api.field_name) from None
        except ApiError as error:
            if self._on_refused is not None and error.status is not None:
                self._on_refused(kind.method, error.status)
            raise

    def _served(self, model: str) -> ServedModel:
        served = self._backend.served_model()
        if served is None:
            raise ApiError(503, "no worker is up; retry shortly", code="unavailable", status=Status.UNAVAILABLE)
        if model != served.name:
            raise ApiError(404, f"model: {model!r} is not served here; this server serves {served.name!r}",
                           "model", "model_not_found", Status.NOT_FOUND)
        return served


def _header(scope: Scope, name: bytes) -> str | None:
    """The value of the request's header ``name`` (lower case; the first if repeated), None when absent."""
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


async def _read_body(receive: Receive, limit: int) -> bytes:
    """The body, read to its end (so that the client hears the answer) but never held beyond ``limit`` bytes."""
    body = bytearray()
    size = 0
    more = True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientGone()
        chunk = message.get("body", b"")
        more = message.get("more_body", False)
        size += len(chunk)
        if size <= limit:
            body += chunk
    if size > limit:
        raise ApiError(413, f"the body is {size} bytes, over the limit of {limit}", code="request_too_large",
                       status=Status.RESOURCE_EXHAUSTED)
    return bytes(body)


class _DisconnectWatch:
    """Within it, the client's disconnecting cancels the task that entered it, which leaves it with
    ``_ClientGone``; enter it after the body was read (the watch reads what ``receive`` gives next)."""

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self._gone = False

    def __enter__(self) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._watch = asyncio.get_running_loop().create_task(self._cancel_when_gone(task))

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: object) -> None:
        self._watch.cancel()
        if self._gone and kind is not None and issubclass(kind, asyncio.CancelledError):
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
            raise _ClientGone() from None

    async def _cancel_when_gone(self, task: asyncio.Task[Any]) -> None:
        while (await self._receive())["type"] != "http.disconnect":
            pass
        self._gone = True
        task.cancel()


async def _events(api: ApiFormat[Any], first: GenerationDelta | None,
                  deltas: AsyncIterator[GenerationDelta]) -> AsyncIterator[bytes]:
    """The stream's server-sent events, starting from its first delta: all of one delta's events in one piece
    (one write to the socket), then ``[DONE]`` alone once ``deltas`` ended; closes ``deltas`` however it ends.

    ``[DONE]`` waits for the backend's stream to finish (so a client that has it finds its request counted), the
    last delta's events do not.
    """
    async with _closing(deltas):
        delta = first
        events = [] if delta is None else [_event(chunk) for chunk in api.opening(delta.request_id)]
        try:
            while delta is not None:
                events += [_event(chunk) for chunk in api.chunks(delta)]
                if delta.usage is not None and api.include_usage():
                    events.append(_event(api.usage_chunk(delta.request_id, delta.usage)))
                if events:
                    yield b"".join(events)
                    events = []
                delta = await anext(deltas, None)
        except GenerationError as error:
            yield _json_event(from_generation_error(error, api.field_name).body())
        except Exception:  # the headers are sent: the client can only hear of it in the stream
            log.exception("a streamed request failed")
            yield _json_event(ApiError(500, "internal error", code="internal").body())
    yield _DONE


def _event(chunk: BaseModel) -> bytes:
    return b"data: " + chunk.model_dump_json().encode() + b"\n\n"


def _json_event(value: object) -> bytes:
    return f"data: {json.dumps(value, separators=(',', ':'))}\n\n".encode()


@contextlib.asynccontextmanager
async def _closing(stream: AsyncIterator[GenerationDelta]) -> AsyncIterator[None]:
    """Closes ``stream`` on the way out, also when the request was cancelled (the client went away): then
    shielded from a second cancellation (an anyio scope costs more than the rest of the close, so only then)."""
    try:
        yield
    finally:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            with anyio.CancelScope(shield=True):
                await stream.aclose()  # type: ignore[attr-defined]
        else:
            await stream.aclose()  # type: ignore[attr-defined]


async def _api_error(request: Request, error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.http_code)


async def _routing_error(request: Request, error: HTTPException) -> JSONResponse:
    """Unknown paths (404) and methods (405), in OpenAI's error shape."""
    message = f"{request.method} {request.url.path}: {error.detail}"
    code = "not_found" if error.status_code == 404 else "invalid_request"
    return JSONResponse(ApiError(error.status_code, message, code=code).body(), status_code=error.status_code,
                        headers=error.headers)


_INTERNAL_ERROR = JSONResponse(ApiError(500, "internal error", code="internal").body(), status_code=500)


async def _internal_error(request: Request, error: Exception) -> JSONResponse:
    """A bug's answer (Starlette then re-raises the error, which uvicorn logs)."""
    return _INTERNAL_ERROR
