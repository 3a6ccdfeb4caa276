"""The `local` sandbox: a temp work dir and limited processes on this machine.

The isolation it promises, layer by layer. Each layer the host lacks makes the sandbox refuse to
start (`IsolationError`, naming the layer and how to get it) unless it is told
`allow_unisolated=True`; then it runs with what is there and logs a warning once.
- bubblewrap (required, as root or not): new pid, net, ipc and uts namespaces (no network: the
  host's loopback is out of reach too; when the sandbox's pid 1 dies every process in it dies),
  read-only /usr, /etc and Python prefix, a private /tmp, and the work dir as the only writable
  place, seen inside as /sandbox. The program sees no other file of the host: not the
  repository, not /tmp, not other sandboxes' work dirs (hidden tests, oracle patches).
- a cgroup per sandbox (required: the `pids` and `memory` controllers, cgroup v1 or v2; see
  cgroups.py): pids.max is a process limit that binds root too, the memory limit caps the
  sandbox as a whole, and the group lists every process to kill, double-forked daemons included.
- an unprivileged uid (required as root): the program runs as `nobody` (or `run_as`), so root's
  files and processes are out of reach and RLIMIT_NPROC binds. Needs CAP_SETUID/CAP_SETGID, the
  uid mapped in this user namespace, and `setpriv` (util-linux) under bubblewrap. Not root (a
  laptop user), there is nothing to drop: programs run as the calling user inside bubblewrap's
  user namespace, and reach what bubblewrap binds.
- always (no host requirement): resource limits set in the child before exec (CPU seconds,
  address space, file size, open files, no core dumps; RLIMIT_NPROC where no pids cgroup binds)
  and its own session, so the whole process group can be killed.
Output is read incrementally and capped; the wall-clock deadline kills everything. Nothing an
`exec` started survives it.
"""

from __future__ import annotations

import errno
import logging
import os
import posixpath
import select
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from sandbox.base import (
    KILLED_TIMEOUT,
    SHELL_LOOP,
    ExecResult,
    IsolationError,
    Sandbox,
    SandboxError,
    SandboxLimits,
    Shell,
    check_relative_path,
)
from sandbox.cgroups import CgroupSet, CgroupUnavailable
from sandbox.contain import (
    BWRAP_MISSING,
    MEMORY_SLACK_MB,
    SANDBOX_WORKDIR,
    USERNS_HINT,
    bwrap_argv,
    bwrap_gap,
    bwrap_path,
    cgroup_gap,
    cpu_limit_seconds,
    exit_status,
    killed_reason,
    limits_preexec,
    nobody_ids,
    pump,
    require_isolation,
    sandbox_env,
    uid_gap,
)

logger = logging.getLogger(__name__)
SHELL_DIR = ".shell"  # in the work dir: the long-lived shell's command files
SHELL_CPU_S = 4 * 3600.0  # a shell's CPU seconds over its whole life, where limits set none


# ---------------------------------------------------------------------------------------------
# The sandbox


@dataclass
class _Spawned:
    """A started process of the sandbox: its pipes (ours), and `kill` for it and all it started."""

    proc: subprocess.Popen
    stdin_w: int
    stdout_r: int
    stderr_r: int
    status_r: int  # bubblewrap's status pipe (-1 without it)
    kill: Callable[[], None]
    oom_before: int


