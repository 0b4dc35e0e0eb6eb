"""Per-request sampling parameters, validated on construction."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

INT64_LIMIT = 2**63  # every int travels as an int64 (protobuf, OpenAI's schema)
SEED_LIMIT = INT64_LIMIT  # a seed is a non-negative int64
MAX_LOGPROBS = 20
MAX_N = 64
MAX_STOP_SEQUENCES = 4  # OpenAI's limit
MAX_STOP_CHARS = 256
MAX_SHOWN_CHARS = 80  # of a refused value, in its error


def _require(ok: bool, name: str, expectation: str, value: object) -> None:
    if not ok:
        shown = repr(value)
        if len(shown) > MAX_SHOWN_CHARS:
            shown = f"{shown[:MAX_SHOWN_CHARS]}... ({len(shown)} characters)"
        raise ValueError(f"{name}: must be {expectation}, got {shown}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_int64(value: object) -> bool:
    return _is_int(value) and -INT64_LIMIT <= value < INT64_LIMIT  # type: ignore[operator]


def _check_int(name: str, value: object) -> None:
    _require(_is_int64(value), name, "an int64 (an int in [-2**63, 2**63))", value)


def _check_float(name: str, value: object) -> float:
    """Return ``value`` as a float; it must be a finite int or float (not a bool)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    _require(ok, name, "a finite number", value)
    return float(value)


def _encodable(text: str) -> bool:
    """Whether UTF-8 can carry ``text`` (a lone surrogate it cannot)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_stops(stop: tuple[object, ...]) -> None:
    _require(len(stop) <= MAX_STOP_SEQUENCES, "stop", f"at most {MAX_STOP_SEQUENCES} strings", len(stop))
    for s in stop:
        _require(isinstance(s, str) and s, "stop", "non-empty strings", s)
        _require(len(s) <= MAX_STOP_CHARS, "stop", f"strings of at most {MAX_STOP_CHARS} characters", s)
        _require(_encodable(s), "stop", "strings UTF-8 can encode (no lone surrogate)", s)


# Each float parameter's range: a test of the value and how its error states the range. Every request builds
# ``SamplingParams`` at least twice (front end and worker), so the rules are built once, here.
_FLOAT_RANGES: dict[str, tuple[Callable[[float], bool], str]] = {
    "temperature": (lambda v: v >= 0, ">= 0"),
    "top_p": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "min_p": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "repetition_penalty": (lambda v: v > 0, "> 0"),
    "frequency_penalty": (lambda v: -2 <= v <= 2, "in [-2, 2]"),
    "presence_penalty": (lambda v: -2 <= v <= 2, "in [-2, 2]"),
}


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the tokens of one request.

    ``temperature`` 0 means greedy. ``top_k`` -1 or 0 disables top-k. ``top_p`` keeps the smallest set of most
    likely tokens whose probability reaches ``top_p``; ``min_p`` drops tokens less likely than ``min_p`` times
    the most likely one. Penalty semantics are documented on ``radixserve.worker.sampler.SamplingState``.
    ``seed`` makes sampling reproducible. ``stop_token_ids`` and ``stop`` (at most ``MAX_STOP_SEQUENCES``
    non-empty strings of at most ``MAX_STOP_CHARS`` characters, each encodable as UTF-8) end generation, as do the
    model's eos ids unless ``ignore_eos``. Every int fits an int64. Until ``min_tokens`` tokens are generated,
    eos and stop ids cannot be sampled. ``logprobs`` None returns no log-probabilities; 0 returns the chosen
    token's; k >= 1 also returns the k most likely alternatives. ``n`` is the number of independent samples (see ``for_sample``).
    Lists given for the tuple fields are converted to tuples.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    n: int = 1
    min_tokens: int = 0

    def __post_init__(self) -> None:
        self._validate_ints()
        self._validate_floats()
        self._validate_stops()
        _require(isinstance(self.ignore_eos, bool), "ignore_eos", "a bool", self.ignore_eos)

    def _validate_ints(self) -> None:
        for name in ("max_tokens", "top_k", "n", "min_tokens"):
            _check_int(name, getattr(self, name))
        _require(self.max_tokens >= 1, "max_tokens", ">= 1", self.max_tokens)
        _require(self.top_k == -1 or self.top_k >= 0, "top_k", "-1, 0 (off) or >= 1", self.top_k)
        _require(1 <= self.n <= MAX_N, "n", f"in [1, {MAX_N}]", self.n)
        _require(0 <= self.min_tokens <= self.max_tokens, "min_tokens", "in [0, max_tokens]", self.min_tokens)
        if self.seed is not None:
            _check_int("seed", self.seed)
            _require(0 <= self.seed < SEED_LIMIT, "seed", "in [0, 2**63)", self.seed)
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs)
            _require(0 <= self.logprobs <= MAX_LOGPROBS, "logprobs", f"None or in [0, {MAX_LOGPROBS}]", self.logprobs)

    def _validate_floats(self) -> None:
        for name, (ok, expectation) in _FLOAT_RANGES.items():
            value = _check_float(name, getattr(self, name))
            _require(ok(value), name, expectation, value)
            object.__setattr__(self, name, value)

    def _validate_stops(self) -> None:
        _require(isinstance(self.stop_token_ids, (list, tuple)), "stop_token_ids", "a list of ints", self.stop_token_ids)
        ids = tuple(self.stop_token_ids)
        _require(all(_is_int64(t) and t >= 0 for t in ids), "stop_token_ids", "ints in [0, 2**63)", ids)
        object.__setattr__(self, "stop_token_ids", ids)
        _require(isinstance(self.stop, (list, tuple)), "stop", "a list of strings", self.stop)
        stop = tuple(self.stop)
        _check_stops(stop)
        object.__setattr__(self, "stop", stop)

    @property
    def greedy(self) -> bool:
        """Whether the token is always the (penalised) argmax."""
        return self.temperature == 0 or self.top_k == 1

    def for_sample(self, i: int) -> SamplingParams:
        """The params of the ``i``-th of ``n`` samples: these params with ``n=1`` and, when seeded,
        ``seed = (seed + i) mod 2**63``, so seeded samples are reproducible and mutually different."""
        _require(_is_int(i) and 0 <= i < self.n, "i", f"an int in [0, n={self.n})", i)
        seed = None if self.seed is None else (self.seed + i) % SEED_LIMIT
        return replace(self, n=1, seed=seed)
