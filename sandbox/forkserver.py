"""The fork server: many small Python runs without paying interpreter start-up each time.

One long-lived server process, started once inside bubblewrap (no network, read-only system,
private pid namespace), imports the interpreter's common modules and then, per request, forks a
child that joins the run's cgroup (pids.max, memory limit), sets rlimits, moves into a fresh run
directory, drops to `nobody`, takes new stdin/stdout/stderr pipes and executes the program with
`exec(compile(...))` in a fresh `__main__`. The server (root with only the capabilities it needs:
setuid/setgid/kill/dac_override/fowner/chown) feeds stdin, caps the output and kills the whole
run group at the deadline, as the local backend does. A program cannot signal the server
(different uid), see other sandboxes (own pid namespace) or reach the network.

Isolation: the same layers as the local backend (see local.py). Root and bubblewrap are
required outright (the design rests on them: `forkserver_unavailable_reason`); a pids + memory
cgroup (v1 or v2) is required unless `allow_unisolated=True`, and without one processes are
bounded by RLIMIT_NPROC of `nobody` and leftovers killed by a kill(-1) sweep as `nobody`.
Cgroups: the server's group (`CgroupSet`, label "fs") holds two children, "server" (bubblewrap
and the server) and "run" (each program; limits set per run); cgroup v2 allows controlled
children only under a group without processes of its own, hence the split. On v2 the server
keeps the host's cgroup namespace: with nsdelegate (systemd's mount) a process may move others
only between groups inside its namespace, and "run" is not inside "server".

The client (`ForkServer`) talks to the server over its stdin/stdout pipes with length-prefixed
frames: a JSON header plus raw byte blobs. The server's code is sent over that pipe at start-up
(this file and the sandbox modules it uses, all stdlib-only), so no project file is visible
inside.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
import types
from collections.abc import Sequence

from sandbox.base import ExecResult, Sandbox, SandboxError, SandboxLimits, check_relative_path
from sandbox.cgroups import CgroupSet, cgroups_unavailable_reason, write_value
from sandbox.contain import (
    BWRAP_MISSING,
    MEMORY_SLACK_MB,
    bwrap_argv,
    bwrap_path,
    cgroup_gap,
    cpu_limit_seconds,
    killed_reason,
    nobody_ids,
    pump,
    require_isolation,
    uid_gap,
)

# Modules a typical test program imports; imported once in the server, shared by every child.
DEFAULT_PRELOAD = (
    "array bisect collections copy dataclasses datetime decimal enum fractions functools hashlib "
    "heapq itertools json math operator random re statistics string sys typing traceback"
).split()
SERVER_CAPS = (
    "CAP_SETUID",
    "CAP_SETGID",
    "CAP_KILL",
    "CAP_DAC_OVERRIDE",
    "CAP_FOWNER",
    "CAP_CHOWN",
)
RUNS_DIR = "/runs"  # a tmpfs inside the server's sandbox; one fresh directory per run
CGROUP_MOUNT = "/cgroup"  # the server's own cgroups, bound in as /cgroup/<controller>
START_TIMEOUT_S = 30.0
REPLY_GRACE_S = 15.0  # beyond the run's timeout, how long the client waits for the reply
SERVER_EXTRA_PROCESSES = 8  # bwrap's init and the server itself, beside the run's processes

# ---------------------------------------------------------------------------------------------
# Framing: u32 header length, JSON header (with "blob_sizes"), then the blobs


def write_frame(fd: int, header: dict, blobs: Sequence[bytes] = ()) -> None:
    header = {**header, "blob_sizes": [len(b) for b in blobs]}
    encoded = json.dumps(header).encode()
    data = memoryview(len(encoded).to_bytes(4, "big") + encoded + b"".join(blobs))
    while data:
        data = data[os.write(fd, data) :]


def _read_exact(fd: int, n: int, deadline: float | None = None) -> bytes:
    chunks = bytearray()
    while len(chunks) < n:
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                raise TimeoutError("no reply from the fork server")
        chunk = os.read(fd, n - len(chunks))
        if not chunk:
            raise EOFError("fork server pipe closed")
        chunks += chunk
    return bytes(chunks)


def read_frame(fd: int, deadline: float | None = None) -> tuple[dict, list[bytes]]:
    size = int.from_bytes(_read_exact(fd, 4, deadline), "big")
    header = json.loads(_read_exact(fd, size, deadline))
    blobs = [_read_exact(fd, n, deadline) for n in header.pop("blob_sizes")]
    return header, blobs


# ---------------------------------------------------------------------------------------------
# Server side (runs inside the sandbox: stdlib plus the sandbox modules sent at start-up)


def serve(config: dict) -> None:
    """The server loop: one request at a time from fd 0, one reply to fd 1, until EOF (the
    client closed the pipe or died), then exit, which takes the sandbox down with it."""
    for name in config["preload"]:
        try:
            __import__(name)
        except ImportError:
            pass
    # Keep the protocol pipes on private fds; stray prints go to stderr, never into a reply.
    requests_fd, replies_fd = os.dup(0), os.dup(1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(2, 1)
    os.close(devnull)
    group = None  # the programs' cgroup ("run", made by the client), None without cgroups
    if config["cgroups"]:
        version, controllers = config["cgroup_version"], tuple(config["controllers"])
        group = CgroupSet.attach(version, config["cgroups"], controllers).child("run")
    write_frame(replies_fd, {"ready": True, "pid": os.getpid()})
    counter = 0
    while True:
        try:
            request, blobs = read_frame(requests_fd)
        except EOFError:
            return
        counter += 1
        try:
            reply, out = _serve_run(request, blobs, config, group, counter)
        except Exception as e:  # an infrastructure failure: report it, keep serving
            reply, out = {"error": f"{type(e).__name__}: {e}"}, []
        write_frame(replies_fd, reply, out)


def _serve_run(
    request: dict, blobs: list[bytes], config: dict, group: CgroupSet | None, counter: int
) -> tuple[dict, list[bytes]]:
    program, stdin_data = blobs
    limits = request["limits"]
    timeout = request["timeout"]
    uid, gid = config["uid"], config["gid"]
    run_dir = os.path.join(RUNS_DIR, str(counter))
    os.mkdir(run_dir, 0o700)
    os.chown(run_dir, uid, gid)
    if group is not None:
        memory_bytes = (limits["memory_mb"] + MEMORY_SLACK_MB) * 1024 * 1024
        group.set_limits(limits["max_processes"], memory_bytes)
    join_files = group.join_files() if group is not None else []
    oom_before = group.oom_kills() if group is not None else 0
    stdin_r, stdin_w = os.pipe()
    stdout_r, stdout_w = os.pipe()
    stderr_r, stderr_w = os.pipe()
    setup_r, setup_w = os.pipe()  # the child reports a failed set-up here (not the program)
    start = time.monotonic()
    try:
        pid = os.fork()
    except OSError:
        for fd in (stdin_r, stdin_w, stdout_r, stdout_w, stderr_r, stderr_w, setup_r, setup_w):
            os.close(fd)
        raise
    if pid == 0:  # the child: never returns
        _child(
            program,
            (stdin_r, stdout_w, stderr_w, setup_w),
            run_dir,
            limits,
            timeout,
            uid,
            gid,
            join_files,
            nproc=group is None or not group.has_pids,
        )
    for fd in (stdin_r, stdout_w, stderr_w, setup_w):
        os.close(fd)

    def kill() -> None:
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if group is not None:
            group.kill_all()
        else:
            _kill_all_of_uid(uid)

    pidfd = os.pidfd_open(pid)
    try:
        pumped = pump(
            pidfd,
            stdin_w,
            stdout_r,
            stderr_r,
            stdin_data,
            start + timeout,
            limits["max_output_bytes"],
            kill,
        )
    finally:
        os.close(pidfd)
        kill()
    _, status, usage = os.wait4(pid, 0)
    duration = time.monotonic() - start
    setup_error = _read_all(setup_r)
    if setup_error:
        shutil.rmtree(run_dir, ignore_errors=True)
        raise RuntimeError(f"sandbox set-up failed in the child: {setup_error}")
    exit_code = os.waitstatus_to_exitcode(status)
    reason = killed_reason(
        pumped.stop_reason,
        exit_code,
        oom_killed=group is not None and group.oom_kills() > oom_before,
        cpu_used_s=usage.ru_utime + usage.ru_stime,
        cpu_limit_s=cpu_limit_seconds(SandboxLimits(cpu_s=limits["cpu_s"]), timeout),
    )
    shutil.rmtree(run_dir, ignore_errors=True)
    _clear_dir("/tmp")
    reply = {
        "exit_code": exit_code,
        "duration_s": duration,
        "killed_reason": reason,
        "stdout_truncated": pumped.stdout_truncated,
        "stderr_truncated": pumped.stderr_truncated,
    }
    return reply, [pumped.stdout, pumped.stderr]


def _child(
    program: bytes,
    fds: tuple[int, int, int],
    run_dir: str,
    limits: dict,
    timeout: float,
    uid: int,
    gid: int,
    join_files: list[str],
    nproc: bool,
) -> None:
    """Forked per run: contain, then run the program as __main__, then _exit."""
    import resource

    try:
        os.setsid()
        for path in join_files:
            write_value(path, "0")
        for target, fd in enumerate(fds):  # stdin, stdout, stderr, set-up errors (fd 3)
            os.dup2(fd, target)
        os.closerange(4, 65536)
        cpu_s = cpu_limit_seconds(SandboxLimits(cpu_s=limits["cpu_s"]), timeout)
        address_space = limits["memory_mb"] * 1024 * 1024
        file_size = limits["max_file_mb"] * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
        resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size, file_size))
        resource.setrlimit(resource.RLIMIT_NOFILE, (limits["max_open_files"],) * 2)
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if nproc:
            resource.setrlimit(resource.RLIMIT_NPROC, (limits["max_processes"],) * 2)
        os.chdir(run_dir)
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
    except BaseException as e:
        os.write(3, f"{e!r}".encode())
        os._exit(125)
    os.close(3)  # set-up done: the program never gets this fd
    os.environ.clear()
    os.environ.update(
        {"PATH": "/usr/bin:/bin", "HOME": run_dir, "TMPDIR": run_dir, "LANG": "C.UTF-8"}
    )
    sys.stdin = sys.__stdin__ = open(0, encoding="utf-8", closefd=False)  # noqa: SIM115
    sys.stdout = sys.__stdout__ = open(1, "w", encoding="utf-8", closefd=False)  # noqa: SIM115
    sys.stderr = sys.__stderr__ = open(  # noqa: SIM115
        2, "w", buffering=1, encoding="utf-8", errors="backslashreplace", closefd=False
    )
    sys.argv = ["main.py"]
    sys.path[0] = run_dir
    if "random" in sys.modules:
        sys.modules["random"].seed()  # else every child would share the server's sequence
    with open("main.py", "wb") as f:  # on disk too, so tracebacks can show the lines
        f.write(program)
    main = types.ModuleType("__main__")
    main.__file__ = os.path.join(run_dir, "main.py")
    sys.modules["__main__"] = main
    code = 0
    try:
        exec(compile(program.decode("utf-8", errors="replace"), "main.py", "exec"), main.__dict__)
    except SystemExit as e:
        code = _system_exit_code(e)
    except BaseException as e:
        traceback.print_exception(type(e), e, e.__traceback__.tb_next)  # from main.py down
        code = 1
    try:
        if "threading" in sys.modules:
            sys.modules["threading"]._shutdown()
        atexit._run_exitfuncs()
    except BaseException:
        traceback.print_exc()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            code = code or 120  # as CPython does when flushing stdout fails at exit
    os._exit(code)


def _system_exit_code(e: SystemExit) -> int:
    if e.code is None:
        return 0
    if isinstance(e.code, int):
        return e.code & 0xFF
    print(e.code, file=sys.stderr)
    return 1


def _kill_all_of_uid(uid: int) -> None:
    """Without cgroups: a helper that becomes `uid` and kills every process of it in this pid
    namespace (kill(-1) reaches exactly the processes it may signal)."""
    helper = os.fork()
    if helper == 0:
        try:
            os.setgroups([])
            os.setuid(uid)
            for _ in range(10000):
                try:
                    os.kill(-1, signal.SIGKILL)
                except ProcessLookupError:
                    break
        finally:
            os._exit(0)
    os.waitpid(helper, 0)


def _read_all(fd: int) -> str:
    """Everything in a pipe whose writers are gone; closes it."""
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks).decode("utf-8", errors="replace")


def _clear_dir(path: str) -> None:
    for entry in os.scandir(path):
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            try:
                os.unlink(entry.path)
            except OSError:
                pass


# ---------------------------------------------------------------------------------------------
# Client side

_BOOTSTRAP = r"""
import json, os, sys, types
def read(n):
    data = bytearray()
    while len(data) < n:
        chunk = os.read(0, n - len(data))
        if not chunk:
            raise SystemExit("fork server: no code received")
        data += chunk
    return bytes(data)
