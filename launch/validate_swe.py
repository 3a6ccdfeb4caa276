"""Validate SWE data before training on it: every instance's image must exist, its hidden
tests apply, its gold patch score +1 and the empty patch not resolve it.

    python -m launch.validate_swe DATA.jsonl [--source swebench] [--limit N] [--backend docker]

Prints one row per instance (instance, result, gold and empty rewards, seconds, reason) and
exits 1 when any instance fails (2 when the data cannot be read). Sandbox options as the `swe`
environment's config (envs/swe/env.py).
"""

from __future__ import annotations

import argparse
import sys

from envs.data import DataError
from envs.swe.env import SWEEnv
from envs.swe.validate import HEADER, check_instances
from rl.schema import ConfigError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", help="a JSONL file of instances (harbor: a directory of tasks)")
    parser.add_argument(
        "--source", default="jsonl", choices=["jsonl", "swebench", "swesmith", "r2e", "harbor"]
    )
    parser.add_argument("--limit", type=int, default=None, help="the first N instances only")
    parser.add_argument("--backend", default="docker", choices=["docker", "local"])
    parser.add_argument("--docker-host", default=None)
    parser.add_argument("--image-namespace", default="swebench", help="'' for local names")
    parser.add_argument("--image-style", default="swebench", choices=["swebench", "swegym"])
    parser.add_argument("--memory-mb", type=int, default=None, help="default: 12 GB")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per test run")
    parser.add_argument("--allow-unisolated", action="store_true")
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be >= 1")
    try:
        env = SWEEnv(
            SWEEnv.validate_config(
                {
                    "source": args.source,
                    "path": args.data,
                    "on_bad_line": "error",
                    "backend": args.backend,
                    "docker_host": args.docker_host,
                    "image_namespace": args.image_namespace or None,
                    "image_style": args.image_style,
                    "memory_mb": args.memory_mb,
                    "scoring_timeout_s": args.timeout,
                    "allow_unisolated": args.allow_unisolated,
                    "validate_first": 0,
                }
            )
        )
        instances = env.instances()
    except (ConfigError, DataError, OSError) as e:
        print(f"validate_swe: {e}", file=sys.stderr)
        return 2
    instances = instances[: args.limit] if args.limit else instances
    print(HEADER, flush=True)
    checks = check_instances(
        instances,
        env.config.sandbox_spec(),
        timeout_s=args.timeout,
        on_check=lambda c: print(c.row(), flush=True),
    )
    failed = [c.instance_id for c in checks if not c.ok]
    print(f"\n{len(checks) - len(failed)}/{len(checks)} instances valid", end="")
    print(f"; failed: {', '.join(failed)}" if failed else "")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
