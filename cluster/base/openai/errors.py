"""Error answers in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.

``param`` names the request field at fault, in this API's terms (``messages[0].content``, ``max_tokens``,
``top_logprobs``), whenever one is; ``code`` is a short machine-readable reason.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import ValidationError

from radixserve.cluster.base.generation import GenerationError, Status, http_status
from radixserve.cluster.base.openai.protocol import ErrorInfo, ErrorResponse

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
          409: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
          503: "service_unavailable_error"}
_CODES = {Status.INVALID_ARGUMENT: "invalid_value", Status.NOT_FOUND: "not_found",
          Status.RESOURCE_EXHAUSTED: "overloaded"}


class ApiError(Exception):
    """An answer other than success: the HTTP status, the message, the field at fault and a code.

    ``status`` is the neutral ``Status`` it stands for (what the metrics count), None where none does (413).
    """

    def __init__(self, http_code: int, message: str, param: str | None = None, code: str | None = None,
                 status: Status | None = None) -> None:
        super().__init__(message)
        self.http_code = http_code
        self.message = message
        self.param = param
        self.code = code
        self.status = status

    def body(self) -> dict[str, Any]:
        """The JSON body: OpenAI's error object."""
        kind = _TYPES.get(self.http_code, "server_error" if self.http_code >= 500 else "invalid_request_error")
        return ErrorResponse(error=ErrorInfo(message=self.message, type=kind, param=self.param,
                                             code=self.code)).model_dump()


def from_generation_error(error: GenerationError, rename: Callable[[str], str]) -> ApiError:
    """The answer to a request the backend refused or failed; its field renamed by ``rename``."""
    field = rename(error.field) if error.field is not None else None
    message = f"{field}: {error.message}" if field else error.message
    return ApiError(http_status(error.status), message, field, _CODES.get(error.status, error.status.lower()),
                    error.status)


def from_validation_error(error: ValidationError) -> ApiError:
    """400 for a body that is not JSON or does not match the schema; the first problem is named."""
    problem = error.errors(include_url=False)[0]
    if problem["type"] == "json_invalid":
        return ApiError(400, f"the body is not valid JSON: {problem['ctx'].get('error', problem['msg'])}",
                        code="invalid_json", status=Status.INVALID_ARGUMENT)
    param = field_path(problem["loc"])
    if problem["type"] == "extra_forbidden":
        return ApiError(400, f"unrecognized request argument supplied: {param}", param, "unknown_parameter",
                        Status.INVALID_ARGUMENT)
    if not param:
        return ApiError(400, f"the body must be a JSON object: {problem['msg']}", code="invalid_type",
                        status=Status.INVALID_ARGUMENT)
    message = problem["msg"].removeprefix("Value error, ")
    code = "missing_required_parameter" if problem["type"] == "missing" else "invalid_value"
    return ApiError(400, f"{param}: {message}", param, code, Status.INVALID_ARGUMENT)


def field_path(loc: tuple[int | str, ...]) -> str:
    """``("messages", 0, "role")`` as ``"messages[0].role"``."""
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path
