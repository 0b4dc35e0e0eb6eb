"""Turns a batch of next-token logits into tokens: penalties, greedy or filtered random sampling, logprobs."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import NamedTuple

import torch

from radixserve.cluster.base.sampling_params import SamplingParams

_MASK64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """splitmix64's finaliser: a bijection on 64-bit ints that spreads every input bit over all output bits."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


class SamplingState:
    """What the sampler needs to remember about one sequence; the engine calls ``append`` for each kept token.

    Penalties, applied in this order to the logits before temperature and filtering:

    * ``repetition_penalty`` r (CTRL-style): for every token that occurs in the prompt or the output, a
      positive logit is divided by r and a negative one multiplied by r.
    * ``frequency_penalty`` f: subtracts ``f * count`` where count is the token's occurrences in the output.
    * ``presence_penalty`` p: subtracts ``p`` from every token that occurs in the output.

    Seeded draws: before each draw the generator is re-seeded from ``(params.seed, num_generated)``, so a draw
    depends only on those and the row's logits; a token the engine discards does not shift later draws.
    ``device`` must be the device of the logits the sampler will get (the generator lives there).
    """

    def __init__(self, params: SamplingParams, prompt_ids: Sequence[int], vocab_size: int,
                 device: torch.device | str = "cpu") -> None:
        if vocab_size < 1:
            raise ValueError(f"vocab_size: must be >= 1, got {vocab_size}")
        if any(not 0 <= t < vocab_size for t in prompt_ids):
            raise ValueError(f"prompt_ids: token ids must be in [0, {vocab_size})")
        self.params = params
        self.vocab_size = vocab_size
        self.prompt_token_ids = torch.tensor(sorted(set(prompt_ids)), dtype=torch.long, device=device)
        self.output_counts: Counter[int] = Counter()
        self.num_generated = 0
        self.generator = None if params.seed is None else torch.Generator(device=device)

    def append(self, token_id: int) -> None:
        """Record a generated token that the engine keeps."""
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token_id: must be in [0, {self.vocab_size}), got {token_id}")
        self.output_counts[token_id] += 1
        self.num_generated += 1

    @property
    def needs_penalties(self) -> bool:
        """Whether any penalty of this sequence changes logits."""
        p = self.params
        return p.repetition_penalty != 1 or p.frequency_penalty != 0 or p.presence_penalty != 0

    def step_generator(self) -> torch.Generator | None:
        """The generator for this step's draw (None when unseeded), seeded from (seed, num_generated)."""
        if self.generator is not None:
            assert self.params.seed is not None
            # The CPU generator only uses the low 32 bits of its seed, hence the mixing of all bits into them.
            self.generator.manual_seed(_mix64(_mix64(self.params.seed) ^ self.num_generated))
        return self.generator


class SamplerOutput(NamedTuple):
    """Per row: the chosen token; its raw log-probability (when asked); the top raw log-probabilities (when asked).

    "Raw" means the log-softmax of the logits as given, before masking, penalties and temperature.
    """

    token_ids: list[int]
    logprobs: list[float | None]
    top_logprobs: list[list[tuple[int, float]] | None]


class Sampler:
    """Picks one token per row of a logits batch (the engine updates the ``SamplingState`` s).

    Rows without a seed of their own draw from ``generator`` (torch's default generator when None): an engine
    seeds it from ``EngineConfig.seed``, so the same requests in the same order sample the same tokens.
    """

    def __init__(self, generator: torch.Generator | None = None) -> None:
        self._generator = generator

    def __call__(self, logits: torch.Tensor, states: Sequence[SamplingState],
                 eos_token_ids: Sequence[int]) -> SamplerOutput:
        """Sample from ``logits`` [B, V], row i belonging to ``states[i]``.

        Per row: while fewer than ``min_tokens`` tokens are generated, stop ids (and the eos ids unless
        ``ignore_eos``) are masked; then penalties; then the argmax for greedy rows, or else a draw from the
        softmax of ``logits / temperature`` restricted by top-k, then top-p (of the top-k-renormalised
        distribution), then min-p (relative to the most likely token).
        """
        _check_shapes(logits, states)
        work = logits.float().clone()
        _mask_min_tokens(work, states, eos_token_ids)
        apply_penalties(work, states)
        tokens = _choose(work, states, self._generator)
        logprobs, top_logprobs = _logprobs(logits, states, tokens)
        return SamplerOutput(tokens.tolist(), logprobs, top_logprobs)


def _check_shapes(logits: torch.Tensor, states: Sequence[SamplingState]) -> None:
    if logits.dim() != 2 or logits.shape[0] != len(states) or len(states) == 0:
        raise ValueError(f"logits: must have shape [len(states) > 0, V], got {list(logits.shape)}")
    if any(s.vocab_size != logits.shape[1] for s in states):
        raise ValueError(f"logits: width {logits.shape[1]} differs from a state's vocab_size")


def _mask_min_tokens(logits: torch.Tensor, states: Sequence[SamplingState], eos_token_ids: Sequence[int]) -> None:
    rows: list[int] = []
    cols: list[int] = []
    for i, s in enumerate(states):
        if s.num_generated < s.params.min_tokens:
            banned = set(s.params.stop_token_ids) | (set() if s.params.ignore_eos else set(eos_token_ids))
            rows += [i] * len(banned)
            cols += banned
    if rows:
        logits[rows, cols] = float("-inf")


