"""Train: `python -m launch.train [CONFIG.yaml] [key=value ...]`, or continue a run with
`python -m launch.train --resume RUN_DIR [key=value ...]`.

With no config file, the embedded default (configs/tiny_multitask.yaml) runs. The whole config is
validated before any actor starts. Under `ray job submit` the run joins that cluster."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rl.config import load_config
from rl.schema import ConfigError

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny_multitask.yaml"


def parse(argv: list[str]) -> tuple[str | None, list[str], argparse.Namespace]:
    ap = argparse.ArgumentParser(prog="python -m launch.train", description=__doc__.splitlines()[0])
    ap.add_argument("args", nargs="*", help="CONFIG.yaml, then key=value overrides")
    ap.add_argument("--run-dir", help="where outputs go (default: output_dir/name)")
    ap.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue RUN_DIR from its newest checkpoint (its config.yaml, plus overrides)",
    )
    ap.add_argument("--num-cpus", type=int, help="CPUs of a local Ray instance")
    ns = ap.parse_intermixed_args(argv)
    config, overrides = None, []
    for a in ns.args:
        if "=" in a:
            overrides.append(a)
        elif config is None:
            config = a
        else:
            ap.error(f"unexpected argument {a!r}: one CONFIG file, then key=value overrides")
    return config, overrides, ns


def main(argv: list[str] | None = None) -> int:
    config, overrides, ns = parse(sys.argv[1:] if argv is None else argv)
    if ns.resume:
        if config is not None:
            print("--resume takes its config from RUN_DIR/config.yaml", file=sys.stderr)
            return 2
        config = Path(ns.resume) / "config.yaml"
        ns.run_dir = ns.resume
    try:
        cfg = load_config(config or DEFAULT_CONFIG, overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    from envs.data import DataError
    from rl.health import InfrastructureFailure
    from rl.orchestrator import LearnerFailure, Orchestrator, SamplerMismatch, init_ray

    init_ray(ns.num_cpus)
    try:
        orchestrator = Orchestrator(cfg, ns.run_dir)
    except DataError as e:  # the data cannot be trained on (unreadable, failed validation)
        print(f"data error: {e}", file=sys.stderr)
        return 2
    try:
        summary = orchestrator.run(resume=bool(ns.resume))
    except (LearnerFailure, InfrastructureFailure, SamplerMismatch) as e:
        print(f"run stopped: {e}", file=sys.stderr)
        return 1
    except ConfigError as e:  # the cluster cannot place the actors (learner_resources, ...)
        print(f"config error: {e}", file=sys.stderr)
        return 2
    print(f"done: {summary['steps']} steps in {summary['train_seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
