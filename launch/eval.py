"""Evaluate a policy on the held-out splits of the configured environments:
`python -m launch.eval CHECKPOINT_OR_HF_DIR [CONFIG.yaml] [key=value ...]`.

CHECKPOINT_OR_HF_DIR is a Hugging Face checkpoint directory, a run directory (its final `hf/`
export, else its newest checkpoint) or one checkpoint (`runs/NAME/checkpoints/step_*`). The config
defaults to the run's own config.yaml, else the embedded default. Prints pass@1 (and pass@k with
k = eval.samples, which needs eval.temperature > 0) per environment."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from launch.train import DEFAULT_CONFIG
from rl.config import load_config
from rl.schema import ConfigError


def find_run_dir(path: Path) -> Path | None:
    for candidate in (path, path.parent, path.parent.parent):
        if (candidate / "config.yaml").exists() and (candidate / "checkpoints").exists():
            return candidate
    return None


def policy_dir(path: Path, cfg, scratch: Path) -> Path:
    """An HF directory for `path`, exporting a DCP checkpoint through a local learner if needed."""
    if (path / "config.json").exists():
        return path
    if (path / "hf" / "config.json").exists():
        return path / "hf"
    from rl import checkpoint as ckpt
    from rl.learner import learner_class

    step = path if (path / "trainer.json").exists() else ckpt.latest(path / "checkpoints")
    if step is None:
        raise SystemExit(f"{path}: neither an HF checkpoint, a run directory nor a checkpoint")
    learner = learner_class(cfg.learner.backend)(cfg.learner, cfg.model)
    learner.load(str(step))
    learner.export_hf(str(scratch / "hf"))
    return scratch / "hf"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m launch.eval", description=__doc__.splitlines()[0])
    ap.add_argument("policy", help="HF checkpoint dir, run dir or checkpoint dir")
    ap.add_argument("args", nargs="*", help="CONFIG.yaml, then key=value overrides")
    ap.add_argument("--out", help="write the results as JSON here")
    ns = ap.parse_args(sys.argv[1:] if argv is None else argv)
    config = next((a for a in ns.args if "=" not in a), None)
    overrides = [a for a in ns.args if "=" in a]
    policy = Path(ns.policy)
    run_dir = find_run_dir(policy)
    if config is None:
        config = run_dir / "config.yaml" if run_dir else DEFAULT_CONFIG
    try:
        cfg = load_config(config, overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    from rl.health import InfrastructureFailure
    from rl.orchestrator import Orchestrator, init_ray

    with tempfile.TemporaryDirectory() as scratch:
        hf = policy_dir(policy, cfg, Path(scratch))
        cfg.model.path, cfg.model.overrides = str(hf), {}
        if not (hf / "tokenizer_config.json").exists() and not cfg.model.tokenizer:
            cfg.model.tokenizer = "default"
        init_ray()
        orch = Orchestrator(cfg, Path(scratch) / "eval")
        orch.start(learners=False)
        try:
            results = orch.evaluate(tag="eval")
        except InfrastructureFailure as e:
            print(f"evaluation stopped: {e}", file=sys.stderr)
            return 1
        finally:
            orch.stop()
    print(f"policy: {hf if hf.parent != Path(scratch) else policy}")
    for env, r in results.items():
        print(f"\n{env}: {r['tasks']} held-out tasks")
        for key in sorted(k for k in r if k.startswith("pass@") and not k.endswith("_se")):
            se = r.get(f"{key}_se")
            print(f"  {key:<8} {r[key]:.3f}" + (f" ± {se:.3f}" if se == se else ""))
        print(f"  {'reward':<8} {r['reward_mean']:.3f}   errors {r['errors']}")
    if ns.out:
        Path(ns.out).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
