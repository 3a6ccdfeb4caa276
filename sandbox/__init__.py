"""Sandboxes: run untrusted code under limits. `make_sandbox(backend, **options)`, backends:
- "local": a work dir on this machine, each command under bubblewrap, a cgroup and an
  unprivileged uid (local.py; the primitives in contain.py);
- "forkserver": the same layers around one warm Python interpreter that forks per program:
  Python programs only, the fast path for test cases (forkserver.py);
- "docker": a container per sandbox, through the Docker API (Podman serves it here) (docker.py).

This package is the ground floor: environments (envs/) and verifiers (rewards/) import it, it
imports neither.

Backends are imported on first use, so importing this package pulls in neither docker-py nor
anything else a backend needs. A backend that cannot give the isolation it promises on this host
raises `IsolationError` (a `SandboxError`) unless told `allow_unisolated=True`.
"""

from __future__ import annotations

import importlib

from sandbox.base import ExecResult, IsolationError, Sandbox, SandboxError, SandboxLimits

BACKENDS: dict[str, str] = {
    "local": "sandbox.local:LocalSandbox",
    "forkserver": "sandbox.forkserver:ForkServerSandbox",
    "docker": "sandbox.docker:DockerSandbox",
}
UNISOLATED_OPTION = ("local", "forkserver")  # the backends whose isolation depends on the host

__all__ = [
    "BACKENDS",
    "ExecResult",
    "IsolationError",
    "Sandbox",
    "SandboxError",
    "SandboxLimits",
    "make_sandbox",
]


def make_sandbox(backend: str, *, allow_unisolated: bool = False, **options: object) -> Sandbox:
    """Create a sandbox of the named backend; `options` go to its constructor.

    allow_unisolated: the local and forkserver backends run even where bubblewrap, their cgroups
    or the uid drop are missing (with a warning) instead of raising IsolationError. Ignored by
    docker, whose containers always isolate, so callers may pass it whatever the backend.
    """
    target = BACKENDS.get(backend)
    if target is None:
        raise ValueError(
            f"unknown sandbox backend {backend!r}; known: {', '.join(sorted(BACKENDS))}"
        )
    module_name, class_name = target.split(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    if backend in UNISOLATED_OPTION:
        options["allow_unisolated"] = allow_unisolated
    return cls(**options)
