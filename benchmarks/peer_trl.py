"""The demo's job on cwm-rl and on TRL's GRPOTrainer: identical prompts, reward and settings, several
seeds; held-out pass@1 before / after and seconds per step, side by side.

    .venv/bin/python benchmarks/peer_trl.py [--seeds 0 1 2] [--steps 16] [--venv .venv-trl]

Run it with the project's Python (.venv; `make install` creates it) on an otherwise idle machine:
the full job (3 seeds x 16 steps) takes about an hour of both cores. TRL is no dependency of
cwm-rl and not part of `make test`: it lives in its own virtualenv, which this script creates on
first use (~1 min, ~1.5 GB): torch 2.13.0 (CPU build) first, then TRL, transformers (the version
.venv has) and math-verify, all pinned.

Per seed, one after the other on the same cores:
  cwm-rl  `python -m launch.train CONFIG seed=S steps=N` (sync mode: the demo, `make demo`).
  TRL     benchmarks/peer_trl_driver.py in the TRL virtualenv: GRPOTrainer on
          - the same base model (the converted SmolLM2-135M-Instruct of model/default_model.py),
          - the same prompts in the same order: exported here from this repository's task source
            (rl/tasks.TaskSource with the seed, the envs' own reset() and model/chat.py, as the
            rollout workers build them), given to TRL as pre-rendered text; the driver checks that
            the text tokenises back to our ids and, every batch, that the ids TRL fed the model
            are ours and the tasks come in our order; here the tasks cwm-rl trained on
            (trained.jsonl) are checked against the same export,
          - the same reward: rewards.math.judge with the math env's options on the completion
            decoded as the rollout workers decode it (model/chat.py response_text),
          - the same settings, read from CONFIG (the mapping is in `trl_settings`; a config TRL
            cannot mirror stops here with the key named).
Paired run (unless --no-replay): TRL's trainer once more, fed, batch for batch, the completions
cwm-rl sampled (its trajectories.jsonl) instead of its own: both trainers then update from
identical data, so the distance between the two final policies, relative to how far training moved
them, measures how much the updates themselves differ, apart from sampling; TRL's reward for each
replayed batch must equal cwm-rl's.
Both final policies are then evaluated by the project's own evaluator (`python -m launch.eval
POLICY CONFIG`: same held-out problems, greedy decoding, token budget); "before" is the base model
through the same evaluator. Seconds per step exclude start-up and evaluation: cwm-rl's
time/step_s (rollouts, learner step, weight sync; metrics.jsonl), TRL's Trainer step (generation,
scoring, forward, backward, optimizer), both averaged over all steps. Where a step goes is printed too: cwm-rl's time/rollout_s,
time/learner_s (time/forward_backward_s, time/optimizer_s) and time/weight_sync_s; TRL's
_generate_and_score_completions and the rest of its step.

Binomial standard error of a pass@1 p over n held-out problems: sqrt(p (1 - p) / n). Goals (issue
13): held-out gain within noise of TRL's or better (mean gain difference cwm-rl - TRL >= -2 se of
that difference) and speed ratio (TRL s/step / cwm-rl s/step) >= 1.5.

Outputs go under --work-dir (runs/peer_trl): per seed the cwm-rl run directory (its resumable
checkpoint removed unless --keep), TRL's final policy, the logs and evaluator outputs. The mean
1-minute load average of each training run is reported; runs during which other work shared the
cores are named in a warning and in RESULT's "cores_shared".

Development: --steps 2 --eval-tasks 8 checks the whole path in minutes (a reduced held-out set is
not the benchmark). Prints a table and a final `RESULT {json}` line."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEFAULT_CONFIG = REPO / "configs" / "tiny_math.yaml"
DRIVER = REPO / "benchmarks" / "peer_trl_driver.py"
TORCH_PIN = "torch==2.13.0"  # the CPU build these machines hold; installed before anything else
TRL_PINS = ["trl==1.16.0", "accelerate==1.15.0", "datasets==5.2.0", "math-verify==0.9.0"]


# -- the TRL virtualenv ----------------------------------------------------------------------------


def venv_pins() -> list[str]:
    """TRL's pins, plus the transformers .venv has: both sides tokenise with the same library."""
    return [*TRL_PINS, f"transformers=={metadata.version('transformers')}"]


