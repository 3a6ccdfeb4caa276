"""The circuit breaker: a run where infrastructure failure dominates stops, loudly.

An env_error means "reward unavailable": the trajectory is left out of the loss and counted. The
rollout records every infrastructure failure that way, with the error text in the trajectory's
metrics: a sandbox or its service down, an environment that raised, an engine that raised for
the whole batch. One such failure is noise; a run where they dominate trains on nothing (every
step skipped) or on the wrong mixture (one environment gone, the others fine), and must stop.

The rule, for one step (the trajectories of one learner step, or of one evaluation round):
- a failure is status env_error; a timeout counts only with `count_timeouts` (see FailuresConfig);
- the step is bad for an environment when more than `max_error_fraction` of that environment's
  trajectories failed, and bad overall when more than that share of all its trajectories failed;
- each environment, and the overall share, keeps a count of consecutive bad steps: up by one on
  a bad step, back to 0 on a good one, unchanged on a step the environment had no trajectory in
  (the task mix did not draw it: no evidence either way);
- the breaker trips when a count reaches `patience`. An environment failing on its own trips it
  even while the others keep the overall share low.
An evaluation round is judged alone (patience 1): it covers the held-out set at once, and its
table would count every failure as a miss. `max_error_fraction: 1.0` turns the breaker off.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from rl.types import Trajectory

ALL = "*"  # the overall share's key among the per-environment counts
RECENT_FAILURES = 64  # failure messages kept to quote from
QUOTED = 3  # distinct failure messages quoted in the error
MESSAGE_CHARS = 300  # each quoted message is cut to this


@dataclass
class FailuresConfig:
    """When infrastructure failure stops the run (the `failures:` section; rl/health.py).

    max_error_fraction: a step is bad for an environment when more than this share of its
      trajectories failed (1.0: never, the breaker is off).
    patience: consecutive bad steps that stop the run (one transient failure never does).
    count_timeouts: count status timeout as a failure. Off by default: an episode that runs
      out of its wall clock is as often the policy's doing (long generations, slow programs,
      agent loops) as the infrastructure's, and a dead service fails fast, as an env_error.
      Turn it on where a hung service shows up as timeouts only.
    """

    max_error_fraction: float = 0.5
    patience: int = 3
    count_timeouts: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_error_fraction <= 1.0:  # NaN fails too
            raise ValueError(
                f"key 'failures.max_error_fraction' must be in [0, 1], "
                f"got {self.max_error_fraction}"
            )
        if self.patience < 1:
            raise ValueError(f"key 'failures.patience' must be >= 1, got {self.patience}")


class InfrastructureFailure(RuntimeError):
    """Infrastructure failure dominated the run's trajectories; the run stopped."""


@dataclass(frozen=True)
class Outcome:
    """What the breaker reads of one trajectory: its environment, status and error text."""

    env: str
    status: str
    error: str | None = None


def outcome(traj: Trajectory | Mapping[str, Any]) -> Outcome:
    """A Trajectory (or its to_dict form) -> Outcome; the error text is the env's own
    (info["env_error"]) or the exception the rollout caught (metrics["error"])."""
    if isinstance(traj, Trajectory):
        env, status, metrics = traj.env, traj.status, traj.metrics
    else:
        env, status, metrics = traj["env"], traj["status"], traj.get("metrics") or {}
    error = metrics.get("env_error") or metrics.get("error")
    return Outcome(env, status, None if error is None else str(error))


def outcomes(trajs: Iterable[Trajectory | Mapping[str, Any]]) -> list[Outcome]:
    return [outcome(t) for t in trajs]


@dataclass
class Verdict:
    """The breaker's reading of one step: metrics to log, and whether the run must stop."""

    tripped: bool
    metrics: dict[str, float] = field(default_factory=dict)
    failing: list[str] = field(default_factory=list)  # environments named in the message
    message: str = ""


