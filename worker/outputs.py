"""What the engine reports per step: the new tokens and text of each sample of a request.

Each sample's part is a ``ChoiceDelta`` (``cluster.base.generation``), the type every front end relays; the
engine's finish reasons are ``"stop"`` (eos, a stop token id or a stop string), ``"length"`` (max_tokens or the
context length), ``"abort"`` or ``"error"`` (the request failed). Text that could still turn out to begin a stop
string is held back until it cannot.
"""

from __future__ import annotations

from dataclasses import dataclass

from radixserve.cluster.base.generation import ChoiceDelta


@dataclass(frozen=True)
class RequestOutput:
    """A step's progress of one request; ``finished`` once every sample has finished.

    ``error`` names the request and what failed when its own work failed (then ``finished``, with no outputs).
    """

    request_id: str
    outputs: tuple[ChoiceDelta, ...]
    num_prompt_tokens: int
    num_cached_tokens: int
    finished: bool
    error: str | None = None
