"""Process containment, the primitives both process backends build on (the local sandbox and
the fork server): which isolation layers this host gives (bubblewrap, cgroups, the uid drop) and
the refusal when one is missing; the bubblewrap command line; resource limits set in the child
before exec; the environment a program sees; and `pump`, which runs one process with a deadline
and capped output. See local.py for what each layer promises.
"""

from __future__ import annotations

import logging
import math
import os
import pwd
import resource
import selectors
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from sandbox.base import (
    KILLED_CPU,
    KILLED_MEMORY,
    KILLED_OUTPUT,
    KILLED_TIMEOUT,
    IsolationError,
    SandboxLimits,
)

logger = logging.getLogger(__name__)

SANDBOX_WORKDIR = "/sandbox"  # the work dir as programs see it under bubblewrap
DRAIN_GRACE_S = 2.0  # after the program ends, how long to wait for its pipes to close
MEMORY_SLACK_MB = 32  # the cgroup holds the sandbox's helpers (bwrap, setpriv) as well


def nobody_ids() -> tuple[int, int]:
    try:
        entry = pwd.getpwnam("nobody")
        return entry.pw_uid, entry.pw_gid
    except KeyError:
        return 65534, 65534


def bwrap_path() -> str | None:
    """The bubblewrap binary, or None where it is not installed."""
    return shutil.which("bwrap")


def setpriv_path() -> str | None:
    """util-linux's setpriv (drops the uid inside bubblewrap), or None."""
    found = shutil.which("setpriv")
    if found is None and os.path.exists("/usr/bin/setpriv"):
        found = "/usr/bin/setpriv"
    return found


# ---------------------------------------------------------------------------------------------
# Isolation checks (shared with the fork server)

SETUP_SCRIPT_HINT = "sudo bash sandbox/host_setup.sh --local"
BWRAP_MISSING = f"bubblewrap is not installed: apt-get install bubblewrap (or {SETUP_SCRIPT_HINT})"
UNISOLATED_HINT = (
    "To run without it anyway, set allow_unisolated: true in the env's sandbox config "
    "(allow_unisolated=True)"
)
USERNS_HINT = (
    " (as a normal user bubblewrap needs unprivileged user namespaces: sysctl -w "
    "kernel.unprivileged_userns_clone=1, or on Ubuntu 24.04+ "
    "kernel.apparmor_restrict_unprivileged_userns=0)"
)
CAP_SETGID, CAP_SETUID = 6, 7
_warned: set[str] = set()
_warned_lock = threading.Lock()


@dataclass(frozen=True)
class IsolationGap:
    """A layer the host lacks: `missing` says what and how to get it, `risk` what a program can
    then do."""

    layer: str  # "bubblewrap" | "cgroups" | "uid"
    missing: str
    risk: str


def bwrap_gap(use_bwrap: bool | None = None) -> IsolationGap | None:
    """bubblewrap: installed, and not turned off."""
    if use_bwrap is False:
        missing = "bubblewrap is turned off (use_bwrap=False)"
    elif bwrap_path() is None:
        missing = BWRAP_MISSING
    else:
        return None
    risk = "programs see the host's files (other tasks' hidden tests, oracle patches) and network"
    return IsolationGap("bubblewrap", missing, risk)


def cgroup_gap(use_cgroups: bool, reason: str | None) -> IsolationGap | None:
    """The pids + memory cgroup: `reason` is why none could be made (None: it was made)."""
    if not use_cgroups:
        reason = "cgroups are turned off (use_cgroups=False)"
    if reason is None:
        return None
    risk = "processes and memory are bounded only per uid and per process (rlimits)"
    return IsolationGap("cgroups", reason, risk)


