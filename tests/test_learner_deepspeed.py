"""The DeepSpeed ZeRO-3 learner against the FSDP2 one: same update from the same batch (in one
process, split over micro-batches, and over 2 Ray actors), same metrics, HF export, and resume.
Skipped without the optional deepspeed package, unless CWM_RL_REQUIRE names "deepspeed"."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import require
from rl_utils import make_prompts, rollout

from model import load_pretrained
from model.hf import to_hf_state_dict
from model.loader import ModelSpec
from rl import grpo
from rl.engines.native import NativeEngine
from rl.learner import Learner, LearnerConfig, OptimConfig, learner_class, start_learners

TINY = ModelSpec("preset:tiny")
# DeepSpeed 0.19 calls collectives torch 2.13 has renamed, and torch.jit.script_method
pytestmark = [
    pytest.mark.filterwarnings(f"ignore:`torch.{name}` is deprecated")
    for name in (
        "distributed.all_gather_into_tensor",
        "distributed.reduce_scatter_tensor",
        "jit.script_method",
    )
]


@pytest.fixture(autouse=True)
def needs_deepspeed():
    """The deepspeed extra is optional: skip without it (fail where CWM_RL_REQUIRE names it)."""
    try:
        import deepspeed  # noqa: F401
    except ImportError as e:
        require("deepspeed", False, f"{e}; DS_BUILD_OPS=0 pip install 'cwm-rl[deepspeed]'")


def config(backend: str, **kw) -> LearnerConfig:
    base = dict(
        optim=OptimConfig(lr=1e-3, weight_decay=0.0, grad_clip=0.1),
        loss=grpo.LossConfig(aggregation="token-mean"),
        micro_batch_tokens=64,
        backend=backend,
    )
    base.update(kw)
    return LearnerConfig(**base)


def learner(backend: str, **kw) -> Learner:
    return learner_class(backend)(config(backend, **kw), TINY)


@pytest.fixture(scope="module")
def batch():
    """Real rollouts of the tiny policy (the same initial weights for both backends)."""
    policy = Learner(config("fsdp2"), TINY)
    trajs = rollout(NativeEngine(copy.deepcopy(policy.model)), make_prompts(4, 0), 4, 12, 0, 0)
    return grpo.build_train_batch(trajs, policy.config.loss)


@pytest.fixture
def deepspeed_learner():
    """Builds DeepSpeed learners and shuts them down afterwards (each one initialises a process
    group of one; shutting down destroys it, so the next learner starts afresh)."""
    made: list[Learner] = []

    def make(**kw) -> Learner:
        made.append(learner("deepspeed", **kw))
        return made[-1]

    yield make
    made[-1].shutdown()


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_deepspeed_step_equals_fsdp(batch, deepspeed_learner):
    fsdp = learner("fsdp2", micro_batch_tokens=10_000)  # one micro-batch
    ds = deepspeed_learner(micro_batch_tokens=20)  # one trajectory per micro-batch
    start = ds.hf_state_dict()
    assert max_diff(start, fsdp.hf_state_dict()) == 0.0  # same initial weights
    m_fsdp, m_ds = fsdp.train_step(batch), ds.train_step(batch)
    assert m_ds["micro_batches"] == len(batch.trajectories) and m_fsdp["micro_batches"] == 1
    # Adam's first step is ~lr * sign(grad), blind to a constant gradient scale: the gradient
    # norm is what shows a loss divided again by DeepSpeed's accumulation steps or by ranks
    assert m_ds["grad_norm"] == pytest.approx(m_fsdp["grad_norm"], rel=1e-5)
    assert m_ds["grad_norm"] > 0.1  # so clipping (at 0.1) took part in both
    for key in ("loss", "entropy", "ratio_mean", "logprob_diff_max", "tokens", "lr"):
        assert m_ds[key] == pytest.approx(m_fsdp[key], rel=1e-5, abs=1e-7), key
    after = ds.hf_state_dict()
    assert max_diff(after, fsdp.hf_state_dict()) < 1e-5  # 1% of one step (lr 1e-3)
    assert max_diff(after, start) > 1e-4  # the step changed the weights
    assert all(v.dtype == torch.float32 and v.device.type == "cpu" for v in after.values())


def test_deepspeed_export_and_resume(batch, deepspeed_learner, tmp_path):
    cfg = dict(optim=OptimConfig(lr=1e-3, warmup_steps=2, schedule="cosine", total_steps=6))
    ds = deepspeed_learner(**cfg)
    ds.train_step(batch)
    path = ds.save(str(tmp_path / "ckpt"), extra={"cursor": 1})
    m_straight = ds.train_step(batch)
    straight = ds.hf_state_dict()
    ds.export_hf(str(tmp_path / "hf"))
    model, _ = load_pretrained(tmp_path / "hf")
    assert max_diff(to_hf_state_dict(model.state_dict(), model.config), straight) == 0.0
    ids = torch.randint(0, 256, (1, 20))
    with torch.no_grad():
        assert torch.allclose(model(ids), ds.model(ids), atol=1e-6)
    ds.shutdown()

    resumed = deepspeed_learner(**cfg)
    assert resumed.load(path) == {"cursor": 1} and resumed.step == 1
    m_resumed = resumed.train_step(batch)
    assert max_diff(resumed.hf_state_dict(), straight) == 0.0
    assert m_resumed["lr"] == m_straight["lr"] and m_resumed["grad_norm"] == m_straight["grad_norm"]


def test_deepspeed_logprobs_and_frozen_kl_reference(batch, deepspeed_learner):
    kl = grpo.LossConfig(aggregation="token-mean", kl_estimator="k3", kl_coef=0.1)
    ds = deepspeed_learner(loss=kl)
    lps = ds.compute_logprobs(batch.trajectories)  # the sampler's weights: its log-probs
    diffs = [
        abs(a - b)
        for t, lp in zip(batch.trajectories, lps)
        for a, b, m in zip(t.logprobs, lp, t.loss_mask)
        if m
    ]
    assert len(diffs) == batch.num_sampled_tokens > 0 and max(diffs) < 1e-4
    m1, m2 = ds.train_step(batch), ds.train_step(batch)
    assert m1["kl"] < 1e-8 < m2["kl"]  # equal to the reference at first, then drifting away


def test_deepspeed_two_ranks_equal_fsdp_one_process(batch, request):
    ray_local = request.getfixturevalue("ray_local")  # started only once deepspeed is known here
    fsdp = learner("fsdp2", micro_batch_tokens=40)
    learners = start_learners(config("deepspeed", micro_batch_tokens=40), TINY, world_size=2)
    try:
        metrics = ray_local.get([a.train_step.remote(batch) for a in learners])
        sds = ray_local.get([a.hf_state_dict.remote() for a in learners])
    finally:
        ray_local.get([a.shutdown.remote() for a in learners])
        for a in learners:
            ray_local.kill(a)
    m1 = fsdp.train_step(batch)
    assert sds[1] == {}  # the full state dict lands on rank 0
    assert max_diff(sds[0], fsdp.hf_state_dict()) < 1e-5
    untimed = lambda m: {k: v for k, v in m.items() if not k.endswith("_s")}  # noqa: E731
    assert untimed(metrics[0]) == untimed(metrics[1])  # all reduced over both ranks
    assert metrics[0]["grad_norm"] == pytest.approx(m1["grad_norm"], rel=1e-5)
    assert metrics[0]["loss"] == pytest.approx(m1["loss"], abs=1e-6)
