"""`ray job submit` end to end: a Ray head on loopback, a tiny run submitted with --working-dir,
its outputs checked."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def test_ray_job_submit_runs_a_tiny_training_job(ray_head, tmp_path):
    address, env = ray_head
    ray = str(BIN / "ray") if (BIN / "ray").exists() else shutil.which("ray")
    run_dir = tmp_path / "job_run"
    cmd = [
        ray, "job", "submit", "--address", address, "--working-dir", str(REPO),
        "--", "python", "-m", "launch.train", "configs/smoke.yaml", "steps=2",
        "groups_per_step=2", "group_size=2", "rollout.max_new_tokens=4", "eval.num_tasks=2",
        "progress=false", f"--run-dir={run_dir}",
    ]  # fmt: skip
    for _ in range(60):  # the head and its job agent take a few seconds to come up
        out = subprocess.run(
            cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path
        )
        if out.returncode == 0 or not any(
            m in out.stderr for m in ("No available agent", "Failed to connect", "Connection")
        ):
            break
        time.sleep(2)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "succeeded" in out.stdout
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert sum("train/loss" in r for r in rows) == 2
    assert (run_dir / "reward_curve.png").exists() and (run_dir / "hf" / "config.json").exists()


def test_a_job_without_the_heads_token_is_refused(ray_head, tmp_path):
    """Token authentication on the head (Ray's RAY_AUTH_MODE=token): a client with another
    token, or with authentication off, cannot submit anything; with the head's token it can
    (the test above). HOME is empty, so no token file of this machine's stands in."""
    address, env = ray_head
    ray = str(BIN / "ray") if (BIN / "ray").exists() else shutil.which("ray")
    marker = tmp_path / "ran"
    cmd = [
        ray, "job", "submit", "--address", address, "--no-wait",
        "--", "python", "-c", f"open({str(marker)!r}, 'w').write('x')",
    ]  # fmt: skip
    home = tmp_path / "home"
    home.mkdir()
    for name, client in (
        ("another token", {**env, "HOME": str(home), "RAY_AUTH_TOKEN": "0" * 64}),
        ("no authentication", {**{k: v for k, v in env.items() if not k.startswith("RAY_AUTH")},
                               "HOME": str(home), "RAY_AUTH_MODE": "disabled"}),
    ):  # fmt: skip
        for _ in range(60):  # the head takes a few seconds to come up
            out = subprocess.run(cmd, env=client, capture_output=True, text=True, timeout=120)
            if not any(m in out.stderr for m in ("No available agent", "Failed to connect")):
                break
            time.sleep(2)
        text = (out.stdout + out.stderr).lower()
        assert out.returncode != 0, f"{name}: submitted\n{out.stdout[-2000:]}"
        assert "auth" in text or "401" in text or "token" in text, f"{name}: {text[-2000:]}"
    time.sleep(2)
    assert not marker.exists()
