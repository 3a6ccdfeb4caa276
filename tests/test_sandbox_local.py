"""Containment of hostile programs by the local sandbox and the fork server.

Every hostile program must end with a result within its deadline, leave nothing running and
leave the host untouched. The fork bomb runs only after the same test has shown that the
process limit binds (50 sleeping children asked for, at most 20 allowed).
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import require

from sandbox import ExecResult, SandboxError, SandboxLimits, make_sandbox
from sandbox.base import check_relative_path
from sandbox.cgroups import cgroups_available
from sandbox.forkserver import ForkServer, forkserver_unavailable_reason
from sandbox.local import LocalSandbox, bwrap_path

pytestmark = pytest.mark.timeout(120)

PROJECT_FILE = Path(__file__).resolve()
HAS_BWRAP = bwrap_path() is not None
MiB = 1024 * 1024


def require_bwrap() -> None:
    require("bwrap", HAS_BWRAP, "bubblewrap is not installed (apt-get install bubblewrap)")


def host_processes_with(marker: str) -> list[int]:
    """Host pids whose command line contains `marker`."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if marker.encode() in cmdline:
                found.append(int(entry))
    return found


Runner = Callable[..., ExecResult]


@pytest.fixture(scope="module")
def forkserver():
    reason = forkserver_unavailable_reason()
    if reason is not None:
        require("bwrap", False, reason)
    server = ForkServer(SandboxLimits(memory_mb=256, max_processes=32, max_output_bytes=MiB))
    yield server
    server.close()


@pytest.fixture(params=["local", "forkserver"])
def run(request) -> Runner:
    """run(code, timeout=, stdin=, memory_mb=, max_processes=) in the backend under test."""
    require_bwrap()
    if request.param == "forkserver":
        server = request.getfixturevalue("forkserver")

        def run_forkserver(code, timeout=5.0, stdin=None, memory_mb=256, max_processes=32):
            result = server.run(
                code, stdin, timeout, memory_mb=memory_mb, max_processes=max_processes
            )
            assert server.running, "a hostile program took the fork server down"
            return result

        return run_forkserver

    def run_local(code, timeout=5.0, stdin=None, memory_mb=256, max_processes=32):
        limits = SandboxLimits(
            memory_mb=memory_mb, max_processes=max_processes, max_output_bytes=MiB
        )
        with LocalSandbox(limits) as sandbox:
            sandbox.write_file("main.py", code)
            result = sandbox.exec(["python3", "main.py"], timeout=timeout, stdin=stdin)
            if sandbox._cgroups is not None:
                assert sandbox._cgroups.kill_all(), "processes left in the sandbox's cgroup"
        assert not os.path.exists(sandbox.host_dir)
        return result

    return run_local


def timed(run: Runner, code: str, **kwargs) -> tuple[ExecResult, float]:
    start = time.monotonic()
    result = run(code, **kwargs)
    return result, time.monotonic() - start


# ---------------------------------------------------------------------------------------------
# Ordinary programs


def test_stdin_stdout_exit_code(run: Runner) -> None:
    result = run(
        "import sys\ndata = sys.stdin.read()\nprint(data.upper())\nsys.exit(3)", stdin="abc"
    )
    assert result.exit_code == 3
    assert result.stdout == b"ABC\n"
    assert result.killed_reason is None and not result.timed_out
    result = run("raise ValueError('boom')")
    assert result.exit_code == 1 and b"ValueError: boom" in result.stderr


def test_runs_unprivileged_without_network_namespace_escape(run: Runner) -> None:
    result = run("import os\nprint(os.getuid(), os.geteuid())")
    uid = int(result.stdout.split()[0])
    if os.geteuid() == 0:
        assert uid != 0, "programs must not run as root"


# ---------------------------------------------------------------------------------------------
# Hostile programs


def test_infinite_loop_is_killed_at_deadline(run: Runner) -> None:
    result, elapsed = timed(run, "while True:\n    pass", timeout=1.5)
    assert result.timed_out and result.killed_reason == "timeout"
    assert result.exit_code != 0
    assert 1.4 <= elapsed < 4.5


