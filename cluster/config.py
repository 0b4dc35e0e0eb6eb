"""Frozen, validated configuration dataclasses.

Every config validates itself in ``__post_init__`` and raises ``ValueError`` naming the offending field.
Configs compose: ``EngineConfig`` holds a ``CacheConfig`` and a ``SchedulerConfig``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_MODEL = "smollm2-135m-instruct"
_DTYPES = ("float32", "bfloat16", "float16")


def _require(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ValueError(f"{name}: {message}")


@dataclass(frozen=True)
class CacheConfig:
    """The paged KV pool: ``page_size`` tokens a page; ``num_pages`` pages, or as many as fit ``memory_gib``."""

    page_size: int = 16
    num_pages: int | None = None
    memory_gib: float = 1.0

    def __post_init__(self) -> None:
        _require(self.page_size >= 1, "page_size", f"must be >= 1, got {self.page_size}")
        _require(self.num_pages is None or self.num_pages >= 2, "num_pages", f"must be >= 2, got {self.num_pages}")
        _require(self.memory_gib > 0, "memory_gib", f"must be > 0, got {self.memory_gib}")


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous batching limits.

    ``max_num_batched_tokens`` bounds the tokens one step feeds the model (decode tokens plus prefill chunks);
    a prompt longer than the budget left in a step is prefilled in chunks. ``max_running_requests`` bounds the
    batch; ``max_waiting_requests`` bounds the requests in flight, queued or running (further ones are refused).
    """

    max_num_batched_tokens: int = 512
    max_running_requests: int = 64
    max_waiting_requests: int = 4096

    def __post_init__(self) -> None:
        _require(self.max_num_batched_tokens >= 1, "max_num_batched_tokens", "must be >= 1")
        _require(self.max_running_requests >= 1, "max_running_requests", "must be >= 1")
        _require(self.max_waiting_requests >= 1, "max_waiting_requests", "must be >= 1")


@dataclass(frozen=True)
class EngineConfig:
    """One engine: which model, where it runs, its KV pool and scheduler.

    ``model`` is a model name from the model store or a path to a GGUF file or a Hugging Face directory.
    ``max_model_len`` caps prompt + output tokens (default: the model's context length).
    ``namespace`` prefixes every page hash (default: ``model``).
    """

    model: str = DEFAULT_MODEL
    device: str = "cpu"
    dtype: str = "float32"
    max_model_len: int | None = None
    seed: int = 0
    namespace: str | None = None
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    def __post_init__(self) -> None:
        _require(bool(self.model), "model", "must not be empty")
        _require(self.dtype in _DTYPES, "dtype", f"must be one of {_DTYPES}, got {self.dtype!r}")
        _require(self.max_model_len is None or self.max_model_len >= 2, "max_model_len", "must be >= 2")

    @property
    def hash_namespace(self) -> str:
        return self.namespace if self.namespace is not None else self.model
