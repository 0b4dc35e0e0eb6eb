from __future__ import annotations

from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from radixserve.worker.sampler import Sampler, SamplerOutput, SamplingState, apply_penalties
from radixserve.cluster.base.sampling_params import SamplingParams

sample = Sampler()


def _states(params: list[SamplingParams], vocab: int, prompt: tuple[int, ...] = ()) -> list[SamplingState]:
    return [SamplingState(p, prompt, vocab) for p in params]


def _generate(states: list[SamplingState], logits_per_step: list[torch.Tensor]) -> list[list[int]]:
    """Run the sampler over the steps, keeping every token; the token sequence of each state."""
    tokens: list[list[int]] = [[] for _ in states]
    for logits in logits_per_step:
        out = sample(logits, states, eos_token_ids=[])
        for seq, state, tok in zip(tokens, states, out.token_ids):
            seq.append(tok)
            state.append(tok)
    return tokens


def _random_logits(shape: tuple[int, ...], seed: int, scale: float = 2.0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


# --- greedy -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("params", [SamplingParams(temperature=0.0), SamplingParams(top_k=1, temperature=5.0),
                                    SamplingParams(top_k=1, seed=3, top_p=0.1)])
def test_greedy_rows_take_the_argmax(params: SamplingParams) -> None:
    logits = _random_logits((32, 100), seed=0)
    out = sample(logits, _states([params] * 32, 100), eos_token_ids=[])
    assert out.token_ids == logits.argmax(dim=-1).tolist()
    assert out.logprobs == [None] * 32 and out.top_logprobs == [None] * 32


def test_sampler_leaves_logits_and_states_alone() -> None:
    logits = _random_logits((2, 10), seed=1)
    before = logits.clone()
    states = _states([SamplingParams(repetition_penalty=1.5, min_tokens=2), SamplingParams(seed=1)], 10, (1, 2))
    sample(logits, states, eos_token_ids=[0])
    assert torch.equal(logits, before)
    assert [s.num_generated for s in states] == [0, 0]


# --- seeded sampling ----------------------------------------------------------------------------------------

TARGET = SamplingParams(seed=1234, temperature=0.9, top_k=40, top_p=0.95, min_p=0.01, frequency_penalty=0.3)
OTHERS = [SamplingParams(), SamplingParams(seed=1), SamplingParams(temperature=0.0),
          SamplingParams(seed=1234, temperature=1.5, top_p=0.5), SamplingParams(min_p=0.2, repetition_penalty=1.3)]


def test_seeded_sampling_is_reproducible() -> None:
    steps = [_random_logits((1, 50), seed=s) for s in range(50)]
    first = _generate(_states([TARGET], 50), steps)
    assert first == _generate(_states([TARGET], 50), steps)
    assert len(set(first[0])) > 10  # actually random, not stuck on one token


@pytest.mark.parametrize("position", [0, 2, 5])
def test_seeded_row_does_not_depend_on_the_batch(position: int) -> None:
    vocab, num_steps = 50, 50
    target_steps = [_random_logits((1, vocab), seed=s) for s in range(num_steps)]
    alone = _generate(_states([TARGET], vocab), target_steps)[0]

    params = OTHERS[:position] + [TARGET] + OTHERS[position:]
    batch_steps = [torch.cat([_random_logits((position, vocab), seed=1000 + s), target_steps[s],
                              _random_logits((len(OTHERS) - position, vocab), seed=2000 + s)])
                   for s in range(num_steps)]
    assert _generate(_states(params, vocab), batch_steps)[position] == alone


def test_seeded_draw_depends_only_on_tokens_kept() -> None:
    logits = torch.zeros(1, 1000)
    state = SamplingState(SamplingParams(seed=5), (), 1000)
    draws = {sample(logits, [state], eos_token_ids=[]).token_ids[0] for _ in range(5)}
    assert len(draws) == 1  # draws the engine discards do not advance the stream
    state.append(draws.pop())
    later = [sample(logits, [state], eos_token_ids=[]).token_ids[0] for _ in range(2)]
    assert later[0] == later[1]


