"""The Environment API: a task source plus an async episode (reset -> step ... -> close).

An environment is one class with a config dataclass; `Environment.validate_config` turns a raw
mapping (a dict or an OmegaConf DictConfig section) into that dataclass through the same
structured-config merge as the run config (rl/schema.py), and fails before a run starts with a
ConfigError naming the bad key.
"""

from __future__ import annotations

import abc
import hashlib
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, NotRequired, TypedDict

from rl.schema import ConfigError, build

TASK_SPLITS = ("train", "test")
# how an episode ended (StepResult.status, rl.types.Trajectory.status): the one list
STATUSES = ("ok", "truncated", "env_error", "timeout")


class Message(TypedDict):
    """One chat message; `name` is set on tool messages (rendered as role `tool: NAME`)."""

    role: str  # "system" | "user" | "assistant" | "tool"
    content: str
    name: NotRequired[str]


@dataclass(frozen=True)
class Task:
    """One prompt of one environment. `id` is stable and unique within its env."""

    id: str
    env: str
    payload: dict
    split: str = "train"

    def __post_init__(self) -> None:
        if self.split not in TASK_SPLITS:
            raise ValueError(
                f"Task {self.id!r}: split must be one of {TASK_SPLITS}, got {self.split!r}"
            )


@dataclass
class StepResult:
    """What one env step returns. env_error / timeout mean "reward unavailable": the trajectory is
    excluded from the loss, never scored 0."""

    messages: list[Message]
    done: bool
    reward: float | None = None
    status: str = "ok"
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"StepResult.status must be one of {STATUSES}, got {self.status!r}")


# ---------------------------------------------------------------------------------------------
# Config checks shared by every environment


def require_config(condition: bool, key: str, message: str) -> None:
    """Value check for a config's `__post_init__`: raise ConfigError naming `key` unless `condition`."""
    if not condition:
        raise ConfigError(f"key '{key}' {message}")


def hash_split(key: str, test_fraction: float = 0.1) -> str:
    """ "test" or "train" from a hash of a problem's content (or id): the same problem always
    falls in the same split, whatever the seed, so held-out problems never appear in training.
    Every environment splits with this."""
    bucket = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64
    return "test" if bucket < test_fraction else "train"


GENERATED_DEFAULT_N = {"train": 2000, "test": 200}  # a generated source's count when n is None


def generated_split(
    draw: Callable[[random.Random, int], tuple[str, Callable[[], dict]]],
    split: str,
    n: int | None,
    *,
    levels: list[int],
    rng: random.Random,
    test_fraction: float,
    max_misses: int = 5000,
) -> list[tuple[str, dict]]:
    """Up to `n` distinct generated problems of one split, as (key, payload): `draw(rng, level)`
    gives a problem's key (its content) and a function that builds its payload; levels are
    cycled, a key seen before or of the other split (hash_split) is drawn again, and after
    `max_misses` such draws in a row the space counts as exhausted. n=None takes up to
    GENERATED_DEFAULT_N[split], fewer if the levels hold fewer; an explicit `n` the levels cannot
    fill raises ValueError. Every task generator splits with this (envs/math.py arithmetic,
    envs/code_gen.py)."""
    target = GENERATED_DEFAULT_N[split] if n is None else n
    seen: set[str] = set()
    problems: list[tuple[str, dict]] = []
    misses = 0
    while len(problems) < target and misses < max_misses:
        key, build = draw(rng, levels[len(problems) % len(levels)])
        if key in seen or hash_split(key, test_fraction) != split:
            misses += 1
            continue
        misses = 0
        seen.add(key)
        problems.append((key, build()))
    if n is not None and len(problems) < n:
        raise ValueError(
            f"difficulty {levels} holds only {len(problems)} distinct '{split}' problems "
            f"(test_fraction {test_fraction}); asked for {n}"
        )
    return problems


# ---------------------------------------------------------------------------------------------
# The environment interface


class Environment(abc.ABC):
    """One episode at a time: `reset(task)`, then `step(text)` until `done`, then `close()`.

    Subclasses set `name` (the registry name) and `config_cls` (a dataclass with defaults), and
    implement `load_tasks`, `reset` and `step`.
    """

    name: ClassVar[str]
    config_cls: ClassVar[type]
    # the reward of an episode the rollout cuts off (turn or token limit) before `done`
    truncation_reward: float = 0.0

    def __init__(self, config: Any = None) -> None:
        # An instance of config_cls; a mapping or None is validated into one for convenience.
        if not isinstance(config, self.config_cls):
            config = self.validate_config(config)
        self.config = config

    def observe_tokens(self, used: int) -> None:  # noqa: B027 - optional hook
        """Before each `step`: the episode's exact token count so far (prompt, turns, tool
        results). An env with a token budget (SWE: the budget note) keeps it; others ignore it."""

    @classmethod
    def episode_seconds(cls, config: Any) -> float | None:
        """The longest one episode may take by this env's own limits (its deadline, then its
        scoring), or None when it sets none. The run's `rollout.episode_timeout_s` must exceed
        it (rl/config.py): the rollout's cut-off is an excluded timeout, and must not pre-empt
        the env's own end of an episode that overran its budget (the agent's failure, trained
        on)."""
        return None

    @classmethod
    def validate_config(cls, raw: Mapping | None) -> Any:
        """This env's config dataclass from a mapping (or None: the defaults), merged as the run
        config is (rl/schema.py); a ConfigError names the bad key as the run config spells it,
        `envs.NAME.config.KEY`."""
        return build(cls.config_cls, raw, where=f"envs.{cls.name}.config")

    @abc.abstractmethod
    def load_tasks(self, split: str) -> list[Task]:
        """The env's tasks of one split ("train" or "test")."""

    @abc.abstractmethod
    async def reset(self, task: Task) -> list[Message]:
        """Start an episode on `task`; return the first messages (system?, user)."""

    @abc.abstractmethod
    async def step(self, assistant_text: str) -> StepResult:
        """Consume one assistant turn; return new messages, done, and the reward when done."""

    async def close(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Release the episode's resources (sandboxes, processes)."""
