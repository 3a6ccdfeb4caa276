"""Sandboxes: run untrusted code under limits. `make_sandbox("local" | "docker", **options)`.

Backends are imported on first use, so importing this package pulls in neither docker-py nor
anything else a backend needs. A backend that cannot give the isolation it promises on this host
raises `IsolationError` (a `SandboxError`) unless told `allow_unisolated=True`.
"""

from __future__ import annotations

import importlib

from envs.sandbox.base import ExecResult, IsolationError, Sandbox, SandboxError, SandboxLimits

BACKENDS: dict[str, str] = {
    "local": "envs.sandbox.local:LocalSandbox",
    "docker": "envs.sandbox.docker:DockerSandbox",
}

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

    allow_unisolated: the local backend runs even where bubblewrap, its cgroups or the uid drop
    are missing (with a warning) instead of raising IsolationError. Ignored by docker, whose
    containers always isolate, so callers may pass it whatever the backend.
    """
    target = BACKENDS.get(backend)
    if target is None:
        raise ValueError(
            f"unknown sandbox backend {backend!r}; known: {', '.join(sorted(BACKENDS))}"
        )
    module_name, class_name = target.split(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    if backend == "local":
        options["allow_unisolated"] = allow_unisolated
    return cls(**options)
