"""Every shipped config validates; CWM's recipe has CWM's values."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from model import CWM, CWMConfig, save_pretrained
from rl.config import load_config
from rl.schema import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize(
    "name",
    ["tiny_math.yaml", "tiny_code.yaml", "tiny_multitask.yaml", "tiny_swe.yaml", "smoke.yaml"],
)
def test_small_configs_validate(name):
    cfg = load_config(CONFIGS / name)
    assert cfg.envs and cfg.steps >= 1
    # the learner's log-probs are of the distribution the rollouts sample from
    assert cfg.learner.temperature == (cfg.rollout.temperature or 1.0)


def test_cwm_multitask_is_cwm_s_recipe(tmp_path, monkeypatch):
    # the 32B run itself is for a GPU cluster; here its config is validated with a stand-in
    # checkpoint directory (the check only needs config.json) and data paths
    tiny = CWM(CWMConfig.preset("tiny"))
    save_pretrained(tiny, tmp_path / "cwm")
    monkeypatch.setenv("CWM_CHECKPOINT", str(tmp_path / "cwm"))
    monkeypatch.setenv("CWM_DATA", str(tmp_path / "data"))
    cfg = load_config(CONFIGS / "cwm_multitask.yaml")
    loss = cfg.learner.loss
    assert (loss.advantage, loss.kl_estimator, loss.aggregation) == ("mean", "off", "constant")
    assert (loss.eps_low, loss.eps_high, loss.norm_length) == (0.2, 0.25, 131072)
    assert cfg.mode == "async" and cfg.max_lag >= 1 and cfg.rollout.engine == "vllm"
    assert set(cfg.envs) == {"math", "code", "swe"} and cfg.num_learners > 1
    assert cfg.rollout.max_turns >= 64  # agentic SWE episodes
    assert cfg.rollout.gpus >= cfg.rollout.tensor_parallel_size > 1  # 32B over several GPUs
    assert cfg.model.path == str(tmp_path / "cwm")


def test_swe_gym_config_names_swe_gym_images_and_ends_overruns_in_the_env(tmp_path, monkeypatch):
    tiny = CWM(CWMConfig.preset("tiny"))
    save_pretrained(tiny, tmp_path / "cwm")
    monkeypatch.setenv("CWM_CHECKPOINT", str(tmp_path / "cwm"))
    cfg = load_config(CONFIGS / "swe_gym.yaml")
    from envs.swe.env import SWEEnv

    swe = SWEEnv.validate_config(cfg.envs["swe"].config)
    assert (swe.source, swe.image_style, swe.backend) == ("swebench", "swegym", "docker")
    assert swe.memory_mb == 12288 and swe.validate_first > 0 and swe.reasoning
    assert cfg.rollout.episode_timeout_s > swe.episode_timeout_s + swe.scoring_timeout_s
    # the rollout's cut-off (an excluded timeout) may not pre-empt the env's own end
    with pytest.raises(ConfigError, match="rollout.episode_timeout_s.*env 'swe'"):
        load_config(CONFIGS / "swe_gym.yaml", ["rollout.episode_timeout_s=3700"])


def test_the_rollout_timeout_resolves_above_every_env_and_an_explicit_one_is_checked():
    """Left unset, rollout.episode_timeout_s covers the longest episode any env allows (its
    deadline, then scoring); set, it must, or the rollout's cut-off (an excluded timeout) would
    pre-empt the env's own end of an overrunning episode (the agent's failure, trained on)."""
    from envs.swe.env import SWEEnv

    swe = ["envs.swe.config.source=builtin", "envs.swe.config.episode_timeout_s=1000"]
    cfg = load_config(CONFIGS / "tiny_math.yaml", swe)
    longest = SWEEnv.episode_seconds(SWEEnv.validate_config(cfg.envs["swe"].config))
    assert longest >= 1000 + 300 and cfg.rollout.episode_timeout_s > longest
    assert load_config(CONFIGS / "tiny_math.yaml").rollout.episode_timeout_s == 600.0
    with pytest.raises(ConfigError, match="rollout.episode_timeout_s.*env 'swe'"):
        load_config(CONFIGS / "tiny_math.yaml", [*swe, "rollout.episode_timeout_s=1200"])


def test_failures_section_has_run_safe_defaults():
    cfg = load_config(CONFIGS / "smoke.yaml")
    f = cfg.failures
    assert (f.max_error_fraction, f.patience, f.count_timeouts) == (0.5, 3, False)
    cfg = load_config(
        CONFIGS / "smoke.yaml", ["failures.patience=1", "failures.count_timeouts=true"]
    )
    assert cfg.failures.patience == 1 and cfg.failures.count_timeouts


@pytest.mark.parametrize(
    "override, key",
    [
        ("failures.max_error_fraction=1.5", "failures.max_error_fraction"),
        ("failures.max_error_fraction=-0.1", "failures.max_error_fraction"),
        ("failures.patience=0", "failures.patience"),
        ("failures.patience=often", "failures.patience"),
        ("failures.max_errors=3", "failures.max_errors"),
    ],
)
def test_bad_failures_values_fail_at_load_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=f"key '{key}'"):
        load_config(CONFIGS / "smoke.yaml", [override])


def test_every_config_key_has_a_value_rule():
    """A key added to RunConfig without a rule fails here (and a rule for a removed key too)."""
    from rl.config import RULES, leaf_keys

    keys = leaf_keys()
    assert len(keys) > 70
    assert sorted(set(keys) - set(RULES)) == []
    assert sorted(set(RULES) - set(keys)) == []


@pytest.mark.parametrize(
    "override, key",
    [
        ("learner.optim.schedule=linear", "learner.optim.schedule"),
        ("learner.backend=megatron", "learner.backend"),
        ("learner.param_dtype=float16x", "learner.param_dtype"),
        ("learner.param_dtype=fp32", "learner.param_dtype"),
        ("max_lag=-1", "max_lag"),
        ("rollout.temperature=-0.5", "rollout.temperature"),
        ("rollout.temperature=nan", "rollout.temperature"),
        ("rollout.top_p=0", "rollout.top_p"),
        ("rollout.top_p=1.5", "rollout.top_p"),
        ("rollout.top_k=-1", "rollout.top_k"),
        ("rollout.max_new_tokens=300", "rollout.max_new_tokens"),  # max_context is 256
        ("learner.micro_batch_tokens=100", "learner.micro_batch_tokens"),  # < max_context
        ("learner.optim.lr=0", "learner.optim.lr"),
        ("learner.optim.lr=-1e-5", "learner.optim.lr"),
        ("learner.optim.lr=inf", "learner.optim.lr"),
        ("learner.optim.grad_clip=0", "learner.optim.grad_clip"),
        ("learner.optim.betas=[0.9,1.0]", "learner.optim.betas"),
        ("learner.optim.betas=[0.9]", "learner.optim.betas"),
        ("learner.optim.min_lr_ratio=2", "learner.optim.min_lr_ratio"),
        ("learner.optim.eps=0", "learner.optim.eps"),
        ("learner.optim.weight_decay=-0.1", "learner.optim.weight_decay"),
        ("learner.logprob_chunk=0", "learner.logprob_chunk"),
        ("rollout.episode_timeout_s=0", "rollout.episode_timeout_s"),
        ("rollout.threads=0", "rollout.threads"),
        ("learner_threads=0", "learner_threads"),
        ("learner_gpus=-1", "learner_gpus"),
        ("weight_sync.timeout_s=-3", "weight_sync.timeout_s"),
        ("eval.temperature=-1", "eval.temperature"),
        ("eval.num_tasks=-1", "eval.num_tasks"),
        ("eval.max_new_tokens=0", "eval.max_new_tokens"),
        ("eval.max_new_tokens=4096", "eval.max_new_tokens"),
        ("checkpoint.keep=0", "checkpoint.keep"),
        ("checkpoint.every=-1", "checkpoint.every"),
        ("samples_per_step=-1", "samples_per_step"),
        ("max_worker_restarts=-1", "max_worker_restarts"),
        ("max_logprob_diff=-1", "max_logprob_diff"),
        ("model.init_seed=-1", "model.init_seed"),
        ("rollout.resources.GPU=1", "rollout.resources"),  # GPUs: rollout.gpus
        ("rollout.resources.rollout_node=0", "rollout.resources"),
        ("rollout.resources.rollout_node=0.00001", "rollout.resources"),  # Ray's unit: 0.0001
        ("rollout.resources=3", "rollout.resources"),
        ("learner_resources.CPU=2", "learner_resources"),
        ("learner_resources.learner_node=-1", "learner_resources"),
        ("learner_resources.learner_node=many", "learner_resources.learner_node"),
        ("name=../elsewhere", "name"),
        ("name=", "name"),
        ("output_dir=", "output_dir"),
        ("envs.math.weight=0", "envs"),
        ("envs.math.weight=nan", "envs.math.weight"),
        ("learner.optim.warmup_steps=2000", "learner.optim.warmup_steps"),  # cosine below
        ("envs.math.config.difficulty=[1,9]", "envs.math.config"),
        ("envs.math.config.n_trian=5", "envs.math.config.n_trian"),
        ("envs.math.config.prompt=essay", "envs.math.config.prompt"),
        ("envs.math.config=3", "envs.math.config"),
        ("envs.maths.weight=1", "envs.maths"),
        ("logging.wandb.mode=cloud", "logging.wandb.mode"),
        ("logging.wandb.mode=true", "logging.wandb.mode"),
        ("logging.wandb.projet=x", "logging.wandb.projet"),
        ("logging.wandb.project=a/b", "logging.wandb.project"),
        ("logging.wandb.project=", "logging.wandb.project"),
        ("logging.tensorboard=false", "logging.tensorboard"),
    ],
)
def test_config_mistakes_are_named_before_anything_starts(override, key):
    import time

    extra = ["learner.optim.schedule=cosine"] if "warmup_steps" in override else []
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_config(CONFIGS / "tiny_math.yaml", [override, *extra])
    assert time.monotonic() - t0 < 5  # at load, not when a worker meets it


def test_any_integer_seed_is_accepted():
    for seed in (0, -1, 2330, 12345, 2**62, -(2**62)):
        assert load_config(CONFIGS / "tiny_math.yaml", [f"seed={seed}"]).seed == seed


@pytest.mark.parametrize(
    "text, message",
    [
        ("name: [unclosed\n", "is not valid YAML"),
        ("- steps: 3\n", "must hold a mapping of keys"),
        ("steps: ${missing}\n", "key 'steps'"),
        ("stpes: 3\n", "key 'stpes'"),
    ],
)
def test_broken_config_files_name_the_file_or_key(tmp_path, text, message):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(message)) as err:
        load_config(path)
    assert str(path) in str(err.value) or "key '" in str(err.value)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path)  # a directory, not a file


def test_placement_resources_default_to_any_node_and_take_custom_resources():
    cfg = load_config(CONFIGS / "tiny_math.yaml")
    assert cfg.learner_resources == {} and cfg.rollout.resources == {}  # Ray places them
    cfg = load_config(
        CONFIGS / "tiny_math.yaml",
        ["learner_resources.learner_node=1", "rollout.resources.rollout_node=0.5"],
    )
    assert cfg.learner_resources == {"learner_node": 1.0}
    assert cfg.rollout.resources == {"rollout_node": 0.5}
