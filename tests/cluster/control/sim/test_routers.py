from __future__ import annotations

import pytest

from radixserve.cluster.control.sim.routers import Sampled, peer_load
from radixserve.router.routing import ReportedLoad


class Bumped:
    """A value that changes only through ``bump``, sampled every second from 0.5 s on."""

    def __init__(self) -> None:
        self.value = 0
        self.reads: list[float] = []
        self.sampled = Sampled(self.read, interval_s=1.0, phase_s=0.5)

    def read(self, at_s: float) -> int:
        self.reads.append(at_s)
        return self.value

    def bump(self, now: float) -> None:
        self.sampled.changing(now)
        self.value += 1


def test_a_sampled_value_is_the_value_at_the_last_sample_time() -> None:
    c = Bumped()
    c.bump(0.2)                       # 1 from 0.2 on
    assert c.sampled.value(0.4) == 0  # the sample at -0.5 saw 0
    assert c.sampled.value(0.5) == 1
    c.bump(0.7)
    c.bump(0.9)                       # 3 from 0.9 on
    assert c.sampled.value(1.4) == 1  # still the sample at 0.5
    assert c.sampled.value(1.5) == 3
    c.bump(2.5)                       # a change at a sample instant: the sample sees the value before it
    assert c.sampled.value(2.5) == 3 and c.sampled.value(3.49) == 3 and c.sampled.value(3.5) == 4


def test_a_sample_is_read_as_of_its_own_time_at_most_once_per_change() -> None:
    c = Bumped()
    c.reads.clear()
    c.bump(0.2)
    c.bump(0.3)                 # no sample between: nothing read
    c.bump(1.7)                 # the sample at 1.5 is kept, read as of 1.5
    assert c.reads == [-0.5, 1.5]
    with pytest.raises(ValueError, match="^interval_s: "):
        Sampled(lambda at_s: 0, interval_s=0.0)


def test_peer_load_sums_the_other_routers_figures_per_worker() -> None:
    published = [(ReportedLoad(1, 10, 5), ReportedLoad(0, 0, 0)), (ReportedLoad(2, 3, 4), ReportedLoad(1, 1, 1))]
    assert peer_load(published) == [ReportedLoad(3, 13, 9), ReportedLoad(1, 1, 1)]
    assert peer_load([]) is None
