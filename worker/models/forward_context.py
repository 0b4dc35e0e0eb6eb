"""What the running forward pass computes, for layers whose method picks its path by a token's role.

The runner marks which rows of the step's tokens (``token_rows``), and of the rows it takes logits of
(``logit_rows``), are generated tokens: positions at or past the prompt. ``GGUFMethod`` runs those through the
block kernel (int8-rounded activations, the speed of decode) and prompt rows through the float GEMM on the
dequantized weight (float quality and MKL's speed for prefill). A token's path then depends only on its own
position, never on caching, chunking, batching or preemption. Outside a runner step (scoring, tests) nothing is
marked: every row is a prompt row. ``True`` marks every row generated (scoring the decode path's quality).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GeneratedRows:
    """Which rows are generated: ``every`` / ``none`` for the uniform cases (checked once, not per layer), else
    ``mask`` (bool [rows])."""

    mask: torch.Tensor | None
    every: bool
    none: bool

    @classmethod
    def of(cls, mask: torch.Tensor | bool) -> GeneratedRows:
        if isinstance(mask, bool):
            return cls(None, mask, not mask)
        every, none = bool(mask.all()), not bool(mask.any())
        return cls(None if every or none else mask, every, none)


_generated: ContextVar[GeneratedRows | None] = ContextVar("generated_rows", default=None)


@contextmanager
def generated_rows(mask: torch.Tensor | bool) -> Iterator[None]:
    """Within the block, ``mask`` (bool [rows], or True / False: every row / none) marks the generated rows of
    every linear layer's input."""
    token = _generated.set(GeneratedRows.of(mask))
    try:
        yield
    finally:
        _generated.reset(token)


def current_generated_rows() -> GeneratedRows | None:
    """What the innermost ``generated_rows`` block set, or None (no row is generated)."""
    return _generated.get()