sources = json.loads(read(int.from_bytes(read(8), "big")))
for name in ("sandbox",):
    package = types.ModuleType(name)
    package.__path__ = []
    sys.modules[name] = package
for name, source in sources:
    module = types.ModuleType(name)
    module.__file__ = "<" + name + ">"
    sys.modules[name] = module
    exec(compile(source, module.__file__, "exec"), module.__dict__)
sys.modules["sandbox.forkserver"].serve(json.loads(sys.argv[1]))
"""
_SERVER_MODULES = (
    "sandbox.base",
    "sandbox.cgroups",
    "sandbox.contain",
    "sandbox.forkserver",
)


def forkserver_unavailable_reason(allow_unisolated: bool = False) -> str | None:
    """None where a fork server can run here, else why not: it needs root, bubblewrap and the
    uid drop, and (unless `allow_unisolated`) a pids + memory cgroup."""
    if os.geteuid() != 0:
        return (
            "the fork server drops programs to an unprivileged uid, which needs root (as a "
            "normal user, use the local backend)"
        )
    if bwrap_path() is None:
        return BWRAP_MISSING
    gap = uid_gap(*nobody_ids(), via_setpriv=False)
    if gap is not None:
        return gap.missing
    if not allow_unisolated:
        reason = cgroups_unavailable_reason()
        if reason is not None:
            return f"{reason} (or allow_unisolated=True)"
    return None


class ForkServer:
    """A client for one fork server process; `run` executes one Python program.

    Thread-safe (runs are serialised). The server starts on first use and again after it died.
    """

    def __init__(
        self,
        limits: SandboxLimits | None = None,
        *,
        preload: Sequence[str] = DEFAULT_PRELOAD,
        use_cgroups: bool = True,
        allow_unisolated: bool = False,
    ) -> None:
        reason = forkserver_unavailable_reason(allow_unisolated=True)
        if reason is not None:
            raise SandboxError(f"fork server unavailable: {reason}")
        gap = cgroup_gap(use_cgroups, cgroups_unavailable_reason() if use_cgroups else None)
        require_isolation("fork server", [gap] if gap is not None else [], allow_unisolated)
        self.limits = limits or SandboxLimits()
        self.preload = tuple(preload)
        self.allow_unisolated = allow_unisolated
        self.use_cgroups = gap is None
        self._proc: subprocess.Popen | None = None
        self._cgroups: CgroupSet | None = None
        self._lock = threading.Lock()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        with self._lock:
            if not self.running:
                self._start()

    def _start(self) -> None:
        self._stop()
        uid, gid = nobody_ids()
        binds: list[tuple[str, str]] = []
        cgroup_dirs: dict[str, str] = {}
        version = 1
        if self.use_cgroups:
            self._cgroups = self._make_cgroups()
            version = self._cgroups.version
            for key, path in self._cgroups.dirs.items():  # "pids"/"memory" (v1), "unified" (v2)
                inside = f"{CGROUP_MOUNT}/{key}"
                binds.append((path, inside))
                cgroup_dirs[key] = inside
        argv = bwrap_argv(
            None,
            uid=None,
            gid=None,
            tmp_size_bytes=self.limits.max_file_mb * 1024 * 1024,
            keep_caps=SERVER_CAPS,
            extra_binds=tuple(binds),
            writable_tmpfs=(RUNS_DIR,),
            die_with_parent=False,  # it ends on EOF from us instead (see serve)
            unshare_cgroup=version == 1,  # v2: see the module doc
        )
        config = {
            "uid": uid,
            "gid": gid,
            "cgroups": cgroup_dirs,
            "cgroup_version": version,
            "controllers": list(self._cgroups.controllers) if self._cgroups else [],
            "preload": list(self.preload),
        }
        argv += ["--chdir", "/", sys.executable, "-I", "-c", _BOOTSTRAP, json.dumps(config)]
        procs_fds = self._cgroups.child("server").open_procs_fds() if self._cgroups else []

        def join_cgroups() -> None:
            for fd in procs_fds:
                os.write(fd, b"0")

        try:
            self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                start_new_session=True,
                preexec_fn=join_cgroups,
                env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
            )
        except (OSError, subprocess.SubprocessError) as e:
            raise SandboxError(f"could not start the fork server: {e}") from e
        finally:
            for fd in procs_fds:
                os.close(fd)
        sources = [(name, _module_source(name)) for name in _SERVER_MODULES]
        blob = json.dumps(sources).encode()
        try:
            self._proc.stdin.write(len(blob).to_bytes(8, "big") + blob)
            self._proc.stdin.flush()
            header, _ = read_frame(self._proc.stdout.fileno(), time.monotonic() + START_TIMEOUT_S)
        except (OSError, EOFError, TimeoutError, ValueError) as e:
            self._stop()
            raise SandboxError(f"the fork server did not start: {e}") from e
        if not header.get("ready"):
            self._stop()
            raise SandboxError(f"the fork server did not start: {header}")

    def _make_cgroups(self) -> CgroupSet:
        """The server's groups, with "server" and "run" children; SandboxError where the host
        lost them since the constructor checked."""
        try:
            return CgroupSet(
                self.limits.max_processes + SERVER_EXTRA_PROCESSES,
                None,
                label="fs",
                children=("server", "run"),
            )
        except (OSError, RuntimeError) as e:
            raise SandboxError(f"could not make the fork server's cgroups: {e}") from e

    def run(
        self,
        program: str,
        stdin: str | bytes | None = None,
        timeout: float = 2.0,
        *,
        memory_mb: int | None = None,
        cpu_s: float | None = None,
        max_processes: int | None = None,
    ) -> ExecResult:
        """Run `program` (Python source) as __main__ with `stdin`; limits default to the
        server's `limits` (max_processes at most theirs). SandboxError when the server fails
        (it is restarted on the next run)."""
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        limits = self.limits
        if max_processes is not None and not 0 < max_processes <= limits.max_processes:
            raise ValueError(
                f"max_processes must be in 1..{limits.max_processes} (the server's limit)"
            )
        request_limits = {
            "memory_mb": memory_mb or limits.memory_mb,
            "cpu_s": cpu_s if cpu_s is not None else limits.cpu_s,
            "max_processes": max_processes or limits.max_processes,
            "max_output_bytes": limits.max_output_bytes,
            "max_file_mb": limits.max_file_mb,
            "max_open_files": limits.max_open_files,
        }
        stdin_data = stdin.encode() if isinstance(stdin, str) else (stdin or b"")
        with self._lock:
            if not self.running:
                self._start()
            proc = self._proc
            try:
                write_frame(
                    proc.stdin.fileno(),
                    {"timeout": timeout, "limits": request_limits},
                    [program.encode("utf-8", errors="surrogateescape"), stdin_data],
                )
                header, blobs = read_frame(
                    proc.stdout.fileno(), time.monotonic() + timeout + REPLY_GRACE_S
                )
            except (OSError, EOFError, TimeoutError, ValueError) as e:
                status = proc.poll()
                self._stop()
                raise SandboxError(
                    f"fork server failed: {type(e).__name__}: {e} (server exit status {status})"
                ) from e
        if "error" in header:
            raise SandboxError(f"fork server failed: {header['error']}")
        stdout, stderr = blobs
        return ExecResult(
            exit_code=header["exit_code"],
            stdout=stdout,
            stderr=stderr,
            duration_s=header["duration_s"],
            timed_out=header["killed_reason"] == "timeout",
            killed_reason=header["killed_reason"],
            stdout_truncated=header["stdout_truncated"],
            stderr_truncated=header["stderr_truncated"],
        )

    def _stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()
            for stream in (proc.stdin, proc.stdout):
                try:
                    stream.close()
                except OSError:
                    pass
        if self._cgroups is not None:
            self._cgroups.remove()
            self._cgroups = None

    def close(self) -> None:
        """Stop the server and everything it runs."""
        with self._lock:
            self._stop()

    def __enter__(self) -> ForkServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self._stop()
        except Exception:
            pass


def _module_source(name: str) -> str:
    module = sys.modules[name]
    with open(module.__file__, encoding="utf-8") as f:
        return f.read()


_shared: dict[bool, ForkServer] = {}  # by allow_unisolated
_shared_lock = threading.Lock()


def shared_forkserver(allow_unisolated: bool = False) -> ForkServer:
    """This process's fork server, made on first use (SandboxError where unavailable;
    IsolationError where it lacks its cgroups and not `allow_unisolated`)."""
    with _shared_lock:
        server = _shared.get(allow_unisolated)
        if server is None:
            server = _shared[allow_unisolated] = ForkServer(allow_unisolated=allow_unisolated)
            atexit.register(server.close)
        return server


class ForkServerSandbox(Sandbox):
    """The fork server behind the `Sandbox` interface (`make_sandbox("forkserver")`), for callers
    that run Python programs: files written with `write_file` are kept here, and
    `exec(["python3", [-I,] FILE])` runs FILE's source in a child forked from this process's
    shared warm server. The server runs no other command (it is a Python interpreter, not a
    shell): any other `cmd` is refused with a SandboxError. Programs always run isolated (-I)
    with a fresh, empty run directory as their work dir."""

    workdir = RUNS_DIR

    def __init__(self, limits: SandboxLimits | None = None, *, allow_unisolated: bool = False):
        self.limits = limits or SandboxLimits()
        self.server = shared_forkserver(allow_unisolated)
        self._files: dict[str, bytes] = {}

    def exec(
        self, cmd: str | list[str], timeout: float, stdin: str | bytes | None = None
    ) -> ExecResult:
        argv = cmd.split() if isinstance(cmd, str) else list(cmd)
        if argv[:1] == ["python3"] and argv[1:2] == ["-I"]:
            argv = argv[:1] + argv[2:]
        if len(argv) != 2 or argv[0] != "python3":
            raise SandboxError(
                f"the fork server runs Python programs only (python3 [-I] FILE), not {cmd!r}"
            )
        source = self.read_file(argv[1]).decode("utf-8", errors="surrogateescape")
        return self.server.run(
            source,
            stdin,
            timeout,
            memory_mb=self.limits.memory_mb,
            cpu_s=self.limits.cpu_s,
            max_processes=min(self.limits.max_processes, self.server.limits.max_processes),
        )

    def write_file(self, path: str, data: str | bytes) -> None:
        self._files[check_relative_path(path)] = data.encode() if isinstance(data, str) else data

    def read_file(self, path: str) -> bytes:
        try:
            return self._files[check_relative_path(path)]
        except KeyError:
            raise FileNotFoundError(path) from None

    def close(self) -> None:
        self._files.clear()  # the shared server stays warm for the next program