def ensure_venv(venv: Path) -> float:
    """Create `venv` with TRL unless its stamp says it is up to date; seconds spent. pip's output
    goes to VENV/install.log."""
    pins = [TORCH_PIN, *venv_pins()]
    stamp = venv / f".installed-{hashlib.sha256(' '.join(pins).encode()).hexdigest()[:12]}"
    if stamp.exists():
        return 0.0
    t0 = time.monotonic()
    print(f"creating {venv} ({' '.join(pins)}) ...", flush=True)
    py = venv / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(py), "-m", "pip", "install", "-q"]
    log = venv / "install.log"
    log.unlink(missing_ok=True)
    for step in (["--upgrade", "pip"], [TORCH_PIN], pins):  # torch first: a bare one pulls CUDA
        run_logged([*pip, *step], log, append=True)
    for old in venv.glob(".installed-*"):
        old.unlink()
    stamp.touch()
    seconds = time.monotonic() - t0
    print(f"{venv} ready in {seconds:.0f} s", flush=True)
    return seconds


# -- what TRL gets: prompts, reward options, settings ----------------------------------------------


def load(config: Path, overrides: list[str]):
    from rl.config import load_config
    from rl.schema import ConfigError

    try:
        return load_config(config, overrides)
    except ConfigError as e:
        raise SystemExit(f"config error: {e}") from None


def trl_settings(cfg) -> dict:
    """The run's settings as the TRL driver applies them (GRPOConfig in peer_trl_driver.py):
    groups_per_step x group_size -> per_device_train_batch_size (one generation batch, one
    optimizer step, gradient_accumulation_steps = steps_per_generation = num_iterations = 1),
    group_size -> num_generations; rollout.max_new_tokens -> max_completion_length;
    rollout.temperature / top_p / top_k -> temperature (sampling and log-probs) / top_p / top_k;
    loss.advantage mean -> scale_rewards "none"; aggregation token-mean -> loss_type "dapo" (sum
    over the batch's completion tokens / their number); eps_low / eps_high -> epsilon /
    epsilon_high; no KL -> beta 0; optim lr, betas, eps, weight_decay, grad_clip -> AdamW
    (adamw_torch) learning_rate, adam_beta1/2, adam_epsilon, weight_decay, max_grad_norm;
    constant schedule, no warm-up -> lr_scheduler_type constant, warmup_steps 0; CPU fp32 ->
    use_cpu, bf16 off; no activation checkpointing -> gradient_checkpointing off; torch threads ->
    max(rollout.threads, learner_threads). A setting TRL cannot mirror raises SystemExit."""
    loss, optim, r = cfg.learner.loss, cfg.learner.optim, cfg.rollout
    problems = []

    def need(ok: bool, key: str, why: str) -> None:
        if not ok:
            problems.append(f"{key} ({why})")

    need(cfg.mode == "sync", "mode", "TRL's GRPOTrainer is on-policy: sync mode")
    need(set(cfg.envs) == {"math"}, "envs", "the TRL driver scores with the math env's judge")
    need(not r.reasoning, "rollout.reasoning", "the driver renders no <think> prefix")
    need(loss.advantage == "mean", "learner.loss.advantage", "TRL: scale_rewards none")
    need(loss.reward_placement == "broadcast", "learner.loss.reward_placement", "TRL broadcasts")
    need(loss.aggregation == "token-mean", "learner.loss.aggregation", "TRL: loss_type dapo")
    need(loss.ratio_level == "token", "learner.loss.ratio_level", "token-level ratios")
    need(loss.kl_estimator == "off" or loss.kl_coef == 0, "learner.loss.kl_coef", "beta 0")
    for key in ("dual_clip", "tis_cap", "overlong_max_len"):
        need(getattr(loss, key) is None, f"learner.loss.{key}", "no TRL equivalent")
    need(not loss.filter_zero_advantage_groups, "learner.loss.filter_zero_advantage_groups", "-")
    need(optim.schedule == "constant", "learner.optim.schedule", "constant")
    need(optim.warmup_steps == 0, "learner.optim.warmup_steps", "no warm-up")
    need(cfg.learner.param_dtype in ("auto", "float32"), "learner.param_dtype", "CPU fp32")
    need(not cfg.learner.activation_checkpointing, "learner.activation_checkpointing", "off")
    need(cfg.learner_gpus == 0 and r.gpus == 0, "learner_gpus / rollout.gpus", "CPU")
    if problems:
        raise SystemExit("the TRL side cannot mirror: " + "; ".join(problems))
    return {
        "steps": cfg.steps,
        "groups_per_step": cfg.groups_per_step,
        "group_size": cfg.group_size,
        "max_new_tokens": r.max_new_tokens,
        "temperature": r.temperature,
        "top_p": r.top_p,
        "top_k": r.top_k,
        "eps_low": loss.eps_low,
        "eps_high": loss.eps_high,
        "lr": optim.lr,
        "betas": list(optim.betas),
        "adam_eps": optim.eps,
        "weight_decay": optim.weight_decay,
        "grad_clip": optim.grad_clip,
        "threads": max(r.threads, cfg.learner_threads),
    }


