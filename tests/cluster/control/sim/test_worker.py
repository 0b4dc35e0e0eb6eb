from __future__ import annotations

import pytest

from radixserve.cluster.control.sim.simulator import SimConfig, simulate
from radixserve.cluster.control.sim.worker import SimSeq, SimWorker
from radixserve.cluster.control.sim.workload import shared_prefix


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
