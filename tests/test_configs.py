"""Every shipped config validates; CWM's recipe has CWM's values."""

from __future__ import annotations

from pathlib import Path

import pytest

from envs.base import ConfigError
from model import CWM, CWMConfig, save_pretrained
from rl.config import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize(
    "name", ["tiny_math.yaml", "tiny_code.yaml", "tiny_swe.yaml", "smoke.yaml"]
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
