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
import secrets
import time
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

    def start_shell(self, cwd: str, init: str = "") -> Shell:
        """A long-lived bash in `cwd` (as commands see it), after `init` (see Shell); backends
        that cannot keep one raise SandboxError."""
        raise SandboxError(f"the {type(self).__name__} backend has no long-lived shell")

    @abc.abstractmethod
    def close(self) -> None:
        """Kill anything left and remove the work dir. Safe to call twice."""

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# The long-lived shell: bash reads one line per command from its stdin and evals it; the line
# sources the command's file. Started after `cd "$1"` and `eval "$2"` (an init, output dropped).
SHELL_LOOP = (
    'exec 2>&1; cd "$1" || exit 97; eval "$2" >/dev/null 2>&1 </dev/null; set --; '
    "shopt -s expand_aliases; "
    'while IFS= read -r __cwm_line; do eval "$__cwm_line"; done'
)
SHELL_TAIL_BYTES = 64 * 1024  # past the output cap, the tail kept to find the end marker in


class Shell(abc.ABC):
    """One long-lived bash in a sandbox (`start_shell` of a backend that has one): commands run
    in it one after another, so the working directory, variables (exported or not), aliases,
    functions, shell options and background jobs carry over, as in a terminal.

    A command is stored as a file (never sent through the shell's input, so no quoting or
    here-document can break the session) and sourced with its stdin from /dev/null (it cannot
    read the session's protocol), stdout and stderr merged, and read back up to a random end
    marker that carries its exit status. Past the deadline, or when the shell exits, the shell
    and everything it started are killed and it is over (`alive` False): start another. The
    backends' own `exec`s kill every process they can reach when they end, so while a shell
    lives, all of a caller's commands go through it."""

    def __init__(self, max_output_bytes: int) -> None:
        self.alive = True
        self.max_output_bytes = max_output_bytes

    @abc.abstractmethod
    def _put_command(self, name: str, text: str) -> str:
        """Store the command's text; its path as the shell sees it."""

    @abc.abstractmethod
    def _send(self, data: bytes) -> None:
        """Write to the shell's input (OSError when it is gone)."""

    @abc.abstractmethod
    def _read(self, deadline: float) -> bytes | None:
        """Output that arrives before `deadline` (b"" if none); None once the shell's output ended."""

    @abc.abstractmethod
    def _kill(self) -> None:
        """End the shell and everything it started."""

    def run(self, command: str, timeout: float) -> ExecResult:
        if not self.alive:
            raise SandboxError("the shell is over; start another")
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        marker = f"cwm-end-{secrets.token_hex(12)}"
        path = self._put_command(f"cmd-{secrets.token_hex(12)}", command)
        line = (
            f"{{ . {path}; }} </dev/null; __cwm_rc=$?; rm -f {path}; "
            f"printf '\\n{marker} %s\\n' \"$__cwm_rc\"\n"
        )
        start = time.monotonic()
        try:
            self._send(line.encode())
        except OSError:
            return self._over(bytearray(), start, "the shell is gone")
        out, truncated, end = bytearray(), False, marker.encode()
        cap, deadline = self.max_output_bytes, start + timeout
        while True:
            found = out.find(end, max(0, len(out) - len(end) - SHELL_TAIL_BYTES))
            if found >= 0 and b"\n" in out[found + len(end) :]:  # the status line is complete
                status = out[found + len(end) :].split(b"\n", 1)[0].strip()
                return ExecResult(
                    exit_code=int(status) if status.lstrip(b"-").isdigit() else -1,
                    stdout=bytes(out[: max(found - 1, 0)]),  # without printf's newline
                    stderr=b"",
                    duration_s=time.monotonic() - start,
                    stdout_truncated=truncated,
                )
            if time.monotonic() >= deadline:
                return self._over(out, start, KILLED_TIMEOUT)
            chunk = self._read(deadline)
            if chunk is None:
                return self._over(out, start, "the shell exited")
            out += chunk
            if len(out) > cap + 2 * SHELL_TAIL_BYTES:  # keep the head, and a tail for the marker
                del out[cap : len(out) - SHELL_TAIL_BYTES]
                truncated = True

    def _over(self, out: bytearray, start: float, why: str) -> ExecResult:
        self.close()
        timed_out = why == KILLED_TIMEOUT
        return ExecResult(
            exit_code=-9 if timed_out else -1,
            stdout=bytes(out),
            stderr=b"" if timed_out else why.encode(),
            duration_s=time.monotonic() - start,
            timed_out=timed_out,
            killed_reason=KILLED_TIMEOUT if timed_out else None,
        )

    def close(self) -> None:
        """End the shell and everything it started. Safe to call twice."""
        if self.alive:
            self.alive = False
            self._kill()