def test_n_samples_with_a_seed_differ_and_reproduce() -> None:
    params = SamplingParams(n=4, seed=7)
    steps = [torch.zeros(1, 1000)] * 20

    def run() -> list[list[int]]:
        return [_generate(_states([params.for_sample(i)], 1000), steps)[0] for i in range(params.n)]

    first = run()
    assert len({tuple(seq) for seq in first}) == params.n
    assert run() == first


def test_seeds_differing_only_in_high_bits_give_different_draws() -> None:
    states = _states([SamplingParams(seed=5), SamplingParams(seed=5 + 2**40)], 1000)
    first, second = sample(torch.zeros(2, 1000), states, eos_token_ids=[]).token_ids
    assert first != second


def test_unseeded_rows_use_the_global_generator() -> None:
    logits = torch.zeros(8, 1000)
    torch.manual_seed(0)
    first = sample(logits, _states([SamplingParams()] * 8, 1000), eos_token_ids=[]).token_ids
    torch.manual_seed(0)
    assert sample(logits, _states([SamplingParams()] * 8, 1000), eos_token_ids=[]).token_ids == first
    assert len(set(first)) > 1


# --- the sampled distribution -------------------------------------------------------------------------------


def _allowed(logits: np.ndarray, temperature: float, top_k: int, top_p: float, min_p: float) -> set[int] | None:
    """Reference top-k, then top-p, then min-p set in float64; None when a threshold is too close to call."""
    z = logits / temperature
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")[: top_k if top_k > 0 else len(probs)]
    kept = probs[order] / probs[order].sum()
    mass_before = np.cumsum(kept) - kept
    ratio = probs[order] / probs.max()
    if np.any(np.abs(mass_before - top_p) < 1e-4) or np.any(np.abs(ratio - min_p) < 1e-4):
        return None
    keep = (mass_before < top_p) & (ratio >= min_p)
    return set(order[keep].tolist())


@settings(max_examples=150, deadline=None)
@given(
    raw=st.lists(st.integers(-40, 40), min_size=2, max_size=40, unique=True),
    temperature=st.floats(0.2, 3.0),
    top_k=st.integers(-1, 40),
    top_p=st.one_of(st.just(1.0), st.floats(0.05, 1.0)),
    min_p=st.one_of(st.just(0.0), st.floats(0.0, 0.9)),
    seed=st.integers(0, 2**63 - 1),
)
def test_filters_never_sample_outside_the_allowed_set(raw: list[int], temperature: float, top_k: int,
                                                      top_p: float, min_p: float, seed: int) -> None:
    logits = np.array(raw, dtype=np.float64) / 8  # distinct values, so the top-k set is well defined
    allowed = _allowed(logits, temperature, top_k, top_p, min_p)
    assume(allowed is not None)
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed)
    rows = 32
    states = _states([replace(params, seed=(seed + i) % 2**63) for i in range(rows)], len(raw))
    batch = torch.tensor(logits, dtype=torch.float32).expand(rows, -1)
    assert set(sample(batch, states, eos_token_ids=[]).token_ids) <= allowed


DIST_LOGITS = [1.0, 0.5, 0.0, -0.5, -1.5]


def _expected_probs(temperature: float, top_k: int) -> np.ndarray:
    z = np.array(DIST_LOGITS) / temperature
    if top_k > 0:
        z[np.argsort(-z)[top_k:]] = -np.inf
    probs = np.exp(z - z.max())
    return probs / probs.sum()


def _assert_matches(counts: Counter[int], expected: np.ndarray) -> None:
    total = sum(counts.values())
    assert all(expected[t] > 0 for t in counts), f"sampled a filtered token: {counts}"
    observed = np.array([counts[t] for t in range(len(expected))])
    support = expected > 0
    chi2 = (((observed - total * expected) ** 2)[support] / (total * expected[support])).sum()
    assert chi2 < 25, f"chi2={chi2:.1f}, observed={observed.tolist()}, expected={(total * expected).round().tolist()}"


