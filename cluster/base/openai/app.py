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
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.types import Send

from radixserve.cluster.base.generation import (GenerationBackend, GenerationDelta, GenerationError,
                                                GenerationRequest, ServedModel, Status, fold)
from radixserve.cluster.base.openai.convert import ApiFormat, ChatFormat, CompletionFormat
from radixserve.cluster.base.openai.errors import ApiError, from_generation_error
from radixserve.cluster.base.openai.protocol import ModelCard, ModelList
from radixserve.cluster.base.security import ApiKeys
from radixserve.cluster.base.version import radixserve_version

log = logging.getLogger(__name__)
T = TypeVar("T")
COUNTED_METHODS = (ChatFormat.method, CompletionFormat.method)  # the methods generation requests are counted as
_DONE = "data: [DONE]\n\n"
_CLIENT_GONE = 499  # nginx's "client closed request": nobody reads it


@dataclass(frozen=True)
class HttpOptions:
    """``max_body_bytes``: the largest request body accepted; ``api_keys``: the keys every call but ``/health``
    must carry (``Authorization: Bearer <key>``), none required when empty."""

    max_body_bytes: int = 4 * 2**20
    api_keys: ApiKeys = field(default_factory=ApiKeys)


class _ClientGone(Exception):
    """The client disconnected before its answer was ready."""


