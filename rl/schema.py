"""How a config becomes typed: one structured-config merge for the run config (rl/config.py)
and every environment's section (envs/base.py), and the one error they raise.

A config class is a dataclass with defaults. `build` merges mappings onto its OmegaConf schema and
returns an instance, so unknown keys, wrong types (OmegaConf's rules: "7" may become 7, 2.5 may
not), `Literal` choices and the class's own `__post_init__` checks all fail the same way: a
ConfigError that names the key. Imports nothing of the project, so any layer may use it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

T = TypeVar("T")


class ConfigError(ValueError):
    """A config is invalid: unknown key, wrong type or impossible value. The message names the
    key."""


def build(cls: type[T], *parts: Any, where: str = "") -> T:
    """An instance of `cls` from its defaults overlaid by `parts` (mappings, DictConfigs or
    `cls` instances; None is skipped). `where` prefixes the keys in errors: "envs.math.config"
    makes a bad `seed` "key 'envs.math.config.seed'"; a failed `__post_init__` check reads
    "envs.math.config: <its message>" (it names its key itself; nested classes' checks cannot
    know their path)."""
    for part in parts:
        if part is not None and not isinstance(part, Mapping | DictConfig | cls):
            raise ConfigError(
                f"{where or cls.__name__}: a config must be a mapping, got {type(part).__name__}"
            )
    try:
        merged = OmegaConf.merge(OmegaConf.structured(cls), *(p for p in parts if p is not None))
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        message = str(e).splitlines()[0]
        key = getattr(e, "full_key", None)
        node_cls = getattr(e, "object_type", None)
        if isinstance(e, ConfigKeyError) and dataclasses.is_dataclass(node_cls):
            valid = sorted(f.name for f in dataclasses.fields(node_cls) if f.init)
            message += f" (valid keys: {', '.join(valid)})"
        if key:
            raise ConfigError(f"key '{f'{where}.{key}' if where else key}': {message}") from None
        raise ConfigError(f"{where}: {message}" if where else message) from None
    except (ValueError, TypeError) as e:  # a __post_init__ check (ConfigError is a ValueError)
        raise ConfigError(f"{where}: {e}" if where else str(e)) from None
