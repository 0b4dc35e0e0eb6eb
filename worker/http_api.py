"""The worker's HTTP API: the shared OpenAI front end over its ``EngineBackend``, plus the SGLang-style info and
load endpoints other gateways probe (SMG asks for ``/get_model_info`` or ``/model_info``, ``/get_server_info`` or
``/server_info``, ``/loads`` and ``/v1/loads``).

Load reports (``/loads``, ``/v1/loads``; query parameters are ignored) follow SGLang's ``/v1/loads`` shape, one
``dp_rank`` 0 entry: ``num_running_reqs``, ``num_waiting_reqs``, ``num_total_reqs``, ``num_used_tokens`` (KV
tokens held by requests, the evictable cache left out), ``max_total_num_tokens`` (the pool), ``token_usage``
(their ratio), ``cache_hit_rate``, ``max_running_requests``, ``num_waiting_uncached_tokens`` (prompt tokens
still to prefill before the first token) and ``draining`` (the worker is stopping and takes nothing new; also in
``aggregate``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from typing import Any

from fastapi import APIRouter
from starlette.types import ASGIApp

from radixserve.cluster.base.openai.app import HttpOptions, create_app
from radixserve.cluster.base.version import radixserve_version
from radixserve.worker.backend import EngineBackend
from radixserve.worker.engine import Engine


def worker_app(engine: Engine, backend: EngineBackend, options: HttpOptions) -> ASGIApp:
    """The OpenAI API over ``backend`` (serving ``engine``) and the info endpoints, behind ``options``."""
    return create_app(backend, options, routes=_info_routes(engine, backend))


def _info_routes(engine: Engine, backend: EngineBackend) -> APIRouter:
    routes = APIRouter()
    def model() -> dict[str, Any]:
        return model_info(engine)

    def server() -> dict[str, Any]:
        return server_info(engine)

    def loads() -> dict[str, Any]:
        return load_report(engine, backend.draining)

    replies = {"/model_info": model, "/get_model_info": model, "/server_info": server,
               "/get_server_info": server, "/loads": loads, "/v1/loads": loads}
    for path, reply in replies.items():
        routes.add_api_route(path, _endpoint(reply), methods=["GET"])
    return routes


def _endpoint(reply: Callable[[], dict[str, Any]]) -> Callable[[], Awaitable[dict[str, Any]]]:
    async def endpoint() -> dict[str, Any]:
        return reply()
    return endpoint


def model_info(engine: Engine) -> dict[str, Any]:
    name = engine.config.model
    return {"model_path": name, "tokenizer_path": name, "is_generation": True, "model_type": "llama",
            "architectures": [type(engine.model).__name__], "max_model_len": engine.max_model_len}


def server_info(engine: Engine) -> dict[str, Any]:
    config = engine.config
    return {"model_path": config.model, "served_model_name": config.model, "tokenizer_path": config.model,
            "tp_size": 1, "dp_size": 1, "disaggregation_mode": "null", "page_size": config.cache.page_size,
            "context_length": engine.max_model_len, "max_total_num_tokens": _pool_tokens(engine),
            "max_prefill_tokens": config.scheduler.max_num_batched_tokens,
            "max_running_requests": config.scheduler.max_running_requests,
            "max_waiting_requests": config.scheduler.max_waiting_requests, "version": radixserve_version()}


def load_report(engine: Engine, draining: bool) -> dict[str, Any]:
    """See the module docstring."""
    load = engine.load()
    page_size = engine.config.cache.page_size
    total = _pool_tokens(engine)
    used = (load.num_pages_used - load.num_pages_evictable) * page_size
    rank = {"dp_rank": 0, "num_running_reqs": load.num_running, "num_waiting_reqs": load.num_waiting,
            "num_total_reqs": load.num_running + load.num_waiting, "num_used_tokens": used,
            "max_total_num_tokens": total, "token_usage": round(used / total, 4),
            "cache_hit_rate": round(load.hit_ratio, 4),
            "max_running_requests": engine.config.scheduler.max_running_requests,
            "num_waiting_uncached_tokens": load.num_pending_prefill_tokens, "draining": draining}
    aggregate = {"total_running_reqs": load.num_running, "total_waiting_reqs": load.num_waiting,
                 "total_reqs": rank["num_total_reqs"], "avg_token_usage": rank["token_usage"], "draining": draining}
    return {"timestamp": datetime.now(timezone.utc).isoformat(), "version": radixserve_version(), "dp_rank_count": 1,
            "loads": [rank], "aggregate": aggregate}


def _pool_tokens(engine: Engine) -> int:
    return engine.allocator.num_pages * engine.config.cache.page_size