def export_spec(cfg) -> dict:
    """The TRL driver's input for one seeded run: the training prompts exactly as the orchestrator
    draws them (TaskSource over the envs' train tasks, cfg.seed, groups_per_step per step) and as
    the rollout workers render them (env.reset -> ChatFormat.encode_messages), with their
    answers, plus the math env's judge options."""
    from envs import registry
    from model.chat import ChatFormat
    from model.loader import checkpoint_dir, load_tokenizer
    from rl.tasks import TaskSource

    settings = trl_settings(cfg)
    envs = {
        name: registry.get(name)(registry.get(name).validate_config(sec.config))
        for name, sec in cfg.envs.items()
    }
    source = TaskSource(
        {name: env.load_tasks("train") for name, env in envs.items()},
        {n: s.weight for n, s in cfg.envs.items()},
        seed=cfg.seed,
    )
    tokenizer = load_tokenizer(cfg.model)
    chat = ChatFormat.from_tokenizer(tokenizer, reasoning=cfg.rollout.reasoning)
    math_cfg = envs["math"].config
    if math_cfg.max_attempts != 1:
        raise SystemExit("the TRL side cannot mirror: envs.math.config.max_attempts != 1")
    tasks = []
    for task in source.take(cfg.steps * cfg.groups_per_step):
        env = registry.get(task.env)(envs[task.env].config)
        ids = chat.encode_messages(asyncio.run(env.reset(task)))
        if len(ids) + cfg.rollout.max_new_tokens > cfg.rollout.max_context:
            raise SystemExit(f"task {task.id}: prompt + max_new_tokens > rollout.max_context")
        tasks.append(
            {
                "id": task.id,
                "answer": str(task.payload["answer"]),
                "prompt_ids": ids,
                "prompt_text": chat.decode(ids),
            }
        )
    return {
        "seed": cfg.seed,
        "model_dir": str(checkpoint_dir(cfg.model)),
        "tasks": tasks,
        "judge": {
            "reasoning": math_cfg.reasoning,
            "require_think": math_cfg.require_think,
            "timeout_s": math_cfg.timeout_s,
            "lenient": math_cfg.lenient,
        },
        "settings": settings,
    }


# -- running the two sides -------------------------------------------------------------------------