def uid_gap(uid: int | None, gid: int | None, *, via_setpriv: bool) -> IsolationGap | None:
    """As root, whether programs can be dropped to `uid`/`gid`; not root, nothing to drop."""
    if os.geteuid() != 0:
        return None
    missing = None
    caps = _effective_caps()
    if not uid or not gid:
        missing = "run_as=0 keeps programs root: leave run_as unset (nobody) or give another uid"
    elif caps is not None and not (caps >> CAP_SETUID & 1 and caps >> CAP_SETGID & 1):
        missing = (
            "this root process lacks CAP_SETUID/CAP_SETGID (a container that dropped them): give "
            "them back (docker/podman run --cap-add SETUID --cap-add SETGID) or run as a user"
        )
    elif not (_id_mapped(uid, "/proc/self/uid_map") and _id_mapped(gid, "/proc/self/gid_map")):
        missing = (
            f"uid {uid} / gid {gid} is not mapped in this user namespace (/proc/self/uid_map: a "
            "rootless container): pass run_as=<a mapped uid>, or run as a normal user"
        )
    elif via_setpriv and setpriv_path() is None:
        missing = (
            "setpriv is not installed (it drops the uid inside bubblewrap): apt-get install "
            f"util-linux (or {SETUP_SCRIPT_HINT})"
        )
    if missing is None:
        return None
    return IsolationGap("uid", missing, "programs run as root")


def _effective_caps() -> int | None:
    """This process's effective capability mask (CapEff), or None where unreadable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except (OSError, ValueError):
        return None
    return None


def _id_mapped(number: int, map_file: str) -> bool:
    """Whether `number` is inside this user namespace's uid/gid map (True where unreadable)."""
    try:
        with open(map_file) as f:
            ranges = [tuple(int(x) for x in line.split()) for line in f if line.strip()]
    except (OSError, ValueError):
        return True
    return any(start <= number < start + count for start, _, count in ranges)


def require_isolation(what: str, gaps: list[IsolationGap], allow_unisolated: bool) -> None:
    """Raise IsolationError naming the missing layers, or with `allow_unisolated` warn (once
    per process and message) and go on."""
    if not gaps:
        return
    layers = tuple(gap.layer for gap in gaps)
    if not allow_unisolated:
        missing = "; ".join(gap.missing for gap in gaps)
        raise IsolationError(
            f"the {what} refuses to run untrusted code without the isolation it promises: "
            f"{missing}. {UNISOLATED_HINT}",
            layers,
        )
    message = (
        f"the {what} runs untrusted code WITHOUT {', '.join(layers)} (allow_unisolated=True): "
        + "; ".join(f"{gap.missing} [{gap.risk}]" for gap in gaps)
    )
    with _warned_lock:
        if message in _warned:
            return
        _warned.add(message)
    logger.warning(message)


# ---------------------------------------------------------------------------------------------
# Running one process with a deadline and capped output (also used by the fork server)


@dataclass
class PumpResult:
    stdout: bytes
    stderr: bytes
    stdout_truncated: bool
    stderr_truncated: bool
    stop_reason: str | None  # KILLED_TIMEOUT / KILLED_OUTPUT when we stopped it, else None


