"""The environment registry (built-ins, register(), real entry points) and config validation."""

from __future__ import annotations

import asyncio
import importlib
import sys
import textwrap
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
from omegaconf import OmegaConf

from envs import registry
from envs.base import Environment, StepResult, Task, require_config
from envs.math import MathConfig, MathEnv
from rl.config import load_config
from rl.schema import ConfigError, build


@dataclass
class _EchoConfig:
    reward: float = 1.0


class _EchoEnv(Environment):
    name = "echo-test"
    config_cls = _EchoConfig

    def load_tasks(self, split: str) -> list[Task]:
        return [Task(id="e-0", env=self.name, payload={"text": "hi"}, split=split)]

    async def reset(self, task: Task):
        return [{"role": "user", "content": task.payload["text"]}]

    async def step(self, assistant_text: str) -> StepResult:
        return StepResult(messages=[], done=True, reward=self.config.reward)


@pytest.fixture
def registered_echo():
    registry.register("echo-test", _EchoEnv)
    yield _EchoEnv
    registry.unregister("echo-test")


def test_builtin_math_is_found_lazily():
    assert "math" in registry.available()
    assert registry.get("math") is MathEnv


def test_unknown_name_lists_known_names(registered_echo):
    with pytest.raises(registry.RegistryError) as err:
        registry.get("maths")
    message = str(err.value)
    assert "unknown environment 'maths'" in message
    assert "math" in message and "echo-test" in message


def test_register_get_and_duplicates(registered_echo):
    assert registry.get("echo-test") is _EchoEnv
    assert "echo-test" in registry.available()
    with pytest.raises(registry.RegistryError, match="already registered"):
        registry.register("echo-test", _EchoEnv)
    with pytest.raises(registry.RegistryError, match="already registered"):
        registry.register("math", _EchoEnv)  # a built-in name is reserved


def test_register_rejects_non_environments():
    with pytest.raises(registry.RegistryError, match="not an Environment subclass"):
        registry.register("not-an-env", dict)  # type: ignore[arg-type]
    assert "not-an-env" not in registry.available()


def _write_distribution(root: Path, dist: str, entry_points: str) -> None:
    """A minimal installed distribution: NAME-VERSION.dist-info with METADATA and entry_points."""
    info = root / f"{dist}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(entry_points)


