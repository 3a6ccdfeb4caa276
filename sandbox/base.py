"""The sandbox interface every backend implements, and the result of one execution.

A sandbox is a private work directory plus a way to run commands in it under limits. `exec` runs
one command to completion or to its deadline and returns an `ExecResult`; nothing it started
survives the call. A program's own failure (non-zero exit, timeout, memory, too much output) is an
`ExecResult`; a failure of the sandbox itself (cannot start, backend gone) raises `SandboxError`,
so callers can tell "the program is wrong" from "the reward is unavailable".

Output is bytes (`stdout`, `stderr`): programs may print anything; `stdout_text` / `stderr_text`
decode as UTF-8 with replacement for convenience.
"""

from __future__ import annotations

import abc
import posixpath
from dataclasses import dataclass

# Values of ExecResult.killed_reason
KILLED_TIMEOUT = "timeout"  # wall-clock deadline passed
KILLED_CPU = "cpu"  # CPU-seconds limit (RLIMIT_CPU) hit
KILLED_MEMORY = "memory"  # the sandbox's memory limit killed it (cgroup OOM / container OOM)
KILLED_OUTPUT = "output_limit"  # printed more than max_output_bytes
KILLED_REASONS = (KILLED_TIMEOUT, KILLED_CPU, KILLED_MEMORY, KILLED_OUTPUT)


class SandboxError(RuntimeError):
    """The sandbox itself failed (could not start, lost its backend): an infrastructure error,
    never a verdict on the program."""


class IsolationError(SandboxError):
    """A sandbox refused to start because an isolation layer it promises is missing here.

    `layers` names them ("bubblewrap", "cgroups", "uid"); the message says what is missing, how
    to get it, and that `allow_unisolated` runs without it anyway."""

    def __init__(self, message: str, layers: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.layers = layers


@dataclass
class ExecResult:
    """The outcome of one `Sandbox.exec`.

    exit_code: the program's exit status; -N when a signal N ended it (as subprocess reports).
    killed_reason: None, or why the sandbox ended it (one of KILLED_REASONS).
    timed_out: killed_reason == "timeout" (kept as a flag because callers test it most).
    stdout_truncated / stderr_truncated: the stream passed max_output_bytes and was cut.
    """

    exit_code: int
    stdout: bytes
    stderr: bytes
    duration_s: float
    timed_out: bool = False
    killed_reason: str | None = None
    stdout_truncated: bool = False
    stderr_truncated: bool = False

    def __post_init__(self) -> None:
        if self.killed_reason is not None and self.killed_reason not in KILLED_REASONS:
            raise ValueError(f"killed_reason must be one of {KILLED_REASONS} or None")

    @property
    def ok(self) -> bool:
        """Exited with status 0 and was not killed."""
        return self.exit_code == 0 and self.killed_reason is None

    @property
    def stdout_text(self) -> str:
        return self.stdout.decode("utf-8", errors="replace")

    @property
    def stderr_text(self) -> str:
        return self.stderr.decode("utf-8", errors="replace")


@dataclass(frozen=True)
class SandboxLimits:
    """Per-execution limits shared by the backends.

    memory_mb bounds the address space of each process (and the whole sandbox where a cgroup or
    container can); cpu_s defaults to the exec timeout when None.
    """

    memory_mb: int = 1024
    cpu_s: float | None = None
    max_processes: int = 64
    max_output_bytes: int = 8 * 1024 * 1024  # per stream
    max_file_mb: int = 256
    max_open_files: int = 256

    def __post_init__(self) -> None:
        for name in ("memory_mb", "max_processes", "max_output_bytes", "max_file_mb"):
            if getattr(self, name) <= 0:
                raise ValueError(
                    f"SandboxLimits.{name} must be positive, got {getattr(self, name)}"
                )
        if self.max_open_files < 16:
            raise ValueError("SandboxLimits.max_open_files must be at least 16")
        if self.cpu_s is not None and self.cpu_s <= 0:
            raise ValueError(f"SandboxLimits.cpu_s must be positive, got {self.cpu_s}")


def check_relative_path(path: str) -> str:
    """Normalise a path inside the work dir; reject absolute paths and `..` escapes."""
    if not isinstance(path, str) or not path or "\0" in path:
        raise ValueError(f"sandbox path must be a non-empty string, got {path!r}")
    if path.startswith("/"):
        raise ValueError(f"sandbox path must be relative to the work dir, got {path!r}")
    normal = posixpath.normpath(path)
    if normal == "." or normal == ".." or normal.startswith("../"):
        raise ValueError(f"sandbox path escapes the work dir: {path!r}")
    return normal


class Sandbox(abc.ABC):
    """A work directory plus limited command execution in it.

    `workdir` is the work dir's path as commands inside the sandbox see it; `exec` starts in it.
    A string `cmd` runs through `/bin/sh -c`; a list runs directly. `timeout` is wall-clock
    seconds; when it passes, everything the command started is killed.
    """

    workdir: str

    @abc.abstractmethod
    def exec(
        self, cmd: str | list[str], timeout: float, stdin: str | bytes | None = None
    ) -> ExecResult:
        """Run `cmd` in the work dir until it exits or `timeout` passes."""

    @abc.abstractmethod
    def write_file(self, path: str, data: str | bytes) -> None:
        """Create or replace a file at `path` (relative to the work dir)."""

    @abc.abstractmethod
    def read_file(self, path: str) -> bytes:
        """Read the file at `path` (relative to the work dir); FileNotFoundError if absent."""

    @abc.abstractmethod
    def close(self) -> None:
        """Kill anything left and remove the work dir. Safe to call twice."""

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