def pump(
    pidfd: int,
    stdin_fd: int,
    stdout_fd: int,
    stderr_fd: int,
    stdin_data: bytes,
    deadline: float,
    max_output_bytes: int,
    kill: Callable[[], None],
) -> PumpResult:
    """Feed stdin and collect stdout/stderr of a running process until it exits, its deadline
    passes or it prints too much; then `kill()` everything it left and drain the pipes.

    `pidfd` becomes readable when the process exits. Closes the three pipe fds.
    """
    selector = selectors.DefaultSelector()
    buffers = {stdout_fd: bytearray(), stderr_fd: bytearray()}
    truncated = {stdout_fd: False, stderr_fd: False}
    for fd in (stdout_fd, stderr_fd):
        selector.register(fd, selectors.EVENT_READ)
    selector.register(pidfd, selectors.EVENT_READ)
    stdin_view = memoryview(stdin_data)
    stdin_open = True
    if stdin_data:
        os.set_blocking(stdin_fd, False)
        selector.register(stdin_fd, selectors.EVENT_WRITE)
    else:
        os.close(stdin_fd)
        stdin_open = False
    stop_reason: str | None = None
    stopped_at: float | None = None  # when kill() ran; then only drain until the grace ends

    def stop(reason: str | None) -> None:
        nonlocal stop_reason, stopped_at
        if stopped_at is None:
            stop_reason = reason
            stopped_at = time.monotonic()
            kill()

    try:
        while True:
            registered = selector.get_map()
            if not any(fd in buffers for fd in registered) and (
                stopped_at is not None or pidfd not in registered
            ):
                break  # both pipes closed and the process is gone (or being killed)
            now = time.monotonic()
            if stopped_at is None and now >= deadline:
                stop(KILLED_TIMEOUT)
            end = deadline if stopped_at is None else stopped_at + DRAIN_GRACE_S
            if now >= end:
                break
            for key, _ in selector.select(end - now):
                fd = key.fd
                if fd == pidfd:
                    selector.unregister(pidfd)
                    stop(None)  # it exited: kill whatever it left behind
                elif fd == stdin_fd:
                    try:
                        written = os.write(fd, stdin_view[:65536])
                    except OSError:
                        written = len(stdin_view)  # it closed stdin: stop feeding
                    stdin_view = stdin_view[written:]
                    if not stdin_view:
                        selector.unregister(fd)
                        os.close(fd)
                        stdin_open = False
                else:
                    chunk = os.read(fd, 65536)
                    if not chunk:
                        selector.unregister(fd)
                        continue
                    buffer = buffers[fd]
                    room = max_output_bytes - len(buffer)
                    if len(chunk) > room:
                        buffer += chunk[:room]
                        truncated[fd] = True
                        stop(KILLED_OUTPUT)
                    else:
                        buffer += chunk
    finally:
        selector.close()
        for fd in (stdout_fd, stderr_fd, *((stdin_fd,) if stdin_open else ())):
            os.close(fd)
    return PumpResult(
        stdout=bytes(buffers[stdout_fd]),
        stderr=bytes(buffers[stderr_fd]),
        stdout_truncated=truncated[stdout_fd],
        stderr_truncated=truncated[stderr_fd],
        stop_reason=stop_reason,
    )


# ---------------------------------------------------------------------------------------------
# Command lines


def python_paths() -> list[str]:
    """Directories this interpreter needs, to bind read-only into a bubblewrap sandbox."""
    candidates = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    candidates.add(os.path.dirname(os.path.dirname(os.path.realpath(sys.executable))))
    paths = []
    for path in sorted(candidates):
        if path and not path.startswith(("/usr/", "/etc/")) and path != "/usr":
            paths.append(path)
    # Drop paths already inside another one.
    return [p for p in paths if not any(p != q and p.startswith(q + "/") for q in paths)]


