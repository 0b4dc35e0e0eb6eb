"""What an engine counts (``EngineStats``) and reports of its load (``EngineLoad``): plain data, read by the
engine's metrics collector and its service's load reports."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EngineStats:
    """Cumulative counters since the engine started.

    ``num_prompt_tokens`` / ``num_cached_prompt_tokens``: prompt tokens of samples that reached their first
    token and how many of them were served from the radix cache on first admission; ``num_computed_tokens``: every token fed to the
    model (prefill, recompute and decode); ``num_generated_tokens``: sampled tokens; ``num_requests_finished``:
    requests that ended, aborted ones included.
    """

    num_steps: int = 0
    num_prompt_tokens: int = 0
    num_cached_prompt_tokens: int = 0
    num_computed_tokens: int = 0
    num_generated_tokens: int = 0
    num_requests_finished: int = 0


@dataclass(frozen=True)
class EngineLoad:
    """A snapshot of the engine's load (``Engine.load``): the ``EngineStats`` counters plus queue and pool state.

    ``num_running``: requests with a sample in the running batch; ``num_waiting``: the other requests in flight,
    queued (or preempted back to the queue), which ``max_waiting_requests`` bounds.
    ``num_pages_used`` = pages not free (held by requests or the radix cache); ``num_pages_evictable``: cached
    pages no request holds, which ``flush_cache`` would free. ``num_evicted_pages`` and ``num_preemptions`` count
    the scheduler's evictions for room and preemptions since the engine started. ``num_pending_prefill_tokens``:
    prompt tokens still to prefill for requests before their first token (the cached prefix a waiting request
    found at arrival left out); ``num_pending_output_tokens``: the output budgets left of every unfinished
    sample (``max_tokens`` less its tokens, within the context).
    """

    num_running: int
    num_waiting: int
    num_pages_used: int
    num_pages_free: int
    num_pages_evictable: int
    num_steps: int
    num_prompt_tokens: int
    num_cached_prompt_tokens: int
    num_computed_tokens: int
    num_generated_tokens: int
    num_requests_finished: int
    num_evicted_pages: int
    num_preemptions: int
    num_pending_prefill_tokens: int
    num_pending_output_tokens: int

    @property
    def hit_ratio(self) -> float:
        """Share of prompt tokens served from the radix cache; 0 before any prompt."""
        return self.num_cached_prompt_tokens / self.num_prompt_tokens if self.num_prompt_tokens else 0.0
