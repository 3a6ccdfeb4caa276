"""A run where infrastructure failure dominates stops, loudly (rl/health.py): the SWE env on the
docker sandbox backend with its Docker API gone, in training (sync and async), in evaluation,
and - the issue's acceptance test - a run whose Podman service is stopped halfway."""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import require
from omegaconf import OmegaConf
from rl_utils import TINY_RUN

from rl import checkpoint as ckpt
from rl.config import load_config
from rl.health import InfrastructureFailure
from rl.orchestrator import Orchestrator

REPO = Path(__file__).resolve().parents[1]
PODMAN_CONF = Path(os.environ.get("CWM_RL_CONF_DIR", "/etc/cwm-rl")) / "containers.conf"
# what docker-py says when the API's socket is gone or refuses (the cause the error must quote)
CONNECTION_FAILURE = re.compile(
    r"Connection aborted|Connection refused|ConnectionRefusedError|FileNotFoundError|"
    r"No such file or directory|no Docker API answers"
)


def rows(run_dir: Path, name: str = "metrics.jsonl") -> list[dict]:
    path = run_dir / name
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):  # a line being written right now
            out.append(json.loads(line))
    return out


def swe_on_docker(tmp_path: Path, docker_host: str, *extra: str) -> list[str]:
    """Overrides for an `swe` env on the docker backend at `docker_host` (copied-in repos)."""
    return [
        "envs.swe.config.source=builtin",
        f"envs.swe.config.tasks_dir={tmp_path / 'swe-tasks'}",
        "envs.swe.config.backend=docker",
        f"envs.swe.config.docker_host={docker_host}",
        "envs.swe.config.use_task_images=false",
        "envs.swe.config.max_turns=1",
        *extra,
    ]


def dead_socket() -> str:
    return f"unix:///tmp/cwm-cb-{secrets.token_hex(4)}.sock"  # nothing listens there


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_one_env_whose_docker_api_is_gone_stops_a_mixed_run(ray_local, tmp_path, mode):
    """reverse is fine, swe fails every episode: the overall share stays low, swe's own share
    trips the breaker at the second step that drew swe tasks (a step without any keeps the count)."""
    args = [
        *TINY_RUN, *swe_on_docker(tmp_path, dead_socket(), "envs.swe.config.n_test=0"),
        "envs.reverse.weight=3", "envs.swe.weight=1", "steps=12", "groups_per_step=4",
        "group_size=2", "failures.patience=2", "checkpoint.export_hf=false", f"mode={mode}",
        "max_lag=1",
    ]  # fmt: skip
    run_dir = tmp_path / mode
    with pytest.raises(InfrastructureFailure) as info:
        Orchestrator(load_config(None, args), run_dir).run()
    message = str(info.value)
    assert "environment 'swe' lost more than 50% of its trajectories" in message
    assert "each of the last 2 training steps" in message and "'reverse'" not in message
    assert "no Docker API answers at unix:///tmp/cwm-cb-" in message  # the cause, quoted
    trained = rows(run_dir, "trained.jsonl")
    with_swe = [r["step"] for r in trained if any(t.startswith("swe-") for t in r["tasks"])]
    assert len(with_swe) >= 2 and trained[-1]["step"] == with_swe[1]  # stopped right there
    steps = [r for r in rows(run_dir) if "policy_version" in r]
    assert all(r.get("health/error_fraction/reverse", 0) == 0 for r in steps)
    last = rows(run_dir)[-1]
    assert last["health/tripped"] == 1 and last["health/error"] == message
    saved = ckpt.latest(run_dir / "checkpoints")  # what was trained is kept, resumable
    assert json.loads((saved / "trainer.json").read_text())["extra"]["step"] == with_swe[1]
    assert f"--resume {run_dir}" in message


def test_an_evaluation_round_lost_to_failures_stops_before_training(ray_local, tmp_path):
    args = [
        *TINY_RUN, *swe_on_docker(tmp_path, dead_socket(), "envs.swe.config.n_test=2"),
        "checkpoint.export_hf=false",
    ]  # fmt: skip
    run_dir = tmp_path / "eval"
    with pytest.raises(InfrastructureFailure) as info:
        Orchestrator(load_config(None, args), run_dir).run()
    message = str(info.value)
    assert "environment 'swe' lost more than 50%" in message
    assert "in the evaluation round 'before'" in message and "no Docker API answers" in message
    assert "the run stopped at step 0" in message
    assert not (run_dir / "eval_before.json").exists()  # no table that scores failures as misses
    eval_row, stop_row = rows(run_dir)[-2:]
    assert eval_row["health/eval/error_fraction/swe"] == 1.0 and stop_row["health/tripped"] == 1
    print(message)


# -- the acceptance test: the Podman service stopped halfway --------------------------------------


