"""The circuit breaker (rl/health.py) on hand-made steps: what counts as a failure, the bound,
patience, per-environment counts, the message; and a real rollout whose engine fails for the
whole batch, which must trip the same breaker."""

from __future__ import annotations

import asyncio

import pytest

from rl.health import CircuitBreaker, FailuresConfig, Outcome, outcome, outcomes
from rl.types import Job, Trajectory

CONNECTION = "SandboxError: no Docker API answers at unix:///tmp/x.sock (ConnectionRefusedError)"


def step(*parts: tuple[str, int, int], status: str = "env_error", error: str = CONNECTION):
    """(env, trajectories, failed) per environment -> one step's outcomes."""
    out = []
    for env, n, failed in parts:
        out += [Outcome(env, status, error)] * failed + [Outcome(env, "ok")] * (n - failed)
    return out


def breaker(**kw) -> CircuitBreaker:
    return CircuitBreaker(FailuresConfig(**{"max_error_fraction": 0.5, "patience": 3, **kw}))


def test_patience_consecutive_bad_steps_trip_and_the_message_names_env_and_cause():
    b = breaker()
    assert not b.observe(step(("swe", 4, 4))).tripped
    assert not b.observe(step(("swe", 4, 3))).tripped
    v = b.observe(step(("swe", 4, 4)))
    assert v.tripped and v.failing == ["swe"]
    assert "environment 'swe' lost more than 50% of its trajectories" in v.message
    assert "each of the last 3 training steps" in v.message
    assert "'swe' 4 of 4 failed" in v.message
    assert "failures.max_error_fraction=0.5, failures.patience=3" in v.message
    assert f"[swe] {CONNECTION} (x11)" in v.message  # one distinct message, counted
    assert v.metrics["health/error_fraction"] == 1.0
    assert v.metrics["health/error_fraction/swe"] == 1.0
    assert v.metrics["health/bad_steps"] == 3


def test_a_transient_failure_never_trips():
    b = breaker()
    for failed in (4, 4, 0, 4, 4, 1, 4, 4, 2):  # never three bad steps in a row; 2 of 4 is 50%
        v = b.observe(step(("math", 4, failed)))
        assert not v.tripped
    assert v.metrics["health/bad_steps"] == 0


def test_the_bound_is_strict_and_one_turns_the_breaker_off():
    at_bound = breaker(patience=1)
    assert not at_bound.observe(step(("code", 4, 2))).tripped  # 50% is not more than 50%
    assert at_bound.observe(step(("code", 4, 3))).tripped
    off = breaker(max_error_fraction=1.0, patience=1)
    assert not any(off.observe(step(("code", 4, 4))).tripped for _ in range(5))
    strict = breaker(max_error_fraction=0.0, patience=1)
    assert strict.observe(step(("code", 100, 1))).tripped


def test_one_environment_failing_alone_trips_while_the_mixture_looks_healthy():
    b = breaker(patience=2)
    v = b.observe(step(("math", 14, 0), ("swe", 2, 2)))
    assert not v.tripped and v.metrics["health/error_fraction"] == 2 / 16
    v = b.observe(step(("math", 14, 0), ("swe", 2, 2)))
    assert v.tripped and v.failing == ["swe"]
    assert "'math'" not in v.message and "'swe' 2 of 2 failed" in v.message


def test_an_environment_absent_from_a_step_keeps_its_count():
    b = breaker(patience=2)
    assert not b.observe(step(("math", 4, 0), ("swe", 4, 4))).tripped
    assert not b.observe(step(("math", 8, 0))).tripped  # the mix drew no swe task
    assert b.observe(step(("math", 4, 0), ("swe", 4, 4))).tripped
    b = breaker(patience=2)
    b.observe(step(("swe", 4, 4)))
    b.observe(step(("swe", 4, 0)))  # a good step resets the count
    assert not b.observe(step(("swe", 4, 4))).tripped


def test_the_overall_share_trips_when_environments_take_turns_failing():
    b = breaker(patience=2)
    assert not b.observe(step(("a", 4, 4), ("b", 2, 1))).tripped  # a bad, b at the bound
    v = b.observe(step(("a", 2, 1), ("b", 4, 4)))  # b bad, a good: no env twice in a row
    assert v.tripped and v.failing == ["a", "b"]
    assert v.message.startswith("more than 50% of all trajectories were lost")
    assert "'a' 1 of 2 failed, 'b' 4 of 4 failed" in v.message


def test_timeouts_count_only_when_configured():
    assert not any(
        breaker(patience=1).observe(step(("swe", 4, 4), status="timeout", error=None)).tripped
        for _ in range(3)
    )
    v = breaker(patience=1, count_timeouts=True).observe(
        step(("swe", 4, 4), status="timeout", error=None)
    )
    assert v.tripped and "(env_error or timeout)" in v.message
    assert "ran out of its wall clock" in v.message  # a timeout's own text (it has no error)


def test_quotes_are_the_last_distinct_messages_cut_to_length():
    b = breaker(patience=1)
    msgs = ["first", "second", "third", "fourth", "x" * 1000]
    v = b.observe([Outcome("code", "env_error", m) for m in msgs + ["fourth"]])
    quotes = v.message.split("Last errors:\n")[1].splitlines()
    assert [q.split("] ")[1].split(" (x")[0] for q in quotes][:2] == ["third", "x" * 297 + "..."]
    assert quotes[-1] == "  [code] fourth (x2)"  # newest last
    assert "first" not in v.message
    no_text = breaker(patience=1).observe([Outcome("code", "env_error", None)])
    assert "no error text recorded" in no_text.message


