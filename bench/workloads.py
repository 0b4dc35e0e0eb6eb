"""The cluster benchmark's workloads: each a frozen dataclass whose ``arrivals`` are deterministic from its seed.

Prompts are token ids drawn from ``TOKEN_RANGE`` and mapped onto a vocabulary (``bench_cluster.word_vocabulary``:
ids whose text encodes back to exactly them), so a workload's shape, order and timing are the same for every
vocabulary. Each is sized for one run of about 1-2 minutes on 2 CPU cores with the default model and 0.3 GiB of
KV pool per worker (two workers):

- ``groups`` (``Workload``): SGLang's generated-shared-prefix shape, equal groups of requests sharing a system
  prompt; every cache-aware rule reaches the oracle's hit ratio on it.
- ``hot_prefix``: one system prompt takes ``hot_share`` of all requests, more than one worker serves at ``rate``,
  the rest spread over cold groups: a router must spread the hot prefix over both workers, and only as far as
  its load needs, keeping the cold groups where they are cached.
- ``eviction``: more distinct system prompts than the two pools hold together, with a popularity skew (Zipf):
  the pools evict, and a router that keeps each prompt on one worker uses both pools' room.
- ``multi_turn``: chat conversations whose history grows (ShareGPT-shaped turn counts and lengths, generated):
  each turn is sent when the previous answer arrived plus a think time, and its prompt is the previous prompt, a
  stand-in for the assistant's reply (as a replay of recorded conversations sends) and the next user message.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol

TOKEN_RANGE = (1000, 40000)  # ordinary vocabulary ids of SmolLM2, far from the special tokens


@dataclass
class Arrival:
    """One request: its prompt, its group (shared system prompt or conversation) and when it is sent.

    ``after`` None: sent ``at_s`` seconds after the run starts. Else the index of the arrival whose answer it
    waits for (an earlier turn of its conversation), and ``at_s`` is the think time after that answer.
    """

    at_s: float
    group: int
    token_ids: list[int]
    after: int | None = None


class WorkloadSpec(Protocol):
    """What the benchmark needs of a workload: its name, each request's output length, its requests."""

    name: ClassVar[str]
    output_len: int
    seed: int

    def arrivals(self, vocabulary: Sequence[int]) -> list[Arrival]: ...


def _token_source(rng: random.Random, vocabulary: Sequence[int]) -> Callable[[int], list[int]]:
    """``tokens(n)``: n tokens drawn from ``TOKEN_RANGE`` by ``rng`` and mapped onto ``vocabulary``."""
    def tokens(n: int) -> list[int]:
        return [vocabulary[(rng.randrange(*TOKEN_RANGE) - TOKEN_RANGE[0]) % len(vocabulary)] for _ in range(n)]
    return tokens


def _poisson(rng: random.Random, prompts: list[tuple[int, list[int]]], rate: float) -> list[Arrival]:
    """``prompts`` (group, tokens) in their order, with Poisson arrivals at ``rate`` requests/s from 0."""
    at, arrivals = 0.0, []
    for group, ids in prompts:
        arrivals.append(Arrival(at, group, ids))
        at += rng.expovariate(rate)
    return arrivals


def _check_positive(owner: str, **values: float) -> None:
    for name, value in values.items():
        if not value > 0:
            raise ValueError(f"{owner}.{name}: must be > 0, got {value}")


@dataclass(frozen=True)
class Workload:
    """``groups`` system prompts of ``system_len`` tokens, each followed by ``prompts_per_group`` questions of
    ``question_len`` tokens, shuffled, Poisson arrivals at ``rate`` requests/s; ``output_len`` tokens each."""

    name: ClassVar[str] = "groups"
    groups: int = 8
    prompts_per_group: int = 8
    system_len: int = 1024
    question_len: int = 64
    output_len: int = 32
    rate: float = 4.0
    seed: int = 0

    def __post_init__(self) -> None:
        _check_positive(self.name, groups=self.groups, prompts_per_group=self.prompts_per_group,
                        system_len=self.system_len, question_len=self.question_len, output_len=self.output_len,
                        rate=self.rate)

    def arrivals(self, vocabulary: Sequence[int] = range(*TOKEN_RANGE)) -> list[Arrival]:
        """The requests in arrival order; the default vocabulary gives the token ids of the runs before word
        vocabularies."""
        rng = random.Random(self.seed)
        tokens = _token_source(rng, vocabulary)
        systems = [tokens(self.system_len) for _ in range(self.groups)]
        prompts = [(g, systems[g] + tokens(self.question_len))
                   for g in range(self.groups) for _ in range(self.prompts_per_group)]
        rng.shuffle(prompts)
        return _poisson(rng, prompts, self.rate)


