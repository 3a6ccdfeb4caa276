"""Sweep: `python -m launch.sweep SWEEP.yaml MODE [key=value ...]` runs an ablation from YAML.

Modes:
  --dry-run       print every expanded run config (a YAML stream); nothing runs
  --local         run them here one after another (one Ray instance, one Orchestrator per run)
  --address URL   submit each as a Ray job (working_dir = this repository) and track them
  --report        only rebuild the comparison table and the plot from the run dirs

`key=value` overrides apply to every run (and so change the run names). Every run's config is
validated before anything runs. A sweep run again continues where it stopped: runs whose run dir
holds a complete eval.json are skipped, a run stopped half-way resumes from its newest checkpoint,
and jobs still running on the cluster are tracked again (sweep_state.json). At the end:
SWEEP_DIR/results.md (+ results.json), a table printed, and SWEEP_DIR/reward_curves.png.
The sweep file's format is described in launch/sweep_file.py.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

from launch import sweep_file as sw
from rl.config import RunConfig, load_config, to_yaml
from rl.schema import ConfigError

REPO = Path(__file__).resolve().parents[1]
STATE_FILE = "sweep_state.json"
RUN_CONFIG_ENV = "CWM_RL_SWEEP_RUN_CONFIG"  # a job's resolved run config (YAML text)
# transient errors of a cluster that is still starting (seen on `ray start` + immediate submit)
TRANSIENT = ("No available agent", "Failed to connect", "Connection", "503", "502")


class SweepState:
    """sweep_state.json: per run its status (pending, running, succeeded, failed, interrupted),
    Ray job id and last error. Written after every change, so a killed sweep loses nothing."""

    def __init__(self, sweep_dir: Path):
        self.path = Path(sweep_dir) / STATE_FILE
        self.runs: dict[str, dict] = {}
        if self.path.exists():
            self.runs = json.loads(self.path.read_text()).get("runs", {})

    def get(self, name: str) -> dict:
        return self.runs.setdefault(name, {"status": "pending", "attempts": 0})

    def update(self, name: str, **fields) -> None:
        self.get(name).update(fields, updated=time.strftime("%Y-%m-%dT%H:%M:%S"))
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"runs": self.runs}, indent=2, default=str))
        tmp.replace(self.path)


def run_dirs(spec: sw.SweepSpec, runs: list[sw.SweepRun]) -> dict[str, Path]:
    root = spec.sweep_dir.resolve() / "runs"
    return {r.name: root / r.name for r in runs}


def warn_if_config_changed(cfg: RunConfig, run_dir: Path) -> None:
    """A finished run whose config.yaml differs from today's (its base file was edited) is
    kept, with a warning: the name hashes the overrides, not the base file's content."""
    path = run_dir / "config.yaml"
    if path.exists() and path.read_text() != to_yaml(cfg):
        print(
            f"warning: {run_dir.name} was run with a different config (was the base edited?); "
            "delete its run dir to run it again",
            file=sys.stderr,
        )


def run_one(cfg: RunConfig, run_dir: Path) -> dict:
    """One run in this process (Ray already initialised): from its newest checkpoint if a previous
    attempt left one, else from scratch in a cleaned run dir (no rows of a dead attempt)."""
    from rl import checkpoint
    from rl.orchestrator import Orchestrator

    resume = checkpoint.latest(run_dir / "checkpoints") is not None
    if not resume and run_dir.exists():
        shutil.rmtree(run_dir)
    return Orchestrator(cfg, run_dir).run(resume=resume)


# -- modes -----------------------------------------------------------------------------------------


def dry_run(spec: sw.SweepSpec, runs: list[sw.SweepRun], configs: dict[str, RunConfig]) -> None:
    seeds = len(spec.seeds) if spec.seeds else 1
    print(
        f"# sweep {spec.name}: {len(runs)} runs ({len(runs) // seeds} variants x {seeds} "
        f"seeds), all valid; run dirs under {spec.sweep_dir / 'runs'}"
    )
    for i, run in enumerate(runs):
        print(
            f"---\n# run {i + 1}/{len(runs)}: {run.name}\n# variant: {run.variant}"
            f"  seed: {run.seed}\n# overrides: {' '.join(run.dotlist())}"
        )
        print(to_yaml(configs[run.name]), end="")


