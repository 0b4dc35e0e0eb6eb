"""Stop strings found by one automaton per sample behave exactly as searching for each stop string did."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from radixserve.worker.stop_strings import StopStringAutomaton, StopText

ALPHABET = "ab é"  # few characters, so that stop strings overlap, nest and recur often


class SearchEachStop:
    """The reference: every check searches the text not yet emitted for each stop string (``str.find``)."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.text = ""
        self.num_emitted_chars = 0
        self.holdback = max((len(s) for s in stops), default=1) - 1

    def append(self, text: str) -> None:
        self.text += text

    def cut_at_stop(self) -> bool:
        found = [i for i in (self.text.find(s, self.num_emitted_chars) for s in self.stops) if i >= 0]
        if found:
            self.text = self.text[: min(found)]
        return bool(found)

    def take(self, finished: bool) -> str:
        end = len(self.text) if finished else max(self.num_emitted_chars, len(self.text) - self.holdback)
        new = self.text[self.num_emitted_chars : end]
        self.num_emitted_chars = end
        return new


stops_st = st.lists(st.text(ALPHABET, min_size=1, max_size=5), max_size=6)
# one step per token: the text it decoded to, and whether the engine emits (takes) text after it
steps_st = st.lists(st.tuples(st.text(ALPHABET, max_size=4), st.booleans()), max_size=40)


@settings(max_examples=600, deadline=None)
@given(stops=stops_st, steps=steps_st, checks_from=st.integers(0, 10))
def test_the_automaton_stops_and_streams_as_searching_each_stop_string(stops: list[str],
                                                                     steps: list[tuple[str, bool]],
                                                                     checks_from: int) -> None:
    ours, reference = StopText(stops), SearchEachStop(stops)
    for i, (piece, emit) in enumerate(steps):
        ours.append(piece)
        reference.append(piece)
        if i >= checks_from:  # stop strings apply from min_tokens on
            stopped = ours.cut_at_stop()
            assert stopped == reference.cut_at_stop()
            if stopped:
                break
        if emit:
            assert ours.take(finished=False) == reference.take(finished=False)
    assert ours.take(finished=True) == reference.take(finished=True)
    assert ours.text == reference.text


@given(stops=st.lists(st.text(ALPHABET, min_size=1, max_size=5), min_size=1, max_size=6),
       pieces=st.lists(st.text(ALPHABET, max_size=6), max_size=8))
def test_feed_reports_the_earliest_start_of_a_match_ending_in_each_piece(stops: list[str], pieces: list[str]) -> None:
    automaton = StopStringAutomaton(stops)
    text = ""
    for piece in pieces:
        begin, text = len(text), text + piece
        starts = [m for s in stops for m in range(len(text) - len(s) + 1)
                  if text.startswith(s, m) and begin < m + len(s) <= len(text)]
        expected = min(starts) - begin if starts else None
        assert automaton.feed(piece) == expected


def test_an_empty_stop_string_is_refused_naming_the_field() -> None:
    with pytest.raises(ValueError, match="^stop"):
        StopStringAutomaton(["ab", ""])