@pytest.fixture
def private_podman(tmp_path):
    """A Podman API service of this test's own, on its own socket (the shared one is untouched),
    with host_setup.sh's containers.conf and the shared image store. Yields (url, stop)."""
    podman = shutil.which("podman")
    require("docker", podman is not None, "podman is not installed (sandbox/host_setup.sh)")
    require("docker", PODMAN_CONF.exists(), f"{PODMAN_CONF} missing: run host_setup.sh as root")
    require("docker", os.geteuid() == 0, "the Podman service of the docker backend runs as root")
    from sandbox.docker import docker_unavailable_reason, resolve_docker_host, shared_client
    from sandbox.images import HOST_IMAGE, ensure_image

    shared = docker_unavailable_reason()
    require("docker", shared is None, shared or "")
    ensure_image(shared_client(resolve_docker_host()), HOST_IMAGE)  # the store both serve
    sock = f"/tmp/cwm-cb-{secrets.token_hex(4)}.sock"
    url = f"unix://{sock}"
    log = open(tmp_path / "podman.log", "wb")  # noqa: SIM115 - closed at teardown
    proc = subprocess.Popen(
        [podman, "system", "service", "--time=0", url],
        env={**os.environ, "CONTAINERS_CONF": str(PODMAN_CONF)},
        cwd="/",  # conmon must never run in a directory deleted later (see host_setup.sh)
        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip

    def stop() -> None:
        """Stop the service (SIGTERM, as `systemctl stop` would; SIGKILL if it lingers)."""
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(15)

    try:
        deadline = time.monotonic() + 30
        while (reason := docker_unavailable_reason(url)) and time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            time.sleep(0.2)
        require("docker", reason is None, f"a private podman service did not start: {reason}")
        yield url, stop
    finally:
        stop()
        log.close()
        if os.path.exists(sock):
            os.unlink(sock)


@pytest.mark.needs_docker
def test_a_run_whose_podman_service_stops_halfway_stops_naming_the_cause(private_podman, tmp_path):
    """python -m launch.train on SWE tasks in docker sandboxes served by a private Podman
    service; the service is stopped once the first step is logged. The run must exit 1 within
    patience + 1 steps with an error that names the env and quotes the connection failure.
    Containers in flight when the service stops cannot be removed through it: they end
    themselves after their lifetime (here 135 s), as after a real crash of the service."""
    url, stop_podman = private_podman
    patience = 2
    run_dir = tmp_path / "run"
    overrides = [
        *[o for o in TINY_RUN if not o.startswith("envs.")],  # swe alone
        *swe_on_docker(tmp_path, url, "envs.swe.config.n_test=2", "envs.swe.config.memory_mb=256",
                       "envs.swe.config.command_timeout_s=5", "envs.swe.config.episode_timeout_s=10",
                       "envs.swe.config.scoring_timeout_s=5"),
        "rollout.max_context=2048", "learner.micro_batch_tokens=2048", "rollout.max_new_tokens=4",
        "rollout.max_turns=1",
        "steps=10", "groups_per_step=1", "group_size=2", "eval.num_tasks=1",
        "checkpoint.export_hf=false", f"failures.patience={patience}",
    ]  # fmt: skip
    config = tmp_path / "podman_stop.yaml"  # a file of its own: the default config adds math
    config.write_text(OmegaConf.to_yaml(OmegaConf.from_dotlist(overrides)))
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "launch.train", str(config), f"--run-dir={run_dir}", "--num-cpus=2"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        start_new_session=True,
    )  # fmt: skip
    stopped_after: dict = {}

    def stop_after_first_step() -> None:
        while proc.poll() is None:
            steps = [r["step"] for r in rows(run_dir) if "policy_version" in r]
            if steps:
                stop_podman()
                stopped_after["step"] = steps[-1]
                return
            time.sleep(0.1)

    watcher = threading.Thread(target=stop_after_first_step, daemon=True)
    watcher.start()
    try:
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:  # a hung run: end it (its own session: driver and its Ray)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    watcher.join(30)
    err_text = err.decode()
    assert "step" in stopped_after, f"no step was logged before the run ended:\n{err_text[-3000:]}"
    assert proc.returncode == 1, err_text[-3000:]
    message = err_text[err_text.index("run stopped: infrastructure failure:") :]
    assert "environment 'swe' lost more than 50% of its trajectories" in message, message
    assert CONNECTION_FAILURE.search(message), message
    all_rows = rows(run_dir)
    first = next(r for r in all_rows if "policy_version" in r)
    assert first["health/error_fraction"] == 0  # the service answered before it was stopped
    assert all_rows[-1]["health/tripped"] == 1 and all_rows[-1]["health/error"] in message
    tripped_at = all_rows[-1]["step"]
    assert tripped_at <= stopped_after["step"] + patience + 1, (stopped_after, tripped_at)
    saved = ckpt.latest(run_dir / "checkpoints")
    assert json.loads((saved / "trainer.json").read_text())["extra"]["step"] == tripped_at
    print(f"\nthe podman service stopped after step {stopped_after['step']}; {message}")
