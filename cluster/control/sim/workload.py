"""Workloads for the cluster simulator: requests whose prompts are chains of block ids.

A prompt is cut into blocks of ``block_size`` tokens, the last one possibly partial, and each block is named by an
int id in ``[0, 2**32)``. Ids are chained: equal ids at the same position of two prompts mean the prompts are equal
up to and including that block (the shape of the Mooncake trace's ``hash_ids``), so a cache matches a prompt
block by block without seeing its tokens.

A ``Workload`` lists its requests in release order: every follow-up (``after >= 0``, a later chat turn) comes after
the request whose completion releases it. Every builder here also keeps the independent requests sorted by
``arrival_s``. Sources: the Mooncake JSONL trace (``load_mooncake``), token-id prompts (``from_token_prompts``) and
two seeded generators built on it (``shared_prefix``, ``chat_sessions``); ``Workload.scaled`` and ``tile`` raise
the load. ``oracle_hit_ratio`` is the ceiling any routing policy's prefix hit ratio can reach.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import reprlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from radixserve.cluster.base.config import require

BLOCK_ID_LIMIT = 2**32  # block ids are hashed as uint32 by the simulator
MOONCAKE_BLOCK_SIZE = 512
_VOCAB = 49_152  # synthetic token ids are drawn below this (the default model's vocabulary); only equality matters


def _require_positive(name: str, value: float) -> None:
    require(math.isfinite(value) and value > 0, name, f"must be finite and > 0, got {value}")


def _is_seconds(value: float) -> bool:
    return math.isfinite(value) and value >= 0


def _check_request_fields(arrival_s: float, output_len: int, after: int, think_s: float) -> None:
    require(_is_seconds(arrival_s), "arrival_s", f"must be finite and >= 0, got {arrival_s}")
    require(output_len >= 1, "output_len", f"must be >= 1, got {output_len}")
    require(after >= -1, "after", f"must be >= -1, got {after}")
    require(_is_seconds(think_s), "think_s", f"must be finite and >= 0, got {think_s}")


@dataclass(frozen=True)
class SimRequest:
    """One request of a workload.

    ``arrival_s``: seconds from the start of the run; ignored for a follow-up (``after >= 0``), which arrives
    ``think_s`` seconds after request ``after`` (an index into ``Workload.requests``) completes.
    ``block_ids``: one chained id per block of the prompt; the last block may be partial.
    ``input_len``: prompt tokens (its consistency with the block count is checked by ``Workload``).
    ``output_len``: tokens to generate. ``group``: a label for reports (shared-prefix group, chat session), -1 none.
    """

    arrival_s: float
    block_ids: tuple[int, ...]
    input_len: int
    output_len: int
    after: int = -1
    think_s: float = 0.0
    group: int = -1

    def __post_init__(self) -> None:
        _check_request_fields(self.arrival_s, self.output_len, self.after, self.think_s)
        require(len(self.block_ids) >= 1, "block_ids", "must be non-empty, got ()")
        low, high = min(self.block_ids), max(self.block_ids)
        require(0 <= low and high < BLOCK_ID_LIMIT, "block_ids", f"must be in [0, 2**32), got ids {low}..{high}")
        require(self.input_len >= 1, "input_len", f"must be >= 1, got {self.input_len}")


@dataclass(frozen=True)
class Workload:
    """Requests in release order over prompts cut into blocks of ``block_size`` tokens.

    Checks: ``block_size >= 1``; at least one request; request ``i`` has
    ``(len(block_ids) - 1) * block_size < input_len <= len(block_ids) * block_size`` and ``after < i``.
    """

    name: str
    block_size: int
    requests: tuple[SimRequest, ...]

    def __post_init__(self) -> None:
        size = self.block_size
        require(size >= 1, "block_size", f"must be >= 1, got {size}")
        require(len(self.requests) >= 1, "requests", "must be non-empty, got 0 requests")
        for i, request in enumerate(self.requests):
            num_blocks = len(request.block_ids)
            low, high = (num_blocks - 1) * size, num_blocks * size
            require(low < request.input_len <= high, f"requests[{i}].input_len",
                     f"must be in ({low}, {high}] for {num_blocks} blocks of {size}, got {request.input_len}")
            require(request.after < i, f"requests[{i}].after", f"must be an earlier index, got {request.after}")

    @property
    def num_requests(self) -> int:
        """The number of requests."""
        return len(self.requests)

    def scaled(self, time_scale: float) -> Workload:
        """Arrival and think times multiplied by ``time_scale`` (0.5 = the same requests at twice the load)."""
        _require_positive("time_scale", time_scale)
        requests = tuple(replace(r, arrival_s=r.arrival_s * time_scale, think_s=r.think_s * time_scale)
                         for r in self.requests)
        return Workload(self.name, self.block_size, requests)

    def block_tokens(self, request: SimRequest, k: int) -> int:
        """Tokens in block ``k`` of ``request``: ``block_size``, or the remainder for the last block."""
        num_blocks = len(request.block_ids)
        require(0 <= k < num_blocks, "k", f"must be in [0, {num_blocks}), got {k}")
        return self.block_size if k < num_blocks - 1 else request.input_len - (num_blocks - 1) * self.block_size


def cached_tokens(workload: Workload, request: SimRequest, matched_blocks: int) -> int:
    """Prompt tokens served from cache when the first ``matched_blocks`` blocks of ``request`` are cached.

    Their tokens, capped at ``input_len - 1``: the last prompt token is always computed, as in the engine.
    """
    num_blocks = len(request.block_ids)
    require(0 <= matched_blocks <= num_blocks, "matched_blocks", f"must be in [0, {num_blocks}], got {matched_blocks}")
    return min(matched_blocks * workload.block_size, request.input_len - 1)


def oracle_cached_tokens(workload: Workload) -> list[int]:
    """Each request's ``cached_tokens`` in one unbounded cache that sees every request in list order.

    A request's matched blocks are its leading blocks some earlier request began with (whether or not that request
    has finished), so no cluster serves a request more of its prompt from cache than this.
    """
    root: dict[int, dict] = {}  # a trie of block ids: block id -> children
    cached = []
    for request in workload.requests:
        node, matched = root, 0
        for block in request.block_ids:
            child = node.get(block)
            if child is None:  # a miss: every later block hangs below a fresh node, so it misses too
                child = node[block] = {}
            else:
                matched += 1
            node = child
        cached.append(cached_tokens(workload, request, matched))
    return cached


def oracle_hit_ratio(workload: Workload) -> float:
    """The share of prompt tokens the unbounded cache of ``oracle_cached_tokens`` serves, in ``[0, 1)``."""
    return sum(oracle_cached_tokens(workload)) / sum(r.input_len for r in workload.requests)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _trace_field(record: dict, name: str, line_no: int, ok: Callable[[object], bool], rule: str) -> object:
    if name not in record:
        raise ValueError(f"line {line_no}: {name}: missing")
    value = record[name]
    if not ok(value):
        raise ValueError(f"line {line_no}: {name}: must be {rule}, got {reprlib.repr(value)}")
    return value


def _mooncake_request(line: str, line_no: int, time_scale: float) -> SimRequest:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"line {line_no}: not valid JSON ({e.msg})") from None
    if not isinstance(record, dict):
        raise ValueError(f"line {line_no}: must be a JSON object, got {reprlib.repr(record)}")
    timestamp = _trace_field(record, "timestamp", line_no,
                             lambda v: (_is_int(v) or isinstance(v, float)) and _is_seconds(v), "a finite number >= 0")
    input_length = _trace_field(record, "input_length", line_no, lambda v: _is_int(v) and v >= 1, "an int >= 1")
    output_length = _trace_field(record, "output_length", line_no, lambda v: _is_int(v) and v >= 0, "an int >= 0")
    hash_ids = _trace_field(
        record, "hash_ids", line_no,
        lambda v: isinstance(v, list) and len(v) >= 1 and all(_is_int(i) and 0 <= i < BLOCK_ID_LIMIT for i in v),
        "a non-empty list of ints in [0, 2**32)")
    low, high = (len(hash_ids) - 1) * MOONCAKE_BLOCK_SIZE, len(hash_ids) * MOONCAKE_BLOCK_SIZE
    if not low < input_length <= high:
        raise ValueError(f"line {line_no}: input_length: must be in ({low}, {high}] for {len(hash_ids)} hash_ids, "
                         f"got {input_length}")
    return SimRequest(arrival_s=timestamp / 1000 * time_scale, block_ids=tuple(hash_ids), input_len=input_length,
                      output_len=max(output_length, 1))


MOONCAKE_TRACE_ENV = "RADIXSERVE_MOONCAKE_TRACE"
MOONCAKE_TRACE_URL = "https://github.com/kvcache-ai/Mooncake/tree/main/FAST25-release/traces"  # synthetic_trace.jsonl
_SHARED_TRACE = Path(__file__).resolve().parents[4] / "shared" / "traces" / "mooncake_synthetic_trace.jsonl"


def mooncake_trace_path() -> Path:
    """The Mooncake synthetic trace to read when no path is given: ``$RADIXSERVE_MOONCAKE_TRACE`` if set, else
    ``shared/traces/`` beside the checkout. The project carries no copy: FileNotFoundError says where to get it."""
    path = Path(os.environ.get(MOONCAKE_TRACE_ENV, _SHARED_TRACE))
    if not path.is_file():
        raise FileNotFoundError(f"the Mooncake trace is not at {path}: download synthetic_trace.jsonl from "
                                f"{MOONCAKE_TRACE_URL} and pass its path (--trace, or ${MOONCAKE_TRACE_ENV})")
    return path


def load_mooncake(path: Path, time_scale: float = 1.0, limit: int | None = None) -> Workload:
    """The first ``limit`` lines (all if None) of a Mooncake-format JSONL trace, as a workload named after the file.

    Each line is a JSON object: ``timestamp`` (ms from the start), ``input_length`` and ``output_length`` (tokens),
    ``hash_ids`` (one chained id per 512-token block, the last possibly partial). Block size 512;
    ``arrival_s = timestamp / 1000 * time_scale``; requests sorted by arrival, stably (the Mooncake traces already
    are). ``output_length`` 0 (the trace has a few) becomes ``output_len`` 1: the engine always generates a token.
    A bad line raises ``ValueError("line <n>: <field>: ...")``, lines numbered from 1.
    """
    _require_positive("time_scale", time_scale)
    require(limit is None or limit >= 1, "limit", f"must be None or >= 1, got {limit}")
    with path.open(encoding="utf-8") as lines:
        requests = [_mooncake_request(line, line_no, time_scale)
                    for line_no, line in enumerate(itertools.islice(lines, limit), start=1)]
    requests.sort(key=lambda r: r.arrival_s)
    return Workload(path.stem, MOONCAKE_BLOCK_SIZE, tuple(requests))


@dataclass(frozen=True)
class TokenPrompt:
    """A prompt of token ids with the other fields of a ``SimRequest`` (same meanings and checks)."""

    arrival_s: float
    token_ids: tuple[int, ...]
    output_len: int
    after: int = -1
    think_s: float = 0.0
    group: int = -1

    def __post_init__(self) -> None:
        _check_request_fields(self.arrival_s, self.output_len, self.after, self.think_s)
        require(len(self.token_ids) >= 1, "token_ids", "must be non-empty, got ()")


def from_token_prompts(name: str, prompts: Sequence[TokenPrompt], block_size: int) -> Workload:
    """Requests from token-id prompts, in the given order, cut into blocks of ``block_size`` tokens.

    Block ids are interned: equal (previous block id, block tokens) pairs get equal ids, numbered from 0 in order
    of first appearance, the partial last block included (so a partial block never shares an id with a full one).
    """
    require(block_size >= 1, "block_size", f"must be >= 1, got {block_size}")
    ids: dict[tuple[int, tuple[int, ...]], int] = {}
    requests = []
    for prompt in prompts:
        tokens = tuple(prompt.token_ids)
        block_ids, parent = [], -1
        for start in range(0, len(tokens), block_size):
            parent = ids.setdefault((parent, tokens[start : start + block_size]), len(ids))
            block_ids.append(parent)
        requests.append(SimRequest(prompt.arrival_s, tuple(block_ids), len(tokens), prompt.output_len,
                                   prompt.after, prompt.think_s, prompt.group))
    return Workload(name, block_size, tuple(requests))


def _random_tokens(rng: random.Random, num_tokens: int) -> tuple[int, ...]:
    return tuple(rng.randrange(_VOCAB) for _ in range(num_tokens))


def _poisson_arrivals(rng: random.Random, num_arrivals: int, rate: float) -> list[float]:
    """Arrival times of a Poisson process at ``rate`` per second, the first at 0."""
    gaps = [rng.expovariate(rate) for _ in range(num_arrivals - 1)]
    return list(itertools.accumulate(gaps, initial=0.0))


def _require_counts(**counts: tuple[int, int]) -> None:
    """Each keyword is ``name=(value, lowest allowed)``."""
    for name, (value, low) in counts.items():
        require(value >= low, name, f"must be >= {low}, got {value}")


def shared_prefix(groups: int = 8, prompts_per_group: int = 8, system_len: int = 1024, question_len: int = 64,
                  output_len: int = 32, rate: float = 4.0, seed: int = 0, block_size: int = 16) -> Workload:
    """SGLang's generated-shared-prefix shape, with random token ids drawn from ``random.Random(seed)``.

    ``groups`` system prompts of ``system_len`` tokens, each followed by ``prompts_per_group`` questions of
    ``question_len`` tokens; the prompts shuffled, then given Poisson arrivals at ``rate`` requests/s (the first
    at 0). Each request's ``group`` is its system prompt's index.
    """
    _require_counts(groups=(groups, 1), prompts_per_group=(prompts_per_group, 1), system_len=(system_len, 0),
                    question_len=(question_len, 1), output_len=(output_len, 1))
    _require_positive("rate", rate)
    rng = random.Random(seed)
    systems = [_random_tokens(rng, system_len) for _ in range(groups)]
    prompts = [(group, systems[group] + _random_tokens(rng, question_len))
               for group in range(groups) for _ in range(prompts_per_group)]
    rng.shuffle(prompts)
    arrivals = _poisson_arrivals(rng, len(prompts), rate)
    return from_token_prompts(
        "shared_prefix",
        [TokenPrompt(t, tokens, output_len, group=group) for t, (group, tokens) in zip(arrivals, prompts)],
        block_size)


def chat_sessions(num_sessions: int = 32, turns: int = 4, num_system_prompts: int = 4, system_len: int = 512,
                  user_len: int = 64, output_len: int = 128, think_s: float = 5.0, session_rate: float = 1.0,
                  seed: int = 0, block_size: int = 16) -> Workload:
    """Multi-turn chat with random token ids drawn from ``random.Random(seed)``.

    Sessions start at Poisson arrivals at ``session_rate`` per second (the first at 0); each picks one of
    ``num_system_prompts`` system prompts. Turn ``t``'s prompt is the system prompt, every earlier user message
    (``user_len`` tokens) and reply (``output_len`` tokens), then a new user message. Replies are synthetic and fixed
    per (session, turn), so turn ``t + 1``'s prompt extends turn ``t``'s prompt and reply. Turn ``t > 0`` has
    ``after`` = turn ``t - 1``'s index, ``think_s`` = ``think_s`` and ``arrival_s`` 0 (ignored). A session's turns
    are consecutive requests, sessions in start order; ``group`` is the session's index.
    """
    _require_counts(num_sessions=(num_sessions, 1), turns=(turns, 1), num_system_prompts=(num_system_prompts, 1),
                    system_len=(system_len, 0), user_len=(user_len, 1), output_len=(output_len, 1))
    require(_is_seconds(think_s), "think_s", f"must be finite and >= 0, got {think_s}")
    _require_positive("session_rate", session_rate)
    rng = random.Random(seed)
    systems = [_random_tokens(rng, system_len) for _ in range(num_system_prompts)]
    prompts: list[TokenPrompt] = []
    for session, start_s in enumerate(_poisson_arrivals(rng, num_sessions, session_rate)):
        history = systems[rng.randrange(num_system_prompts)]
        for turn in range(turns):
            if turn:
                history += _random_tokens(rng, output_len)  # the reply to the previous turn
            history += _random_tokens(rng, user_len)
            if turn:
                prompts.append(TokenPrompt(0.0, history, output_len, len(prompts) - 1, think_s, session))
            else:
                prompts.append(TokenPrompt(start_s, history, output_len, group=session))
    return from_token_prompts("chat_sessions", prompts, block_size)


def _copy(request: SimRequest, copy: int, copies: int, id_offset: int, group_offset: int) -> SimRequest:
    return replace(request, block_ids=tuple(b + copy * id_offset for b in request.block_ids),
                   after=request.after * copies + copy if request.after >= 0 else -1,
                   group=request.group + copy * group_offset if request.group >= 0 else -1)


def tile(workload: Workload, copies: int) -> Workload:
    """``copies`` overlaid copies of ``workload`` on the same timeline: ``copies`` times the load.

    Copy ``c`` adds ``c * (max block id + 1)`` to its block ids (copies share no prefix) and
    ``c * (max group + 1)`` to its groups (labels -1 stay -1). Request ``i`` of copy ``c`` lands at index
    ``i * copies + c``, ``after`` remapped alike: a stable merge in arrival order that keeps release order.
    Raises ``ValueError`` if block ids would reach ``2**32``.
    """
    require(copies >= 1, "copies", f"must be >= 1, got {copies}")
    id_offset = max(max(r.block_ids) for r in workload.requests) + 1
    require(copies * id_offset <= BLOCK_ID_LIMIT, "copies",
             f"must keep block ids below 2**32 (ids reach {id_offset - 1} in one copy), got {copies}")
    group_offset = max(r.group for r in workload.requests) + 1
    requests = tuple(_copy(r, c, copies, id_offset, group_offset) for r in workload.requests for c in range(copies))
    return Workload(f"{workload.name}x{copies}", workload.block_size, requests)
