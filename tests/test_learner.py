"""The learner: split-independent accumulation, FSDP2 over 2 Ray actors equals 1 process, log-probs
equal the engine's, exact resume from a checkpoint, HF export, and GRPO alone raising the reward."""

from __future__ import annotations

import copy

import torch
from rl_utils import make_prompts, rollout

from model import load_pretrained
from model.loader import ModelSpec
from rl import grpo
from rl.engines.native import NativeEngine
from rl.learner import (
    Learner,
    LearnerConfig,
    OptimConfig,
    lr_lambda,
    start_learners,
    token_logprobs,
)
from rl.types import Trajectory

TINY = ModelSpec("preset:tiny")


def config(**kw) -> LearnerConfig:
    base = dict(
        optim=OptimConfig(lr=1e-3, weight_decay=0.0, grad_clip=1.0),
        loss=grpo.LossConfig(aggregation="token-mean"),
        micro_batch_tokens=64,
    )
    base.update(kw)
    return LearnerConfig(**base)


def engine_for(learner: Learner) -> NativeEngine:
    engine = NativeEngine(copy.deepcopy(learner.model))
    return engine


def batch_from(learner: Learner, seed: int = 0, step: int = 0):
    trajs = rollout(engine_for(learner), make_prompts(4, seed), 4, 12, seed, step)
    return grpo.build_train_batch(trajs, learner.config.loss)


def weights(learner_or_sd) -> dict[str, torch.Tensor]:
    sd = learner_or_sd if isinstance(learner_or_sd, dict) else learner_or_sd.hf_state_dict()
    return {k: v.clone() for k, v in sd.items()}


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_update_does_not_depend_on_micro_batch_split():
    ref = Learner(config(micro_batch_tokens=10_000), TINY)  # one micro-batch
    batch = batch_from(ref)
    split = Learner(config(micro_batch_tokens=20), TINY)  # one trajectory per micro-batch
    start = weights(ref)
    m1, m2 = ref.train_step(batch), split.train_step(batch)
    assert m1["micro_batches"] == 1 and m2["micro_batches"] == len(batch.trajectories)
    assert abs(m1["loss"] - m2["loss"]) < 1e-6
    # Adam's first step is ~lr * sign(grad): fp32 summation-order noise on near-zero gradients
    # shows up as a small fraction of lr (1e-3), so the tolerance is 1% of one step
    assert max_diff(weights(ref), weights(split)) < 1e-5
    assert max_diff(weights(ref), start) > 1e-4  # the step did change the weights


def test_learner_logprobs_equal_the_engine_s():
    learner = Learner(config(), TINY)
    engine = engine_for(learner)
    trajs = rollout(engine, make_prompts(3, 1), 2, 10, 1, 0)
    lps = learner.compute_logprobs(trajs)
    diffs = [
        abs(a - b) for t, lp in zip(trajs, lps) for a, b, m in zip(t.logprobs, lp, t.loss_mask) if m
    ]
    assert len(diffs) == 60 and max(diffs) < 1e-4


def test_learner_logprobs_follow_the_sampler_s_top_k_top_p():
    """With top-k / top-p the engine samples from (and reports log-probs of) the truncated,
    renormalised distribution; the learner computes the same, so on-policy ratios are 1. A
    learner that ignored the truncation would be off by the dropped mass (checked too)."""
    engine = engine_for(Learner(config(), TINY))
    for top_k, top_p in ((50, 1.0), (0, 0.9), (50, 0.9)):
        trajs = rollout(engine, make_prompts(3, 2), 2, 10, 2, 0, 0.8, top_k, top_p)

        def diffs(learner: Learner, trajs=trajs) -> list[float]:
            lps = learner.compute_logprobs(trajs)
            return [
                abs(a - b)
                for t, lp in zip(trajs, lps)
                for a, b, m in zip(t.logprobs, lp, t.loss_mask)
                if m
            ]

        same = Learner(config(temperature=0.8, top_k=top_k, top_p=top_p), TINY)
        assert len(diffs(same)) == 60 and max(diffs(same)) < 1e-4, (top_k, top_p)
        full = Learner(config(temperature=0.8), TINY)
        assert max(diffs(full)) > 1e-2, (top_k, top_p)


def test_output_layer_on_selected_positions_equals_the_full_one():
    """The learner runs lm_head only where the loss reads (sampled tokens): log-probs, entropies
    and the gradient they carry equal the full head's there, 0 elsewhere; chunked + recomputed
    (several chunks) equals one chunk."""
    learner = Learner(config(), TINY)
    mb = learner._micro_batches(batch_from(learner).trajectories)[0]
    where = mb.loss_mask[0].nonzero()[:, 0]
    assert 0 < where.numel() < mb.num_tokens

    def run(positions, chunk):
        learner.model.zero_grad(set_to_none=True)
        lp, ent = token_logprobs(learner.model, mb, 0.7, chunk, positions)
        (lp * mb.loss_mask[0]).sum().backward()
        grads = {n: p.grad.clone() for n, p in learner.model.named_parameters()}
        return lp.detach(), ent.detach(), grads

    full_lp, full_ent, full_g = run(None, 10_000)
    for chunk in (10_000, 3):  # one chunk; several (checkpointed)
        lp, ent, g = run(where, chunk)
        assert torch.allclose(lp[where], full_lp[where], atol=1e-6)
        assert torch.allclose(ent[where], full_ent[where], atol=1e-5)
        outside = torch.ones_like(mb.loss_mask[0])
        outside[where] = False
        assert lp[outside].abs().max() == 0 and ent[outside].abs().max() == 0
        scale = max(full_g[n].abs().max().item() for n in g)  # fp32 summation-order noise
        assert max((g[n] - full_g[n]).abs().max().item() for n in g) < 1e-6 * scale


