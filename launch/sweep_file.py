"""Ablation sweeps: a YAML file -> a list of named, validated runs; their results -> a comparison.

    name: clip_x_aggregation
    base: configs/tiny_math.yaml              # a run config file, or an inline mapping
    overrides: [learner.loss.norm_length=256]  # every run (key=value strings or a mapping)
    grid:                                      # the cartesian product of these lists
      learner.loss.eps_high: [0.2, 0.28]
      learner.loss.aggregation: [token-mean, constant]
    zip:                                       # lists varied together (one group, or a list)
      learner.optim.lr: [1.0e-5, 2.0e-5]
      learner.optim.warmup_steps: [0, 2]
    runs:                                      # explicit override sets
      - {rollout.temperature: 0.7}
      - {rollout.temperature: 1.0, rollout.max_new_tokens: 48}
    seeds: [0, 1]
    metrics: [reward/mean, train/entropy]      # table columns (+ held-out pass@1 per env)
    last_steps: 1                              # a final metric = mean of its last N logged values
    output_dir: runs/sweeps                    # runs go to OUTPUT_DIR/NAME/runs/RUN
    runtime_env: {}                            # merged into each Ray job's runtime env

Runs = grid x each zip group x runs x seeds (every part optional). Overrides follow
`launch.train`'s `key=value` rules: a mapping value merges into the base's mapping (so an
environment of the base cannot be removed by an override; give another base for that). A run is
named by a readable prefix and a stable hash of all its overrides, so a sweep run again finds its
finished runs. Every run's config goes through `load_config` before anything runs; an invalid one
fails naming the run, the key and the part of the sweep file that set it.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from rl.config import RunConfig, load_config
from rl.runlog import plot_lines, read_jsonl
from rl.schema import ConfigError

REPO = Path(__file__).resolve().parents[1]
SPEC_KEYS = (
    "name", "base", "overrides", "grid", "zip", "runs", "seeds", "metrics", "last_steps",
    "output_dir", "runtime_env",
)  # fmt: skip
DEFAULT_METRICS = ("reward/mean", "train/loss")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class SweepError(ConfigError):
    """The sweep file is malformed (unknown key, axis that is not a list, unequal zip lengths)."""


@dataclass
class SweepSpec:
    name: str
    base: str | dict  # a config file path, or an inline run config mapping
    overrides: dict[str, Any] = field(default_factory=dict)  # applied to every run
    grid: dict[str, list] = field(default_factory=dict)
    zips: list[dict[str, list]] = field(default_factory=list)
    runs: list[dict[str, Any]] = field(default_factory=list)
    seeds: list[int] | None = None
    metrics: list[str] = field(default_factory=lambda: list(DEFAULT_METRICS))
    last_steps: int = 1
    output_dir: str = "runs/sweeps"
    runtime_env: dict[str, Any] = field(default_factory=dict)

    @property
    def sweep_dir(self) -> Path:
        return Path(self.output_dir) / self.name


@dataclass(frozen=True)
class SweepRun:
    """One expanded run. `overrides` holds every override (fixed ones first); `varied` only those
    that differ between runs, seed included; the variant groups runs that differ only by seed."""

    name: str
    overrides: dict[str, Any]
    varied: dict[str, Any]
    seed: int | None
    sources: dict[str, str] = field(default_factory=dict, compare=False)  # key -> sweep part

    @property
    def variant(self) -> str:
        parts = [f"{k}={format_value(v)}" for k, v in self.varied.items() if k != "seed"]
        return " ".join(parts) or "base"

    def dotlist(self) -> list[str]:
        return [f"{k}={format_value(v)}" for k, v in self.overrides.items()]


# -- parsing -------------------------------------------------------------------------------------


def parse_value(text: str) -> Any:
    """The value of a `key=value` override, parsed the way OmegaConf parses a dotlist."""
    return OmegaConf.to_container(OmegaConf.from_dotlist([f"v={text}"]))["v"]


def format_value(value: Any) -> str:
    """A value as override text that parses back to itself: plain where that is unambiguous
    (`token-mean`, `0.28`), else JSON, which YAML reads (`"a b"`, `[1, 2]`, `null`)."""
    if isinstance(value, str) and re.fullmatch(r"[A-Za-z0-9_./:+-]+", value):
        with contextlib.suppress(OmegaConfBaseException):
            if parse_value(value) == value:
                return value
    if isinstance(value, bool) or value is None or isinstance(value, str | list | dict):
        return json.dumps(value)
    return str(value)


def parse_overrides(raw: Any, where: str) -> dict[str, Any]:
    """`[key=value, ...]` or `{key: value}` -> {dotted key: value}."""
    if raw is None:
        return {}
    if isinstance(raw, dict):
        out = dict(raw)
    elif isinstance(raw, list | tuple):
        out = {}
        for item in raw:
            if not isinstance(item, str) or "=" not in item:
                raise SweepError(f"{where}: {item!r} is not a key=value string")
            key, _, text = item.partition("=")
            try:
                out[key.strip()] = parse_value(text)
            except OmegaConfBaseException as e:
                raise SweepError(f"{where}: {item!r}: {str(e).splitlines()[0]}") from None
    else:
        raise SweepError(f"{where} must be a list of key=value strings or a mapping, got {raw!r}")
    for key in out:
        if not isinstance(key, str) or not re.fullmatch(r"[A-Za-z_][\w.-]*", key):
            raise SweepError(f"{where}: {key!r} is not a dotted config key")
    return out


def _axes(raw: Any, where: str) -> dict[str, list]:
    axes = parse_overrides(raw, where)
    for key, values in axes.items():
        if not isinstance(values, list) or not values:
            raise SweepError(f"{where} axis '{key}' must be a non-empty list, got {values!r}")
    return axes


def parse_spec(
    raw: dict, source: str = "<sweep>", extra_overrides: list[str] | None = None
) -> SweepSpec:
    """A sweep mapping (a loaded YAML file) -> SweepSpec; every malformed part is named."""
    if not isinstance(raw, dict):
        raise SweepError(f"{source}: a sweep file is a mapping, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(SPEC_KEYS))
    if unknown:
        raise SweepError(f"{source}: unknown key '{unknown[0]}' (known: {', '.join(SPEC_KEYS)})")
    if "base" not in raw:
        raise SweepError(f"{source}: key 'base' is missing (a config file or an inline mapping)")
    base = raw["base"]
    if isinstance(base, str):
        base = str(resolve_path(base, Path(source).parent))
    elif not isinstance(base, dict):
        raise SweepError(f"{source}: key 'base' must be a path or a mapping, got {base!r}")
    name = raw.get("name") or Path(source).stem
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise SweepError(f"{source}: key 'name' must match {NAME_RE.pattern}, got {name!r}")
    zips_raw = raw.get("zip") or []
    zips = [_axes(g, f"zip group {i}") for i, g in enumerate(_as_list(zips_raw))]
    for i, group in enumerate(zips):
        lengths = {k: len(v) for k, v in group.items()}
        if len(set(lengths.values())) > 1:
            raise SweepError(f"zip group {i}: axes of unequal lengths {lengths}")
    runs = raw.get("runs") or []
    if not isinstance(runs, list):
        raise SweepError(f"{source}: key 'runs' must be a list of override sets, got {runs!r}")
    seeds = raw.get("seeds")
    if seeds is not None and (
        not isinstance(seeds, list)
        or not seeds
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
        or len(set(seeds)) != len(seeds)
    ):
        raise SweepError(f"{source}: key 'seeds' must be a non-empty list of distinct ints")
    metrics = raw.get("metrics", list(DEFAULT_METRICS))
    if not isinstance(metrics, list) or not all(isinstance(m, str) for m in metrics):
        raise SweepError(f"{source}: key 'metrics' must be a list of metric names")
    last_steps = raw.get("last_steps", 1)
    if not isinstance(last_steps, int) or last_steps < 1:
        raise SweepError(f"{source}: key 'last_steps' must be an int >= 1, got {last_steps!r}")
    runtime_env = raw.get("runtime_env") or {}
    if not isinstance(runtime_env, dict):
        raise SweepError(f"{source}: key 'runtime_env' must be a mapping")
    overrides = parse_overrides(raw.get("overrides"), "overrides")
    overrides.update(parse_overrides(list(extra_overrides or []), "command-line overrides"))
    spec = SweepSpec(
        name=name,
        base=base,
        overrides=overrides,
        grid=_axes(raw.get("grid"), "grid"),
        zips=zips,
        runs=[parse_overrides(r, f"runs[{i}]") for i, r in enumerate(runs)],
        seeds=seeds,
        metrics=metrics,
        last_steps=last_steps,
        output_dir=str(raw.get("output_dir", "runs/sweeps")),
        runtime_env=runtime_env,
    )
    _check_disjoint(spec)
    return spec


def _as_list(raw: Any) -> list:
    return raw if isinstance(raw, list) else [raw]


def _check_disjoint(spec: SweepSpec) -> None:
    """A key set by two parts of the sweep (grid and runs, overrides and seeds...) is ambiguous."""
    parts: list[tuple[str, set[str]]] = [
        ("overrides", set(spec.overrides)),
        ("grid", set(spec.grid)),
        *((f"zip group {i}", set(g)) for i, g in enumerate(spec.zips)),
        ("runs", {k for entry in spec.runs for k in entry}),
    ]
    if spec.seeds is not None:
        parts.append(("seeds", {"seed"}))
    for (a, keys_a), (b, keys_b) in itertools.combinations(parts, 2):
        both = sorted(keys_a & keys_b)
        if both:
            raise SweepError(f"key '{both[0]}' is set by both {a} and {b}")
    for key in ("name", "output_dir"):
        if any(key in keys for _, keys in parts):
            raise SweepError(f"key '{key}' is set by the sweep for each run; do not override it")


def resolve_path(path: str, sweep_file_dir: Path) -> Path:
    """A relative path is looked up in the working directory, then the repository root, then
    next to the sweep file."""
    p = Path(path)
    if p.is_absolute():
        return p
    for root in (Path.cwd(), REPO, sweep_file_dir):
        if (root / p).exists():
            return (root / p).resolve()
    return p.resolve()


def load_spec(path: str | os.PathLike, extra_overrides: list[str] | None = None) -> SweepSpec:
    """Read and check a sweep YAML file (its runs are validated by `validate_runs`)."""
    if not Path(path).exists():
        raise SweepError(f"sweep file {path} does not exist")
    try:
        raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except OmegaConfBaseException as e:
        raise SweepError(f"{path}: {str(e).splitlines()[0]}") from None
    return parse_spec(raw, str(path), extra_overrides)


# -- expansion -----------------------------------------------------------------------------------


def run_hash(overrides: dict[str, Any]) -> str:
    """8 hex digits of a hash of the overrides (order-independent, stable across processes)."""
    text = json.dumps(overrides, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def run_name(varied: dict[str, Any], overrides: dict[str, Any]) -> str:
    """`eps_high-0.28_aggregation-constant_seed-1-3fa2b1c9`: the varied keys' last components
    and values (for people), then the hash of all the overrides (for uniqueness)."""
    parts = [f"{k.rsplit('.', 1)[-1]}-{format_value(v)}" for k, v in varied.items()]
    prefix = re.sub(r"[^A-Za-z0-9.=+-]+", "_", "_".join(parts)).strip("_")[:64]
    return f"{prefix}-{run_hash(overrides)}" if prefix else f"run-{run_hash(overrides)}"


def expand(spec: SweepSpec) -> list[SweepRun]:
    """Every run of the sweep: seeds outermost (a stopped sweep has every variant at its first
    seeds), then the grid, zip groups and explicit runs in file order."""
    # each factor: a list of alternatives; an alternative: {key: (value, the part that set it)}
    factors: list[list[dict[str, tuple[Any, str]]]] = []
    if spec.grid:
        keys = list(spec.grid)
        factors.append(
            [
                {k: (v, f"grid axis '{k}'") for k, v in zip(keys, combo)}
                for combo in itertools.product(*spec.grid.values())
            ]
        )
    for i, group in enumerate(spec.zips):
        keys = list(group)
        factors.append(
            [
                {k: (v, f"zip group {i} axis '{k}'") for k, v in zip(keys, values)}
                for values in zip(*group.values())
            ]
        )
    if spec.runs:
        factors.append(
            [{k: (v, f"runs[{j}]") for k, v in entry.items()} for j, entry in enumerate(spec.runs)]
        )
    variants = [
        {k: kv for part in combo for k, kv in part.items()} for combo in itertools.product(*factors)
    ]
    runs, seen = [], {}
    for seed in spec.seeds if spec.seeds is not None else [None]:
        for variant in variants:
            if seed is not None:
                variant = {**variant, "seed": (seed, "seeds")}
            varied = {k: v for k, (v, _) in variant.items()}
            overrides = {**spec.overrides, **varied}
            sources = {k: "overrides" for k in spec.overrides}
            sources.update({k: where for k, (_, where) in variant.items()})
            name = run_name(varied, overrides)
            if name in seen:
                raise SweepError(
                    f"runs {seen[name]} and {len(runs)} have the same overrides "
                    f"({' '.join(f'{k}={format_value(v)}' for k, v in varied.items())})"
                )
            seen[name] = len(runs)
            runs.append(SweepRun(name, overrides, varied, seed, sources))
    return runs


# -- validation ----------------------------------------------------------------------------------


@contextlib.contextmanager
def base_config_file(spec: SweepSpec) -> Iterator[str]:
    """The base config as a file for load_config (an inline base is written to a temp file)."""
    if isinstance(spec.base, str):
        yield spec.base
        return
    with tempfile.TemporaryDirectory(prefix="cwm-sweep-") as tmp:
        path = Path(tmp) / "base.yaml"
        path.write_text(OmegaConf.to_yaml(OmegaConf.create(spec.base)))
        yield str(path)


def _culprit(message: str, origins: dict[str, str]) -> str | None:
    """The part of the sweep that set the key an error names. Errors name a key in full
    (`key 'learner.loss.eps_high'`) or by its tail (`loss.eps_high must be >= 0`): the override
    whose longest dotted tail appears in the message as a whole word wins."""
    best, best_len = None, 0
    for key, origin in origins.items():
        parts = key.split(".")
        for i in range(len(parts)):
            tail = ".".join(parts[i:])
            if len(tail) > best_len and re.search(rf"(?<![\w.]){re.escape(tail)}(?![\w])", message):
                best, best_len = origin, len(tail)
                break
    return best


def validate_runs(spec: SweepSpec, runs: list[SweepRun]) -> dict[str, RunConfig]:
    """Load every run's config (base + overrides + its name) before anything runs; one
    ConfigError lists the invalid runs, each with the key at fault and where the sweep set it."""
    configs: dict[str, RunConfig] = {}
    errors: list[str] = []
    with base_config_file(spec) as base:
        for i, run in enumerate(runs):
            try:
                configs[run.name] = load_config(base, [*run.dotlist(), f"name={run.name}"])
            except ConfigError as e:
                msg = str(e)
                culprit = _culprit(msg, run.sources)
                where = f" (set by {culprit})" if culprit else ""
                errors.append(f"run {i + 1}/{len(runs)} {run.name} [{run.variant}]: {msg}{where}")
    if errors:
        more = f"\n  ... and {len(errors) - 10} more" if len(errors) > 10 else ""
        raise ConfigError(
            f"sweep '{spec.name}': {len(errors)} of {len(runs)} runs are invalid, nothing ran:\n  "
            + "\n  ".join(errors[:10])
            + more
        )
    return configs


# -- results -------------------------------------------------------------------------------------


def read_metrics(run_dir: Path) -> list[dict]:
    return read_jsonl(Path(run_dir) / "metrics.jsonl")


def read_eval(run_dir: Path) -> dict | None:
    """eval.json of a finished run (None while the run is incomplete)."""
    try:
        summary = json.loads((Path(run_dir) / "eval.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return summary if isinstance(summary, dict) and "after" in summary else None


def is_complete(run_dir: Path) -> bool:
    return read_eval(run_dir) is not None


def final_values(run_dir: Path, metrics: list[str], last_steps: int = 1) -> dict[str, float]:
    """Each metric's mean over its last `last_steps` logged values, and held-out results from
    eval.json as `eval/ENV/pass@K/before|after`."""
    rows = read_metrics(run_dir)
    out: dict[str, float] = {}
    for key in metrics:
        values = [r[key] for r in rows if isinstance(r.get(key), int | float)]
        if values:
            tail = values[-last_steps:]
            out[key] = sum(tail) / len(tail)
    summary = read_eval(run_dir)
    if summary:
        for when in ("before", "after"):
            for env, results in (summary.get(when) or {}).items():
                for metric, value in results.items():
                    if (
                        metric.startswith("pass@")
                        and not metric.endswith("_se")
                        and isinstance(value, int | float)
                    ):
                        out[f"eval/{env}/{metric}/{when}"] = float(value)
    return out


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n - 1; None for a single value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def summarize(runs: list[SweepRun], run_dirs: dict[str, Path], spec: SweepSpec) -> dict:
    """Per-run final values and per-variant mean/std over seeds (complete runs only)."""
    per_run = {}
    for run in runs:
        done = is_complete(run_dirs[run.name])
        values = final_values(run_dirs[run.name], spec.metrics, spec.last_steps) if done else {}
        per_run[run.name] = {
            "variant": run.variant, "seed": run.seed, "complete": done, "values": values,
        }  # fmt: skip
    columns = list(spec.metrics) + sorted(
        {k for r in per_run.values() for k in r["values"] if k.startswith("eval/")},
        key=lambda k: (k.rsplit("/", 1)[0], k.endswith("/after")),
    )
    variants: dict[str, dict] = {}
    for run in runs:
        entry = variants.setdefault(run.variant, {"runs": [], "complete": 0, "stats": {}})
        entry["runs"].append(run.name)
        entry["complete"] += per_run[run.name]["complete"]
    for entry in variants.values():
        for col in columns:
            values = [
                per_run[n]["values"][col] for n in entry["runs"] if col in per_run[n]["values"]
            ]
            if values:
                mean, std = mean_std(values)
                entry["stats"][col] = {"mean": mean, "std": std, "n": len(values)}
    return {"sweep": spec.name, "columns": columns, "variants": variants, "runs": per_run}


def _cell(stat: dict | None) -> str:
    if stat is None:
        return "n/a"
    if stat["std"] is None:
        return f"{stat['mean']:.3f}"
    return f"{stat['mean']:.3f} ± {stat['std']:.3f}"


def _header(col: str) -> str:
    if col.startswith("eval/"):  # eval/ENV/pass@1/after -> ENV pass@1 after
        _, env, metric, when = col.split("/", 3)
        return f"{env} {metric} {when}"
    return col


def results_table(summary: dict) -> str:
    """Markdown: one row per variant (mean ± sample std over seeds), then one row per run."""
    cols = summary["columns"]
    lines = [
        f"### sweep {summary['sweep']}: final metrics, mean ± std over seeds",
        "",
        "| variant | runs done | " + " | ".join(_header(c) for c in cols) + " |",
        "|---|---:|" + "---:|" * len(cols),
    ]
    for variant, entry in summary["variants"].items():
        cells = [_cell(entry["stats"].get(c)) for c in cols]
        done = f"{entry['complete']}/{len(entry['runs'])}"
        lines.append(f"| {variant} | {done} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| run | seed | " + " | ".join(_header(c) for c in cols) + " |",
        "|---|---:|" + "---:|" * len(cols),
    ]
    for name, run in summary["runs"].items():
        if run["complete"]:
            cells = [f"{run['values'][c]:.3f}" if c in run["values"] else "n/a" for c in cols]
        else:
            cells = ["not finished"] + [""] * (len(cols) - 1)
        seed = "" if run["seed"] is None else str(run["seed"])
        lines.append(f"| {name} | {seed} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_reward_curves(
    runs: list[SweepRun], run_dirs: dict[str, Path], out: Path, metric: str = "reward/mean"
) -> Path | None:
    """One colour per variant: a thin line per seed and a thick line for the mean over seeds."""
    curves: dict[str, list[dict[int, float]]] = {}
    for run in runs:
        rows = read_metrics(run_dirs[run.name])
        points = {r["step"]: r[metric] for r in rows if isinstance(r.get(metric), int | float)}
        if points:
            curves.setdefault(run.variant, []).append(points)
    if not curves:
        return None
    colors = [f"C{i % 10}" for i in range(len(curves))]  # matplotlib's default cycle
    lines = []
    for color, (variant, seeds) in zip(colors, curves.items()):
        for points in seeds:
            steps = sorted(points)
            lines.append({"x": steps, "y": [points[s] for s in steps], "color": color,
                          "alpha": 0.3, "linewidth": 1})  # fmt: skip
        common = sorted(set.intersection(*(set(p) for p in seeds)))
        mean = [sum(p[s] for p in seeds) / len(seeds) for s in common]
        lines.append({"x": common, "y": mean, "color": color, "linewidth": 2.2,
                      "label": f"{variant} (n={len(seeds)})"})  # fmt: skip
    return plot_lines(
        out, lines, title=f"{out.parent.name}: {metric} (thin: seeds, thick: mean)",
        ylabel=metric, size=(8, 4.5), legend_size=7,
    )  # fmt: skip
