"""Stop strings over a sample's streamed text, at a cost per token independent of how many stop strings there are.

``StopStringAutomaton`` is an Aho-Corasick automaton built once per sample over its stop strings; ``StopText``
feeds it only the text each token adds, cuts the text where the earliest-beginning stop string begins and streams
the rest, holding back only what could still begin a stop string.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence


class StopStringAutomaton:
    """Finds stop strings in text fed to it piece by piece (a match may span pieces).

    ``feed`` costs amortized O(len(text)) whatever the number and length of the stop strings: each state knows the
    longest stop string ending there, which is the earliest-beginning match ending at that character.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        """``stops``: non-empty strings (ValueError naming ``stop`` otherwise)."""
        if not all(stops):
            raise ValueError("stop: stop strings must be non-empty")
        self._goto: list[dict[str, int]] = [{}]
        self._longest = [0]  # per state: length of the longest stop string that is a suffix of its text, 0 if none
        for stop in stops:
            self._add(stop)
        self._fail = self._link()
        self._state = 0

    def _add(self, stop: str) -> None:
        state = 0
        for ch in stop:
            if ch not in self._goto[state]:
                self._goto.append({})
                self._longest.append(0)
                self._goto[state][ch] = len(self._goto) - 1
            state = self._goto[state][ch]
        self._longest[state] = len(stop)  # a state's own text is the longest suffix of it

    def _link(self) -> list[int]:
        """Failure links, breadth first; a state's longest match is its own, else its failure state's."""
        fail = [0] * len(self._goto)
        queue = deque(self._goto[0].values())
        while queue:
            state = queue.popleft()
            for ch, child in self._goto[state].items():
                fallback = fail[state]
                while fallback and ch not in self._goto[fallback]:
                    fallback = fail[fallback]
                fail[child] = self._goto[fallback].get(ch, 0) if state else 0
                if not self._longest[child]:
                    self._longest[child] = self._longest[fail[child]]
                queue.append(child)
        return fail

    def reset(self) -> None:
        """Forgets the text fed so far: matches begin in text fed after this."""
        self._state = 0

    def feed(self, text: str) -> int | None:
        """Advances over ``text``; returns where, relative to ``text``'s start (negative: in text fed before), the
        earliest-beginning stop string that ends in ``text`` begins, or None when none ends in it."""
        goto, fail, longest = self._goto, self._fail, self._longest
        state, start = self._state, None
        for i, ch in enumerate(text):
            while state and ch not in goto[state]:
                state = fail[state]
            state = goto[state].get(ch, 0)
            if longest[state] and (start is None or i + 1 - longest[state] < start):
                start = i + 1 - longest[state]
        self._state = state
        return start


class StopText:
    """A sample's text as it streams, ended where its earliest-beginning stop string begins.

    ``append`` adds decoded text; ``cut_at_stop`` (called once stop strings apply, then after every append) looks
    for stop strings in the text not yet emitted, and on a match drops the text from where the match begins and
    returns True; ``take`` returns the text not yet emitted, while running holding back the last
    ``len(longest stop) - 1`` characters, which could still begin a stop string.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.text = ""
        self.num_emitted_chars = 0
        self._holdback = max((len(s) for s in stops), default=1) - 1
        self._automaton = StopStringAutomaton(stops) if stops else None
        self._num_fed = 0  # text the automaton has seen (from ``num_emitted_chars`` at the first check)

    def append(self, text: str) -> None:
        self.text += text

    def cut_at_stop(self) -> bool:
        if self._automaton is None:
            return False
        if self._num_fed < self.num_emitted_chars:  # the first check: search the text not yet emitted
            self._automaton.reset()
            self._num_fed = self.num_emitted_chars
        start = self._automaton.feed(self.text[self._num_fed :])
        if start is None:
            self._num_fed = len(self.text)
            return False
        self.text = self.text[: self._num_fed + start]
        return True

    def take(self, finished: bool) -> str:
        end = len(self.text) if finished else max(self.num_emitted_chars, len(self.text) - self._holdback)
        new = self.text[self.num_emitted_chars : end]
        self.num_emitted_chars = end
        return new