def bwrap_argv(
    workdir: str | None,
    *,
    uid: int | None,
    gid: int | None,
    tmp_size_bytes: int,
    keep_caps: tuple[str, ...] = (),
    extra_binds: tuple[tuple[str, str], ...] = (),
    writable_tmpfs: tuple[str, ...] = (),
    die_with_parent: bool = True,
    unshare_cgroup: bool = True,
) -> list[str]:
    """The bubblewrap prefix: read-only system and Python, private /tmp, `workdir` bound at
    /sandbox. As root (no user namespace, so the uid can still be dropped) every capability is
    dropped except `keep_caps`, and `setpriv` switches to `uid`/`gid` before the command runs;
    as a normal user a user namespace is made instead. `unshare_cgroup=False` keeps the host's
    cgroup namespace (a server that moves its children between its cgroup v2 groups needs it)."""
    bwrap = bwrap_path()
    if bwrap is None:
        raise IsolationError(BWRAP_MISSING, ("bubblewrap",))
    # --die-with-parent ties the sandbox to the *thread* that started it (PR_SET_PDEATHSIG):
    # right for one exec, wrong for a long-lived server started from a worker thread.
    argv = [bwrap, "--new-session"] + (["--die-with-parent"] if die_with_parent else [])
    argv += ["--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts"]
    if unshare_cgroup:
        argv += ["--unshare-cgroup-try"]
    if os.geteuid() == 0:
        argv += ["--cap-drop", "ALL"]
        for cap in keep_caps:
            argv += ["--cap-add", cap]
    else:
        argv += ["--unshare-user"]
    argv += ["--ro-bind", "/usr", "/usr", "--ro-bind", "/etc", "/etc"]
    for link in ("bin", "sbin", "lib", "lib64", "lib32"):
        target = f"/{link}"
        if os.path.islink(target):
            argv += ["--symlink", os.readlink(target), target]
        elif os.path.isdir(target):
            argv += ["--ro-bind", target, target]
    argv += ["--proc", "/proc", "--dev", "/dev"]
    argv += ["--perms", "1777", "--size", str(tmp_size_bytes), "--tmpfs", "/tmp"]
    made: set[str] = {"/", "/usr", "/etc", "/tmp", "/proc", "/dev"}
    for path in python_paths():  # after /tmp, so a venv under /tmp is not hidden by it
        argv += _dirs_for(os.path.dirname(path), made)
        argv += ["--ro-bind", path, path]
    for source, dest in extra_binds:
        argv += _dirs_for(os.path.dirname(dest), made)
        argv += ["--bind", source, dest]
    for path in writable_tmpfs:
        argv += ["--perms", "0755", "--size", str(tmp_size_bytes), "--tmpfs", path]
    if workdir is not None:
        argv += ["--bind", workdir, SANDBOX_WORKDIR, "--chdir", SANDBOX_WORKDIR]
    if os.geteuid() == 0 and uid is not None:
        setpriv = setpriv_path() or "/usr/bin/setpriv"
        argv += [setpriv, f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--"]
    return argv


def _dirs_for(path: str, made: set[str]) -> list[str]:
    """bwrap arguments creating `path` and its ancestors as 0755 directories (bwrap would copy
    the host's modes, and /root is 0700)."""
    argv: list[str] = []
    parts = [p for p in path.split("/") if p]
    for i in range(1, len(parts) + 1):
        sub = "/" + "/".join(parts[:i])
        if sub not in made:
            made.add(sub)
            argv += ["--perms", "0755", "--dir", sub]
    return argv


def limits_preexec(
    limits: SandboxLimits,
    timeout: float,
    cgroup_fds: list[int],
    *,
    nproc: bool,
    uid: int | None,
    gid: int | None,
) -> Callable[[], None]:
    """The function a child runs between fork and exec: join the cgroups, set the rlimits and,
    without bubblewrap, drop to the unprivileged uid. Only plain system calls."""
    cpu_s = cpu_limit_seconds(limits, timeout)
    address_space = limits.memory_mb * 1024 * 1024
    file_size = limits.max_file_mb * 1024 * 1024

    def preexec() -> None:
        for fd in cgroup_fds:
            os.write(fd, b"0")
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
        resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size, file_size))
        resource.setrlimit(resource.RLIMIT_NOFILE, (limits.max_open_files, limits.max_open_files))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if nproc:
            resource.setrlimit(resource.RLIMIT_NPROC, (limits.max_processes,) * 2)
        if uid is not None:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)

    return preexec


def sandbox_env(home: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    """A small, fixed environment: this interpreter first on PATH."""
    python_bin = os.path.dirname(sys.executable)
    env = {
        "PATH": f"{python_bin}:/usr/local/bin:/usr/bin:/bin",
        "HOME": home,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "TMPDIR": "/tmp",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    env.update(extra or {})
    return env


def cpu_limit_seconds(limits: SandboxLimits, timeout: float) -> int:
    """RLIMIT_CPU's soft limit: limits.cpu_s, else the wall-clock timeout, rounded up."""
    return math.ceil(limits.cpu_s if limits.cpu_s is not None else timeout)


def killed_reason(
    stop_reason: str | None,
    exit_code: int,
    *,
    oom_killed: bool,
    cpu_used_s: float,
    cpu_limit_s: float,
) -> str | None:
    """Why the sandbox ended a process: our own stop (timeout, output), else the memory cgroup's
    OOM kill, else RLIMIT_CPU (SIGXCPU, or SIGKILL at the hard limit); None if it ended itself."""
    if stop_reason is not None:
        return stop_reason
    if oom_killed:
        return KILLED_MEMORY
    if exit_code == -signal.SIGXCPU:
        return KILLED_CPU
    if exit_code == -signal.SIGKILL and cpu_used_s >= cpu_limit_s:
        return KILLED_CPU
    return None


def exit_status(returncode: int, via_bwrap: bool) -> int:
    """subprocess's code; bubblewrap reports death by signal N as 128+N, mapped back to -N."""
    if via_bwrap and 128 < returncode < 128 + 65:
        return -(returncode - 128)
    return returncode
