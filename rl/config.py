"""The run config: OmegaConf structured dataclasses, merged from a YAML file and `key=value`
overrides, validated in full before any actor starts (unknown key, wrong type, impossible
combination -> a ConfigError naming the key).

    cfg = load_config("configs/tiny_math.yaml", ["steps=3", "learner.optim.lr=1e-5"])
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from envs import registry
from envs.base import ConfigError
from model.loader import ModelSpec
from rl.health import FailuresConfig
from rl.learner import LearnerConfig
from rl.rollout import RolloutConfig
from rl.weights import WeightSyncConfig


@dataclass
class EnvSection:
    weight: float = 1.0  # mixing weight among the run's environments
    config: dict[str, Any] = field(default_factory=dict)  # the env's own config (validated by it)


@dataclass
class EvalConfig:
    every: int = 0  # evaluate every N steps (0: only before and after training)
    num_tasks: int = 64  # held-out tasks per environment (0: all)
    samples: int = 1  # k of pass@k (pass@1 is always reported)
    temperature: float = 0.0  # 0: greedy pass@1; > 0 needed for pass@k with k > 1
    max_new_tokens: int | None = None  # default: rollout.max_new_tokens


@dataclass
class CheckpointConfig:
    every: int = 0  # steps between checkpoints (0: only at the end)
    keep: int = 2  # newest checkpoints kept
    export_hf: bool = True  # write an HF export of the final policy


@dataclass
class RunConfig:
    name: str = "run"
    output_dir: str = "runs"
    seed: int = 0
    model: ModelSpec = field(default_factory=ModelSpec)
    envs: dict[str, EnvSection] = field(default_factory=dict)
    mode: str = "sync"  # sync (exactly on-policy) | async (overlap, bounded by max_lag)
    max_lag: int = 1  # async: max policy versions between sampling and training a token
    on_stale: str = "drop"  # drop | requeue
    steps: int = 10
    groups_per_step: int = 8  # tasks per learner step
    group_size: int = 8  # G samples per task
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    num_learners: int = 1  # FSDP ranks
    learner_gpus: float = 0.0  # GPUs per learner rank
    learner_threads: int = 1  # torch threads per learner rank (CPU)
    weight_sync: WeightSyncConfig = field(default_factory=WeightSyncConfig)  # rl/weights.py
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    samples_per_step: int = 2  # trajectories written to samples.jsonl per step
    # every trained trajectory (token ids, loss mask, behaviour log-probs, versions, reward,
    # status), step by step, to trajectories.jsonl: for debugging and for replaying a run's
    # batches through another trainer (benchmarks/peer_trl.py --replay)
    save_trajectories: bool = False
    max_worker_restarts: int = 10  # rollout workers restarted after a crash before giving up
    failures: FailuresConfig = field(default_factory=FailuresConfig)  # rl/health.py
    progress: bool = True  # a progress bar on stderr
    # sync mode: a step whose train/logprob_diff_max (|sampler - learner| log-prob of a trained
    # token, same policy version) exceeds this stops the run: sampler and learner disagree.
    # None: 1e-2 when both compute in fp32, 1.0 when either is bf16 (rl/orchestrator.py); 0: off
    max_logprob_diff: float | None = None


def _check(cfg: RunConfig) -> None:
    """Cross-field checks the types cannot express; each error names its key."""
    if cfg.mode not in ("sync", "async"):
        raise ConfigError(f"key 'mode' must be sync or async, got {cfg.mode!r}")
    if cfg.mode == "async" and cfg.max_lag < 1:
        raise ConfigError("key 'max_lag' must be >= 1 in async mode (0 is sync mode)")
    if cfg.on_stale not in ("drop", "requeue"):
        raise ConfigError(f"key 'on_stale' must be drop or requeue, got {cfg.on_stale!r}")
    for key in ("steps", "groups_per_step", "group_size", "num_learners"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"key '{key}' must be >= 1, got {getattr(cfg, key)}")
    # the learner's log-probs must be those of the distribution the sampler drew from (greedy
    # rollouts report plain log-softmax, i.e. temperature 1), or every importance ratio is off
    sampler_t = cfg.rollout.temperature if cfg.rollout.temperature > 0 else 1.0
    if cfg.learner.temperature is None:
        cfg.learner.temperature = sampler_t
    elif cfg.learner.temperature != sampler_t:
        raise ConfigError(
            f"key 'learner.temperature' is {cfg.learner.temperature} but rollout.temperature "
            f"samples at {cfg.rollout.temperature}: the learner's log-probs must be those of the "
            f"sampling distribution (leave learner.temperature unset to follow rollout)"
        )
    if cfg.max_logprob_diff is not None and not cfg.max_logprob_diff >= 0:
        raise ConfigError(
            f"key 'max_logprob_diff' must be >= 0 (0: no check), got {cfg.max_logprob_diff}"
        )
    ws = cfg.weight_sync
    if (
        ws.method == "collective"
        and ws.backend == "nccl"
        and not (cfg.learner_gpus > 0 and cfg.rollout.gpus > 0)
    ):
        raise ConfigError(
            "key 'weight_sync.backend' is nccl but learner_gpus and rollout.gpus are not both > 0"
            " (NCCL broadcasts between GPUs; use gloo or auto)"
        )
    if not cfg.envs:
        raise ConfigError("key 'envs' is empty: name at least one environment")
    if cfg.group_size == 1 and cfg.learner.loss.advantage in ("mean", "std"):
        raise ConfigError(
            "key 'group_size' is 1: group-relative advantages are all 0; use group_size >= 2"
        )
    if cfg.eval.samples > 1 and cfg.eval.temperature == 0:
        raise ConfigError("key 'eval.samples' > 1 needs eval.temperature > 0 (greedy repeats)")
    for name, section in cfg.envs.items():
        if section.weight < 0:
            raise ConfigError(f"key 'envs.{name}.weight' must be >= 0, got {section.weight}")
        try:
            env_cls = registry.get(name)
        except KeyError as e:
            raise ConfigError(f"key 'envs.{name}': {e.args[0]}") from None
        env_cls.validate_config(section.config)
    try:
        cfg.model.validate()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.model.path.startswith("preset:") and not cfg.model.tokenizer:
        raise ConfigError(
            "key 'model.tokenizer' is needed with a preset model (environments speak text): "
            "'default' or a directory"
        )


def load_config(
    path: str | os.PathLike | None = None, overrides: list[str] | None = None
) -> RunConfig:
    """YAML file (optional) + dotted overrides -> a validated RunConfig."""
    schema = OmegaConf.structured(RunConfig)
    try:
        parts: list[DictConfig] = [schema]
        if path is not None:
            if not Path(path).exists():
                raise ConfigError(f"config file {path} does not exist")
            parts.append(OmegaConf.load(path))
        if overrides:
            bad = [o for o in overrides if "=" not in o]
            if bad:
                raise ConfigError(f"override {bad[0]!r} is not key=value")
            parts.append(OmegaConf.from_dotlist(list(overrides)))
        merged = OmegaConf.merge(*parts)
        cfg: RunConfig = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        msg = str(e).splitlines()[0]
        raise ConfigError(f"key '{key}': {msg}" if key else msg) from None
    except (ValueError, TypeError) as e:  # dataclass __post_init__ checks
        raise ConfigError(str(e)) from None
    _check(cfg)
    return cfg


def to_yaml(cfg: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def from_yaml_file(path: str | os.PathLike) -> RunConfig:
    """Reload a resolved config.yaml written by a run (validated again)."""
    return load_config(path)