def test_sleeping_past_deadline(run: Runner) -> None:
    result, elapsed = timed(
        run, "import time\nprint('start', flush=True)\ntime.sleep(60)", timeout=1
    )
    assert result.killed_reason == "timeout"
    assert result.stdout == b"start\n"
    assert elapsed < 4


def test_process_limit_binds_then_fork_bomb_is_contained(run: Runner) -> None:
    # Harmless first: ask for 50 sleeping children with a limit of 20.
    probe = run(
        "import os, time\n"
        "started = 0\n"
        "for _ in range(50):\n"
        "    try:\n"
        "        pid = os.fork()\n"
        "    except OSError:\n"
        "        break\n"
        "    if pid == 0:\n"
        "        time.sleep(30)\n"
        "        os._exit(0)\n"
        "    started += 1\n"
        "print(started)\n",
        timeout=10,
        max_processes=20,
    )
    started = int(probe.stdout.split()[0])
    if not 1 <= started < 20:
        pytest.fail(f"process limit does not bind ({started} of 50 children started): no fork bomb")
    # Proven: now the fork bomb.
    load_before = os.getloadavg()[0]
    bomb, elapsed = timed(
        run,
        "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
        timeout=2,
        max_processes=20,
    )
    assert bomb.killed_reason in ("timeout", "cpu")
    assert elapsed < 8
    assert os.getloadavg()[0] < load_before + 25
    after = run("print('alive')", timeout=5)
    assert after.stdout == b"alive\n"


def test_memory_bomb(run: Runner) -> None:
    result, elapsed = timed(
        run, "chunks = []\nwhile True:\n    chunks.append(bytearray(10**7))", memory_mb=200
    )
    assert result.exit_code != 0
    assert b"MemoryError" in result.stderr or result.killed_reason == "memory"
    assert elapsed < 5


def test_memory_limit_covers_all_processes(run: Runner) -> None:
    """Three children of 150 MB each stay under the per-process 200 MB address space but not
    under the sandbox's memory cgroup."""
    require("cgroups", cgroups_available(), "no memory cgroup here")
    code = (
        "import os, time\n"
        "for _ in range(3):\n"
        "    if os.fork() == 0:\n"
        "        block = bytearray(150 * 2**20)\n"
        "        for i in range(0, len(block), 4096):\n"
        "            block[i] = 1\n"
        "        time.sleep(3)\n"
        "        os._exit(0)\n"
        "for _ in range(3):\n"
        "    os.wait()\n"
    )
    result = run(code, timeout=10, memory_mb=200)
    assert result.killed_reason == "memory"


def test_writing_outside_the_work_dir(run: Runner) -> None:
    name = f"cwm-escape-{secrets.token_hex(6)}"
    targets = [
        f"/tmp/{name}",
        f"/root/{name}",
        f"{PROJECT_FILE.parent}/{name}",
        f"/etc/{name}",
        f"/usr/{name}",
        f"../{name}",
        f"/{name}",
    ]
    code = (
        "written = []\n"
        f"for path in {targets!r}:\n"
        "    try:\n"
        "        with open(path, 'w') as f:\n"
        "            f.write('escaped')\n"
        "        written.append(path)\n"
        "    except OSError:\n"
        "        pass\n"
        "print(written)\n"
    )
    result = run(code)
    leaked = [p for p in targets if not p.startswith("..") and os.path.exists(p)]
    for path in leaked:  # a failing run must not litter the host (or this repository)
        os.remove(path)
    assert result.exit_code == 0, result.stderr
    assert not leaked, f"the program wrote {leaked} on the host"


def test_reading_files_outside_the_work_dir(run: Runner, tmp_path_factory) -> None:
    secret = secrets.token_hex(16)
    tmp_secret = Path(f"/tmp/cwm-secret-{secrets.token_hex(6)}")
    tmp_secret.write_text(secret)
    tmp_secret.chmod(0o644)  # readable by anyone on the host: only isolation can hide it
    root_secret = Path.home() / f".cwm-secret-{secrets.token_hex(6)}"
    root_secret.write_text(secret)
    try:
        paths = [str(tmp_secret), str(root_secret), str(PROJECT_FILE), "/etc/shadow"]
        code = (
            "seen = []\n"
            f"for path in {paths!r}:\n"
            "    try:\n"
            "        seen.append(open(path).read())\n"
            "    except OSError as e:\n"
            "        seen.append(type(e).__name__)\n"
            "print(seen)\n"
        )
        result = run(code)
        assert result.exit_code == 0, result.stderr
        assert secret.encode() not in result.stdout
        assert b"Containment of hostile programs" not in result.stdout  # this file's text
        assert b"root:" not in result.stdout  # /etc/shadow
    finally:
        tmp_secret.unlink()
        root_secret.unlink()


