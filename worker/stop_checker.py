"""Per-sample stop conditions and the streaming text that respects stop strings."""

from __future__ import annotations

from radixserve.cluster.base.tokenizer import IncrementalDetokenizer, Tokenizer
from radixserve.worker.sequence import Sequence
from radixserve.worker.stop_strings import StopText


class StopChecker:
    """Decides when a sample ends and which of its text may be streamed.

    Order of checks after a token is appended: stop token ids (and eos unless ``ignore_eos``), stop strings
    (``stop_strings.StopText``: the text is cut where the earliest-beginning one begins; neither is emitted), then
    ``max_tokens`` and the context length. Stop tokens and stop strings only apply once ``min_tokens`` tokens exist.
    """

    def __init__(self, seq: Sequence, tokenizer: Tokenizer, eos_token_ids: tuple[int, ...], max_model_len: int):
        params = seq.params
        self.seq = seq
        self.detokenizer = IncrementalDetokenizer(tokenizer)
        self.stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_token_ids))
        self.stop_text = StopText(params.stop)
        self.max_model_len = max_model_len
        self.num_emitted_tokens = 0
        self.finish_reported = False

    def append(self, token_id: int) -> str | None:
        """Records a sampled token (already in ``seq.token_ids``); returns a finish reason or None."""
        reason = self._check(token_id)
        if reason is not None and reason != "stop_string":
            self.stop_text.append(self.detokenizer.finish())
        return "stop" if reason == "stop_string" else reason

    def _check(self, token_id: int) -> str | None:
        seq, params = self.seq, self.seq.params
        self.stop_text.append(self.detokenizer.push(token_id))
        if seq.num_generated >= params.min_tokens:
            if token_id in self.stop_ids:
                return "stop"
            if self.stop_text.cut_at_stop():
                return "stop_string"
        if seq.num_generated >= params.max_tokens or len(seq.token_ids) >= self.max_model_len:
            return "length"
        return None

    def take_text(self, finished: bool) -> str:
        """Text not yet emitted; while running, keeps back what could be the start of a stop string."""
        return self.stop_text.take(finished)