def test_an_evaluation_round_is_judged_alone():
    b = CircuitBreaker(
        FailuresConfig(patience=3), patience=1, what="evaluation round 'before'",
        prefix="health/eval/",
    )  # fmt: skip
    v = b.observe(step(("code", 8, 5), ("math", 8, 0)))
    assert v.tripped and v.failing == ["code"]
    assert "in the evaluation round 'before'" in v.message
    assert "[failures.max_error_fraction=0.5]" in v.message
    assert v.metrics["health/eval/error_fraction/code"] == 5 / 8
    assert not b.observe([]).tripped


def test_outcome_reads_the_env_s_error_text_first():
    traj = Trajectory("t", "code", "g", [1, 2], [0, 1], [0.0, -0.5], [-1, 0], 1, None, "env_error")
    traj.metrics = {"env_error": "docker sandbox failed: gone", "error": "other"}
    assert outcome(traj) == Outcome("code", "env_error", "docker sandbox failed: gone")
    as_dict = {**traj.to_dict(), "metrics": {"error": "RuntimeError: boom"}}
    assert outcomes([as_dict]) == [Outcome("code", "env_error", "RuntimeError: boom")]
    assert outcome({"env": "m", "status": "ok"}) == Outcome("m", "ok", None)


@pytest.mark.parametrize(
    "kw, key",
    [
        ({"max_error_fraction": 1.5}, "failures.max_error_fraction"),
        ({"max_error_fraction": -0.1}, "failures.max_error_fraction"),
        ({"max_error_fraction": float("nan")}, "failures.max_error_fraction"),
        ({"patience": 0}, "failures.patience"),
    ],
)
def test_bad_values_name_their_key(kw, key):
    with pytest.raises(ValueError, match=f"key '{key}'"):
        FailuresConfig(**kw)


def test_an_engine_failing_for_the_whole_batch_trips_the_same_breaker():
    """A real rollout worker (no Ray) whose engine raises for every batch: each episode ends as
    env_error with the engine's error text, never a score, and the breaker quotes it."""
    from model.loader import ModelSpec
    from rl.rollout import RolloutConfig, RolloutWorker

    worker = RolloutWorker(
        ModelSpec(path="preset:tiny", tokenizer="default"),
        {"reverse": {"n_train": 8, "n_test": 1}},
        RolloutConfig(max_new_tokens=4, max_context=128),
    )

    def generate(prompts, params):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    worker.engine.generate = generate
    tasks = worker.env_classes["reverse"](worker.env_configs["reverse"]).load_tasks("train")
    b = breaker(patience=2)

    async def two_steps() -> list:  # one event loop: the worker's batcher lives on it
        verdicts = []
        for i in range(2):
            jobs = [Job(task, 3, f"s{i}-{task.id}", 7 * i + k) for k, task in enumerate(tasks[:2])]
            groups = await worker.run_groups(jobs)
            trajs = [Trajectory.from_dict(t) for g in groups for t in g]
            assert all(t.status == "env_error" and t.reward is None for t in trajs)
            verdicts.append(b.observe(outcomes(trajs)))
        return verdicts

    verdicts = asyncio.run(two_steps())
    assert [v.tripped for v in verdicts] == [False, True]
    assert "'reverse' 6 of 6 failed" in verdicts[1].message
    assert "RuntimeError: CUDA error: an illegal memory access" in verdicts[1].message


def test_pass_at_k_leaves_unavailable_rewards_out_instead_of_counting_misses():
    from rl.orchestrator import pass_at_k

    def t(reward, status="ok"):
        return {"reward": reward, "status": status}

    groups = [
        [t(1.0), t(None, "env_error")],  # one success, one unavailable: pass@1 counts 1 of 1
        [t(0.0), t(0.0, "timeout")],  # a timeout is the policy's miss
        [t(None, "env_error"), t(None, "env_error")],  # no reward at all: task left out
    ]
    out = pass_at_k(groups, 2)
    assert out["tasks"] == 2 and out["errors"] == 4
    assert out["pass@1"] == pytest.approx(1 / 3) and out["pass@2"] == pytest.approx(1 / 2)
    assert out["reward_mean"] == pytest.approx(1 / 3)
    empty = pass_at_k([[t(None, "env_error")]], 2)
    assert empty["tasks"] == 0 and empty["pass@1"] != empty["pass@1"]  # NaN, not 0


def test_standard_errors_over_tasks_in_results_and_the_eval_table():
    from rl.orchestrator import pass_at_k
    from rl.runlog import eval_table

    def group(*rewards):
        return [{"reward": r, "status": "ok"} for r in rewards]

    one_each = [group(1.0)] * 16 + [group(0.0)] * 48  # 64 tasks, p = 0.25
    out = pass_at_k(one_each, 1)
    # by hand: sample std of 16 ones and 48 zeros, over sqrt(64)
    assert out["pass@1_se"] == pytest.approx(((0.25 * 0.75 * 64 / 63) ** 0.5) / 8)
    two_each = [group(1.0, 0.0)] * 4 + [group(1.0, 1.0)] * 4  # per-task means 0.5 and 1.0
    out2 = pass_at_k(two_each, 2)
    # eight task means, each 0.25 from their mean 0.75: sqrt(8 * 0.25**2 / 7 / 8)
    assert out2["pass@1_se"] == pytest.approx((8 * 0.25**2 / 7 / 8) ** 0.5)
    assert out2["pass@2"] == 1.0 and out2["pass@2_se"] == 0.0
    table = eval_table({"math": out}, {"math": out})
    assert "0.250 ± 0.055" in table and "pass@1_se" not in table