def test_no_network_not_even_host_loopback(run: Runner) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(0.2)
    port = listener.getsockname()[1]
    connections = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                connections.append(listener.accept())
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        code = (
            "import socket\n"
            "try:\n"
            f"    s = socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
            "    s.sendall(b'leak')\n"
            "    print('connected')\n"
            "except OSError as e:\n"
            "    print('refused', type(e).__name__)\n"
        )
        result = run(code)
        time.sleep(0.3)
    finally:
        stop.set()
        thread.join()
        listener.close()
    assert connections == []
    assert b"refused" in result.stdout


def test_killing_parent_and_process_group(run: Runner) -> None:
    for attack in (
        "os.kill(os.getppid(), signal.SIGKILL)",
        "os.killpg(0, signal.SIGKILL)",
        "os.kill(-1, signal.SIGKILL)",
        "os.kill(1, signal.SIGKILL)",
    ):
        result = run(f"import os, signal\n{attack}\nprint('survived')")
        assert result.killed_reason is None, attack
    after = run("print('still working')")
    assert after.stdout == b"still working\n"


def test_printing_gigabytes_is_capped(run: Runner) -> None:
    code = "import sys\nblock = b'x' * 2**20\nwhile True:\n    sys.stdout.buffer.write(block)\n"
    result, elapsed = timed(run, code, timeout=20)
    assert result.killed_reason == "output_limit"
    assert result.stdout_truncated and len(result.stdout) == MiB
    assert elapsed < 5


def test_closing_stdout(run: Runner) -> None:
    result = run("import os\nos.close(1)\nprint('lost')")
    assert result.exit_code != 0 and result.killed_reason is None
    result, elapsed = timed(
        run, "import os, time\nos.close(1)\nos.close(2)\ntime.sleep(60)", timeout=1
    )
    assert result.killed_reason == "timeout" and elapsed < 4
    result = run("import os, time\nos.close(1)\ntime.sleep(0.5)\nraise SystemExit(7)", timeout=5)
    assert result.exit_code == 7 and result.killed_reason is None


def daemon_program(marker: str) -> str:
    """Double fork + setsid + exec `sleep MARKER`; prints 'daemon running' once it is."""
    return (
        "import os, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        f"        os.execv('/bin/sleep', ['sleep', '{marker}'])\n"
        "    os._exit(0)\n"
        "for _ in range(200):\n"
        "    running = any(\n"
        f"        b'{marker}' in open(f'/proc/{{p}}/cmdline', 'rb').read()\n"
        "        for p in os.listdir('/proc') if p.isdigit()\n"
        "    )\n"
        "    if running:\n"
        "        print('daemon running')\n"
        "        break\n"
        "    time.sleep(0.01)\n"
    )


def test_daemon_left_behind_is_killed(run: Runner) -> None:
    marker = f"{1000 + secrets.randbelow(10**6)}.{secrets.randbelow(10**6)}"
    result, elapsed = timed(run, daemon_program(marker), timeout=10)
    assert result.stdout == b"daemon running\n", result.stderr
    assert elapsed < 5, "exec waited for the daemon instead of killing it"
    assert host_processes_with(marker) == []


def test_forkserver_runs_do_not_see_each_other(forkserver) -> None:
    require_bwrap()
    first = forkserver.run(
        "import os\nopen('left.txt', 'w').write('x')\nopen('/tmp/left.txt', 'w').write('x')\n"
        "print(os.getcwd())"
    )
    assert first.exit_code == 0, first.stderr
    second = forkserver.run(
        "import os\nprint(os.path.exists('left.txt'), os.path.exists('/tmp/left.txt'), os.getcwd())"
    )
    assert second.stdout.split()[:2] == [b"False", b"False"]
    assert second.stdout.split()[2] != first.stdout.strip()


