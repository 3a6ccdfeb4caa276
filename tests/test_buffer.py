"""The rollout buffer without Ray: admission by staleness, drop / requeue, whole steps only, and
statistics that count each group once."""

from __future__ import annotations

import pytest

from envs.base import Task
from rl.buffer import Buffer, Group
from rl.types import Trajectory


def group(i: int, version: int, completion: int = 3, samples: int = 2) -> Group:
    """Group i: `samples` trajectories whose sampled tokens all carry policy `version`."""
    trajs = [
        Trajectory(
            task_id=f"t{i}",
            env="e",
            group_id=f"g{i}",
            tokens=[1, 2] + [5] * completion,
            loss_mask=[0, 0] + [1] * completion,
            logprobs=[0.0, 0.0] + [-1.0] * completion,
            versions=[-1, -1] + [version] * completion,
            prompt_len=2,
            reward=float(s),
        )  # fmt: skip
        for s in range(samples)
    ]
    return Group(Task(f"t{i}", "e", {}), f"g{i}", trajs, seed=i)


def ids(groups: list[Group]) -> list[str]:
    return [g.group_id for g in groups]


def test_takes_oldest_first_and_whole_steps_only():
    buf = Buffer(max_lag=1)
    for i in range(3):
        buf.add(group(i, version=5))
    taken, requeue = buf.take(4, version=5)  # only 3 admissible: nothing, nothing counted
    assert taken == [] and requeue == [] and ids(buf.groups) == ["g0", "g1", "g2"]
    assert buf.metrics()["buffer/admitted"] == 0
    buf.add(group(3, version=6))
    taken, _ = buf.take(4, version=6)
    assert ids(taken) == ["g0", "g1", "g2", "g3"] and len(buf) == 0
    m = buf.metrics()
    assert m["buffer/admitted"] == 4  # each once, although three were looked at twice
    assert m["buffer/lag_mean"] == pytest.approx(3 / 4) and m["buffer/lag_max"] == 1


def test_stale_groups_are_dropped_once_and_not_returned():
    buf = Buffer(max_lag=1, on_stale="drop")
    buf.add(group(0, version=1))  # lag 3 at version 4
    buf.add(group(1, version=3))
    buf.add(group(2, version=4))
    taken, requeue = buf.take(2, version=4)
    assert ids(taken) == ["g1", "g2"] and requeue == []
    m = buf.metrics()
    assert (m["buffer/dropped_stale"], m["buffer/requeued_stale"], m["buffer/admitted"]) == (
        1,
        0,
        2,
    )


def test_stale_groups_are_handed_back_for_requeue():
    buf = Buffer(max_lag=0, on_stale="requeue")
    buf.add(group(0, version=0))
    buf.add(group(1, version=1))
    taken, requeue = buf.take(2, version=1)  # g0 stale; g1 alone is not a whole step
    assert taken == [] and ids(requeue) == ["g0"] and ids(buf.groups) == ["g1"]
    m = buf.metrics()
    assert (m["buffer/requeued_stale"], m["buffer/admitted"]) == (1, 0)


def test_lag_is_reported_against_response_length():
    """Staleness vs length: in async mode long episodes lag more; the metric shows it."""
    buf = Buffer(max_lag=2)
    buf.add(group(0, version=2, completion=10))
    buf.add(group(1, version=4, completion=2))
    buf.take(2, version=4)
    m = buf.metrics()
    assert m["buffer/response_len_at_lag2"] == 10 and m["buffer/response_len_at_lag0"] == 2
    assert "buffer/response_len_at_lag2" not in buf.metrics()  # reported once


def test_state_round_trip_keeps_groups_and_counters():
    buf = Buffer(max_lag=1)
    for i in range(3):
        buf.add(group(i, version=i))
    buf.take(1, version=2)  # g0: lag 2, dropped; g1 taken
    again = Buffer(max_lag=1)
    again.load_state_dict(buf.state_dict())
    assert ids(again.groups) == ["g2"]
    assert again.groups[0].trajectories[1].to_dict() == buf.groups[0].trajectories[1].to_dict()
    assert again.stats.admitted == 1 and again.stats.dropped_stale == 1


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="max_lag"):
        Buffer(max_lag=-1)
    with pytest.raises(ValueError, match="on_stale"):
        Buffer(max_lag=1, on_stale="keep")
