"""The run config: OmegaConf structured dataclasses, merged from a YAML file and `key=value`
overrides, validated in full before any actor starts (unknown key, wrong type, impossible
combination -> a ConfigError naming the key).

    cfg = load_config("configs/tiny_math.yaml", ["steps=3", "learner.optim.lr=1e-5"])
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from envs import registry
from model.loader import ModelSpec
from rl import grpo, wandb_log
from rl.health import FailuresConfig
from rl.learner import LearnerConfig
from rl.rollout import DEFAULT_EPISODE_TIMEOUT_S, RolloutConfig
from rl.schema import ConfigError, build
from rl.wandb_log import WandbConfig
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
class LoggingConfig:
    # metrics, reward curve, config and provenance to Weights & Biases (rl/wandb_log.py);
    # None: no W&B. metrics.jsonl and TensorBoard are always written (rl/runlog.py)
    wandb: WandbConfig | None = None


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
    num_learners: int = 1  # FSDP ranks (learner.context_parallel_size of them share a row)
    learner_gpus: float = 0.0  # GPUs per learner rank
    learner_threads: int = 1  # torch threads per learner rank (CPU)
    # custom Ray resources each learner rank needs, e.g. {learner_node: 1}: which node(s) of a
    # multi-node cluster run the learner (rollout.resources places the workers); {}: any node
    learner_resources: dict[str, float] = field(default_factory=dict)
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
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    # sync mode: a step whose train/logprob_diff_max (|sampler - learner| log-prob of a trained
    # token, same policy version) exceeds this stops the run: sampler and learner disagree.
    # None: 1e-2 when both compute in fp32, 1.0 when either is bf16 (rl/orchestrator.py); 0: off
    max_logprob_diff: float | None = None


# -- value rules: one per leaf key of RunConfig (tests/test_configs.py checks none is missing) -------

Rule = Callable[[Any], "str | None"]  # value -> what is wrong with it, or None


def _number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def ge(low: float, integer: bool = False) -> Rule:
    kind = "an integer" if integer else "a finite number"
    return lambda x: None if _number(x) and x >= low else f"must be {kind} >= {low}"


def gt(low: float) -> Rule:
    return lambda x: None if _number(x) and x > low else f"must be a finite number > {low}"


def between(low: float, high: float, low_open: bool = False, high_open: bool = False) -> Rule:
    def rule(x: Any) -> str | None:
        ok = _number(x) and (x > low if low_open else x >= low)
        ok = ok and (x < high if high_open else x <= high)
        left, right = "(" if low_open else "[", ")" if high_open else "]"
        return None if ok else f"must be in {left}{low}, {high}{right}"

    return rule


def one_of(*allowed: str) -> Rule:
    return lambda x: None if x in allowed else f"must be one of {', '.join(allowed)}"


def optional(rule: Rule) -> Rule:
    return lambda x: None if x is None else rule(x)


def text(pattern: str | None = None, what: str = "") -> Rule:
    def rule(x: Any) -> str | None:
        if not isinstance(x, str) or not x.strip():
            return "must be a non-empty string"
        if pattern and not re.fullmatch(pattern, x):
            return f"must be {what} (matching {pattern})"
        return None

    return rule


RAY_BUILTIN_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")


def ray_resources(x: Any) -> str | None:
    """Custom Ray resources {name: amount}; CPUs and GPUs have keys of their own (one CPU per
    actor; learner_gpus, rollout.gpus)."""
    for name, amount in x.items():
        if not str(name).strip():
            return "names a resource with an empty name"
        if name in RAY_BUILTIN_RESOURCES:
            return (
                f"names Ray's built-in resource {name!r}: GPUs are set by learner_gpus and "
                f"rollout.gpus, CPUs are one per actor; name custom resources here"
            )
        if not (_number(amount) and amount >= 1e-4):  # Ray counts in units of 0.0001
            return f"must map each resource to an amount >= 0.0001 ({name}: {amount!r})"
    return None


ANY = lambda x: None  # noqa: E731 - the type (checked by OmegaConf) is all there is to check
SEED = lambda x: None if isinstance(x, int) and not isinstance(x, bool) else "must be an integer"  # noqa: E731

RULES: dict[str, Rule] = {
    "name": text(r"[A-Za-z0-9][A-Za-z0-9._=+-]*", "a run directory name"),
    "output_dir": text(),
    "seed": SEED,  # any integer: per-request seeds are hashed from it (rl/tasks.py)
    "model.path": text(),  # and ModelSpec.validate
    "model.overrides": ANY,  # preset fields, checked when the preset is built
    "model.init_seed": between(0, 2**63 - 1),
    "model.tokenizer": optional(text()),
    "mode": one_of("sync", "async"),
    "max_lag": ge(0, integer=True),
    "on_stale": one_of("drop", "requeue"),
    "steps": ge(1, integer=True),
    "groups_per_step": ge(1, integer=True),
    "group_size": ge(1, integer=True),
    "rollout.num_workers": ge(1, integer=True),
    "rollout.engine": one_of("native", "vllm"),
    "rollout.max_new_tokens": ge(1, integer=True),
    "rollout.max_turns": ge(1, integer=True),
    "rollout.max_context": ge(2, integer=True),
    "rollout.temperature": ge(0),
    "rollout.top_p": between(0, 1, low_open=True),
    "rollout.top_k": ge(0, integer=True),
    "rollout.episode_timeout_s": optional(gt(0)),
    "rollout.max_batch": ge(1, integer=True),
    "rollout.continuous_batching": ANY,
    "rollout.reasoning": ANY,
    "rollout.threads": ge(1, integer=True),
    "rollout.gpus": ge(0),
    "rollout.tensor_parallel_size": ge(1, integer=True),
    "rollout.resources": ray_resources,
    "learner.optim.lr": gt(0),
    "learner.optim.betas": lambda x: (
        None
        if len(x) == 2 and all(_number(b) and 0 <= b < 1 for b in x)
        else "must be two numbers in [0, 1)"
    ),
    "learner.optim.weight_decay": ge(0),
    "learner.optim.eps": gt(0),
    "learner.optim.warmup_steps": ge(0, integer=True),
    "learner.optim.schedule": one_of("constant", "cosine"),
    "learner.optim.total_steps": ge(1, integer=True),
    "learner.optim.min_lr_ratio": between(0, 1),
    "learner.optim.grad_clip": gt(0),
    "learner.loss.advantage": one_of(*grpo.ADVANTAGES),
    "learner.loss.std_eps": ge(0),
    "learner.loss.reward_placement": one_of(*grpo.REWARD_PLACEMENTS),
    "learner.loss.filter_zero_advantage_groups": ANY,
    "learner.loss.overlong_max_len": optional(ge(1, integer=True)),
    "learner.loss.overlong_cache_len": ge(0, integer=True),
    "learner.loss.ratio_level": one_of(*grpo.RATIO_LEVELS),
    "learner.loss.eps_low": between(0, 1, high_open=True),
    "learner.loss.eps_high": ge(0),
    "learner.loss.dual_clip": optional(gt(1)),
    "learner.loss.tis_cap": optional(gt(0)),
    "learner.loss.kl_estimator": one_of(*grpo.KL_ESTIMATORS),
    "learner.loss.kl_coef": ge(0),
    "learner.loss.aggregation": one_of(*grpo.AGGREGATIONS),
    "learner.loss.norm_length": ge(1, integer=True),
    "learner.micro_batch_tokens": ge(1, integer=True),
    "learner.temperature": optional(gt(0)),
    "learner.top_k": optional(ge(0, integer=True)),
    "learner.top_p": optional(between(0, 1, low_open=True)),
    "learner.activation_checkpointing": ANY,
    "learner.param_dtype": one_of("auto", "float32", "bfloat16"),
    "learner.logprob_chunk": ge(1, integer=True),
    "learner.backend": one_of("fsdp2", "deepspeed"),
    "learner.context_parallel_size": ge(1, integer=True),
    "num_learners": ge(1, integer=True),
    "learner_gpus": ge(0),
    "learner_threads": ge(1, integer=True),
    "learner_resources": ray_resources,
    "weight_sync.method": one_of("object_store", "collective"),
    "weight_sync.backend": one_of("auto", "gloo", "nccl"),
    "weight_sync.bucket_mb": gt(0),
    "weight_sync.dtype": one_of("auto", "float32", "bfloat16", "float16"),
    "weight_sync.timeout_s": gt(0),
    "eval.every": ge(0, integer=True),
    "eval.num_tasks": ge(0, integer=True),
    "eval.samples": ge(1, integer=True),
    "eval.temperature": ge(0),
    "eval.max_new_tokens": optional(ge(1, integer=True)),
    "checkpoint.every": ge(0, integer=True),
    "checkpoint.keep": ge(1, integer=True),
    "checkpoint.export_hf": ANY,
    "samples_per_step": ge(0, integer=True),
    "save_trajectories": ANY,
    "max_worker_restarts": ge(0, integer=True),
    "failures.max_error_fraction": between(0, 1, low_open=True),
    "failures.patience": ge(1, integer=True),
    "failures.count_timeouts": ANY,
    "progress": ANY,
    "logging.wandb.project": text(r"[^/\\#?%:]{1,128}", "a W&B project name"),
    "logging.wandb.entity": optional(text()),
    "logging.wandb.mode": one_of("online", "offline", "disabled"),
    "max_logprob_diff": optional(ge(0)),
}


def leaf_keys(cls: type = None, prefix: str = "") -> list[str]:
    """Dotted keys of every leaf field of the RunConfig dataclass tree, optional sections' too
    (envs excluded: each env validates its own section)."""
    cls = cls or RunConfig
    hints = typing.get_type_hints(cls)
    keys = []
    for f in dataclasses.fields(cls):
        if prefix == "" and f.name == "envs":
            continue
        section = _section(hints[f.name])
        if section is not None:
            keys += leaf_keys(section, f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


def _section(hint: Any) -> type | None:
    """The dataclass of a section field, `X` or `X | None`; None for a leaf."""
    if dataclasses.is_dataclass(hint):
        return hint
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if len(args) == 1 and dataclasses.is_dataclass(args[0]) else None


UNSET = object()  # the value of a key inside an optional section left out (logging.wandb: None)


def _value(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        if cfg is None:
            return UNSET
        cfg = getattr(cfg, part)
    return cfg


def resolve(cfg: RunConfig) -> RunConfig:
    """Derived values, set before validation: the learner's log-probs are those of the
    distribution the sampler draws from (temperature; greedy rollouts report plain log-softmax,
    i.e. temperature 1), truncated as the sampler truncates (top_k, top_p); the rollout's
    episode timeout above every environment's own limits. Explicit values that differ are left
    for _check."""
    r, learner = cfg.rollout, cfg.learner
    greedy = r.temperature == 0  # greedy rollouts report the plain log-softmax
    if learner.temperature is None:
        learner.temperature = 1.0 if greedy else r.temperature
    if learner.top_k is None:
        learner.top_k = 0 if greedy else r.top_k
    if learner.top_p is None:
        learner.top_p = 1.0 if greedy else r.top_p
    if r.episode_timeout_s is None:  # the rollout's safety net above every env's own end
        longest = [s for s in (_episode_seconds(n, sec) for n, sec in cfg.envs.items()) if s]
        r.episode_timeout_s = max([DEFAULT_EPISODE_TIMEOUT_S] + [s + 60.0 for s in longest])
    return cfg


def _episode_seconds(name: str, section: EnvSection) -> float | None:
    """How long an episode of env `name` may take by its own limits (None: unknown or unset;
    an invalid section is left for _check to name)."""
    try:
        env_cls = registry.get(name)
        return env_cls.episode_seconds(env_cls.validate_config(section.config))
    except (KeyError, ConfigError):
        return None


def _check(cfg: RunConfig) -> None:
    """Every leaf against its rule, then the cross-field checks; each error names its key."""
    for key in leaf_keys():
        value = _value(cfg, key)
        problem = None if value is UNSET else RULES[key](value)
        if problem:
            raise ConfigError(f"key '{key}' {problem}, got {value!r}")
    wandb = cfg.logging.wandb
    if wandb is not None and wandb.mode != "disabled" and not wandb_log.installed():
        raise ConfigError(
            f"key 'logging.wandb' is set (mode {wandb.mode}) but the wandb package is not "
            f"installed: {wandb_log.INSTALL_HINT}; or remove logging.wandb"
        )
    cp = cfg.learner.context_parallel_size
    if cfg.num_learners % cp:
        raise ConfigError(
            f"key 'learner.context_parallel_size' is {cp}, which does not divide "
            f"num_learners={cfg.num_learners} (each context-parallel group is {cp} learner ranks)"
        )
    if cp > 1 and cfg.learner.backend != "fsdp2":
        raise ConfigError(
            f"key 'learner.context_parallel_size' is {cp} but learner.backend is "
            f"{cfg.learner.backend!r}: context parallelism is implemented for fsdp2 only"
        )
    if cfg.mode == "async" and cfg.max_lag < 1:
        raise ConfigError("key 'max_lag' must be >= 1 in async mode (0 is sync mode)")
    r, learner = cfg.rollout, cfg.learner
    if r.max_new_tokens >= r.max_context:
        raise ConfigError(
            f"key 'rollout.max_new_tokens' is {r.max_new_tokens} but an episode holds at most "
            f"rollout.max_context={r.max_context} tokens, prompt included"
        )
    if learner.micro_batch_tokens < r.max_context:
        raise ConfigError(
            f"key 'learner.micro_batch_tokens' is {learner.micro_batch_tokens}, less than one "
            f"episode may hold (rollout.max_context={r.max_context}): an episode is never split "
            f"across micro-batches, so the budget would not hold; raise it to >= {r.max_context}"
        )
    if cfg.eval.max_new_tokens is not None and cfg.eval.max_new_tokens >= r.max_context:
        raise ConfigError(
            f"key 'eval.max_new_tokens' is {cfg.eval.max_new_tokens}, not below "
            f"rollout.max_context={r.max_context}"
        )
    if learner.optim.warmup_steps > 0 and learner.optim.schedule == "cosine":
        if learner.optim.warmup_steps >= learner.optim.total_steps:
            raise ConfigError(
                f"key 'learner.optim.warmup_steps' ({learner.optim.warmup_steps}) must be below "
                f"learner.optim.total_steps ({learner.optim.total_steps}) with the cosine schedule"
            )
    # the learner's log-probs must be those of the distribution the sampler drew from, or every
    # importance ratio is off
    sampler = resolve(RunConfig(rollout=r)).learner  # what rollout's settings resolve to
    for key in ("temperature", "top_k", "top_p"):
        if getattr(learner, key) != getattr(sampler, key):
            raise ConfigError(
                f"key 'learner.{key}' is {getattr(learner, key)} but the rollouts sample with "
                f"{key} {getattr(sampler, key)} (rollout.temperature={r.temperature}, "
                f"rollout.top_k={r.top_k}, rollout.top_p={r.top_p}): the learner's log-probs "
                f"must be those of the sampling distribution (leave learner.{key} unset to follow "
                f"rollout)"
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
        problem = ge(0)(section.weight)
        if problem:
            raise ConfigError(f"key 'envs.{name}.weight' {problem}, got {section.weight!r}")
        try:
            env_cls = registry.get(name)
        except KeyError as e:
            raise ConfigError(f"key 'envs.{name}': {e.args[0]}") from None
        env_config = env_cls.validate_config(section.config)
        longest = env_cls.episode_seconds(env_config)
        if longest is not None and r.episode_timeout_s <= longest:
            raise ConfigError(
                f"key 'rollout.episode_timeout_s' is {r.episode_timeout_s:g} s but an episode of "
                f"env '{name}' may take {longest:g} s by its own limits (its deadline, then "
                f"scoring): the rollout would cut it off as an excluded timeout instead of the "
                f"env ending it as the agent's failure; raise it above {longest:g}"
            )
    if not any(section.weight > 0 for section in cfg.envs.values()):
        raise ConfigError("key 'envs': every environment has weight 0, nothing would be sampled")
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
    """YAML file (optional) + dotted overrides -> a validated RunConfig, in three explicit steps:
    merge onto the schema (types, unknown keys), `resolve` derived values, `_check` every rule."""
    parts: list[DictConfig] = []
    if path is not None:
        parts.append(_read_yaml(path))
    if overrides:
        parts.append(_read_overrides(overrides))
    cfg = build(RunConfig, *parts)
    _check(resolve(cfg))
    return cfg


def _read_yaml(path: str | os.PathLike) -> DictConfig:
    if not Path(path).is_file():
        raise ConfigError(f"config file {path} does not exist (or is not a file)")
    try:
        loaded = OmegaConf.load(path)
    except (yaml.YAMLError, OmegaConfBaseException, UnicodeDecodeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"config file {path} is not valid YAML: {first}") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(
            f"config file {path} must hold a mapping of keys (name: ..., envs: ...), "
            f"got a {type(loaded).__name__}"
        )
    return loaded


def _read_overrides(overrides: list[str]) -> DictConfig:
    bad = [o for o in overrides if "=" not in o or not o.split("=", 1)[0].strip()]
    if bad:
        raise ConfigError(f"override {bad[0]!r} is not key=value")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except (yaml.YAMLError, OmegaConfBaseException) as e:
        raise ConfigError(f"overrides {overrides}: {str(e).splitlines()[0]}") from None


def to_yaml(cfg: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    """The config as plain nested dicts and lists (what config.yaml holds)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg))


def from_yaml_file(path: str | os.PathLike) -> RunConfig:
    """Reload a resolved config.yaml written by a run (validated again)."""
    return load_config(path)