@pytest.fixture
def plugin_dir(tmp_path, monkeypatch):
    """A temp dir on sys.path holding a real env module; its distributions are added per test."""
    module = f"cwm_rl_plugin_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{module}.py").write_text(
        textwrap.dedent(
            """
            from dataclasses import dataclass
            from envs.base import Environment, StepResult, Task

            @dataclass
            class CountConfig:
                target: int = 3

            class CountEnv(Environment):
                name = "count"
                config_cls = CountConfig

                def load_tasks(self, split):
                    return [Task(id="c-0", env=self.name, payload={}, split=split)]

                async def reset(self, task):
                    return [{"role": "user", "content": f"Say {self.config.target}."}]

                async def step(self, assistant_text):
                    ok = assistant_text.strip() == str(self.config.target)
                    return StepResult(messages=[], done=True, reward=1.0 if ok else 0.0)
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    yield tmp_path, module
    sys.modules.pop(module, None)


def test_entry_point_plugin_is_discovered_and_runs(plugin_dir):
    root, module = plugin_dir
    _write_distribution(root, "cwm_rl_count_plugin", f"[cwm_rl.envs]\ncount = {module}:CountEnv\n")
    assert "count" in registry.available()
    env_cls = registry.get("count")
    assert env_cls.__module__ == module and env_cls.__name__ == "CountEnv"

    env = env_cls(env_cls.validate_config({"target": 5}))
    task = env.load_tasks("train")[0]

    async def episode(text: str) -> float | None:
        messages = await env.reset(task)
        assert messages == [{"role": "user", "content": "Say 5."}]
        return (await env.step(text)).reward

    assert asyncio.run(episode("5")) == 1.0
    assert asyncio.run(episode("4")) == 0.0
    with pytest.raises(ConfigError, match="envs.count.config.targt"):
        env_cls.validate_config({"targt": 5})


def test_entry_point_clashing_with_builtin_is_an_error(plugin_dir):
    root, module = plugin_dir
    _write_distribution(root, "cwm_rl_clash_plugin", f"[cwm_rl.envs]\nmath = {module}:CountEnv\n")
    with pytest.raises(registry.RegistryError, match="'math'.*clashes with builtin"):
        registry.available()


def test_two_distributions_declaring_one_name_is_an_error(plugin_dir):
    root, module = plugin_dir
    _write_distribution(root, "cwm_rl_plugin_a", f"[cwm_rl.envs]\ncount = {module}:CountEnv\n")
    _write_distribution(root, "cwm_rl_plugin_b", f"[cwm_rl.envs]\ncount = {module}:Other\n")
    with pytest.raises(registry.RegistryError, match="'count' is declared by two"):
        registry.get("count")


def test_broken_entry_point_names_itself(plugin_dir):
    root, _ = plugin_dir
    _write_distribution(root, "cwm_rl_broken_plugin", "[cwm_rl.envs]\nbroken = no_such_mod:Env\n")
    with pytest.raises(registry.RegistryError, match="'broken'.*no_such_mod:Env.*failed to load"):
        registry.get("broken")


# ---------------------------------------------------------------------------------------------
# Config validation


def test_unknown_key_names_key_env_and_valid_keys():
    with pytest.raises(ConfigError) as err:
        MathEnv.validate_config({"difficulty_level": 2})
    message = str(err.value)
    assert message.startswith("key 'envs.math.config.difficulty_level'")
    assert "valid keys:" in message and "difficulty" in message and "seed" in message


def test_wrong_type_names_key_expected_and_got():
    """OmegaConf's rules, as for every key of the run config: "7" may become 7, "x" may not."""
    with pytest.raises(ConfigError) as err:
        MathEnv.validate_config({"seed": "x"})
    assert str(err.value) == (
        "key 'envs.math.config.seed': Value 'x' of type 'str' could not be converted to Integer"
    )
    with pytest.raises(ConfigError, match="key 'envs.math.config.seed'.*'2.5'"):
        MathEnv.validate_config({"seed": 2.5})
    with pytest.raises(ConfigError, match="key 'envs.math.config.reasoning'.*not a valid bool"):
        MathEnv.validate_config({"reasoning": "maybe"})
    with pytest.raises(
        ConfigError,
        match=r"key 'envs.math.config.source'.*expected one of \['arithmetic', 'jsonl', 'hf'\]",
    ):
        MathEnv.validate_config({"source": "csv"})
    with pytest.raises(ConfigError, match="key 'envs.math.config.difficulty'.*incompatible"):
        MathEnv.validate_config({"difficulty": [1, "a"]})
    with pytest.raises(ConfigError, match="envs.math.config: a config must be a mapping, got list"):
        MathEnv.validate_config([1, 2])  # type: ignore[arg-type]


def test_value_checks_name_the_key():
    with pytest.raises(ConfigError, match="envs.math.config: key 'difficulty' must be a level"):
        MathEnv.validate_config({"difficulty": 7})
    with pytest.raises(ConfigError, match="key 'path' is required when source is 'jsonl'"):
        MathEnv.validate_config({"source": "jsonl"})
    with pytest.raises(ConfigError, match="key 'max_attempts' must be >= 1"):
        MathEnv.validate_config({"max_attempts": 0})


def test_env_sections_fail_in_load_config_with_the_run_configs_key():
    """The env section goes through the run config's path: load_config names the full key."""
    for override, match in [
        ("envs.math.config.seed=x", r"key 'envs\.math\.config\.seed'"),
        ("envs.math.config.sed=1", r"key 'envs\.math\.config\.sed'.*Did you mean"),
        ("envs.math.config.prompt=essay", r"key 'envs\.math\.config\.prompt'"),
        ("envs.math.config.difficulty=9", r"envs\.math\.config: key 'difficulty'"),
    ]:
        with pytest.raises(ConfigError, match=match):
            load_config("configs/tiny_math.yaml", [override])


def test_omegaconf_section_is_accepted_and_ints_widen_to_float():
    section = OmegaConf.create({"difficulty": [1, 2], "seed": 3, "timeout_s": 2})
    config = MathEnv.validate_config(section)
    assert isinstance(config, MathConfig)
    assert config.difficulty == [1, 2] and config.seed == 3
    assert config.timeout_s == 2.0 and isinstance(config.timeout_s, float)
    assert MathEnv.validate_config(None) == MathConfig()


@dataclass
class _Inner:
    weight: float = 1.0

    def __post_init__(self) -> None:
        require_config(self.weight >= 0, "weight", f"must be >= 0, got {self.weight}")


@dataclass
class _Outer:
    mode: Literal["a", "b"] = "a"
    weights: dict[str, float] = field(default_factory=dict)
    sizes: list[int] = field(default_factory=list)
    inner: _Inner = field(default_factory=_Inner)
    label: str | None = None


def test_build_nested_containers_and_value_checks():
    config = build(
        _Outer,
        {"mode": "b", "weights": {"math": 2}, "sizes": [1, 2], "inner": {"weight": 0.5}},
        where="test",
    )
    assert config == _Outer(mode="b", weights={"math": 2.0}, sizes=[1, 2], inner=_Inner(0.5))
    assert isinstance(config.weights["math"], float)
    with pytest.raises(ConfigError, match=r"key 'test\.weights\.math'.*'x'.*Float"):
        build(_Outer, {"weights": {"math": "x"}}, where="test")
    with pytest.raises(ConfigError, match=r"key 'test\.sizes\[1\]'.*'2\.5'.*Integer"):
        build(_Outer, {"sizes": [1, 2.5]}, where="test")
    with pytest.raises(ConfigError, match=r"test: key 'weight' must be >= 0, got -1"):
        build(_Outer, {"inner": {"weight": -1}}, where="test")
    with pytest.raises(ConfigError, match=r"key 'test\.inner\.wieght'.*valid keys: weight"):
        build(_Outer, {"inner": {"wieght": 1}}, where="test")
    with pytest.raises(ConfigError, match=r"key 'test\.mode'.*expected one of \['a', 'b'\]"):
        build(_Outer, {"mode": "c"}, where="test")
    assert build(_Outer, None, {"label": "x"}).label == "x"  # parts overlay in order
