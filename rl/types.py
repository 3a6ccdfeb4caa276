"""Data contracts between rollouts and the learner (DESIGN.md "Contracts").

A `Trajectory` is token-in/token-out: the whole conversation as token ids, which of them the policy
sampled (`loss_mask`), their behaviour log-probs and the policy version that sampled each. A
`TrainBatch` is what one learner step consumes: trajectories plus per-token advantages, built by
`rl.grpo.build_train_batch`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

from envs.base import STATUSES  # the one list of how an episode ended (re-exported)

# reward unavailable: the trajectory is left out of the loss and counted, never scored as 0
EXCLUDED_STATUSES = ("env_error", "timeout")
# the behaviour log-prob of a sampled token is <= 0; this much rounding above 0 is tolerated
_LOGPROB_SLACK = 1e-4


@dataclass
class Trajectory:
    """One episode of one task, as the learner sees it (all per-token lists have len(tokens))."""

    task_id: str
    env: str
    group_id: str  # shared by the G samples of one task in one step
    tokens: list[int]  # the whole conversation: prompt, sampled turns, tool results
    loss_mask: list[int]  # 1 where the policy sampled the token
    logprobs: list[float]  # behaviour log-prob of each sampled token, 0.0 elsewhere
    versions: list[int]  # policy version that sampled each token, -1 elsewhere
    prompt_len: int  # tokens of the first prompt (never sampled)
    reward: float | None = None  # None = unavailable (status env_error / timeout)
    status: str = "ok"  # one of STATUSES
    metrics: dict[str, Any] = field(default_factory=dict)  # env verdicts, turns, timings...

    @property
    def excluded(self) -> bool:
        """True when the reward is unavailable (env_error / timeout): left out of the loss."""
        return self.status in EXCLUDED_STATUSES

    @property
    def num_sampled_tokens(self) -> int:
        return sum(self.loss_mask)

    @property
    def min_version(self) -> int | None:
        """Oldest policy version among the sampled tokens (None if nothing was sampled)."""
        sampled = [v for v, m in zip(self.versions, self.loss_mask) if m]
        return min(sampled) if sampled else None

    @property
    def max_version(self) -> int | None:
        """Newest policy version among the sampled tokens (None if nothing was sampled)."""
        sampled = [v for v, m in zip(self.versions, self.loss_mask) if m]
        return max(sampled) if sampled else None

    def validate(self) -> Trajectory:
        """Check the contract; raise ValueError naming the offending field. Returns self."""
        for name in ("task_id", "env", "group_id"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a str, got {getattr(self, name)!r}")
        n = len(self.tokens)
        for name in ("loss_mask", "logprobs", "versions"):
            if len(getattr(self, name)) != n:
                raise ValueError(
                    f"{name} has {len(getattr(self, name))} entries but tokens has {n}"
                )
        if any(m not in (0, 1) for m in self.loss_mask):
            raise ValueError("loss_mask must hold only 0 and 1")
        if not isinstance(self.prompt_len, int) or not min(1, n) <= self.prompt_len <= n:
            raise ValueError(
                f"prompt_len must be in [{min(1, n)}, {n}] (len(tokens)), got {self.prompt_len}"
            )
        if any(self.loss_mask[: self.prompt_len]):
            raise ValueError(
                f"loss_mask must be 0 over the prompt (first {self.prompt_len} tokens)"
            )
        for i, (m, lp, v) in enumerate(zip(self.loss_mask, self.logprobs, self.versions)):
            if m and not (math.isfinite(lp) and lp <= _LOGPROB_SLACK):
                raise ValueError(f"logprobs[{i}] = {lp} is not a finite log-probability (<= 0)")
            if not m and lp != 0.0:
                raise ValueError(f"logprobs[{i}] = {lp} must be 0.0 where loss_mask is 0")
            if m and v < 0:
                raise ValueError(f"versions[{i}] = {v} must be >= 0 where loss_mask is 1")
            if not m and v != -1:
                raise ValueError(f"versions[{i}] = {v} must be -1 where loss_mask is 0")
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {self.status!r}")
        if self.reward is None:
            if not self.excluded:
                raise ValueError(
                    f"reward is None but status is {self.status!r}; an unavailable reward "
                    f"needs status {' or '.join(EXCLUDED_STATUSES)}"
                )
        elif isinstance(self.reward, bool) or not isinstance(self.reward, int | float):
            raise ValueError(f"reward must be a float or None, got {self.reward!r}")
        elif not math.isfinite(self.reward):
            raise ValueError(f"reward must be finite, got {self.reward}")
        if not isinstance(self.metrics, dict):
            raise ValueError(f"metrics must be a dict, got {type(self.metrics).__name__}")
        return self

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (for checkpoints and samples.jsonl); `from_dict` inverts it."""
        return {
            "task_id": self.task_id,
            "env": self.env,
            "group_id": self.group_id,
            "tokens": [int(t) for t in self.tokens],
            "loss_mask": [int(m) for m in self.loss_mask],
            "logprobs": [float(x) for x in self.logprobs],
            "versions": [int(v) for v in self.versions],
            "prompt_len": int(self.prompt_len),
            "reward": None if self.reward is None else float(self.reward),
            "status": self.status,
            "metrics": dict(self.metrics),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Trajectory:
        """Rebuild and validate a trajectory from `to_dict` output."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown Trajectory field(s): {', '.join(unknown)}")
        required = {f.name for f in fields(cls) if f.name not in ("reward", "status", "metrics")}
        missing = sorted(required - set(data))
        if missing:
            raise ValueError(f"missing Trajectory field(s): {', '.join(missing)}")
        kwargs = dict(data)
        for name in ("tokens", "loss_mask", "logprobs", "versions"):
            kwargs[name] = list(kwargs[name])
        kwargs["metrics"] = dict(kwargs.get("metrics", {}))
        return cls(**kwargs).validate()


@dataclass(frozen=True)
class Job:
    """What a rollout worker runs: `samples` episodes of one task, one group. Their seeds derive
    from `seed` (rl.tasks.derive_seed(seed, i) for episode i), so a job run again (a replaced
    worker, a resumed run) yields the same trajectories."""

    task: Any  # envs.base.Task
    samples: int  # G
    group_id: str
    seed: int


@dataclass
class TrainBatch:
    """What one learner step trains on: trajectories and their per-token advantages.

    `advantages[i]` is aligned with `trajectories[i].tokens` (0.0 where not sampled). The
    learner's own log-probs (before the step, for truncated importance sampling; a reference
    policy's, for the KL penalty) live on its micro-batches (rl.packing.MicroBatch)."""

    trajectories: list[Trajectory]
    advantages: list[list[float]]
    num_excluded: int = 0  # env_error / timeout trajectories left out (reward unavailable)
    num_filtered_groups: int = 0  # groups dropped because every advantage was 0 (DAPO)
    num_filtered_trajectories: int = 0

    def __len__(self) -> int:
        return len(self.trajectories)

    @property
    def num_sampled_tokens(self) -> int:
        return sum(t.num_sampled_tokens for t in self.trajectories)

    def validate(self) -> TrainBatch:
        """Check per-token lists line up with the trajectories; raise ValueError naming them."""
        n, rows = len(self.trajectories), self.advantages
        if len(rows) != n:
            raise ValueError(f"advantages has {len(rows)} rows but there are {n} trajectories")
        for i, (row, traj) in enumerate(zip(rows, self.trajectories)):
            if len(row) != len(traj.tokens):
                raise ValueError(
                    f"advantages[{i}] has {len(row)} entries but trajectory {i} has "
                    f"{len(traj.tokens)} tokens"
                )
        return self