@pytest.mark.parametrize(("temperature", "top_k"), [(1.0, -1), (0.5, -1), (2.0, 3)])
def test_unseeded_batch_matches_softmax(temperature: float, top_k: int) -> None:
    torch.manual_seed(0)
    rows = 20000
    states = _states([SamplingParams(temperature=temperature, top_k=top_k)], len(DIST_LOGITS)) * rows
    logits = torch.tensor(DIST_LOGITS).expand(rows, -1)
    _assert_matches(Counter(sample(logits, states, eos_token_ids=[]).token_ids), _expected_probs(temperature, top_k))


@pytest.mark.parametrize(("temperature", "top_k"), [(1.0, -1), (0.5, 3)])
def test_seeded_rows_across_seeds_match_softmax(temperature: float, top_k: int) -> None:
    rows = 5000
    states = _states([SamplingParams(seed=s, temperature=temperature, top_k=top_k) for s in range(rows)],
                     len(DIST_LOGITS))
    logits = torch.tensor(DIST_LOGITS).expand(rows, -1)
    _assert_matches(Counter(sample(logits, states, eos_token_ids=[]).token_ids), _expected_probs(temperature, top_k))


def test_one_seeded_sequence_across_steps_matches_softmax() -> None:
    steps = [torch.tensor([DIST_LOGITS])] * 3000
    tokens = _generate(_states([SamplingParams(seed=99, max_tokens=3000)], len(DIST_LOGITS)), steps)[0]
    _assert_matches(Counter(tokens), _expected_probs(1.0, -1))


# --- penalties ----------------------------------------------------------------------------------------------


def test_penalties_match_a_hand_computed_example() -> None:
    params = SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25)
    penalised, plain = SamplingState(params, (0, 1, 1), 5), SamplingState(SamplingParams(), (0, 1), 5)
    for tok in (1, 3, 3):
        penalised.append(tok)
        plain.append(tok)
    logits = torch.tensor([[2.0, -1.0, 0.5, -0.5, 3.0]] * 2)
    apply_penalties(logits, [penalised, plain])
    # token 0: prompt only, positive: 2 / 2.   token 1: prompt + output once, negative: -1 * 2 - 0.5 - 0.25.
    # token 2, 4: never seen.                    token 3: output twice, negative: -0.5 * 2 - 2 * 0.5 - 0.25.
    assert logits[0].tolist() == [1.0, -2.75, 0.5, -2.25, 3.0]
    assert logits[1].tolist() == [2.0, -1.0, 0.5, -0.5, 3.0]


def test_negative_penalties_reward_output_tokens_only() -> None:
    state = SamplingState(SamplingParams(frequency_penalty=-1.0, presence_penalty=-0.5), (2,), 4)
    state.append(1)
    state.append(1)
    logits = torch.zeros(1, 4)
    apply_penalties(logits, [state])
    assert logits[0].tolist() == [0.0, 2.5, 0.0, 0.0]


def test_frequency_penalty_steers_greedy_decoding() -> None:
    steps = [torch.tensor([[3.0, 2.6, 0.0]])] * 4
    tokens = _generate(_states([SamplingParams(temperature=0.0, frequency_penalty=0.5)], 3), steps)[0]
    # After one 0 its logit is 2.5 < 2.6; after one 1 that is 2.1 < 2.5; and so on.
    assert tokens == [0, 1, 0, 1]


# --- min_tokens ---------------------------------------------------------------------------------------------


def test_min_tokens_masks_eos_and_stop_ids() -> None:
    steps = [torch.tensor([[0.0, 0.0, 1.0, 9.0, 10.0, 8.0]])] * 4
    params = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[3])
    state = SamplingState(params, (), 6)
    tokens = []
    for logits in steps:
        tok = sample(logits, [state], eos_token_ids=[4, 5]).token_ids[0]
        tokens.append(tok)
        state.append(tok)
    assert tokens == [2, 2, 4, 4]