class CircuitBreaker:
    """Fed one step's outcomes at a time (`observe`); trips per the module's rule."""

    def __init__(
        self,
        config: FailuresConfig,
        *,
        patience: int | None = None,
        what: str = "training step",
        prefix: str = "health/",
    ) -> None:
        self.config = config
        self.patience = config.patience if patience is None else patience
        self.what, self.prefix = what, prefix
        self.streaks: dict[str, int] = {}  # env (or ALL) -> consecutive bad steps
        self.recent: deque[tuple[str, str]] = deque(maxlen=RECENT_FAILURES)  # (env, message)

    def is_failure(self, status: str) -> bool:
        return status == "env_error" or (status == "timeout" and self.config.count_timeouts)

    def observe(self, step: Iterable[Outcome]) -> Verdict:
        """Count one step's failures per environment, update the streaks, judge."""
        totals: dict[str, int] = {}
        failed: dict[str, int] = {}
        for o in step:
            totals[o.env] = totals.get(o.env, 0) + 1
            if self.is_failure(o.status):
                failed[o.env] = failed.get(o.env, 0) + 1
                self.recent.append((o.env, _message(o)))
        if not totals:
            return Verdict(False)
        totals[ALL], failed[ALL] = sum(totals.values()), sum(failed.values())
        bound = self.config.max_error_fraction
        metrics: dict[str, float] = {}
        for env, n in totals.items():
            fraction = failed.get(env, 0) / n
            bad = fraction > bound
            self.streaks[env] = self.streaks.get(env, 0) + 1 if bad else 0
            key = "error_fraction" if env == ALL else f"error_fraction/{env}"
            metrics[self.prefix + key] = fraction
        metrics[self.prefix + "bad_steps"] = max(self.streaks.values())
        tripped = [env for env, streak in self.streaks.items() if streak >= self.patience]
        if not tripped:
            return Verdict(False, metrics)
        envs = sorted(e for e in tripped if e != ALL)
        if not envs:  # only the overall share: name every environment that failed in this step
            envs = sorted(e for e in failed if e != ALL and failed[e])
        message = self._message(envs, ALL in tripped and len(tripped) == 1, totals, failed)
        return Verdict(True, metrics, envs, message)

    def _message(
        self, envs: list[str], overall: bool, totals: dict[str, int], failed: dict[str, int]
    ) -> str:
        c = self.config
        kind = "env_error" + (" or timeout" if c.count_timeouts else "")
        if self.patience > 1:
            steps = f"in each of the last {self.patience} {self.what}s"
            settings = f"failures.max_error_fraction={c.max_error_fraction}, "
            settings += f"failures.patience={self.patience}"
        else:
            steps = f"in the {self.what}"
            settings = f"failures.max_error_fraction={c.max_error_fraction}"
        counts = ", ".join(f"'{e}' {failed.get(e, 0)} of {totals.get(e, 0)} failed" for e in envs)
        counts = f"in the last: {counts}" if self.patience > 1 else counts
        if overall:
            head = (
                f"more than {c.max_error_fraction:.0%} of all trajectories were lost to "
                f"infrastructure failures ({kind}) {steps} ({counts})"
            )
        else:
            names = ", ".join(f"'{e}'" for e in envs)
            head = (
                f"environment{'s' if len(envs) > 1 else ''} {names} lost more than "
                f"{c.max_error_fraction:.0%} of {'their' if len(envs) > 1 else 'its'} "
                f"trajectories to infrastructure failures ({kind}) {steps} ({counts})"
            )
        return f"{head} [{settings}]. Last errors:\n" + "\n".join(self.quotes(envs))

    def quotes(self, envs: list[str]) -> list[str]:
        """The last QUOTED distinct failure messages of `envs`, newest last, with their counts."""
        counts: dict[tuple[str, str], int] = {}
        for item in self.recent:
            if item[0] in envs:
                counts[item] = counts.get(item, 0) + 1
        order: list[tuple[str, str]] = []
        for item in reversed(self.recent):
            if item in counts and item not in order:
                order.append(item)
            if len(order) == QUOTED:
                break
        return [f"  [{env}] {text} (x{counts[(env, text)]})" for env, text in reversed(order)]


def _message(o: Outcome) -> str:
    if o.error:
        text = " ".join(o.error.split())
    elif o.status == "timeout":
        text = "the episode ran out of its wall clock (rollout.episode_timeout_s)"
    else:
        text = "no error text recorded"
    return text if len(text) <= MESSAGE_CHARS else text[: MESSAGE_CHARS - 3] + "..."
