"""The Environment API: a task source plus an async episode (reset -> step ... -> close).

An environment is one class with a config dataclass; `Environment.validate_config` turns a raw
mapping (a dict or an OmegaConf DictConfig section) into that dataclass and fails before a run
starts with a message naming the bad key. `validate_dataclass` is the shared checker.
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, NotRequired, TypedDict, Union

TASK_SPLITS = ("train", "test")
# how an episode ended (StepResult.status, rl.types.Trajectory.status): the one list
STATUSES = ("ok", "truncated", "env_error", "timeout")


class Message(TypedDict):
    """One chat message; `name` is set on tool messages (rendered as role `tool: NAME`)."""

    role: str  # "system" | "user" | "assistant" | "tool"
    content: str
    name: NotRequired[str]


class ConfigError(ValueError):
    """A config section is invalid: unknown key, wrong type or impossible value."""


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
# Config validation shared by every environment


def _to_plain(raw: Any) -> Any:
    """OmegaConf containers -> plain dicts/lists (resolving interpolations); others unchanged."""
    if type(raw).__module__.startswith("omegaconf"):
        from omegaconf import OmegaConf

        return OmegaConf.to_container(raw, resolve=True)
    return raw


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, where: str) -> Any:
    """Check `value` against the annotation `tp`; return it (ints widen to float, lists to tuples
    where the annotation says tuple, nested mappings to nested dataclasses)."""

    def wrong() -> ConfigError:
        return ConfigError(
            f"{where}: key '{key}' expects {_type_name(tp)}, got {type(value).__name__} ({value!r})"
        )

    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, where)
            except ConfigError:
                continue
        raise wrong()
    if origin is Literal:
        if value in args and type(value) in {type(a) for a in args}:
            return value
        raise ConfigError(f"{where}: key '{key}' must be one of {list(args)}, got {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise wrong()
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise wrong()
            return tuple(
                _coerce(v, a, f"{key}[{i}]", where) for i, (v, a) in enumerate(zip(value, args))
            )
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{key}[{i}]", where) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise wrong()
        key_tp, val_tp = args if args else (Any, Any)
        return {
            _coerce(k, key_tp, f"{key}.<key>", where): _coerce(v, val_tp, f"{key}.{k}", where)
            for k, v in value.items()
        }
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise wrong()
        return validate_dataclass(tp, value, where=f"{where}.{key}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise wrong()
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise wrong()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise wrong()
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise wrong()
    return value  # an annotation we do not check (e.g. a Callable)


def validate_dataclass(config_cls: type, raw: Mapping | None, *, where: str) -> Any:
    """Build `config_cls` (a dataclass with defaults) from `raw`.

    Unknown keys, wrong types and failing value checks (`__post_init__` raising ValueError) become
    a ConfigError that names `where` (e.g. "env 'math'") and the key.
    """
    if raw is None:
        raw = {}
    if isinstance(raw, config_cls):
        return raw
    raw = _to_plain(raw)
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: config must be a mapping, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(config_cls) if f.init}
    unknown = [k for k in raw if k not in fields]
    if unknown:
        raise ConfigError(
            f"{where}: unknown config key '{unknown[0]}'; valid keys: {', '.join(sorted(fields))}"
        )
    hints = typing.get_type_hints(config_cls)
    kwargs = {name: _coerce(value, hints[name], name, where) for name, value in raw.items()}
    missing = [
        name
        for name, f in fields.items()
        if name not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{where}: missing required config key '{missing[0]}'")
    try:
        return config_cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{where}: {e}") from None


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
    def validate_config(cls, raw: Mapping | None) -> Any:
        """Build this env's config dataclass from a mapping; ConfigError names the bad key."""
        return validate_dataclass(cls.config_cls, raw, where=f"env '{cls.name}'")

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