def create_app(backend: GenerationBackend, options: HttpOptions = HttpOptions(),
               on_refused: Callable[[str, Status], None] | None = None, routes: APIRouter | None = None) -> FastAPI:
    """The API over ``backend``; ``routes`` are served too, behind the same API key check."""
    app = FastAPI(title="radixserve", version=radixserve_version(), redoc_url=None)
    front = _FrontEnd(backend, options, on_refused)
    guarded = [Depends(front.authorize)]
    app.add_api_route("/v1/chat/completions", front.chat, methods=["POST"], dependencies=guarded,
                      openapi_extra=_request_body(ChatFormat))
    app.add_api_route("/v1/completions", front.completions, methods=["POST"], dependencies=guarded,
                      openapi_extra=_request_body(CompletionFormat))
    app.add_api_route("/v1/models", front.models, methods=["GET"], dependencies=guarded)
    app.add_api_route("/version", front.version, methods=["GET"], dependencies=guarded)
    app.add_api_route("/health", front.health, methods=["GET"])
    if routes is not None:
        app.include_router(routes, dependencies=guarded)
    app.add_exception_handler(ApiError, _api_error)  # type: ignore[arg-type]
    app.add_exception_handler(HTTPException, _routing_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _internal_error)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def _request_body(kind: type[ApiFormat[Any]]) -> dict[str, Any]:
    """The OpenAPI request body of an endpoint whose body ``kind.parse`` validates (not FastAPI)."""
    schema = {"$ref": f"#/components/schemas/{kind.schema.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document of ``app`` with the request models of the generation endpoints among its schemas."""
    if app.openapi_schema is None:
        document = get_openapi(title=app.title, version=app.version, routes=app.routes)
        schemas = document.setdefault("components", {}).setdefault("schemas", {})
        for kind in (ChatFormat, CompletionFormat):
            schema = kind.schema.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(schema.pop("$defs", {}))
            schemas[kind.schema.__name__] = schema
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
        if not self._options.api_keys.check(request.headers.get("authorization")):
            raise ApiError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key", status=Status.UNAUTHENTICATED)

    async def chat(self, request: Request) -> Response:
        return await self._serve(request, ChatFormat)

    async def completions(self, request: Request) -> Response:
        return await self._serve(request, CompletionFormat)

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

    async def _serve(self, request: Request, kind: type[ApiFormat[Any]]) -> Response:
        try:
            api, generation = await self._accept(request, kind)
            deltas = self._backend.generate(generation, kind.method)
            try:
                if not api.streaming:
                    whole = await _unless_gone(request, fold(deltas))
                    return JSONResponse(api.whole(whole).model_dump())
                first = await _unless_gone(request, anext(deltas, None))
            except GenerationError as error:
                raise from_generation_error(error, api.field_name) from None
            return _EventStream(_events(api, first, deltas))
        except _ClientGone:
            return Response(status_code=_CLIENT_GONE)

    async def _accept(self, request: Request,
                      kind: type[ApiFormat[Any]]) -> tuple[ApiFormat[Any], GenerationRequest]:
        """The request's format and neutral request; errors are counted as refused."""
        try:
            body = kind.parse(await _read_body(request, self._options.max_body_bytes))
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


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, read to its end (so that the client hears the answer) but never held beyond ``limit`` bytes."""
    body = bytearray()
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size <= limit:
                body += chunk
    except ClientDisconnect:
        raise _ClientGone() from None
    if size > limit:
        raise ApiError(413, f"the body is {size} bytes, over the limit of {limit}", code="request_too_large",
                       status=Status.RESOURCE_EXHAUSTED)
    return bytes(body)


async def _unless_gone(request: Request, work: Awaitable[T]) -> T:
    """``work``'s result; ``_ClientGone`` when the client disconnects first, after cancelling ``work``."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait((task, gone), return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        raise _ClientGone()
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def _disconnected(request: Request) -> None:
    """Returns once the client has gone (call after the body was read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _events(api: ApiFormat[Any], first: GenerationDelta | None,
                  deltas: AsyncIterator[GenerationDelta]) -> AsyncIterator[str]:
    """The stream's server-sent events, starting from its first delta; closes ``deltas`` however it ends."""
    async with _closing(deltas):
        delta = first
        if delta is not None:
            for chunk in api.opening(delta.request_id):
                yield _event(chunk)
        try:
            while delta is not None:
                for chunk in api.chunks(delta):
                    yield _event(chunk)
                if delta.usage is not None and api.include_usage():
                    yield _event(api.usage_chunk(delta.request_id, delta.usage))
                delta = await anext(deltas, None)
        except GenerationError as error:
            yield f"data: {_json(from_generation_error(error, api.field_name).body())}\n\n"
        except Exception:  # the headers are sent: the client can only hear of it in the stream
            log.exception("a streamed request failed")
            yield f"data: {_json(ApiError(500, 'internal error', code='internal').body())}\n\n"
    yield _DONE


def _event(chunk: BaseModel) -> str:
    return f"data: {chunk.model_dump_json()}\n\n"


def _json(value: object) -> str:
    return json.dumps(value, separators=(",", ":"))


@contextlib.asynccontextmanager
async def _closing(stream: AsyncIterator[GenerationDelta]) -> AsyncIterator[None]:
    """Closes ``stream`` on the way out, also when the request was cancelled (the client went away)."""
    try:
        yield
    finally:
        with anyio.CancelScope(shield=True):
            await stream.aclose()  # type: ignore[attr-defined]


class _EventStream(StreamingResponse):
    """Server-sent events whose generator is closed however the response ends (a send to a client that went
    away raises where the generator is suspended, which would otherwise leave it to the garbage collector)."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[str]) -> None:
        super().__init__(events, headers={"cache-control": "no-cache"})

    async def stream_response(self, send: Send) -> None:
        async with contextlib.aclosing(self.body_iterator):  # type: ignore[type-var]
            await super().stream_response(send)


async def _api_error(request: Request, error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.http_code)


async def _routing_error(request: Request, error: HTTPException) -> JSONResponse:
    """Unknown paths (404) and methods (405), in OpenAI's error shape."""
    message = f"{request.method} {request.url.path}: {error.detail}"
    code = "not_found" if error.status_code == 404 else "invalid_request"
    return JSONResponse(ApiError(error.status_code, message, code=code).body(), status_code=error.status_code,
                        headers=error.headers)


async def _internal_error(request: Request, error: Exception) -> JSONResponse:
    """A bug's answer (Starlette then re-raises the error, which uvicorn logs)."""
    return JSONResponse(ApiError(500, "internal error", code="internal").body(), status_code=500)