class LocalSandbox(Sandbox):
    """A temp work dir on this machine; each `exec` runs under the layers described above.

    use_bwrap: None = required (used where installed when `allow_unisolated`); True = required
    even then; False = not used (needs `allow_unisolated`).
    run_as: the uid (and gid) to run programs as when this process is root (default `nobody`).
    use_cgroups: a pids + memory cgroup per sandbox; False needs `allow_unisolated`.
    allow_unisolated: run even where a layer is missing (warned once) instead of raising
    IsolationError; programs may then read the host's files, hidden tests included.
    """

    def __init__(
        self,
        limits: SandboxLimits | None = None,
        *,
        use_bwrap: bool | None = None,
        run_as: int | None = None,
        use_cgroups: bool = True,
        allow_unisolated: bool = False,
        env: dict[str, str] | None = None,
        base_dir: str | None = None,
    ) -> None:
        self._closed = True  # until set up: close() has nothing to do
        self._cgroups: CgroupSet | None = None
        self.limits = limits or SandboxLimits()
        if use_bwrap and bwrap_path() is None:
            raise IsolationError(f"use_bwrap=True but {BWRAP_MISSING}", ("bubblewrap",))
        self.use_bwrap = use_bwrap is not False and bwrap_path() is not None
        self.is_root = os.geteuid() == 0
        if self.is_root:
            nobody_uid, nobody_gid = nobody_ids()
            self.uid: int | None = nobody_uid if run_as is None else run_as
            self.gid: int | None = nobody_gid if run_as is None else run_as
        else:
            self.uid = self.gid = None
        cgroup_problem = self._make_cgroups() if use_cgroups else None
        gaps = [
            gap
            for gap in (
                bwrap_gap(use_bwrap),
                uid_gap(self.uid, self.gid, via_setpriv=self.use_bwrap),
                cgroup_gap(use_cgroups, cgroup_problem),
            )
            if gap is not None
        ]
        try:
            require_isolation("local sandbox", gaps, allow_unisolated)
            self._host_dir = tempfile.mkdtemp(prefix="cwm-sandbox-", dir=base_dir)
        except BaseException:
            if self._cgroups is not None:
                self._cgroups.remove()
            raise
        self.isolation_gaps = tuple(gap.layer for gap in gaps)  # what this sandbox runs without
        self._closed = False
        if self.uid is not None:
            os.chown(self._host_dir, self.uid, self.gid)
        self.workdir = SANDBOX_WORKDIR if self.use_bwrap else self._host_dir
        self._env = sandbox_env(self.workdir, env)
        self._lock = threading.Lock()

    def _make_cgroups(self) -> str | None:
        """Make this sandbox's pids + memory cgroup; None, or why it could not be made."""
        try:
            self._cgroups = CgroupSet(self.limits.max_processes, self._memory_bytes())
        except CgroupUnavailable as e:
            return str(e)
        except OSError as e:
            return f"could not make the sandbox's cgroup: {e}"
        return None

    def _memory_bytes(self) -> int:
        return (self.limits.memory_mb + MEMORY_SLACK_MB) * 1024 * 1024

    @property
    def host_dir(self) -> str:
        """The work dir's path on the host (for inspection; programs see `workdir`)."""
        return self._host_dir

    def exec(
        self, cmd: str | list[str], timeout: float, stdin: str | bytes | None = None
    ) -> ExecResult:
        if self._closed:
            raise SandboxError("exec on a closed sandbox")
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        argv = ["/bin/sh", "-c", cmd] if isinstance(cmd, str) else [str(a) for a in cmd]
        if not argv:
            raise ValueError("empty command")
        stdin_data = stdin.encode() if isinstance(stdin, str) else (stdin or b"")
        with self._lock:
            return self._exec(argv, timeout, stdin_data)

    def _spawn(self, argv: list[str], timeout: float) -> _Spawned:
        """Start `argv` under every layer (bubblewrap, the cgroup, the uid drop, rlimits with
        `timeout` as the CPU budget); its pipes and how to kill it and all it started."""
        limits = self.limits
        cgroups = self._cgroups
        if self.use_bwrap:
            tmp_bytes = limits.max_file_mb * 1024 * 1024
            argv = (
                bwrap_argv(
                    self._host_dir,
                    uid=self.uid,
                    gid=self.gid,
                    tmp_size_bytes=tmp_bytes,
                    keep_caps=("CAP_SETUID", "CAP_SETGID", "CAP_DAC_OVERRIDE"),
                )
                + argv
            )
        status_r, status_w = os.pipe() if self.use_bwrap else (-1, -1)
        if self.use_bwrap:  # bwrap writes {"exit-code": N} there only if the sandbox worked
            argv[1:1] = ["--json-status-fd", str(status_w)]
        cgroup_fds = cgroups.open_procs_fds() if cgroups else []
        oom_before = cgroups.oom_kills() if cgroups else 0
        preexec = limits_preexec(
            limits,
            timeout,
            cgroup_fds,
            nproc=cgroups is None or not cgroups.has_pids,
            uid=None if self.use_bwrap else self.uid,
            gid=None if self.use_bwrap else self.gid,
        )
        stdin_r, stdin_w = os.pipe()
        stdout_r, stdout_w = os.pipe()
        stderr_r, stderr_w = os.pipe()
        try:
            proc = subprocess.Popen(
                argv,
                stdin=stdin_r,
                stdout=stdout_w,
                stderr=stderr_w,
                cwd=self._host_dir,
                env=self._env,
                start_new_session=True,
                preexec_fn=preexec,
                pass_fds=(status_w,) if self.use_bwrap else (),
            )
        except (OSError, subprocess.SubprocessError) as e:
            for fd in (stdin_w, stdout_r, stderr_r, status_r):
                if fd >= 0:
                    os.close(fd)
            hint = ""
            if isinstance(e, PermissionError) and self.uid is not None and not self.use_bwrap:
                hint = f" (uid {self.uid} must be able to reach it; or use bubblewrap)"
            raise SandboxError(f"could not start {argv[0]!r}: {e}{hint}") from e
        finally:
            for fd in [*cgroup_fds, stdin_r, stdout_w, stderr_w, status_w]:
                if fd >= 0:
                    os.close(fd)

        def kill() -> None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            if cgroups is not None:
                cgroups.kill_all()

        return _Spawned(proc, stdin_w, stdout_r, stderr_r, status_r, kill, oom_before)

    def _exec(self, argv: list[str], timeout: float, stdin_data: bytes) -> ExecResult:
        limits, cgroups = self.limits, self._cgroups
        start = time.monotonic()
        spawned = self._spawn(argv, timeout)
        proc, kill, oom_before = spawned.proc, spawned.kill, spawned.oom_before
        stdin_w, stdout_r, stderr_r, status_r = (
            spawned.stdin_w,
            spawned.stdout_r,
            spawned.stderr_r,
            spawned.status_r,
        )
        pidfd = os.pidfd_open(proc.pid)
        try:
            pumped = pump(
                pidfd,
                stdin_w,
                stdout_r,
                stderr_r,
                stdin_data,
                start + timeout,
                limits.max_output_bytes,
                kill,
            )
        finally:
            os.close(pidfd)
            kill()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        duration = time.monotonic() - start
        exit_code = exit_status(proc.returncode, self.use_bwrap)
        reason = killed_reason(
            pumped.stop_reason,
            exit_code,
            oom_killed=cgroups is not None and cgroups.oom_kills() > oom_before,
            cpu_used_s=usage.ru_utime + usage.ru_stime,
            cpu_limit_s=cpu_limit_seconds(limits, timeout),
        )
        if self.use_bwrap:
            status_text = _read_all(status_r)
            if reason is None and '"exit-code"' not in status_text:
                tail = pumped.stderr[-500:].decode("utf-8", errors="replace").strip()
                userns = "namespace" in tail or "uid map" in tail
                hint = USERNS_HINT if userns and not self.is_root else ""
                raise SandboxError(f"bubblewrap could not set up the sandbox: {tail}{hint}")
        return ExecResult(
            exit_code=exit_code,
            stdout=pumped.stdout,
            stderr=pumped.stderr,
            duration_s=duration,
            timed_out=reason == KILLED_TIMEOUT,
            killed_reason=reason,
            stdout_truncated=pumped.stdout_truncated,
            stderr_truncated=pumped.stderr_truncated,
        )

    def start_shell(self, cwd: str, init: str = "") -> LocalShell:
        """A long-lived bash under every layer of this sandbox (see sandbox.base.Shell), started
        in `cwd` (as programs see it) after `init`. Its CPU budget is its whole life's."""
        if self._closed:
            raise SandboxError("start_shell on a closed sandbox")
        argv = ["bash", "--norc", "--noprofile", "-c", SHELL_LOOP, "cwm-shell", cwd, init]
        with self._lock:
            spawned = self._spawn(argv, self.limits.cpu_s or SHELL_CPU_S)
        return LocalShell(self, spawned)

    def _host_path(self, path: str) -> str:
        """The host path for `path` inside the work dir; refuses symlinks that lead outside."""
        relative = check_relative_path(path)
        full = os.path.join(self._host_dir, relative)
        root = os.path.realpath(self._host_dir)
        parent = os.path.realpath(os.path.dirname(full))
        if parent != root and not parent.startswith(root + os.sep):
            raise ValueError(f"sandbox path {path!r} leads outside the work dir")
        return full

    def write_file(self, path: str, data: str | bytes) -> None:
        if self._closed:
            raise SandboxError("write_file on a closed sandbox")
        full = self._host_path(path)
        directory = os.path.dirname(full)
        if not os.path.isdir(directory):
            os.makedirs(directory)
            if self.uid is not None:
                relative = os.path.relpath(directory, self._host_dir)
                current = self._host_dir
                for part in relative.split(os.sep):
                    current = os.path.join(current, part)
                    os.chown(current, self.uid, self.gid, follow_symlinks=False)
        payload = data.encode() if isinstance(data, str) else bytes(data)
        try:
            os.unlink(full)  # never write through a link the program left
        except FileNotFoundError:
            pass
        fd = os.open(full, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        try:
            with os.fdopen(fd, "wb", closefd=False) as f:
                f.write(payload)
            if self.uid is not None:
                os.fchown(fd, self.uid, self.gid)
        finally:
            os.close(fd)

    def read_file(self, path: str) -> bytes:
        if self._closed:
            raise SandboxError("read_file on a closed sandbox")
        full = self._host_path(path)
        try:
            fd = os.open(full, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise ValueError(f"sandbox path {path!r} is a symlink") from None
            raise
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise ValueError(f"sandbox path {path!r} is not a regular file")
            return f.read()

    def close(self) -> None:
        if getattr(self, "_closed", False):
            return
        self._closed = True
        if self._cgroups is not None:
            self._cgroups.remove()
        shutil.rmtree(self._host_dir, ignore_errors=True)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def _read_all(fd: int) -> str:
    """Everything left in a pipe whose writers are gone; closes it."""
    os.set_blocking(fd, False)
    chunks = []
    try:
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    except BlockingIOError:
        pass
    finally:
        os.close(fd)
    return b"".join(chunks).decode("utf-8", errors="replace")


class LocalShell(Shell):
    """The long-lived shell of a local sandbox (see sandbox.base.Shell): one bash under the
    sandbox's bubblewrap, cgroup and uid, kept with its pipes; commands are files in the work
    dir; the end kills its process group and the sandbox's cgroup (background jobs too)."""

    def __init__(self, sandbox: LocalSandbox, spawned: _Spawned) -> None:
        super().__init__(sandbox.limits.max_output_bytes)
        self.sandbox, self.spawned = sandbox, spawned
        os.set_blocking(spawned.stdout_r, False)

    def _put_command(self, name: str, text: str) -> str:
        self.sandbox.write_file(f"{SHELL_DIR}/{name}", text)
        return posixpath.join(self.sandbox.workdir, SHELL_DIR, name)

    def _send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.spawned.stdin_w, view) :]

    def _read(self, deadline: float) -> bytes | None:
        wait = deadline - time.monotonic()
        fd = self.spawned.stdout_r
        if wait > 0 and select.select([fd], [], [], wait)[0]:
            try:
                chunk = os.read(fd, 1 << 20)
            except BlockingIOError:
                return b""
            return chunk if chunk else None
        return b""

    def _kill(self) -> None:
        spawned = self.spawned
        try:
            spawned.kill()
            os.waitpid(spawned.proc.pid, 0)
        except ChildProcessError:
            pass
        finally:
            for fd in (spawned.stdin_w, spawned.stdout_r, spawned.stderr_r, spawned.status_r):
                if fd >= 0:
                    try:
                        os.close(fd)
                    except OSError:
                        pass
