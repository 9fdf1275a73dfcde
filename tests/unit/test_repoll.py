"""The per-cgroup re-poll schedule of discovery (pure: no kubelet, no cgroups)."""

from __future__ import annotations

import pytest

from agent.kube.discovery import RepollSchedule


def test_repoll_schedule_backs_off_per_cgroup() -> None:
    sched = RepollSchedule(first_s=0.2, max_s=2.0, forget_after_s=60.0)
    assert sched.request(1, now=100.0)  # new: poll now
    assert not sched.request(1, now=100.01)  # already scheduled
    assert sched.next_due() == 100.0
    polls = [100.0]
    while (due := sched.next_due()) is not None:
        sched.polled(due, resolved=set())
        polls.append(due)
        assert not sched.request(1, now=due)  # still writing: changes nothing
    gaps = [round(b - a, 3) for a, b in zip(polls, polls[1:], strict=False)]
    assert gaps == [0.0, 0.2, 0.4, 0.8, 1.6]  # then the periodic poll covers it
    # A second cgroup has its own schedule, from its first request.
    assert sched.request(2, now=110.0)
    sched.polled(110.0, resolved=set())
    assert sched.next_due() == pytest.approx(110.2)
    # Resolved: forgotten; asked about again later: a new schedule.
    sched.polled(110.2, resolved={2})
    assert sched.next_due() is None and len(sched) == 1
    assert sched.request(2, now=111.0)
    # A cgroup left to the periodic poll is forgotten once nobody asked for a while.
    sched.polled(111.0 + 61.0, resolved=set())
    assert len(sched) == 1  # 2 is backing off again; 1 is gone
    assert not sched.request(2, now=173.0)