def test_forkserver_random_differs_between_runs(forkserver) -> None:
    require_bwrap()
    draws = {forkserver.run("import random\nprint(random.random())").stdout for _ in range(3)}
    assert len(draws) == 3


# ---------------------------------------------------------------------------------------------
# The sandbox API


def test_files_round_trip_and_path_checks() -> None:
    require_bwrap()
    with make_sandbox("local") as sandbox:
        sandbox.write_file("sub/dir/data.txt", "hello")
        assert sandbox.read_file("sub/dir/data.txt") == b"hello"
        result = sandbox.exec("cat sub/dir/data.txt; echo more >> sub/dir/data.txt", timeout=5)
        assert result.stdout == b"hello"
        assert sandbox.read_file("sub/dir/data.txt") == b"hellomore\n"
        for bad in ("/etc/passwd", "../x", "a/../../x", ""):
            with pytest.raises(ValueError):
                sandbox.write_file(bad, "x")
        with pytest.raises(FileNotFoundError):
            sandbox.read_file("missing.txt")
        # Links the program leaves must not lead the host outside the work dir.
        sandbox.exec("ln -s /etc/passwd link; ln -s /etc dirlink; mkfifo fifo", timeout=5)
        with pytest.raises(ValueError):
            sandbox.read_file("link")
        with pytest.raises(ValueError):
            sandbox.read_file("fifo")
        with pytest.raises(ValueError):
            sandbox.write_file("dirlink/evil", "x")
        sandbox.write_file("link", "replaced")
        assert sandbox.read_file("link") == b"replaced"
        assert "replaced" not in Path("/etc/passwd").read_text()
    with pytest.raises(SandboxError):
        sandbox.exec("true", timeout=1)
    assert check_relative_path("a/./b") == "a/b"


def test_sandbox_failures_raise_sandbox_error_not_a_result() -> None:
    """A sandbox that cannot be set up is an infrastructure error, never a program's verdict."""
    require_bwrap()
    impossible = SandboxLimits(max_open_files=2**40)  # above the hard limit: setrlimit fails
    with LocalSandbox(impossible) as sandbox, pytest.raises(SandboxError):
        sandbox.exec(["true"], timeout=5)
    with LocalSandbox() as sandbox:
        shutil.rmtree(sandbox.host_dir)
        with pytest.raises(SandboxError):
            sandbox.exec(["true"], timeout=5)
    if forkserver_unavailable_reason() is None:
        with ForkServer(impossible) as server, pytest.raises(SandboxError, match="set-up"):
            server.run("print(1)")


def test_unknown_backend_is_named() -> None:
    with pytest.raises(ValueError, match="local"):
        make_sandbox("vm")


def test_without_bwrap_limits_and_kills_still_hold() -> None:
    """use_bwrap=False (so allow_unisolated), with shell commands (this interpreter may live
    where `nobody` cannot go). Each check gets a fresh sandbox: without bwrap's pid namespace,
    killed orphans are reaped by the host's init, and until then they count against the group's
    pids.max."""
    require("cgroups", os.geteuid() != 0 or cgroups_available(), "needs a pids cgroup as root")
    marker = f"{2000 + secrets.randbelow(10**6)}.{secrets.randbelow(10**6)}"
    limits = SandboxLimits(max_processes=20, max_output_bytes=MiB)
    unisolated = {"use_bwrap": False, "allow_unisolated": True}
    with LocalSandbox(limits, **unisolated) as sandbox:
        assert sandbox.workdir == sandbox.host_dir
        if os.geteuid() == 0:
            assert sandbox.exec("id -u", timeout=5).stdout.strip() != b"0"
        result = sandbox.exec(
            "for i in $(seq 50); do (echo $i >> started; exec sleep 30) & done", timeout=10
        )
        started = len(sandbox.read_file("started").split())
        assert b"Cannot fork" in result.stderr and 1 <= started < 20, (started, result)
    with LocalSandbox(limits, **unisolated) as sandbox:
        start = time.monotonic()
        result = sandbox.exec(
            f"(setsid sleep {marker} &); sleep 0.3; "
            f"grep -qs {marker} /proc/[0-9]*/cmdline && echo running; sleep 60",
            timeout=2,
        )
        assert result.stdout == b"running\n"
        assert result.killed_reason == "timeout" and time.monotonic() - start < 5
        assert host_processes_with(marker) == []
    with LocalSandbox(limits, **unisolated) as sandbox:
        result = sandbox.exec("yes", timeout=10)
        assert result.killed_reason == "output_limit" and len(result.stdout) == MiB


