"""Environment plugins as packages: examples/plugin_env (cwm-rl-example-plugin) is built and
installed into a directory of its own (never into the shared venv), found through its
`cwm_rl.envs` entry point, trained in a tiny run, and shipped to a Ray job's workers as a wheel in
the job's runtime environment by a sweep submitted with --address."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml

from envs import registry

REPO = Path(__file__).resolve().parents[1]
PLUGIN = REPO / "examples" / "plugin_env"
BIN = Path(sys.executable).parent
TINY = [
    "steps=2", "groups_per_step=2", "group_size=2", "rollout.max_new_tokens=4",
    "eval.num_tasks=2", "progress=false", "checkpoint.export_hf=false",
]  # fmt: skip


def _pip(*args: str, cwd: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "pip", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]


@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    """The plugin built as a wheel from a copy of its source (no build files left in the repo)
    and installed with `pip install --target` into a directory of its own: (wheel, site dir)."""
    if "shout" in registry.available():
        pytest.fail("the example plugin is already installed here; these tests need it absent")
    root = tmp_path_factory.mktemp("plugin")
    src = root / "src"
    shutil.copytree(PLUGIN, src, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    _pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(root / "dist"), str(src), cwd=root)
    (wheel,) = (root / "dist").glob("cwm_rl_example_plugin-*.whl")
    _pip("install", "--no-deps", "--no-index", "--target", str(root / "site"), str(wheel), cwd=root)
    return wheel, root / "site"


def _auth(env: dict[str, str]) -> dict[str, str]:
    """The head's authentication settings (its token), for the submitting side."""
    return {k: v for k, v in env.items() if k.startswith("RAY_AUTH_")}


def _env_with(site: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{REPO}", "CWM_RL_TEST_THREADS": "1"}


def test_plugin_is_found_through_its_entry_point_only(plugin):
    _, site = plugin
    code = (
        "from envs import registry; from rl.config import load_config\n"
        "cls = registry.get('shout'); print(cls.__module__, cls.__name__)\n"
        "cfg = load_config('examples/plugin_env/smoke_shout.yaml'); print(sorted(cfg.envs))\n"
        "env = cls(cfg.envs['shout'].config); tasks = env.load_tasks('test')\n"
        "print(len(tasks), len({t.id for t in tasks}))\n"
        "import asyncio; asyncio.run(env.reset(tasks[0]))\n"
        "print(asyncio.run(env.step(tasks[0].payload['text'].upper())).reward)\n"
        "try:\n    cls.validate_config({'n_train': 0})\nexcept Exception as e: print(e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=_env_with(site), capture_output=True,
        text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert lines[0] == "cwm_rl_example_plugin.shout ShoutEnv"
    assert lines[1] == "['shout']"
    assert lines[2] == "4 4"
    assert lines[3] == "1.0"  # the exact answer scores 1
    assert "key 'n_train' must be >= 1" in lines[4]
    # without the package on the path, the name is unknown, and no cwm-rl code names the module
    assert "shout" not in registry.available()
    for package in ("rl", "envs", "model", "rewards", "launch"):
        for path in (REPO / package).rglob("*.py"):
            assert "cwm_rl_example_plugin" not in path.read_text(), path


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_plugin_env_trains_in_a_tiny_run(plugin, tmp_path):
    _, site = plugin
    run_dir = tmp_path / "run"
    out = subprocess.run(
        [
            sys.executable, "-m", "launch.train", "examples/plugin_env/smoke_shout.yaml", *TINY,
            f"--run-dir={run_dir}", "--num-cpus=4",
        ],
        cwd=REPO, env=_env_with(site), capture_output=True, text=True, timeout=280,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert sum("train/loss" in r for r in rows) == 2
    assert all(0.0 <= r["reward/env/shout"] <= 1.0 for r in rows if "reward/env/shout" in r)
    summary = json.loads((run_dir / "eval.json").read_text())
    assert summary["after"]["shout"]["tasks"] == 2


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_sweep_job_mode_ships_the_plugin_to_the_workers(plugin, ray_head, tmp_path):
    """`launch.sweep --address`: one run of configs/smoke.yaml with `shout` instead of `reverse`
    (an inline base), submitted as a Ray job whose runtime_env carries the plugin wheel."""
    wheel, site = plugin
    address, head_env = ray_head
    base = yaml.safe_load((REPO / "configs" / "smoke.yaml").read_text())
    base["envs"] = {"shout": {"config": {"n_train": 16, "n_test": 2}}}
    sweep = {
        "name": "plugin_job",
        "base": base,
        "overrides": TINY,
        "runtime_env": {"py_modules": [str(wheel)]},
    }
    sweep_file = tmp_path / "plugin_job.yaml"
    sweep_file.write_text(yaml.safe_dump(sweep))
    # the submitting side validates the config, so it has the plugin too (not the cluster)
    out = subprocess.run(
        [
            sys.executable, "-m", "launch.sweep", str(sweep_file), "--address", address,
            "--output-dir", str(tmp_path / "sweeps"), "--poll-s", "2",
        ],
        cwd=tmp_path, env={**_env_with(site), **_auth(head_env)},
        capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    sweep_dir = tmp_path / "sweeps" / "plugin_job"
    logs = "\n".join(p.read_text()[-3000:] for p in (sweep_dir / "logs").glob("*.log"))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:] + logs
    state = json.loads((sweep_dir / "sweep_state.json").read_text())["runs"]
    ((name, entry),) = state.items()
    assert entry["status"] == "succeeded" and entry["job_id"]
    run_dir = sweep_dir / "runs" / name
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert sum("reward/env/shout" in r for r in rows) == 2
    assert "shout" in json.loads((run_dir / "eval.json").read_text())["after"]
    assert "done: 2 steps" in (sweep_dir / "logs" / f"{name}.log").read_text()
    assert "shout pass@1 after" in (sweep_dir / "results.md").read_text()
    # the job really ran on the cluster: its dashboard lists it as succeeded
    # (the head has token authentication on: the REST API too wants the token)
    request = urllib.request.Request(
        f"{address}/api/jobs/{entry['job_id']}",
        headers={"Authorization": f"Bearer {head_env['RAY_AUTH_TOKEN']}"},
    )
    with urllib.request.urlopen(request, timeout=10) as r:
        assert json.loads(r.read())["status"] == "SUCCEEDED"
    assert "PYTHONPATH" not in head_env