def run_local(
    spec: sw.SweepSpec,
    runs: list[sw.SweepRun],
    configs: dict[str, RunConfig],
    state: SweepState,
    num_cpus: int | None = None,
) -> list[str]:
    """Run the unfinished runs one after another; returns the names of those that failed."""
    dirs = run_dirs(spec, runs)
    todo = []
    for run in runs:
        if sw.is_complete(dirs[run.name]):
            warn_if_config_changed(configs[run.name], dirs[run.name])
            if state.get(run.name)["status"] != "succeeded":
                state.update(run.name, status="succeeded")
        else:
            todo.append(run)
    print(
        f"sweep {spec.name}: {len(runs) - len(todo)} of {len(runs)} runs already done, "
        f"{len(todo)} to run",
        flush=True,
    )
    if not todo:
        return []
    from rl.orchestrator import init_ray

    init_ray(num_cpus)
    failed = []
    for i, run in enumerate(todo):
        print(
            f"\n=== [{i + 1}/{len(todo)}] {run.name}  ({run.variant}, seed {run.seed})", flush=True
        )
        state.update(run.name, status="running", attempts=state.get(run.name)["attempts"] + 1)
        try:
            run_one(configs[run.name], dirs[run.name])
        except KeyboardInterrupt:
            state.update(run.name, status="interrupted")
            raise
        except Exception as e:  # one broken run does not stop the others
            traceback.print_exc()
            state.update(run.name, status="failed", error=f"{type(e).__name__}: {e}")
            failed.append(run.name)
            continue
        state.update(run.name, status="succeeded", error=None)
    return failed


def _retry(call, what: str, timeout_s: float = 90.0):
    """`call()`, again while the cluster answers with a start-up error, for up to timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return call()
        except Exception as e:
            if time.monotonic() > deadline or not any(t in str(e) for t in TRANSIENT):
                raise RuntimeError(f"{what} failed: {e}") from e
            time.sleep(2)


def job_runtime_env(spec: sw.SweepSpec, cfg: RunConfig) -> dict:
    """The repository as working_dir (without virtualenvs: Ray skips what .gitignore lists and
    `.venv`, not a `.venv-OTHER` beside it), the sweep's runtime_env (py_modules, pip, env_vars)
    merged in, and the run's resolved config as an environment variable."""
    env = dict(spec.runtime_env)
    env.setdefault("working_dir", str(REPO))
    env["excludes"] = [*env.get("excludes", []), ".venv*/"]
    env["env_vars"] = {**env.get("env_vars", {}), RUN_CONFIG_ENV: to_yaml(cfg)}
    return env


