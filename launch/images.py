"""Build the docker sandbox's base images where they are missing (sandbox/images.py has the
recipes): `python -m launch.images [--debian] [--rebuild] [--podman-cli]`.

Runs before `make install` as well (sandbox/host_setup.sh, with the system python3 and
--podman-cli), so it imports nothing beyond the standard library and sandbox/images.py.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from sandbox.images import DEBIAN_IMAGE, HOST_IMAGE, ensure_image


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docker-host", help="API address (default: $DOCKER_HOST, then Podman's)")
    parser.add_argument("--debian", action="store_true", help=f"also build {DEBIAN_IMAGE}")
    parser.add_argument("--rebuild", action="store_true", help="rebuild even if present")
    parser.add_argument(
        "--podman-cli", action="store_true", help="use the podman CLI (no docker-py needed)"
    )
    args = parser.parse_args(argv)
    client = None
    if not args.podman_cli:
        from sandbox.base import SandboxError
        from sandbox.docker import connect

        try:
            client = connect(args.docker_host)
        except SandboxError as e:
            print(e, file=sys.stderr)
            return 1
    names = [HOST_IMAGE] + ([DEBIAN_IMAGE] if args.debian else [])
    for name in names:
        start = time.monotonic()
        try:
            built = ensure_image(client, name, rebuild=args.rebuild)
        except (RuntimeError, OSError, subprocess.CalledProcessError) as e:
            print(f"building {name} failed: {e}", file=sys.stderr)
            return 1
        took = time.monotonic() - start
        print(f"{name}: built in {took:.1f} s" if built else f"{name}: present")
    return 0


if __name__ == "__main__":
    sys.exit(main())