def test_min_tokens_with_ignore_eos_masks_only_stop_ids() -> None:
    logits = torch.tensor([[0.0, 1.0, 9.0, 10.0]])
    params = SamplingParams(temperature=0.0, min_tokens=1, stop_token_ids=[3], ignore_eos=True)
    assert sample(logits, [SamplingState(params, (), 4)], eos_token_ids=[2]).token_ids == [2]


def test_min_tokens_masks_eos_for_sampled_rows() -> None:
    rows = 200
    logits = torch.tensor([[0.0, 0.0, 8.0]]).expand(rows, -1)
    states = _states([SamplingParams(seed=s, min_tokens=1) for s in range(rows)], 3)
    assert 2 not in sample(logits, states, eos_token_ids=[2]).token_ids
    for state in states:
        state.append(0)
    assert Counter(sample(logits, states, eos_token_ids=[2]).token_ids)[2] > rows * 0.9


# --- logprobs -----------------------------------------------------------------------------------------------


def test_logprobs_are_of_the_raw_logits() -> None:
    logits = _random_logits((3, 30), seed=4)
    params = [SamplingParams(logprobs=0, temperature=0.5, repetition_penalty=1.8, seed=1),
              SamplingParams(logprobs=3, temperature=0.0, min_tokens=1),
              SamplingParams()]
    states = _states(params, 30, prompt=tuple(range(10)))
    out = sample(logits, states, eos_token_ids=[int(logits[1].argmax())])
    raw = torch.log_softmax(logits, dim=-1)
    assert out.logprobs[0] == pytest.approx(raw[0, out.token_ids[0]].item(), abs=1e-6)
    assert out.logprobs[1] == pytest.approx(raw[1, out.token_ids[1]].item(), abs=1e-6)
    assert out.token_ids[1] != int(logits[1].argmax())  # the masked eos, yet logprobs stay raw
    assert out.logprobs[2] is None
    assert out.top_logprobs[0] is None and out.top_logprobs[2] is None


@pytest.mark.parametrize(("vocab", "k"), [(30, 1), (30, 5), (30, 20), (4, 20)])
def test_top_logprobs_are_the_sorted_top_k(vocab: int, k: int) -> None:
    logits = _random_logits((2, vocab), seed=k)
    states = _states([SamplingParams(logprobs=k, seed=0), SamplingParams(logprobs=2)], vocab)
    out = sample(logits, states, eos_token_ids=[])
    raw = torch.log_softmax(logits, dim=-1)
    for row, want in ((0, min(k, vocab)), (1, 2)):
        top = out.top_logprobs[row]
        assert top is not None and len(top) == want
        values = [v for _, v in top]
        assert values == sorted(values, reverse=True)
        expected = torch.sort(raw[row], descending=True)
        assert [t for t, _ in top] == expected.indices[:want].tolist()
        assert values == pytest.approx(expected.values[:want].tolist(), abs=1e-6)


def test_output_is_a_sampler_output_of_python_values() -> None:
    out = sample(torch.zeros(1, 3), _states([SamplingParams(logprobs=1)], 3), eos_token_ids=[])
    assert isinstance(out, SamplerOutput)
    assert isinstance(out.token_ids[0], int) and isinstance(out.logprobs[0], float)
    token, value = out.top_logprobs[0][0]  # type: ignore[index]
    assert isinstance(token, int) and isinstance(value, float)


# --- input validation ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(5,), (2, 5), (1, 6), (1, 1, 5)])
def test_sampler_rejects_misshapen_logits(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="^logits: "):
        sample(torch.zeros(shape), _states([SamplingParams()], 5), eos_token_ids=[])


def test_state_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="^vocab_size: "):
        SamplingState(SamplingParams(), (), 0)
    with pytest.raises(ValueError, match="^prompt_ids: "):
        SamplingState(SamplingParams(), (0, 5), 5)
    state = SamplingState(SamplingParams(), (), 5)
    with pytest.raises(ValueError, match="^token_id: "):
        state.append(5)
    with pytest.raises(ValueError, match="^token_id: "):
        state.append(-1)