def run_jobs(
    spec: sw.SweepSpec,
    runs: list[sw.SweepRun],
    configs: dict[str, RunConfig],
    state: SweepState,
    address: str,
    max_concurrent: int = 1,
    poll_s: float = 5.0,
) -> list[str]:
    """Submit the unfinished runs as Ray jobs, at most `max_concurrent` at a time (jobs that
    share a small cluster can deadlock on actor resources), and track them to the end.
    Run dirs are absolute paths on the cluster; the table needs them on a shared file system."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    from rl.orchestrator import RAY_ENV

    for key, value in RAY_ENV.items():  # e.g. no auth token on a cluster started without one
        os.environ.setdefault(key, value)
    client = _retry(lambda: JobSubmissionClient(address), f"connecting to {address}")
    dirs = run_dirs(spec, runs)
    logs = spec.sweep_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    active: dict[str, str] = {}  # run name -> job id
    todo = []
    for run in runs:
        entry = state.get(run.name)
        if sw.is_complete(dirs[run.name]) or entry["status"] == "succeeded":
            continue
        job_id = entry.get("job_id")
        if job_id and entry["status"] in ("pending", "running"):
            try:
                status = client.get_job_status(job_id)
            except Exception:  # a new cluster does not know the old job
                status = None
            if status is not None and not status.is_terminal():
                print(f"tracking {run.name} again: job {job_id} is {status.value}")
                active[run.name] = job_id
                continue
        todo.append(run)
    print(
        f"sweep {spec.name} on {address}: {len(runs) - len(todo) - len(active)} runs done, "
        f"{len(active)} running, {len(todo)} to submit",
        flush=True,
    )
    failed: list[str] = []
    try:
        while todo or active:
            while todo and len(active) < max_concurrent:
                run = todo.pop(0)
                entrypoint = f"python -m launch.sweep --job-run {shlex.quote(str(dirs[run.name]))}"
                job_id = _retry(
                    lambda run=run, entrypoint=entrypoint: client.submit_job(
                        entrypoint=entrypoint,
                        runtime_env=job_runtime_env(spec, configs[run.name]),
                        metadata={"cwm_rl_sweep": spec.name, "cwm_rl_run": run.name},
                    ),
                    f"submitting {run.name}",
                )
                attempts = state.get(run.name)["attempts"] + 1
                state.update(run.name, status="pending", job_id=job_id, attempts=attempts)
                active[run.name] = job_id
                print(f"submitted {run.name} as job {job_id}", flush=True)
            time.sleep(poll_s)
            for name, job_id in list(active.items()):
                status = client.get_job_status(job_id)
                if not status.is_terminal():
                    if status == JobStatus.RUNNING and state.get(name)["status"] != "running":
                        state.update(name, status="running")
                        print(f"{name}: running", flush=True)
                    continue
                del active[name]
                (logs / f"{name}.log").write_text(client.get_job_logs(job_id))
                if status == JobStatus.SUCCEEDED:
                    state.update(name, status="succeeded", error=None)
                    print(f"{name}: succeeded", flush=True)
                else:
                    message = client.get_job_info(job_id).message
                    state.update(name, status="failed", error=f"{status.value}: {message}")
                    failed.append(name)
                    print(f"{name}: {status.value} ({message}); log: {logs / name}.log", flush=True)
    except KeyboardInterrupt:
        print(
            f"\ninterrupted: {len(active)} jobs keep running on the cluster; run the same "
            "command again to track them",
            file=sys.stderr,
        )
        raise
    return failed


def report(spec: sw.SweepSpec, runs: list[sw.SweepRun]) -> str:
    """results.md / results.json / reward_curves.png in the sweep dir; returns the table."""
    dirs = run_dirs(spec, runs)
    summary = sw.summarize(runs, dirs, spec)
    table = sw.results_table(summary)
    out = spec.sweep_dir
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    png = sw.plot_reward_curves(runs, dirs, out / "reward_curves.png")
    print(f"\n{table}\n\nwrote {out / 'results.md'}" + (f" and {png}" if png else ""))
    return table


def job_run(run_dir: str) -> int:
    """Inside a Ray job: the run config comes from the job's environment (validated again)."""
    text = os.environ.get(RUN_CONFIG_ENV)
    if not text:
        print(f"--job-run needs {RUN_CONFIG_ENV} (set by launch.sweep --address)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="cwm-sweep-run-") as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(text)
        cfg = load_config(path)
    from rl.orchestrator import init_ray

    init_ray()
    summary = run_one(cfg, Path(run_dir))
    print(f"done: {summary['steps']} steps in {summary['train_seconds']} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m launch.sweep", description=__doc__.splitlines()[0])
    ap.add_argument("args", nargs="*", help="SWEEP.yaml, then key=value overrides for every run")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="print the expanded run configs")
    mode.add_argument("--local", action="store_true", help="run here, one run after another")
    mode.add_argument("--address", metavar="URL", help="Ray dashboard URL to submit jobs to")
    mode.add_argument("--report", action="store_true", help="only rebuild the table and plot")
    mode.add_argument("--job-run", metavar="RUN_DIR", help=argparse.SUPPRESS)
    ap.add_argument("--output-dir", help="instead of the sweep file's output_dir")
    ap.add_argument("--num-cpus", type=int, help="--local: CPUs of the local Ray instance")
    ap.add_argument("--max-concurrent", type=int, default=1, help="--address: jobs at a time")
    ap.add_argument("--poll-s", type=float, default=5.0, help="--address: status poll interval")
    ns = ap.parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    if ns.job_run:
        return job_run(ns.job_run)
    files = [a for a in ns.args if "=" not in a]
    overrides = [a for a in ns.args if "=" in a]
    if len(files) != 1:
        ap.error("give one SWEEP.yaml, then key=value overrides")
    if not (ns.dry_run or ns.local or ns.address or ns.report):
        ap.error("choose --dry-run, --local, --address URL or --report")
    try:
        spec = sw.load_spec(files[0], overrides)
        if ns.output_dir:
            spec.output_dir = ns.output_dir
        runs = sw.expand(spec)
        configs = sw.validate_runs(spec, runs)
    except ConfigError as e:
        print(f"sweep error: {e}", file=sys.stderr)
        return 2
    if ns.dry_run:
        dry_run(spec, runs, configs)
        return 0
    failed: list[str] = []
    if not ns.report:
        spec.sweep_dir.mkdir(parents=True, exist_ok=True)
        extra = f"\n# command-line overrides: {' '.join(overrides)}\n" if overrides else ""
        (spec.sweep_dir / "sweep.yaml").write_text(Path(files[0]).read_text() + extra)
        state = SweepState(spec.sweep_dir)
        for run in runs:
            state.get(run.name).update(variant=run.variant, overrides=run.dotlist())
        state.save()
        if ns.local:
            failed = run_local(spec, runs, configs, state, ns.num_cpus)
        else:
            try:
                failed = run_jobs(
                    spec, runs, configs, state, ns.address, ns.max_concurrent, ns.poll_s
                )
            except RuntimeError as e:  # the cluster cannot be reached or refuses a job
                print(f"sweep error: {e}", file=sys.stderr)
                return 1
        if failed:
            print(f"\n{len(failed)} runs failed: {', '.join(failed)}", file=sys.stderr)
    report(spec, runs)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
