from __future__ import annotations

import pytest

from radixserve.cluster.base.hashing import namespace_seed, page_hashes
from radixserve.cluster.control.sim.simulator import SimConfig, simulate
from radixserve.cluster.control.sim.worker import SimSeq, SimWorker, WorkerConfig
from radixserve.cluster.control.sim.workload import shared_prefix
from radixserve.router.routing import ReportedLoad


def test_prompt_blocks_repeat_their_id_and_generated_tokens_follow_on() -> None:
    seq = SimSeq.of_blocks(7, (5, 9, 3), 10, 4, 4, first_generated=100, hashes=[])
    assert list(seq.token_ids) == [5] * 4 + [9] * 4 + [3] * 2
    seq.append_generated(2)
    seq.append_generated(1)
    assert list(seq.token_ids[10:]) == [100, 101, 102] and seq.num_generated == 3


@pytest.mark.parametrize("host_kv_gib", [0.0, 1.0])
def test_decode_macro_steps_decide_what_single_steps_decide(monkeypatch: pytest.MonkeyPatch,
                                                            host_kv_gib: float) -> None:
    trace = shared_prefix(groups=6, prompts_per_group=8, system_len=96, question_len=8, output_len=40, rate=300.0,
                          block_size=8)
    config = SimConfig(num_workers=2, num_blocks=48, max_batch_tokens=64, kv_event_lag_s=0.0, host_kv_gib=host_kv_gib)
    runs = []
    decode_run = SimWorker._decode_run
    macro_steps = []

    def recording(self: SimWorker, batch) -> int:
        macro_steps.append(decode_run(self, batch))
        return macro_steps[-1]

    monkeypatch.setattr(SimWorker, "_decode_run", recording)
    runs.append(simulate(trace, config))
    monkeypatch.setattr(SimWorker, "_decode_run", lambda self, batch: 1)
    runs.append(simulate(trace, config))
    macro, single = runs
    assert max(macro_steps) > 1
    assert [(o.worker, o.cached_tokens) for o in macro.outcomes] == \
        [(o.worker, o.cached_tokens) for o in single.outcomes]
    assert [(w.num_evicted_blocks, w.num_preemptions) for w in macro.workers] == \
        [(w.num_evicted_blocks, w.num_preemptions) for w in single.workers]
    assert sum(w.num_evicted_blocks for w in macro.workers) > 0 and sum(w.num_preemptions for w in macro.workers) > 0
    for m, s in zip(macro.outcomes, single.outcomes, strict=True):
        assert m.finish_s == pytest.approx(s.finish_s, rel=1e-3)


def _seq(index: int, blocks: tuple[int, ...], output_len: int) -> SimSeq:
    hashes = page_hashes(blocks, 1, namespace_seed("sim"))
    return SimSeq.of_blocks(index, blocks, len(blocks) * 4, output_len, 4, first_generated=1000 + 100 * index,
                            hashes=hashes)


def test_load_reports_what_the_engine_would() -> None:
    worker = SimWorker(WorkerConfig(num_blocks=64), SimConfig().cost_model(), 4, "sim")
    first_end_s = worker.submit(_seq(0, (1, 2, 3), output_len=9), 0.0)
    worker.submit(_seq(1, (1, 2, 4), output_len=9), 0.0)
    # The first prefills its 12 tokens; the second arrived behind the first's 2 pages of prompt (its last token
    # left out, as the engine hashes prompts), so it owes 4; both owe their 9 output tokens.
    assert worker.load(0.0) == ReportedLoad(2, 16, 18)
    assert first_end_s is not None
    _, second_end_s = worker.finish_step(first_end_s)
    # The first generated its first token; the second, admitted now, matched those 2 cached pages.
    assert worker.load(first_end_s) == ReportedLoad(2, 4, 17)
    assert second_end_s is not None
    _, third_end_s = worker.finish_step(second_end_s)
    assert worker.load(second_end_s) == ReportedLoad(2, 0, 15)
    # Both decode now, several steps priced as one: a report inside it counts the steps already ended.
    assert third_end_s is not None and worker._step is not None
    num_steps = worker._step.num_decode_steps
    assert num_steps > 2
    step_s = (third_end_s - second_end_s) / num_steps
    assert worker.load(second_end_s + 2.5 * step_s) == ReportedLoad(2, 0, 15 - 2 * 2)
    assert worker.load(second_end_s + 1.9 * step_s) == ReportedLoad(2, 0, 15 - 2)  # before the second ended