def test_a_batch_without_sampled_tokens_is_reported_not_trained():
    learner = Learner(config(), TINY)
    before = weights(learner)
    trajs = [
        Trajectory("t", "e", "g", [1, 2, 3], [0, 0, 0], [0.0] * 3, [-1] * 3, 3, reward=float(r))
        for r in (0, 1)
    ]
    metrics = learner.train_on(trajs, version=0)
    assert metrics["train/skipped"] == 1 and metrics["batch/no_sampled_tokens"] == 1
    assert learner.step == 0 and max_diff(weights(learner), before) == 0


def test_metrics_are_reported():
    learner = Learner(config(loss=grpo.LossConfig(aggregation="token-mean", tis_cap=2.0)), TINY)
    m = learner.train_step(batch_from(learner))
    for key in ("loss", "clip_frac_low", "clip_frac_high", "entropy", "grad_norm",
                "logprob_diff_mean", "logprob_diff_max", "ratio_mean", "ratio_max", "lr",
                "tis_weight_mean"):  # fmt: skip
        assert key in m, key
    # a first step is on-policy: ratios are 1 and the sampler/learner log-probs agree
    assert abs(m["ratio_mean"] - 1) < 1e-4 and m["logprob_diff_max"] < 1e-4
    assert m["entropy"] > 0


def test_kl_penalty_uses_a_frozen_reference():
    learner = Learner(
        config(loss=grpo.LossConfig(aggregation="token-mean", kl_estimator="k3", kl_coef=0.1)),
        TINY,
    )
    m1 = learner.train_step(batch_from(learner, step=0))
    m2 = learner.train_step(batch_from(learner, step=1))
    assert m1["kl"] < 1e-8 < m2["kl"]  # equal to the reference at first, then drifting away


def test_lr_schedule_by_hand():
    f = lr_lambda(OptimConfig(warmup_steps=4, schedule="cosine", total_steps=14, min_lr_ratio=0.0))
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert abs(f(9) - 0.5) < 1e-12 and f(14) == 0.0  # half way down the cosine; its end


def test_fsdp_two_ranks_equal_one_process(ray_local):
    cfg = config(micro_batch_tokens=40)
    single = Learner(cfg, TINY)
    batch = batch_from(single)
    learners = start_learners(cfg, TINY, world_size=2)
    try:
        metrics = ray_local.get([a.train_step.remote(batch) for a in learners])
        sds = ray_local.get([a.hf_state_dict.remote() for a in learners])
    finally:
        ray_local.get([a.shutdown.remote() for a in learners])
        for a in learners:
            ray_local.kill(a)
    m1 = single.train_step(batch)
    assert sds[1] == {}  # the full state dict lands on rank 0
    assert max_diff(weights(sds[0]), weights(single)) < 1e-5
    assert abs(metrics[0]["loss"] - m1["loss"]) < 1e-6
    untimed = lambda m: {k: v for k, v in m.items() if not k.endswith("_s")}  # noqa: E731
    assert untimed(metrics[0]) == untimed(metrics[1])  # all reduced over both ranks


def test_resume_equals_an_uninterrupted_run(tmp_path):
    cfg = config(optim=OptimConfig(lr=1e-3, warmup_steps=2, schedule="cosine", total_steps=6))
    batches = [batch_from(Learner(cfg, TINY), seed=s) for s in range(4)]
    straight = Learner(cfg, TINY)
    for b in batches:
        straight.train_step(b)
    first = Learner(cfg, TINY)
    for b in batches[:2]:
        first.train_step(b)
    path = first.save(str(tmp_path / "ckpt"), extra={"cursor": 2})
    first.train_step(batches[2])  # progress after the save must not leak into the resume
    resumed = Learner(cfg, TINY)
    assert resumed.load(path) == {"cursor": 2} and resumed.step == 2
    for b in batches[2:]:
        resumed.train_step(b)
    assert max_diff(weights(resumed), weights(straight)) == 0.0
    assert resumed.scheduler.get_last_lr() == straight.scheduler.get_last_lr()


def test_export_hf_loads_back(tmp_path):
    learner = Learner(config(), TINY)
    learner.train_step(batch_from(learner))
    learner.export_hf(str(tmp_path / "hf"))
    model, _ = load_pretrained(tmp_path / "hf")
    ids = torch.randint(0, 256, (1, 20))
    with torch.no_grad():
        assert torch.equal(model(ids), learner.model(ids))


def test_grpo_alone_raises_the_reward():
    """Reward = fraction of even token ids in the completion; a tiny random CWM learns it."""
    learner = Learner(
        config(optim=OptimConfig(lr=3e-3, weight_decay=0.0), micro_batch_tokens=512), TINY
    )
    engine = engine_for(learner)
    prompts = make_prompts(8, 3)
    rewards = []
    for step in range(25):
        trajs = rollout(engine, prompts, 8, 8, seed=3, step=step)
        rewards.append(sum(t.reward for t in trajs) / len(trajs))
        learner.train_step(grpo.build_train_batch(trajs, learner.config.loss))
        engine.update_weights(learner.hf_state_dict(), version=step + 1)
    start, end = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    print(f"mean reward: first steps {start:.3f}, last steps {end:.3f}")
    assert end > start + 0.3, rewards
