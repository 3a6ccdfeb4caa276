"""Sweeps from YAML (launch/sweep_file.py, launch/sweep.py): expansion and names, validation before
anything runs, the comparison table from hand-made run dirs, and a real local sweep of tiny runs
that continues an interrupted one."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from launch import sweep as cli
from launch import sweep_file as sw
from rl.schema import ConfigError

REPO = Path(__file__).resolve().parents[1]
SMOKE_SWEEP = REPO / "configs" / "sweeps" / "smoke.yaml"
TINY_ABLATION = REPO / "configs" / "sweeps" / "tiny_clip_x_aggregation.yaml"


def spec_of(**parts) -> sw.SweepSpec:
    return sw.parse_spec({"name": "t", "base": str(REPO / "configs" / "smoke.yaml"), **parts})


# -- expansion --------------------------------------------------------------------------------------


def test_grid_zip_runs_and_seeds_expand_to_their_product():
    spec = spec_of(
        overrides=["steps=2"],
        grid={"learner.loss.eps_high": [0.2, 0.28], "learner.loss.aggregation": ["token-mean"]},
        zip={"learner.optim.lr": [1e-3, 1e-4], "learner.optim.warmup_steps": [0, 1]},
        runs=[{"group_size": 2}, {"group_size": 4, "rollout.temperature": 0.5}],
        seeds=[0, 7],
    )
    runs = sw.expand(spec)
    assert len(runs) == 2 * 1 * 2 * 2 * 2
    # seeds outermost: the first half is seed 0, in grid -> zip -> runs order
    assert [r.seed for r in runs] == [0] * 8 + [7] * 8
    assert runs[0].overrides == {
        "steps": 2,
        "learner.loss.eps_high": 0.2,
        "learner.loss.aggregation": "token-mean",
        "learner.optim.lr": 1e-3,
        "learner.optim.warmup_steps": 0,
        "group_size": 2,
        "seed": 0,
    }
    # zipped axes move together, never crossed
    assert {
        (r.overrides["learner.optim.lr"], r.overrides["learner.optim.warmup_steps"]) for r in runs
    } == {
        (1e-3, 0),
        (1e-4, 1),
    }
    assert runs[3].varied == {
        "learner.loss.eps_high": 0.2,
        "learner.loss.aggregation": "token-mean",
        "learner.optim.lr": 1e-4,
        "learner.optim.warmup_steps": 1,
        "group_size": 4,
        "rollout.temperature": 0.5,
        "seed": 0,
    }
    assert runs[3].dotlist()[0] == "steps=2" and "rollout.temperature=0.5" in runs[3].dotlist()
    # a variant groups the seeds of one setting
    assert runs[3].variant == runs[11].variant and runs[3].name != runs[11].name
    assert len({r.name for r in runs}) == 16
    assert len({r.variant for r in runs}) == 8


def test_run_names_are_stable_readable_and_order_independent():
    overrides = {"steps": 2, "learner.loss.eps_high": 0.28, "seed": 1}
    # the hash of the overrides is fixed: sha256 of their sorted compact JSON
    assert sw.run_hash(overrides) == "0408cc1d"
    assert sw.run_hash(dict(reversed(list(overrides.items())))) == "0408cc1d"
    name = sw.run_name({"learner.loss.eps_high": 0.28, "seed": 1}, overrides)
    assert name == "eps_high-0.28_seed-1-0408cc1d"
    # the same in another interpreter (no dependence on Python's per-process hash seed)
    code = (
        "from launch import sweep_file as sw; print(sw.run_name({'learner.loss.eps_high': 0.28, 'seed': 1},"
        " {'steps': 2, 'learner.loss.eps_high': 0.28, 'seed': 1}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
        env={**os.environ, "PYTHONHASHSEED": "12345"},
    )  # fmt: skip
    assert out.stdout.strip() == name
    # a changed fixed override changes every name (old results never pass for new ones)
    assert sw.run_hash({**overrides, "steps": 3}) != "0408cc1d"


def test_override_values_round_trip_through_their_text():
    for value in (0.28, 1e-5, 3, True, None, "token-mean", "two words", [1, 2], {"a": 1}, "1"):
        assert sw.parse_value(sw.format_value(value)) == value, value
    assert sw.format_value("token-mean") == "token-mean"
    assert sw.format_value("1") == '"1"'  # a string that YAML would read as an int


@pytest.mark.parametrize(
    ("parts", "message"),
    [
        ({"grid": {"learner.loss.eps_high": 0.2}}, "grid axis 'learner.loss.eps_high' must be a non-empty list"),
        ({"grid": {"steps": []}}, "grid axis 'steps' must be a non-empty list"),
        ({"zip": {"steps": [1, 2], "seed": [0]}}, "zip group 0: axes of unequal lengths"),
        ({"grid": {"steps": [1, 2]}, "runs": [{"steps": 3}]}, "key 'steps' is set by both grid and runs"),
        ({"overrides": ["seed=3"], "seeds": [0, 1]}, "key 'seed' is set by both overrides and seeds"),
        ({"seeds": [0, 0]}, "key 'seeds' must be a non-empty list of distinct ints"),
        ({"grids": {"steps": [1]}}, "unknown key 'grids'"),
        ({"overrides": ["steps"]}, "'steps' is not a key=value string"),
        ({"grid": {"name": ["a", "b"]}}, "key 'name' is set by the sweep"),
        ({"last_steps": 0}, "key 'last_steps' must be an int >= 1"),
    ],
)  # fmt: skip
def test_malformed_sweep_files_fail_naming_the_part(parts, message):
    with pytest.raises(sw.SweepError, match=message.replace("(", r"\(")):
        sw.expand(spec_of(**parts))


def test_duplicate_runs_are_an_error():
    with pytest.raises(sw.SweepError, match="runs 0 and 1 have the same overrides"):
        sw.expand(spec_of(runs=[{"steps": 2}, {"steps": 2}]))


# -- validation before anything runs ---------------------------------------------------------------


def test_invalid_axis_value_fails_before_anything_runs(tmp_path, capsys):
    sweep = tmp_path / "bad.yaml"
    sweep.write_text(
        yaml.safe_dump(
            {
                "base": "configs/smoke.yaml",
                "grid": {"learner.loss.aggregation": ["token-mean", "per-banana"]},
                "seeds": [0, 1],
            }
        )
    )
    out_dir = tmp_path / "out"
    rc = cli.main([str(sweep), "--local", "--output-dir", str(out_dir)])
    err = capsys.readouterr().err
    assert rc == 2
    assert "2 of 4 runs are invalid, nothing ran" in err
    assert "loss.aggregation must be one of" in err and "'per-banana'" in err
    assert "(set by grid axis 'learner.loss.aggregation')" in err
    assert not out_dir.exists()  # no sweep dir, no state, no run


def test_unknown_key_and_impossible_combination_name_their_source():
    bad_key = spec_of(grid={"learner.loss.eps_hihg": [0.2]})
    with pytest.raises(
        ConfigError, match=r"eps_hihg.*\(set by grid axis 'learner.loss.eps_hihg'\)"
    ):
        sw.validate_runs(bad_key, sw.expand(bad_key))
    # each value valid alone, the combination not (group_size 1 with group-relative advantages)
    combo = spec_of(runs=[{"group_size": 2}, {"group_size": 1}])
    with pytest.raises(ConfigError, match=r"run 2/2 .*group_size.*\(set by runs\[1\]\)"):
        sw.validate_runs(combo, sw.expand(combo))
    env_key = spec_of(overrides={"envs.reverse.config.max_len": 0})
    with pytest.raises(ConfigError, match=r"min_len.*\(set by overrides\)|max_len.*overrides"):
        sw.validate_runs(env_key, sw.expand(env_key))


def test_inline_base_and_the_tiny_ablation_validate(capsys):
    spec = sw.parse_spec(
        {
            "name": "inline",
            "base": yaml.safe_load((REPO / "configs" / "smoke.yaml").read_text()),
            "grid": {"steps": [1, 2]},
        }
    )
    configs = sw.validate_runs(spec, sw.expand(spec))
    assert sorted(c.steps for c in configs.values()) == [1, 2]
    # the real ablation: 2 clip ranges x 2 aggregations x 2 seeds, printed as a YAML stream
    assert cli.main([str(TINY_ABLATION), "--dry-run"]) == 0
    docs = [d for d in yaml.safe_load_all(capsys.readouterr().out) if d]
    assert len(docs) == 8
    combos = {
        (d["learner"]["loss"]["eps_high"], d["learner"]["loss"]["aggregation"], d["seed"])
        for d in docs
    }
    assert combos == {
        (e, a, s) for e in (0.2, 0.28) for a in ("token-mean", "constant") for s in (0, 1)
    }
    assert {d["learner"]["loss"]["norm_length"] for d in docs} == {256}
    assert {d["model"]["path"] for d in docs} == {"default"}
    assert len({d["name"] for d in docs}) == 8 and all(d["name"][-9] == "-" for d in docs)


# -- the comparison table --------------------------------------------------------------------------


def fabricate_run(run_dir: Path, rewards: list[float], before: float, after: float) -> None:
    """A finished run's outputs: metrics.jsonl (step 0 = eval row) and eval.json."""
    run_dir.mkdir(parents=True)
    rows = [{"step": 0, "eval/reverse/pass@1": before}]
    rows += [{"step": i + 1, "reward/mean": r, "train/loss": -r} for i, r in enumerate(rewards)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = {
        "before": {"reverse": {"pass@1": before, "tasks": 4}},
        "after": {"reverse": {"pass@1": after, "tasks": 4}},
        "steps": len(rewards),
    }
    (run_dir / "eval.json").write_text(json.dumps(summary))


def test_table_means_and_stds_over_seeds_from_fabricated_runs(tmp_path):
    spec = spec_of(
        grid={"learner.loss.eps_high": [0.2, 0.28]},
        seeds=[0, 1],
        metrics=["reward/mean", "train/loss"],
        last_steps=2,
        output_dir=str(tmp_path),
    )
    runs = sw.expand(spec)  # [0.2 s0, 0.28 s0, 0.2 s1, 0.28 s1]
    dirs = cli.run_dirs(spec, runs)
    fabricate_run(dirs[runs[0].name], [0.1, 0.3, 0.5], before=0.0, after=0.25)
    fabricate_run(dirs[runs[2].name], [0.2, 0.6, 0.8], before=0.0, after=0.75)
    fabricate_run(dirs[runs[1].name], [0.9, 0.2, 0.4], before=0.0, after=0.5)
    # runs[3] was stopped: metrics but no eval.json
    dirs[runs[3].name].mkdir(parents=True)
    (dirs[runs[3].name] / "metrics.jsonl").write_text('{"step": 1, "reward/mean": 1.0}\n')

    summary = sw.summarize(runs, dirs, spec)
    a = summary["variants"]["learner.loss.eps_high=0.2"]
    # last 2 rewards: seed 0 (0.3 + 0.5) / 2 = 0.4, seed 1 (0.6 + 0.8) / 2 = 0.7
    # mean 0.55, sample std sqrt((0.15^2 + 0.15^2) / 1) = 0.212132
    assert a["stats"]["reward/mean"]["mean"] == pytest.approx(0.55)
    assert a["stats"]["reward/mean"]["std"] == pytest.approx(math.sqrt(0.045))
    assert a["stats"]["train/loss"]["mean"] == pytest.approx(-0.55)
    # pass@1 after: 0.25 and 0.75 -> 0.5 +- sqrt(0.125) = 0.353553
    assert a["stats"]["eval/reverse/pass@1/after"]["mean"] == pytest.approx(0.5)
    assert a["stats"]["eval/reverse/pass@1/after"]["std"] == pytest.approx(0.3535534)
    b = summary["variants"]["learner.loss.eps_high=0.28"]
    # one finished seed: (0.2 + 0.4) / 2, no std
    assert b["complete"] == 1 and b["stats"]["reward/mean"]["n"] == 1
    assert b["stats"]["reward/mean"]["mean"] == pytest.approx(0.3)
    assert b["stats"]["reward/mean"]["std"] is None
    assert summary["runs"][runs[3].name]["complete"] is False

    table = sw.results_table(summary)
    assert (
        "| learner.loss.eps_high=0.2 | 2/2 | 0.550 ± 0.212 | -0.550 ± 0.212 | 0.000 ± 0.000 | 0.500 ± 0.354 |"
        in table
    )
    assert "| learner.loss.eps_high=0.28 | 1/2 | 0.300 | -0.300 | 0.000 | 0.500 |" in table
    assert f"| {runs[3].name} | 1 | not finished |" in table
    assert "reverse pass@1 before | reverse pass@1 after" in table

    png = sw.plot_reward_curves(runs, dirs, tmp_path / "curves.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


# -- a real local sweep, continued after an interruption ---------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_local_sweep_continues_an_interrupted_one_and_reports(tmp_path):
    """configs/sweeps/smoke.yaml with seeds 0 and 1 (4 tiny runs). Before it starts, the seed-1
    runs look finished (fabricated outputs) and one seed-0 run looks killed half-way (a stale
    metrics row, state 'running'): the sweep runs only the two seed-0 runs, for real, from
    scratch, and its table mixes the real and the fabricated results."""
    sweep_file = tmp_path / "smoke_2_seeds.yaml"
    sweep_file.write_text(SMOKE_SWEEP.read_text() + "seeds: [0, 1]\n")
    spec = sw.load_spec(sweep_file)
    spec.output_dir = str(tmp_path)
    runs = sw.expand(spec)
    assert [r.seed for r in runs] == [0, 0, 1, 1]
    dirs = cli.run_dirs(spec, runs)
    for run, after in zip(runs[2:], (0.125, 0.375)):
        fabricate_run(dirs[run.name], [0.5, 0.5], before=0.0, after=after)
    killed = dirs[runs[0].name]
    killed.mkdir(parents=True)
    (killed / "metrics.jsonl").write_text('{"step": 9, "reward/mean": 123.0}\n')
    state = cli.SweepState(spec.sweep_dir)
    state.update(runs[0].name, status="running", attempts=1)
    fabricated = {r.name: (dirs[r.name] / "metrics.jsonl").read_text() for r in runs[2:]}

    out = subprocess.run(
        [
            sys.executable, "-m", "launch.sweep", str(sweep_file), "--local",
            "--output-dir", str(tmp_path), "--num-cpus", "4",
        ],
        cwd=REPO, capture_output=True, text=True, timeout=400,
        env={**os.environ, "CWM_RL_TEST_THREADS": "1"},
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "2 of 4 runs already done, 2 to run" in out.stdout
    for run in runs[2:]:  # finished runs untouched
        assert (dirs[run.name] / "metrics.jsonl").read_text() == fabricated[run.name]
    for run in runs[:2]:
        rows = [
            json.loads(line) for line in (dirs[run.name] / "metrics.jsonl").read_text().splitlines()
        ]
        assert sum("train/loss" in r for r in rows) == 2
        assert all(r["step"] <= 2 for r in rows)  # the dead attempt's row is gone
        assert sw.is_complete(dirs[run.name])
        cfg = yaml.safe_load((dirs[run.name] / "config.yaml").read_text())
        assert cfg["name"] == run.name and cfg["seed"] == 0 and cfg["steps"] == 2
        assert cfg["learner"]["loss"]["eps_high"] == run.overrides["learner.loss.eps_high"]
    saved = json.loads((spec.sweep_dir / cli.STATE_FILE).read_text())["runs"]
    assert {n: s["status"] for n, s in saved.items()} == {r.name: "succeeded" for r in runs}
    assert saved[runs[0].name]["attempts"] == 2

    results = json.loads((spec.sweep_dir / "results.json").read_text())
    for run in runs[:2]:
        real = json.loads((dirs[run.name] / "eval.json").read_text())["after"]["reverse"]["pass@1"]
        variant = results["variants"][run.variant]
        assert variant["complete"] == 2
        # mean over the real seed-0 result and the fabricated seed-1 one
        fake = 0.125 if run is runs[0] else 0.375
        stat = variant["stats"]["eval/reverse/pass@1/after"]
        assert stat["mean"] == pytest.approx((real + fake) / 2)
        assert stat["std"] == pytest.approx(abs(real - fake) / math.sqrt(2))
    table = (spec.sweep_dir / "results.md").read_text()
    assert table.strip() in out.stdout and table.count("±") >= 2 * len(results["columns"])
    assert (spec.sweep_dir / "reward_curves.png").read_bytes()[:4] == b"\x89PNG"
