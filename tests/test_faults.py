"""Faults never stall or corrupt training: a killed rollout worker is replaced and its groups run
again, a hanging environment times out and is excluded (not scored 0), a learner failure stops the
run with its last checkpoint intact, and `kill -9` of the driver loses no prompt on --resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rl_utils import TINY_RUN, run_in_thread

from rl import checkpoint as ckpt
from rl.config import load_config
from rl.orchestrator import LearnerFailure, Orchestrator

REPO = Path(__file__).resolve().parents[1]


def rows(run_dir: Path, name: str = "metrics.jsonl") -> list[dict]:
    return [json.loads(x) for x in (run_dir / name).read_text().splitlines() if x.strip()]


def train_rows(run_dir: Path) -> list[dict]:
    keep = lambda k: not k.startswith(("time/", "throughput/", "faults/"))  # noqa: E731
    return [{k: v for k, v in r.items() if keep(k)} for r in rows(run_dir) if "train/loss" in r]


def wait_for(condition, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(0.05)


KILLED_WORKER_RUN = [*TINY_RUN, "steps=4"]


@pytest.fixture(scope="module")
def uninterrupted(ray_local, tmp_path_factory) -> list[dict]:
    """The training rows of the run the killed-worker runs must equal (both transports train
    exactly alike: tests/test_loop.py), run once for both."""
    run_dir = tmp_path_factory.mktemp("straight")
    Orchestrator(load_config(None, KILLED_WORKER_RUN), run_dir).run()
    return train_rows(run_dir)


@pytest.mark.parametrize("method", ["object_store", "collective"])
def test_killed_rollout_worker_is_replaced_and_nothing_is_lost(
    ray_local, tmp_path, method, uninterrupted
):
    """With collective weight sync the dead worker is also found before the next broadcast and
    the group forms again with its replacement."""
    # a worker killed around a broadcast can leave the learner's gloo send waiting for the
    # group's timeout before the failure is seen (measured: the whole 120 s default; failing
    # fast there is open work): 20 s keeps the test short, the recovery is the same
    args = [*KILLED_WORKER_RUN, f"weight_sync.method={method}", "weight_sync.timeout_s=20"]
    orch = Orchestrator(load_config(None, args), tmp_path / "crash")
    thread, box = run_in_thread(orch)
    wait_for(lambda: orch.step >= 2)  # then kill the worker while it generates step 3's groups
    victim = orch.workers[0]
    ray_local.kill(victim, no_restart=True)
    thread.join(300)
    assert "error" not in box, box.get("error")
    last = rows(tmp_path / "crash")[-2]  # the last step row (the final eval row follows)
    assert last["faults/worker_restarts"] >= 1
    # groups rerun with the same seeds and weights: the run is the uninterrupted one
    assert train_rows(tmp_path / "crash") == uninterrupted


def test_killed_worker_in_async_mode_with_two_learner_ranks(ray_local, tmp_path):
    """Async mode, two FSDP ranks, two workers: a worker killed mid-run is replaced (with the
    learner's weights, labelled with the learner's own version even while a step finishes), the
    run completes, staleness stays within max_lag and no group trains twice."""
    args = [*TINY_RUN, "steps=5", "mode=async", "max_lag=1", "num_learners=2",
            "rollout.num_workers=2", "checkpoint.export_hf=false"]  # fmt: skip
    orch = Orchestrator(load_config(None, args), tmp_path / "async")
    thread, box = run_in_thread(orch)
    wait_for(lambda: orch.step >= 2, 300)
    ray_local.kill(orch.workers[0], no_restart=True)
    thread.join(300)
    assert not thread.is_alive() and "error" not in box, box.get("error")
    steps = [r for r in rows(tmp_path / "async") if "time/step_s" in r]
    assert len(steps) == 5 and steps[-1]["faults/worker_restarts"] >= 1
    assert all(r["staleness/max_token_lag"] <= 1 for r in steps)
    assert [r["policy_version"] for r in steps] == [1, 2, 3, 4, 5]
    groups = [g for r in rows(tmp_path / "async", "trained.jsonl") for g in r["groups"]]
    assert len(groups) == len(set(groups)) == 5 * 2


def test_hanging_environment_times_out_and_is_excluded(ray_local, tmp_path):
    cfg = load_config(
        None,
        [*TINY_RUN, "steps=1", "envs.reverse.config.latency_s=600", "rollout.episode_timeout_s=2",
         "eval.num_tasks=1", "checkpoint.export_hf=false"],
    )  # fmt: skip
    t0 = time.monotonic()
    Orchestrator(cfg, tmp_path / "hang").run()
    elapsed = time.monotonic() - t0
    step = next(r for r in rows(tmp_path / "hang") if "rollout/timeout" in r)
    assert step["rollout/timeout"] == step["rollout/trajectories"] == 6
    assert step["batch/excluded"] == 6 and step.get("train/skipped") == 1
    assert "reward/mean" not in step  # reward unavailable, never scored 0
    assert elapsed < 60  # three episode deadlines (eval before, the step, eval after), not 600 s


def test_learner_failure_stops_the_run_with_the_checkpoint_intact(ray_local, tmp_path):
    cfg = load_config(None, [*TINY_RUN, "steps=500", "checkpoint.every=1"])
    orch = Orchestrator(cfg, tmp_path / "lf")
    thread, box = run_in_thread(orch)

    def saved_two_steps() -> bool:
        latest = ckpt.latest(tmp_path / "lf" / "checkpoints")
        return latest is not None and latest.name >= "step_00000002"

    wait_for(saved_two_steps)
    ray_local.kill(orch.learners[0], no_restart=True)
    thread.join(300)
    error = box.get("error")
    assert isinstance(error, LearnerFailure), error
    assert "learner failed" in str(error) and "--resume" in str(error)
    latest = ckpt.latest(tmp_path / "lf" / "checkpoints")
    meta = json.loads((latest / "trainer.json").read_text())
    assert meta["step"] >= 2 and (latest / "dcp").exists()


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_kill_9_of_the_driver_then_resume_loses_no_prompt(tmp_path, mode):
    """The prompts trained over a killed-and-resumed run are exactly those of an uninterrupted run."""
    args = [
        "configs/smoke.yaml", "steps=6", "checkpoint.every=1", "progress=false",
        "checkpoint.export_hf=false", "eval.num_tasks=1", f"mode={mode}", "max_lag=1",
    ]  # fmt: skip
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    train = [sys.executable, "-m", "launch.train"]

    def launch(*extra, **kw):
        return subprocess.Popen(
            [*train, *extra], cwd=REPO, env=env, start_new_session=True,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **kw,
        )  # fmt: skip

    def finish(proc):
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err.decode()[-3000:]

    straight = tmp_path / "straight"
    if mode == "sync":  # the uninterrupted run to compare with (async's timing differs anyway)
        finish(launch(*args, f"--run-dir={straight}"))
    killed = tmp_path / "killed"
    proc = launch(*args, f"--run-dir={killed}")
    pointer = killed / "checkpoints" / "latest"
    wait_for(lambda: pointer.exists() and pointer.read_text().strip() >= "step_00000002", 300)
    time.sleep(0.7)  # somewhere inside the next step
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
    proc.wait()
    finish(launch("--resume", str(killed)))
    trained = lambda d: [r["groups"] for r in rows(d, "trained.jsonl")]  # noqa: E731
    assert len(trained(killed)) == 6
    if mode == "sync":
        assert trained(killed) == trained(straight)
        assert train_rows(killed) == train_rows(straight)
    else:  # async: which group trains when depends on timing, but none is lost or repeated
        groups = [g for step in trained(killed) for g in step]
        assert len(groups) == len(set(groups))


def test_collective_weight_sync_survives_a_worker_dead_at_the_broadcast(ray_local, tmp_path):
    """A worker dies after the liveness check, so the broadcast meets it: the learner's send
    fails, its group closes (freeing the other receivers at once, not at the timeout), the dead
    worker is replaced and the update is sent again in a new group; every worker ends with it."""
    args = [*TINY_RUN, "rollout.num_workers=3", "weight_sync.method=collective",
            "weight_sync.timeout_s=60"]  # fmt: skip
    orch = Orchestrator(load_config(None, args), tmp_path / "bcast")
    orch.start()
    try:
        orch.sync_weights(1)  # forms the group
        assert ray_local.get([w.version.remote() for w in orch.workers]) == [1, 1, 1]
        victim = orch.workers[1]
        ray_local.kill(victim, no_restart=True)
        wait_for(lambda: not is_alive(ray_local, victim), timeout=30)
        check, calls = orch.pool.check, []

        def blind_first_check() -> int:  # the worker dies "after" the first liveness check
            calls.append(1)
            return 0 if len(calls) == 1 else check()

        orch.pool.check = blind_first_check  # what the weight sync asks (rl/workers.py)
        t0 = time.monotonic()
        orch.sync_weights(2)
        elapsed = time.monotonic() - t0
        assert len(calls) == 3  # blind check, the failure's check (found it), the retry's check
        assert orch.workers[1] is not victim and orch.faults["worker_restarts"] == 1
        assert ray_local.get([w.version.remote() for w in orch.workers]) == [2, 2, 2]
        assert elapsed < 30  # nobody waited for the 60 s timeout
    finally:
        orch.stop()


def is_alive(ray, actor) -> bool:
    try:
        ray.get(actor.version.remote(), timeout=5)
        return True
    except Exception:  # noqa: BLE001 - dead (or dying)
        return False