def run_logged(cmd: list[str], log: Path, env: dict | None = None, append: bool = False) -> float:
    """Run `cmd` in the repository root, output to `log`; seconds. On failure: its tail, exit.
    Samples the 1-minute load average meanwhile (LOADS[log.stem]: the mean): a run measured
    while other work shares the cores is flagged in the report."""
    t0, loads = time.monotonic(), []
    with open(log, "a" if append else "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env)
        while True:
            loads.append(os.getloadavg()[0])
            try:
                rc = proc.wait(timeout=2)
                break
            except subprocess.TimeoutExpired:
                continue
    LOADS[log.stem] = sum(loads) / len(loads)
    if rc != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
        raise SystemExit(f"{' '.join(cmd)} failed ({rc}); the end of {log}:\n{tail}")
    return time.monotonic() - t0


LOADS: dict[str, float] = {}


def evaluate(policy: Path, config: Path, overrides: list[str], out: Path) -> dict:
    """The project's evaluator on an HF directory: {"pass@1", "tasks", ...} of the math env."""
    wall = run_logged(
        [sys.executable, "-m", "launch.eval", "--out", str(out), str(policy), str(config),
         *overrides],
        out.with_suffix(".log"),
    )  # fmt: skip
    return {**json.loads(out.read_text())["math"], "wall_s": wall}


def run_cwm_rl(config: Path, overrides: list[str], run_dir: Path) -> dict:
    shutil.rmtree(run_dir, ignore_errors=True)  # a reused run dir would append to its logs
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    log = run_dir.parent / "cwm-rl.log"
    cmd = [sys.executable, "-m", "launch.train", str(config), *overrides, "progress=false",
           "save_trajectories=true"]  # fmt: skip
    wall = run_logged([*cmd, "--run-dir", str(run_dir)], log)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    steps = [r for r in rows if "time/step_s" in r]
    trained = [json.loads(x) for x in (run_dir / "trained.jsonl").read_text().splitlines() if x]
    summary = json.loads((run_dir / "eval.json").read_text())
    return {
        "step_s": [r["time/step_s"] for r in steps],
        "phases_s": {
            phase: mean([r.get(f"time/{phase}_s", math.nan) for r in steps])
            for phase in ("rollout", "learner", "forward_backward", "optimizer", "weight_sync")
        },
        "reward_mean": [r.get("reward/mean") for r in steps],
        "trained_tasks": [t for row in trained for t in row["tasks"]],
        "in_run_before": summary["before"]["math"]["pass@1"],
        "in_run_after": summary["after"]["math"]["pass@1"],
        "wall_s": wall,
    }


def run_trl(venv: Path, spec: dict, out: Path, replay: Path | None = None) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    spec_path = out / "spec.json"
    spec_path.write_text(json.dumps(spec))
    threads = str(spec["settings"]["threads"])
    env = {
        **os.environ,
        "OMP_NUM_THREADS": threads,
        "MKL_NUM_THREADS": threads,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": "",  # nothing of .venv leaks into the TRL interpreter
    }
    cmd = [str(venv / "bin" / "python"), str(DRIVER), str(spec_path), str(out)]
    if replay is not None:
        cmd += ["--replay", str(replay)]
    wall = run_logged(cmd, out.parent / f"{out.name}.log", env)
    result = json.loads((out / "result.json").read_text())
    result["wall_s"] = wall
    return result


def update_agreement(base: Path, ours: Path, theirs: Path) -> dict:
    """How far two trained policies (HF directories) are apart, relative to how far training
    moved them: |theirs - ours| / |ours - base| over all weights (L2), and the largest element
    difference against the largest element update."""
    from safetensors.torch import load_file

    def weights(d: Path) -> dict:
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            out.update({k: v.float() for k, v in load_file(str(f)).items()})
        return out

    b, o, t = weights(base), weights(ours), weights(theirs)
    keys = sorted(set(b) & set(o) & set(t))
    if not keys:
        raise SystemExit(f"no weight names in common between {ours} and {theirs}")
    diff = math.sqrt(sum(float((t[k] - o[k]).pow(2).sum()) for k in keys))
    moved = math.sqrt(sum(float((o[k] - b[k]).pow(2).sum()) for k in keys))
    return {
        "relative_l2": diff / moved if moved else math.nan,
        "max_abs_diff": max(float((t[k] - o[k]).abs().max()) for k in keys),
        "max_abs_update": max(float((o[k] - b[k]).abs().max()) for k in keys),
        "tensors": len(keys),
    }


# -- report ----------------------------------------------------------------------------------------


def se(p: float, n: int) -> float:
    """Binomial standard error of a pass rate p over n problems."""
    return math.sqrt(p * (1 - p) / n) if n else math.nan


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, help="learner steps (default: the config's)")
    ap.add_argument("--venv", type=Path, default=REPO / ".venv-trl")
    ap.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    ap.add_argument("--work-dir", type=Path, default=REPO / "runs" / "peer_trl")
    ap.add_argument("--eval-tasks", type=int, help="held-out problems (development only)")
    ap.add_argument("--keep", action="store_true", help="keep cwm-rl's resumable checkpoints")
    ap.add_argument(
        "--no-replay",
        action="store_true",
        help="skip the paired run (TRL trained on cwm-rl's own sampled batches)",
    )
    ns = ap.parse_args()
    venv = ns.venv if ns.venv.is_absolute() else REPO / ns.venv
    config = ns.config.resolve()
    common = [f"steps={ns.steps}"] if ns.steps else []
    eval_over = [f"eval.num_tasks={ns.eval_tasks}"] if ns.eval_tasks else []
    if ns.eval_tasks:
        print(f"note: {ns.eval_tasks} held-out problems: a development check, not the benchmark")

    try:
        import omegaconf  # noqa: F401
        import torch  # noqa: F401
    except ImportError:
        raise SystemExit(
            "run this with the project's Python: .venv/bin/python benchmarks/peer_trl.py "
            "(`make install` creates .venv)"
        ) from None
    started = time.monotonic()
    base_cfg = load(config, common + eval_over)
    threads = trl_settings(base_cfg)["threads"]  # fails here if TRL cannot mirror the config
    venv_s = ensure_venv(venv)
    ns.work_dir.mkdir(parents=True, exist_ok=True)
    from model.loader import checkpoint_dir

    base_dir = checkpoint_dir(base_cfg.model)
    before = evaluate(base_dir, config, eval_over, ns.work_dir / "eval-before.json")
    n = before["tasks"]
    print(
        f"before: pass@1 {before['pass@1']:.3f} on {n} held-out problems ({base_dir})", flush=True
    )

    rows = []
    for seed in ns.seeds:
        cfg = load(config, [*common, *eval_over, f"seed={seed}"])
        seed_dir = ns.work_dir / f"seed{seed}"
        spec = export_spec(cfg)
        order = [t["id"] for t in spec["tasks"]]
        print(f"seed {seed}: cwm-rl, {cfg.steps} steps ...", flush=True)
        ours = run_cwm_rl(config, [*common, *eval_over, f"seed={seed}"], seed_dir / "cwm-rl")
        if ours["trained_tasks"] != order:
            raise SystemExit(
                f"seed {seed}: cwm-rl trained on tasks {ours['trained_tasks'][:8]}..., the export "
                f"to TRL has {order[:8]}...: the exported prompt order is not cwm-rl's"
            )
        print(f"seed {seed}: TRL, {cfg.steps} steps ...", flush=True)
        trl = run_trl(venv, spec, seed_dir / "trl")
        paired = None
        if not ns.no_replay:
            print(f"seed {seed}: TRL on cwm-rl's sampled batches (replay) ...", flush=True)
            replay = run_trl(
                venv, spec, seed_dir / "trl-replay", seed_dir / "cwm-rl" / "trajectories.jsonl"
            )
            rewards_ours = [round(x, 6) for x in ours["reward_mean"]]
            rewards_replay = [round(x, 6) for x in replay["reward_mean"]]
            paired = {
                **update_agreement(base_dir, seed_dir / "cwm-rl" / "hf", Path(replay["final"])),
                # TRL scores the replayed completions itself: the same rewards, step by step
                "rewards_equal": rewards_ours == rewards_replay,
                "trl_train_s_per_step": mean(
                    [a - b for a, b in zip(replay["step_s"], replay["generate_score_s"])]
                ),
            }
            if not paired["rewards_equal"]:
                print(f"warning: seed {seed}: TRL scored the replayed batches "
                      f"{rewards_replay}, cwm-rl {rewards_ours}", flush=True)  # fmt: skip
            paired["after"] = evaluate(
                Path(replay["final"]), config, eval_over, seed_dir / "eval-trl-replay.json"
            )["pass@1"]
        print(f"seed {seed}: evaluating both final policies ...", flush=True)
        ours_eval = evaluate(
            seed_dir / "cwm-rl" / "hf", config, eval_over, seed_dir / "eval-cwm-rl.json"
        )
        trl_eval = evaluate(Path(trl["final"]), config, eval_over, seed_dir / "eval-trl.json")
        if abs(ours_eval["pass@1"] - ours["in_run_after"]) > 1e-9:
            print(
                f"warning: seed {seed}: launch.eval gives cwm-rl's policy {ours_eval['pass@1']:.3f}, "
                f"its own run {ours['in_run_after']:.3f}",
                flush=True,
            )
        if not ns.keep:
            shutil.rmtree(seed_dir / "cwm-rl" / "checkpoints", ignore_errors=True)
        a, b = mean(ours["step_s"]), mean(trl["step_s"])
        rows.append(
            {
                "seed": seed,
                "before": before["pass@1"],
                "cwm_rl_after": ours_eval["pass@1"],
                "cwm_rl_after_se": se(ours_eval["pass@1"], ours_eval["tasks"]),
                "trl_after": trl_eval["pass@1"],
                "trl_after_se": se(trl_eval["pass@1"], trl_eval["tasks"]),
                "cwm_rl_s_per_step": round(a, 3),
                "trl_s_per_step": round(b, 3),
                "speed_ratio": round(b / a, 3),
                # where a step's seconds go: cwm-rl's metrics; TRL's generation + scoring
                # (_generate_and_score_completions) and the rest of its step (loss, backward,
                # clip, AdamW)
                "cwm_rl_phases_s": {k: round(v, 3) for k, v in ours["phases_s"].items()},
                "trl_phases_s": {
                    "generate_score": round(mean(trl["generate_score_s"]), 3),
                    "train": round(mean(trl["step_s"]) - mean(trl["generate_score_s"]), 3),
                },
                "paired": paired,
                "cwm_rl_train_reward": [round(x, 4) for x in ours["reward_mean"] if x is not None],
                "trl_train_reward": [round(x, 4) for x in trl["reward_mean"]],
                "cwm_rl_in_run_after": ours["in_run_after"],
                "trl_prompts_checked": trl["prompts_checked"],
                # whole-process wall clock (start-up, training, the run's own evaluations)
                # mean 1-minute load average during each training run (this run: ~threads)
                "load_avg": {
                    "cwm_rl_run": round(LOADS["cwm-rl"], 2),
                    "trl_run": round(LOADS["trl"], 2),
                },
                "wall_s": {
                    "cwm_rl_run": round(ours["wall_s"], 1),
                    "trl_run": round(trl["wall_s"], 1),
                    "eval_cwm_rl": round(ours_eval["wall_s"], 1),
                    "eval_trl": round(trl_eval["wall_s"], 1),
                },
            }
        )
        print(
            f"seed {seed}: cwm-rl {ours_eval['pass@1']:.3f} ({a:.2f} s/step), "
            f"TRL {trl_eval['pass@1']:.3f} ({b:.2f} s/step)",
            flush=True,
        )

    print("\nwhere a step goes (mean seconds): cwm-rl rollout / learner (forward+backward, AdamW) "
          "/ weight sync; TRL generation+scoring / training")  # fmt: skip
    for r in rows:
        c, t = r["cwm_rl_phases_s"], r["trl_phases_s"]
        print(
            f"  seed {r['seed']}: cwm-rl {c['rollout']:.2f} / {c['learner']:.2f} "
            f"({c['forward_backward']:.2f}, {c['optimizer']:.2f}) / {c['weight_sync']:.2f}; "
            f"TRL {t['generate_score']:.2f} / {t['train']:.2f}"
        )
    if any(r["paired"] for r in rows):
        print("\npaired: TRL trained on cwm-rl's own sampled batches (same data, both updates)")
        for r in rows:
            p = r["paired"]
            if p:
                print(
                    f"  seed {r['seed']}: |TRL - cwm-rl| / |cwm-rl - base| = "
                    f"{p['relative_l2']:.2e} (max element {p['max_abs_diff']:.1e} of "
                    f"{p['max_abs_update']:.1e}); rewards equal: {p['rewards_equal']}; held-out "
                    f"{p['after']:.3f} (cwm-rl {r['cwm_rl_after']:.3f}); TRL training "
                    f"{p['trl_train_s_per_step']:.2f} s/step"
                )
    print(f"\nheld-out pass@1 on {n} problems (± binomial se), seconds per step; TRL {trl['trl']}")
    head = f"{'seed':>4} {'before':>7} {'cwm-rl after':>14} {'TRL after':>14} "
    print(head + f"{'cwm-rl s/step':>13} {'TRL s/step':>10} {'speed':>6}")
    for r in rows:
        print(
            f"{r['seed']:>4} {r['before']:>7.3f} "
            f"{r['cwm_rl_after']:>7.3f} ± {r['cwm_rl_after_se']:.3f} "
            f"{r['trl_after']:>7.3f} ± {r['trl_after_se']:.3f} "
            f"{r['cwm_rl_s_per_step']:>13.2f} {r['trl_s_per_step']:>10.2f} {r['speed_ratio']:>5.2f}x"
        )
    k = len(rows)
    ours_after, trl_after = (
        mean([r["cwm_rl_after"] for r in rows]),
        mean([r["trl_after"] for r in rows]),
    )
    # the mean over k seeds of n-problem pass rates: binomial se over k * n samples
    ours_se, trl_se = se(ours_after, k * n), se(trl_after, k * n)
    diff, diff_se = ours_after - trl_after, math.hypot(ours_se, trl_se)
    a, b = mean([r["cwm_rl_s_per_step"] for r in rows]), mean([r["trl_s_per_step"] for r in rows])
    print(
        f"mean {before['pass@1']:>7.3f} {ours_after:>7.3f} ± {ours_se:.3f} "
        f"{trl_after:>7.3f} ± {trl_se:.3f} {a:>13.2f} {b:>10.2f} {b / a:>5.2f}x"
    )
    gain_ours, gain_trl = ours_after - before["pass@1"], trl_after - before["pass@1"]
    print(
        f"gain: cwm-rl {gain_ours:+.3f}, TRL {gain_trl:+.3f}, difference {diff:+.3f} ± {diff_se:.3f}"
        f"; speed ratio (TRL s/step / cwm-rl s/step) {b / a:.2f}"
    )
    busy = [
        f"seed {r['seed']} {side.removesuffix('_run').replace('_', '-')}"
        for r in rows
        for side, load in r["load_avg"].items()
        if load > threads + 0.5
    ]
    if busy:
        print(
            f"warning: other work shared the cores during {', '.join(busy)} (mean load average "
            f"above {threads + 0.5}): those seconds per step are not comparable"
        )
    result = {
        "benchmark": "peer_trl",
        "trl": trl["trl"],
        "transformers": trl["transformers"],
        "config": str(config.relative_to(REPO) if config.is_relative_to(REPO) else config),
        "steps": base_cfg.steps,
        "held_out_tasks": n,
        "venv_created_s": round(venv_s, 1),
        "wall_s": round(time.monotonic() - started, 1),
        "seeds": rows,
        "before": before["pass@1"],
        "cwm_rl_after_mean": ours_after,
        "trl_after_mean": trl_after,
        "cwm_rl_gain": gain_ours,
        "trl_gain": gain_trl,
        "gain_diff": diff,
        "gain_diff_se": diff_se,
        "cwm_rl_s_per_step": round(a, 3),
        "trl_s_per_step": round(b, 3),
        "speed_ratio": round(b / a, 3),
        "goal_gain_within_noise_or_better": diff >= -2 * diff_se,
        "goal_speed_ratio_1_5": b / a >= 1.5,
        "cores_shared": busy,
    }
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
