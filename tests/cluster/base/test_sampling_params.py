from __future__ import annotations

import math

import pytest

from radixserve.cluster.base.sampling_params import MAX_STOP_CHARS, MAX_STOP_SEQUENCES, SamplingParams

BAD_VALUES = [
    ("max_tokens", 0), ("max_tokens", -1), ("max_tokens", 1.5), ("max_tokens", True),
    ("temperature", -0.1), ("temperature", math.nan), ("temperature", math.inf), ("temperature", "1"),
    ("top_k", -2), ("top_k", 2.0), ("top_k", None),
    ("top_p", 0.0), ("top_p", -0.5), ("top_p", 1.01), ("top_p", math.nan),
    ("min_p", -0.1), ("min_p", 1.1), ("min_p", math.nan),
    ("repetition_penalty", 0.0), ("repetition_penalty", -1.0), ("repetition_penalty", math.inf),
    ("frequency_penalty", 2.1), ("frequency_penalty", -2.1), ("frequency_penalty", math.nan),
    ("presence_penalty", 2.5), ("presence_penalty", -2.01), ("presence_penalty", -math.inf),
    ("seed", -1), ("seed", 2**63), ("seed", 1.0), ("seed", False),
    ("stop_token_ids", [-1]), ("stop_token_ids", ["a"]), ("stop_token_ids", [1.0]), ("stop_token_ids", 7),
    ("stop_token_ids", "12"),
    ("stop", [""]), ("stop", [1]), ("stop", "abc"), ("stop", None),
    ("ignore_eos", 1), ("ignore_eos", "yes"),
    ("logprobs", -1), ("logprobs", 21), ("logprobs", 1.5),
    ("n", 0), ("n", 65), ("n", 2.0),
    ("min_tokens", -1), ("min_tokens", 17), ("min_tokens", 0.5),
    # beyond int64, what every wire format carries
    ("max_tokens", 2**63), ("top_k", 2**63), ("top_k", 2**70), ("stop_token_ids", [2**63]),
    # stop strings: a bounded count and length, each text UTF-8 can carry (no lone surrogate)
    ("stop", ["a"] * (MAX_STOP_SEQUENCES + 1)), ("stop", ["a" * (MAX_STOP_CHARS + 1)]), ("stop", ["\ud800"]),
    ("stop", ["ok", "x\udfffy"]),
]


@pytest.mark.parametrize(("field", "value"), BAD_VALUES)
def test_bad_value_raises_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"^{field}: "):
        SamplingParams(**{field: value})


@pytest.mark.parametrize(("field", "value"), [
    ("max_tokens", 1), ("temperature", 0.0), ("top_k", -1), ("top_k", 0), ("top_k", 1), ("top_p", 1.0),
    ("top_p", 1e-6), ("min_p", 0.0), ("min_p", 1.0), ("repetition_penalty", 1e-3), ("frequency_penalty", -2.0),
    ("frequency_penalty", 2.0), ("presence_penalty", -2.0), ("presence_penalty", 2.0), ("seed", 0),
    ("seed", 2**63 - 1), ("logprobs", 0), ("logprobs", 20), ("n", 64), ("min_tokens", 16),
    ("max_tokens", 2**63 - 1), ("top_k", 2**63 - 1), ("stop_token_ids", (2**63 - 1,)),
    ("stop", ("a",) * MAX_STOP_SEQUENCES), ("stop", ("\U0001f642" * MAX_STOP_CHARS,)),
])
def test_boundary_values_are_accepted(field: str, value: object) -> None:
    assert getattr(SamplingParams(**{field: value}), field) == value


def test_a_refused_stop_list_is_not_echoed_whole() -> None:
    with pytest.raises(ValueError, match="^stop: ") as caught:
        SamplingParams(stop=["x" * 100_000] * 2)
    assert len(str(caught.value)) < 200


def test_min_tokens_is_bounded_by_max_tokens() -> None:
    assert SamplingParams(max_tokens=40, min_tokens=40).min_tokens == 40
    with pytest.raises(ValueError, match="^min_tokens: "):
        SamplingParams(max_tokens=40, min_tokens=41)


def test_lists_become_tuples_and_params_stay_hashable() -> None:
    params = SamplingParams(stop_token_ids=[3, 4], stop=["\n\n", "END"])
    assert params.stop_token_ids == (3, 4)
    assert params.stop == ("\n\n", "END")
    assert params == SamplingParams(stop_token_ids=(3, 4), stop=("\n\n", "END"))
    assert hash(params) == hash(SamplingParams(stop_token_ids=(3, 4), stop=("\n\n", "END")))


def test_integral_floats_are_stored_as_float() -> None:
    params = SamplingParams(temperature=2, top_p=1, repetition_penalty=1)
    assert [type(v) for v in (params.temperature, params.top_p, params.repetition_penalty)] == [float] * 3


def test_frozen() -> None:
    with pytest.raises(AttributeError):
        SamplingParams().temperature = 0.5  # type: ignore[misc]


@pytest.mark.parametrize(("kwargs", "greedy"), [
    ({}, False), ({"temperature": 0.0}, True), ({"top_k": 1}, True), ({"top_k": 2}, False),
    ({"temperature": 1e-3}, False), ({"top_p": 1e-6}, False),
])
def test_greedy(kwargs: dict[str, object], greedy: bool) -> None:
    assert SamplingParams(**kwargs).greedy is greedy


def test_for_sample_offsets_the_seed_and_keeps_the_rest() -> None:
    params = SamplingParams(n=4, seed=10, temperature=0.7, top_p=0.9, stop=["x"], max_tokens=5)
    samples = [params.for_sample(i) for i in range(4)]
    assert [s.seed for s in samples] == [10, 11, 12, 13]
    assert all(s.n == 1 for s in samples)
    assert samples[2] == SamplingParams(n=1, seed=12, temperature=0.7, top_p=0.9, stop=["x"], max_tokens=5)
    assert params.for_sample(3) == samples[3]


def test_for_sample_seed_wraps_below_2_pow_63() -> None:
    params = SamplingParams(n=3, seed=2**63 - 2)
    assert [params.for_sample(i).seed for i in range(3)] == [2**63 - 2, 2**63 - 1, 0]


def test_for_sample_without_seed_stays_unseeded() -> None:
    assert SamplingParams(n=2).for_sample(1) == SamplingParams()


@pytest.mark.parametrize("i", [-1, 3, 1.0])
def test_for_sample_rejects_out_of_range_index(i: object) -> None:
    with pytest.raises(ValueError, match="^i: "):
        SamplingParams(n=3).for_sample(i)  # type: ignore[arg-type]