@pytest.mark.parametrize("backend", ["local", "forkserver"])
def test_without_cgroups_rlimit_and_namespace_still_contain(backend: str) -> None:
    """No cgroups (so allow_unisolated): RLIMIT_NPROC (programs run unprivileged) limits
    processes, and leftovers die with the pid namespace (local) or by the server's kill(-1) sweep
    as `nobody` (fork server)."""
    require_bwrap()
    if backend == "forkserver" and forkserver_unavailable_reason() is not None:
        require("bwrap", False, forkserver_unavailable_reason())
    limits = SandboxLimits(memory_mb=256, max_processes=20, max_output_bytes=MiB)
    server = None
    if backend == "forkserver":
        server = ForkServer(limits, use_cgroups=False, allow_unisolated=True)

    def run(code: str, timeout: float = 10) -> ExecResult:
        if server is not None:
            return server.run(code, timeout=timeout)
        with LocalSandbox(limits, use_cgroups=False, allow_unisolated=True) as sandbox:
            assert sandbox._cgroups is None
            sandbox.write_file("main.py", code)
            return sandbox.exec(["python3", "main.py"], timeout=timeout)

    marker = f"{3000 + secrets.randbelow(10**6)}.{secrets.randbelow(10**6)}"
    try:
        probe = run(
            "import os, time\nstarted = 0\nfor _ in range(50):\n    try:\n        pid = os.fork()\n"
            "    except OSError:\n        break\n    if pid == 0:\n        time.sleep(30)\n"
            "        os._exit(0)\n    started += 1\nprint(started)\n"
        )
        assert 1 <= int(probe.stdout.split()[0]) < 20, probe
        daemon = run(daemon_program(marker))
        assert daemon.stdout == b"daemon running\n", daemon
        time.sleep(0.2)
        assert host_processes_with(marker) == []
        loop = run("while True:\n    pass\n", timeout=1)
        # a busy loop reaches its CPU second and its wall second together: either kill is right
        assert loop.killed_reason in ("timeout", "cpu"), loop
    finally:
        if server is not None:
            server.close()


# ---------------------------------------------------------------------------------------------
# The long-lived shell (an agent's bash session) under every layer of the local sandbox


def test_the_local_shell_keeps_state_and_its_end_kills_everything() -> None:
    require_bwrap()
    marker = f"cwm-shell-{secrets.token_hex(6)}"
    with LocalSandbox(SandboxLimits(memory_mb=256)) as box:
        shell = box.start_shell(box.workdir, "export INIT=yes")
        steps = [
            ("mkdir -p d && cd d && X=plain && alias ll='ls -d' && f() { echo fn; }", ""),
            (f"(exec -a {marker} sleep 300) & echo x > /tmp/kept", ""),
            (
                "pwd; echo $X $INIT; ll .; f; cat /tmp/kept; jobs | wc -l",
                f"{box.workdir}/d\nplain yes\n.\nfn\nx\n1\n",
            ),
            ("read line; echo got:$line; id -u", None),
            ("cat <<'EOF'\nit's \"quoted\" $X\nEOF", 'it\'s "quoted" $X\n'),
        ]
        for command, expected in steps:
            result = shell.run(command, timeout=10)
            if expected is not None:
                assert result.stdout_text == expected, (command, result)
        assert result.exit_code == 0
        assert host_processes_with(marker)  # the background job runs between calls
        started = time.monotonic()
        result = shell.run("sleep 30", timeout=1)
        assert result.timed_out and not shell.alive and time.monotonic() - started < 10
        assert not host_processes_with(marker)  # the end of the shell killed its job
        fresh = box.start_shell(box.workdir)
        assert (
            fresh.run("echo ${X:-unset}; pwd", timeout=10).stdout_text == f"unset\n{box.workdir}\n"
        )
        fresh.close()
    assert not host_processes_with(marker)