@dataclass(frozen=True)
class HotPrefixWorkload:
    """``num_requests`` questions of ``question_len`` tokens after a ``system_len``-token system prompt: group 0's
    (the hot one) for ``hot_share`` of them, the rest dealt evenly over ``cold_groups`` others; shuffled, Poisson
    arrivals at ``rate`` requests/s."""

    name: ClassVar[str] = "hot_prefix"
    num_requests: int = 96
    hot_share: float = 0.5
    cold_groups: int = 6
    system_len: int = 1024
    question_len: int = 64
    output_len: int = 32
    rate: float = 3.0
    seed: int = 0

    def __post_init__(self) -> None:
        _check_positive(self.name, num_requests=self.num_requests, cold_groups=self.cold_groups,
                        system_len=self.system_len, question_len=self.question_len, output_len=self.output_len,
                        rate=self.rate)
        if not 0 < self.hot_share < 1:
            raise ValueError(f"{self.name}.hot_share: must be in (0, 1), got {self.hot_share}")

    def arrivals(self, vocabulary: Sequence[int]) -> list[Arrival]:
        rng = random.Random(self.seed)
        tokens = _token_source(rng, vocabulary)
        systems = [tokens(self.system_len) for _ in range(1 + self.cold_groups)]
        num_hot = round(self.num_requests * self.hot_share)
        groups = [0] * num_hot + [1 + i % self.cold_groups for i in range(self.num_requests - num_hot)]
        prompts = [(g, systems[g] + tokens(self.question_len)) for g in groups]
        rng.shuffle(prompts)
        return _poisson(rng, prompts, self.rate)


@dataclass(frozen=True)
class EvictionWorkload:
    """``num_requests`` questions after one of ``groups`` system prompts, the prompt drawn with Zipf weights
    (``1 / rank ** zipf_s``; every group at least once), Poisson arrivals at ``rate`` requests/s.

    The default 24 prompts of 1,024 tokens take 1,536 pages; two 0.3 GiB float32 pools hold about 870.
    """

    name: ClassVar[str] = "eviction"
    num_requests: int = 96
    groups: int = 24
    zipf_s: float = 0.6
    system_len: int = 1024
    question_len: int = 64
    output_len: int = 32
    rate: float = 2.0
    seed: int = 0

    def __post_init__(self) -> None:
        _check_positive(self.name, num_requests=self.num_requests, groups=self.groups, system_len=self.system_len,
                        question_len=self.question_len, output_len=self.output_len, rate=self.rate)
        if self.groups > self.num_requests:
            raise ValueError(f"{self.name}.groups: must be <= num_requests ({self.num_requests}), got {self.groups}")
        if self.zipf_s < 0:
            raise ValueError(f"{self.name}.zipf_s: must be >= 0, got {self.zipf_s}")

    def arrivals(self, vocabulary: Sequence[int]) -> list[Arrival]:
        rng = random.Random(self.seed)
        tokens = _token_source(rng, vocabulary)
        systems = [tokens(self.system_len) for _ in range(self.groups)]
        weights = [1 / (rank + 1) ** self.zipf_s for rank in range(self.groups)]
        groups = list(range(self.groups)) + rng.choices(range(self.groups), weights, k=self.num_requests - self.groups)
        rng.shuffle(groups)
        return _poisson(rng, [(g, systems[g] + tokens(self.question_len)) for g in groups], self.rate)


@dataclass(frozen=True)
class MultiTurnWorkload:
    """``conversations`` chats started at Poisson times (``rate`` conversations/s), each a ``system_len``-token
    system prompt of its own and 2 to ``max_turns`` turns (geometric, mean about 4, as ShareGPT's).

    Turn k's prompt is turn k-1's, then a reply stand-in and the next user message; user messages and replies
    have log-normal lengths (medians ``user_len`` and ``reply_len``, long-tailed as ShareGPT's), a conversation
    ending early rather than passing ``max_prompt_len``. The next turn is sent an exponential think time (mean
    ``think_s``) after the previous answer's end.
    """

    name: ClassVar[str] = "multi_turn"
    conversations: int = 16
    max_turns: int = 6
    system_len: int = 256
    user_len: int = 64
    reply_len: int = 128
    max_prompt_len: int = 3072
    output_len: int = 32
    rate: float = 0.5
    think_s: float = 2.0
    seed: int = 0

    def __post_init__(self) -> None:
        _check_positive(self.name, conversations=self.conversations, system_len=self.system_len,
                        user_len=self.user_len, reply_len=self.reply_len, max_prompt_len=self.max_prompt_len,
                        output_len=self.output_len, rate=self.rate, think_s=self.think_s)
        if self.max_turns < 2:
            raise ValueError(f"{self.name}.max_turns: must be >= 2, got {self.max_turns}")

    def arrivals(self, vocabulary: Sequence[int]) -> list[Arrival]:
        rng = random.Random(self.seed)
        tokens = _token_source(rng, vocabulary)

        def length(median: int) -> int:
            return max(4, min(8 * median, round(rng.lognormvariate(math.log(median), 0.8))))

        arrivals: list[Arrival] = []
        start = 0.0
        for conversation in range(self.conversations):
            num_turns = min(self.max_turns, 2 + int(rng.expovariate(0.5)))
            prompt = tokens(self.system_len) + tokens(length(self.user_len))
            arrivals.append(Arrival(start, conversation, prompt))
            for _ in range(num_turns - 1):
                prompt = prompt + tokens(length(self.reply_len)) + tokens(length(self.user_len))
                if len(prompt) > self.max_prompt_len:
                    break
                arrivals.append(Arrival(rng.expovariate(1 / self.think_s), conversation, prompt, len(arrivals) - 1))
            start += rng.expovariate(self.rate)
        return arrivals


WORKLOADS: dict[str, WorkloadSpec] = {w.name: w for w in (Workload(), HotPrefixWorkload(), EvictionWorkload(),
                                                          MultiTurnWorkload())}


def make_arrivals(w: Workload, vocabulary: Sequence[int] = range(*TOKEN_RANGE)) -> list[Arrival]:
    """``w.arrivals(vocabulary)``: the ``groups`` workload's requests (the name its readers import)."""
    return w.arrivals(vocabulary)