def apply_penalties(logits: torch.Tensor, states: Sequence[SamplingState]) -> None:
    """Apply each row's penalties (see ``SamplingState``) in place to float ``logits`` [B, V], row i of ``states[i]``."""
    rows = [i for i, s in enumerate(states) if s.needs_penalties]
    if not rows:
        return
    device = logits.device
    sub = logits[rows]
    counts = torch.zeros_like(sub)
    out_rows = [j for j, i in enumerate(rows) for _ in states[i].output_counts]
    out_toks = [t for i in rows for t in states[i].output_counts]
    out_counts = [c for i in rows for c in states[i].output_counts.values()]
    counts[out_rows, out_toks] = torch.tensor(out_counts, dtype=counts.dtype, device=device)
    in_output = counts > 0
    seen = in_output.clone()
    prompts = [states[i].prompt_token_ids.to(device) for i in rows]
    prompt_rows = torch.repeat_interleave(torch.arange(len(rows), device=device),
                                          torch.tensor([len(p) for p in prompts], device=device))
    seen[prompt_rows, torch.cat(prompts)] = True

    rep, freq, pres = (_column([getattr(states[i].params, name) for i in rows], device)
                       for name in ("repetition_penalty", "frequency_penalty", "presence_penalty"))
    sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
    sub = sub - freq * counts - pres * in_output
    logits[rows] = sub


def _column(values: list[float] | list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, device=device).unsqueeze(1)


def _choose(logits: torch.Tensor, states: Sequence[SamplingState], generator: torch.Generator | None) -> torch.Tensor:
    tokens = logits.argmax(dim=-1)
    rows = [i for i, s in enumerate(states) if not s.params.greedy]
    if rows:
        sampled = [states[i] for i in rows]
        probs = _filtered_probs(logits[rows], [s.params for s in sampled])
        tokens[rows] = _draw(probs, sampled, generator)
    return tokens


def _filtered_probs(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Softmax of ``logits / temperature`` with the tokens outside the top-k / top-p / min-p set zeroed.

    The result is not renormalised: the draw only needs weights.
    """
    device = logits.device
    probs = (logits / _column([p.temperature for p in params], device)).softmax(dim=-1)
    if any(p.top_k > 0 or p.top_p < 1 for p in params):
        probs = _top_k_top_p(probs, params)
    if any(p.min_p > 0 for p in params):
        min_p = _column([p.min_p for p in params], device)
        probs = probs.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), 0.0)
    return probs


def _top_k_top_p(probs: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    device = probs.device
    vocab = probs.shape[1]
    top_k = _column([p.top_k if p.top_k > 0 else vocab for p in params], device)
    top_p = _column([p.top_p for p in params], device)
    sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)
    drop = torch.arange(vocab, device=device) >= top_k
    sorted_probs = sorted_probs.masked_fill(drop, 0.0)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    # top_p == 1 must keep everything, even where rounding makes the running mass reach the total early.
    drop |= (mass_before >= top_p * sorted_probs.sum(dim=-1, keepdim=True)) & (top_p < 1)
    return probs.scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))


def _draw(probs: torch.Tensor, states: Sequence[SamplingState], generator: torch.Generator | None) -> torch.Tensor:
    """One token per row with probability proportional to ``probs``: the argmax of ``probs / q`` for
    independent q ~ Exp(1) (the smallest of independent exponential clocks with rates ``probs``).

    Seeded rows draw their own q, so their tokens do not depend on the rest of the batch.
    """
    q = torch.empty_like(probs)
    unseeded = [j for j, s in enumerate(states) if s.generator is None]
    if unseeded:
        q[unseeded] = torch.empty(len(unseeded), probs.shape[1], device=probs.device).exponential_(
            generator=generator)
    for j, s in enumerate(states):
        if s.generator is not None:
            q[j].exponential_(generator=s.step_generator())
    return (probs / q.clamp_min_(torch.finfo(q.dtype).tiny)).argmax(dim=-1)


def _logprobs(logits: torch.Tensor, states: Sequence[SamplingState],
              tokens: torch.Tensor) -> tuple[list[float | None], list[list[tuple[int, float]] | None]]:
    chosen: list[float | None] = [None] * len(states)
    top: list[list[tuple[int, float]] | None] = [None] * len(states)
    rows = [i for i, s in enumerate(states) if s.params.logprobs is not None]
    if not rows:
        return chosen, top
    logprobs = logits[rows].float().log_softmax(dim=-1)
    for i, value in zip(rows, logprobs.gather(1, tokens[rows].unsqueeze(1)).squeeze(1).tolist()):
        chosen[i] = value
    k = min(max(states[i].params.logprobs or 0 for i in rows), logprobs.shape[1])
    if k:
        values, ids = (t.tolist() for t in logprobs.topk(k, dim=-1))
        for j, i in enumerate(rows):
            wanted = states[i].params.logprobs or 0
            top[i] = list(zip(ids[j][:wanted], values[j][:wanted])) if wanted else None
    return chosen, top
