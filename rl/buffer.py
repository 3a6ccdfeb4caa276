"""The rollout buffer: groups of G trajectories per task, admitted by staleness, oldest first.

A group's lag, when a learner step at policy version v takes it, is v - (the oldest policy version
among its sampled tokens). Groups with lag > max_lag are dropped and counted, or re-queued for
fresh generation, per config. Staleness is recorded against response length so a bias toward
short (fast) episodes in async mode is visible."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from envs.base import Task
from rl.types import Trajectory


@dataclass
class Group:
    task: Task
    group_id: str
    trajectories: list[Trajectory]
    seed: int

    @property
    def min_version(self) -> int | None:
        versions = [t.min_version for t in self.trajectories if t.min_version is not None]
        return min(versions) if versions else None


@dataclass
class BufferStats:
    admitted: int = 0
    dropped_stale: int = 0
    requeued_stale: int = 0
    lag_sum: int = 0
    lag_max: int = 0
    # (lag, mean sampled tokens of the group) of the groups admitted since the last report
    lag_vs_length: list[tuple[int, float]] = field(default_factory=list)


class Buffer:
    def __init__(self, max_lag: int, on_stale: str = "drop"):
        if max_lag < 0:
            raise ValueError(f"max_lag must be >= 0, got {max_lag}")
        if on_stale not in ("drop", "requeue"):
            raise ValueError(f"buffer.on_stale must be drop or requeue, got {on_stale!r}")
        self.max_lag, self.on_stale = max_lag, on_stale
        self.groups: deque[Group] = deque()
        self.stats = BufferStats()

    def __len__(self) -> int:
        return len(self.groups)

    def add(self, group: Group) -> None:
        self.groups.append(group)

    def take(self, n: int, version: int) -> tuple[list[Group], list[Group]]:
        """n admissible groups for a learner step at policy `version`, oldest first, or none
        when fewer than n are admissible (those stay in the buffer, in order, uncounted); also
        returns the stale groups met on the way (they leave the buffer; the caller re-queues
        their tasks when on_stale=requeue). Each group is counted once: when it is taken, or
        when it is found stale."""
        admissible: list[tuple[Group, int]] = []
        stale: list[Group] = []
        while self.groups and len(admissible) < n:
            group = self.groups.popleft()
            oldest = group.min_version
            lag = 0 if oldest is None else version - oldest
            if lag > self.max_lag:
                if self.on_stale == "requeue":
                    self.stats.requeued_stale += 1
                else:
                    self.stats.dropped_stale += 1
                stale.append(group)
            else:
                admissible.append((group, lag))
        requeue = stale if self.on_stale == "requeue" else []
        if len(admissible) < n:  # not a whole step yet: back to the front, as they were
            self.groups.extendleft(reversed([g for g, _ in admissible]))
            return [], requeue
        for group, lag in admissible:
            self.stats.admitted += 1
            self.stats.lag_sum += lag
            self.stats.lag_max = max(self.stats.lag_max, lag)
            lengths = [t.num_sampled_tokens for t in group.trajectories]
            self.stats.lag_vs_length.append((lag, sum(lengths) / max(1, len(lengths))))
        return [g for g, _ in admissible], requeue

    def metrics(self) -> dict[str, float]:
        """Counters since the start, plus the lag/length correlation of recent admissions."""
        s = self.stats
        out = {
            "buffer/size": len(self.groups),
            "buffer/admitted": s.admitted,
            "buffer/dropped_stale": s.dropped_stale,
            "buffer/requeued_stale": s.requeued_stale,
            "buffer/lag_mean": s.lag_sum / max(1, s.admitted),
            "buffer/lag_max": s.lag_max,
        }
        pairs = s.lag_vs_length
        for lag in sorted({p[0] for p in pairs}):
            lens = [p[1] for p in pairs if p[0] == lag]
            out[f"buffer/response_len_at_lag{lag}"] = sum(lens) / len(lens)
        s.lag_vs_length = []
        return out

    def state_dict(self) -> dict:
        groups = [
            {
                "task": vars(g.task),
                "group_id": g.group_id,
                "seed": g.seed,
                "trajectories": [t.to_dict() for t in g.trajectories],
            }
            for g in self.groups
        ]
        stats = {k: v for k, v in vars(self.stats).items() if k != "lag_vs_length"}
        return {"groups": groups, "stats": stats}

    def load_state_dict(self, state: dict) -> None:
        self.groups = deque(
            Group(
                Task(**g["task"]),
                g["group_id"],
                [Trajectory.from_dict(t) for t in g["trajectories"]],
                g["seed"],
            )
            for g in state["groups"]
        )
        self.stats = BufferStats(**state["stats"])
