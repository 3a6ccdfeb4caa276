"""What a run writes to its directory (runs/NAME/): config.yaml, provenance.json, metrics.jsonl,
TensorBoard events, samples.jsonl, trained.jsonl, trajectories.jsonl (save_trajectories),
reward_curve.png and eval.json / eval.md; with logging.wandb, the same metrics and image to
Weights & Biases (rl/wandb_log.py, files under wandb/)."""

from __future__ import annotations

import contextlib
import json
import math
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rl.wandb_log import WandbLog

PACKAGES = (
    "torch",
    "ray",
    "transformers",
    "omegaconf",
    "math-verify",
    "vllm",
    "deepspeed",
    "numpy",
)


def provenance(repo: Path) -> dict[str, Any]:
    """Package versions, the git commit and whether the tree was dirty."""

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(
                ["git", *args], cwd=repo, capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    status = git("status", "--porcelain")
    return {
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": None if status is None else bool(status),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": versions,
        "argv": sys.argv,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


class RunLog:
    def __init__(self, run_dir: Path, tensorboard: bool = True):
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(self.dir / "tensorboard"))
            except ImportError:  # tensorboard is a dependency; tolerate its absence anyway
                self.writer = None
        self.wandb: WandbLog | None = None  # set when the run starts, if logging.wandb is

    def metrics(self, step: int, values: dict[str, Any]) -> None:
        """A row of metrics.jsonl; its finite numbers to TensorBoard (and W&B) at `step`."""
        row = {"step": step, **{k: _jsonable(v) for k, v in values.items()}}
        with open(self.dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        scalars = {
            k: v for k, v in values.items() if isinstance(v, int | float) and math.isfinite(v)
        }
        if self.writer is not None:
            for key, value in scalars.items():
                self.writer.add_scalar(key, value, step)
            self.writer.flush()
        if self.wandb is not None:
            self.wandb.metrics(step, scalars)

    def samples(self, step: int, rows: list[dict]) -> None:
        with open(self.dir / "samples.jsonl", "a") as f:
            for row in rows:
                f.write(json.dumps({"step": step, **row}) + "\n")

    def trained(self, step: int, groups: list[tuple[str, str]]) -> None:
        """trained.jsonl: which groups (and tasks) each learner step trained on."""
        row = {"step": step, "groups": [g for g, _ in groups], "tasks": [t for _, t in groups]}
        with open(self.dir / "trained.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")

    def trajectories(self, step: int, groups: list[tuple[str, list[dict]]]) -> None:
        """trajectories.jsonl: every trajectory of the groups a step trained on (to_dict form),
        group by group in training order."""
        row = {"step": step, "groups": [{"group_id": g, "trajectories": t} for g, t in groups]}
        with open(self.dir / "trajectories.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")

    def read_metrics(self) -> list[dict]:
        return read_jsonl(self.dir / "metrics.jsonl")

    def truncate_after(self, step: int) -> None:
        """Drop metric rows past `step` (a resumed run rewrites them)."""
        for name in ("metrics.jsonl", "samples.jsonl", "trained.jsonl", "trajectories.jsonl"):
            path = self.dir / name
            if path.exists():
                keep = []
                for line in path.read_text().splitlines():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:  # a line torn by a killed process
                        continue
                    if row.get("step", 0) <= step:
                        keep.append(line)
                path.write_text("".join(line + "\n" for line in keep))

    def plot_rewards(self, evals: list[dict] | None = None) -> Path | None:
        """reward_curve.png: train reward per step (per environment too) and held-out pass@1."""
        rows = self.read_metrics()
        if not rows:
            return None
        with_reward = [r for r in rows if "reward/mean" in r]
        lines = [
            {
                "x": [r["step"] for r in with_reward],
                "y": [r["reward/mean"] for r in with_reward],
                "label": "train reward",
            }
        ]
        env_keys = sorted({k for r in rows for k in r if k.startswith("reward/env/")})
        if len(env_keys) > 1:
            for key in env_keys:
                pts = [(r["step"], r[key]) for r in rows if key in r]
                lines.append(
                    {"x": [p[0] for p in pts], "y": [p[1] for p in pts], "alpha": 0.6,
                     "label": key.removeprefix("reward/env/")}
                )  # fmt: skip
        for ev in evals or []:
            pts = sorted((e["step"], e["pass@1"]) for e in ev.get("points", []))
            if pts:
                lines.append(
                    {"x": [p[0] for p in pts], "y": [p[1] for p in pts], "fmt": "o--",
                     "label": f"held-out pass@1 ({ev['env']})"}
                )  # fmt: skip
        path = plot_lines(
            self.dir / "reward_curve.png", lines, title=self.dir.name, ylabel="reward"
        )
        if self.wandb is not None:
            self.wandb.image(max(r["step"] for r in rows), "reward_curve", path)
        return path

    def close(self, failed: bool = False) -> None:
        """Close TensorBoard's writer and end the W&B run (marked failed when the run raised)."""
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.close(failed)
            self.wandb = None


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSON-lines file ([] if it does not exist); a line cut by a killed process
    is skipped."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            rows.append(json.loads(line))
    return rows


def plot_lines(
    out: Path,
    lines: list[dict],
    *,
    title: str,
    ylabel: str,
    size=(7, 4),
    legend_size=None,
    xlabel: str = "step",
) -> Path:
    """One PNG of curves over steps: each line a dict with "x", "y", optional "label", "fmt"
    (a matplotlib format string) and style keys (color, alpha, linewidth). Used by a run's
    reward_curve.png and by a sweep's reward_curves.png (launch/sweep_file.py)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=size)
    for line in lines:
        style = {k: v for k, v in line.items() if k not in ("x", "y", "fmt")}
        ax.plot(line["x"], line["y"], line.get("fmt", "-"), **style)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if any(line.get("label") for line in lines):
        ax.legend(fontsize=legend_size)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def eval_table(before: dict[str, dict], after: dict[str, dict]) -> str:
    """A markdown table of held-out results per environment, before vs after training, each
    with its standard error over tasks (+-)."""
    lines = ["| env | tasks | metric | before | after | change |", "|---|---:|---|---:|---:|---:|"]

    def cell(result: dict, metric: str) -> str:
        value, se = result.get(metric), result.get(f"{metric}_se")
        if value is None:
            return ""
        return f"{value:.3f}" if se is None or not math.isfinite(se) else f"{value:.3f} ± {se:.3f}"

    for env in sorted(after):
        metrics = [k for k in after[env] if k.startswith("pass@") and not k.endswith("_se")]
        for metric in sorted(metrics):
            b, a = before.get(env, {}).get(metric), after[env][metric]
            change = "" if b is None else f"{a - b:+.3f}"
            b_text = cell(before.get(env, {}), metric)
            a_text = cell(after[env], metric)
            lines.append(
                f"| {env} | {after[env]['tasks']} | {metric} | {b_text} | {a_text} | {change} |"
            )
    return "\n".join(lines)


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item"):
        return value.item()
    return value
