"""The docker sandbox against a real Docker API (Podman's, set up by sandbox/host_setup.sh).

Every hostile program must end with a verdict well within the test's own timeout, leave nothing
running, leave the host untouched, and leave the sandbox usable for the next program. The fork
bomb runs only after the same test has shown that the process limit binds.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import socket
import threading
import time

import pytest
from conftest import host_processes_with, require
from docker.types import Mount

from sandbox import SandboxError, SandboxLimits, make_sandbox
from sandbox.docker import (
    EXPIRES_LABEL,
    SANDBOX_LABEL,
    DockerSandbox,
    docker_unavailable_reason,
    reap_stale,
    shared_client,
)
from sandbox.images import HOST_IMAGE, ensure_image

pytestmark = pytest.mark.timeout(60)

MiB = 1024 * 1024
SMALL = SandboxLimits(memory_mb=128, max_processes=20, max_output_bytes=MiB)


@pytest.fixture(scope="module")
def docker_url() -> str:
    from sandbox.docker import resolve_docker_host

    reason = docker_unavailable_reason()
    require("docker", reason is None, reason or "")
    url = resolve_docker_host()
    ensure_image(shared_client(url), HOST_IMAGE)  # what host_setup.sh does; ~0.1 s if missing
    return url


@pytest.fixture
def sandbox(docker_url):
    box = DockerSandbox(SMALL)
    yield box
    box.close()


def still_usable(box: DockerSandbox) -> None:
    """The sandbox answers, and nothing but PID 1 and its sleep runs in it."""
    result = box.exec("echo ok; ls /proc | grep -c '^[0-9]'", timeout=10)
    assert result.ok, result
    lines = result.stdout_text.split()
    assert lines[0] == "ok"
    # PID 1, its `sleep 1`, the exec's shell and ls/grep: at most 6 processes
    assert int(lines[1]) <= 6, f"processes left over: {lines[1]}"


# ---------------------------------------------------------------------------------------------
# Plain use


def test_exec_stdin_and_files_round_trip(sandbox: DockerSandbox) -> None:
    result = sandbox.exec("echo out; echo err >&2; pwd; id -u; exit 3", timeout=10)
    assert result.exit_code == 3 and result.killed_reason is None
    assert result.stdout_text.split() == ["out", sandbox.workdir, str(sandbox.uid)]
    assert result.stderr == b"err\n"
    assert sandbox.uid != 0

    listed = sandbox.exec(["python3", "-c", "import sys; print(sys.argv[1:])", "a b", "$HOME"], 10)
    assert listed.stdout_text.strip() == "['a b', '$HOME']"

    assert sandbox.exec("cat", timeout=10, stdin="hello\nworld").stdout == b"hello\nworld"
    blob = secrets.token_bytes(3 * MiB // 4)  # binary stdin, larger than any pipe buffer
    digest = sandbox.exec("sha256sum | cut -c1-64", timeout=10, stdin=blob).stdout_text.strip()
    assert digest == hashlib.sha256(blob).hexdigest()
    assert sandbox.exec("cat", timeout=10).stdout == b""  # no stdin: empty, not the last one

    sandbox.write_file("pkg/sub/data.bin", blob[:1000])
    sandbox.write_file("main.py", "print(open('pkg/sub/data.bin','rb').read()[:4].hex())")
    assert sandbox.read_file("pkg/sub/data.bin") == blob[:1000]
    ran = sandbox.exec(["python3", "main.py"], timeout=10)
    assert ran.stdout_text.strip() == blob[:4].hex()
    made = sandbox.exec("echo made > out.txt && mkdir -p d && printf x > d/y", timeout=10)
    assert made.ok, made
    assert sandbox.read_file("out.txt") == b"made\n"
    assert sandbox.read_file("d/y") == b"x"
    with pytest.raises(FileNotFoundError):
        sandbox.read_file("missing.txt")
    with pytest.raises(ValueError):
        sandbox.read_file("d")  # a directory
    for bad in ("../etc/passwd", "/etc/passwd", ""):
        with pytest.raises(ValueError):
            sandbox.write_file(bad, "x")
    assert sandbox.exec("ln -s /etc/passwd leak", timeout=10).ok
    with pytest.raises(ValueError):
        sandbox.read_file("leak")  # a link is not followed out of the work dir


def test_reused_across_test_cases_like_run_tests(docker_url) -> None:
    from rewards.tests import run_tests

    program = "n = int(input())\nprint(n * n)\n"
    tests = [{"input": f"{n}\n", "output": f"{n * n}\n"} for n in (2, 3, 12)]
    report = run_tests(program, tests, time_limit_s=5, memory_mb=256, backend="docker")
    assert report.infrastructure_error is None, report.infrastructure_error
    assert report.passed and report.verdicts == ["AC"] * 3
    wrong = run_tests("print(0)", tests, time_limit_s=5, memory_mb=256, backend="docker")
    assert not wrong.passed and wrong.fraction == 0.0


# ---------------------------------------------------------------------------------------------
# Hostile programs


def test_infinite_loop_and_sleep_time_out(sandbox: DockerSandbox) -> None:
    start = time.monotonic()
    loop = sandbox.exec(["python3", "-c", "while True: pass"], timeout=1.0)
    assert loop.timed_out and loop.killed_reason == "timeout" and loop.exit_code == -9
    assert time.monotonic() - start < 5
    start = time.monotonic()
    slept = sandbox.exec("echo before; sleep 300; echo after", timeout=1.0)
    assert slept.timed_out and slept.stdout == b"before\n"
    assert time.monotonic() - start < 5
    still_usable(sandbox)


def test_cpu_seconds_limit(docker_url) -> None:
    with DockerSandbox(SandboxLimits(cpu_s=1)) as box:
        spin = box.exec(["python3", "-c", "while True: pass"], timeout=20)
        assert spin.killed_reason == "cpu" and spin.duration_s < 10, spin


def test_process_limit_binds_then_fork_bomb_contained(sandbox: DockerSandbox) -> None:
    spawn = (
        "import subprocess\n"
        "children = []\n"
        "for _ in range(50):\n"
        "    try:\n"
        "        children.append(subprocess.Popen(['sleep', '30']))\n"
        "    except OSError:\n"
        "        break\n"
        "print(len(children))\n"
    )
    spawned = sandbox.exec(["python3", "-c", spawn], timeout=20)
    assert spawned.ok, spawned
    assert 5 <= int(spawned.stdout_text) < SMALL.max_processes  # the limit (20) binds
    still_usable(sandbox)  # and the 30 s sleepers are gone with the exec

    start = time.monotonic()
    bomb = sandbox.exec("bomb() { bomb | bomb & }; bomb; sleep 5", timeout=3)
    assert bomb.timed_out or bomb.exit_code != 0, bomb
    assert time.monotonic() - start < 15
    python_bomb = (
        "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    )
    bomb = sandbox.exec(["python3", "-c", python_bomb], timeout=3)
    assert bomb.timed_out, bomb
    assert time.monotonic() - start < 25
    still_usable(sandbox)


def test_memory_bomb_is_killed(sandbox: DockerSandbox) -> None:
    fine = sandbox.exec(["python3", "-c", "x = bytearray(32 << 20); print(len(x))"], 10)
    assert fine.ok and fine.stdout_text.strip() == str(32 << 20)  # the limit is not spurious
    bomb = sandbox.exec(["python3", "-c", "x = bytearray(1 << 30); print('alive')"], 20)
    assert bomb.killed_reason == "memory" and bomb.exit_code == -9, bomb
    assert b"alive" not in bomb.stdout
    growing = "chunks = []\nwhile True:\n    chunks.append(bytearray(8 << 20))\n"
    bomb = sandbox.exec(["python3", "-c", growing], 20)
    assert bomb.killed_reason == "memory", bomb
    still_usable(sandbox)


def test_writes_outside_the_work_dir_fail_and_host_is_untouched(sandbox: DockerSandbox) -> None:
    name = f"cwm-escape-{secrets.token_hex(6)}"
    targets = [f"/{name}", f"/etc/{name}", f"/usr/{name}", f"/usr/bin/{name}", f"/root/{name}"]
    script = "; ".join(f"(echo x > {t}) 2>/dev/null && echo WROTE {t}" for t in targets)
    result = sandbox.exec(script + f"; echo x > /tmp/{name} && echo tmp-ok", timeout=10)
    assert "WROTE" not in result.stdout_text, result.stdout_text
    assert "tmp-ok" in result.stdout_text  # the container's own /tmp is writable
    for target in [*targets, f"/tmp/{name}"]:
        assert not os.path.exists(target), f"{target} appeared on the host"
    chmod = sandbox.exec("chmod 777 /usr/bin/python3 2>&1; touch /usr/bin/python3", timeout=10)
    assert chmod.exit_code != 0
    # the file size limit binds (a small one, so the tmpfs pages stay under the memory limit:
    # otherwise the memory cgroup's OOM killer may pick PID 1 and end the container)
    with DockerSandbox(SandboxLimits(memory_mb=256, max_file_mb=16, max_processes=20)) as box:
        big = box.exec("head -c 64M /dev/zero > big; echo rc=$?", timeout=20)
    assert "rc=0" not in big.stdout_text


def test_host_secrets_and_processes_are_unreachable(sandbox: DockerSandbox, tmp_path) -> None:
    secret = f"cwm-secret-{secrets.token_hex(8)}"
    secret_file = tmp_path / "secret.txt"
    secret_file.write_text(secret)
    os.environ["CWM_TEST_SECRET"] = secret
    try:
        probe = (
            f"cat {secret_file} /root/.bash_history 2>/dev/null; env; "
            f"grep -rsl {secret} / --exclude-dir=proc --exclude-dir=sys --exclude-dir=usr; "
            "ls /proc | grep -c '^[0-9]'"
        )
        result = sandbox.exec(probe, timeout=20)
    finally:
        del os.environ["CWM_TEST_SECRET"]
    assert secret not in result.stdout_text + result.stderr_text
    assert int(result.stdout_text.split()[-1]) <= 6  # its own pid namespace: no host processes
    assert secret_file.read_text() == secret


def test_no_network(sandbox: DockerSandbox) -> None:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("0.0.0.0", 0))
    listener.listen(8)
    listener.settimeout(0.2)
    port = listener.getsockname()[1]
    accepted: list[object] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except TimeoutError:
                continue
            except OSError:
                return

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        host_ip = socket.gethostbyname(socket.gethostname())
        probe = (
            "import socket, sys\n"
            "for host in sys.argv[2:]:\n"
            "    try:\n"
            "        socket.create_connection((host, int(sys.argv[1])), timeout=2).close()\n"
            "        print('CONNECTED', host)\n"
            "    except OSError as e:\n"
            "        print('refused', host, e)\n"
            "print(sorted(line.split(':')[0].strip() for line in open('/proc/net/dev').readlines()[2:]))\n"
        )
        result = sandbox.exec(["python3", "-c", probe, str(port), "127.0.0.1", host_ip], 20)
    finally:
        stop.set()
        thread.join()
        listener.close()
    assert result.ok, result
    assert "CONNECTED" not in result.stdout_text
    assert result.stdout_text.strip().splitlines()[-1] == "['lo']"
    assert accepted == []


def test_killing_pid1_and_the_process_group(sandbox: DockerSandbox) -> None:
    attack = sandbox.exec("kill -9 1; kill -TERM 1; kill -9 -1; echo survived", timeout=10)
    assert attack.exit_code in (0, -9), attack
    still_usable(sandbox)
    group = sandbox.exec("sleep 30 & kill -9 0; echo unreachable", timeout=10)
    assert group.exit_code == -9 and group.duration_s < 8
    still_usable(sandbox)
    parent = sandbox.exec("sleep 30 & kill -9 $PPID; sleep 30", timeout=10)
    assert parent.exit_code == -9 and parent.duration_s < 8
    still_usable(sandbox)


def test_gigabytes_of_output_are_capped(sandbox: DockerSandbox) -> None:
    start = time.monotonic()
    flood = sandbox.exec("head -c 4G /dev/zero", timeout=30)
    assert flood.killed_reason == "output_limit" and flood.stdout_truncated
    assert len(flood.stdout) == MiB and not flood.stderr_truncated
    errors = sandbox.exec("yes error >&2", timeout=30)
    assert errors.killed_reason == "output_limit" and errors.stderr_truncated
    assert len(errors.stderr) == MiB
    assert time.monotonic() - start < 15
    exact = sandbox.exec(f"head -c {MiB} /dev/zero", timeout=10)
    assert exact.ok and len(exact.stdout) == MiB and not exact.stdout_truncated
    still_usable(sandbox)


def test_closing_stdout(sandbox: DockerSandbox) -> None:
    closed = sandbox.exec("exec 1>&-; echo gone; echo still-here >&2; exit 0", timeout=10)
    assert closed.exit_code == 0 and closed.stdout == b"" and b"still-here" in closed.stderr
    silent = sandbox.exec("exec 1>&- 2>&-; sleep 30", timeout=1.5)
    assert silent.timed_out
    still_usable(sandbox)


def test_daemons_are_gone_after_the_exec_and_the_close(docker_url) -> None:
    marker = f"{secrets.randbelow(10**6)}.{secrets.randbelow(999) + 1}"  # a unique sleep time
    box = DockerSandbox(SMALL)
    container_id = box._container_id
    daemon = (
        f"setsid sh -c 'sleep {marker}' </dev/null >/dev/null 2>&1 & "
        f'python3 -c "import os, subprocess\nif os.fork() == 0:\n    os.setsid()\n'
        f"    subprocess.Popen(['sleep', '{marker}'])\" ; echo started"
    )
    assert box.exec(daemon, timeout=10).ok
    assert host_processes_with(f"sleep {marker}") == []
    assert box.exec("sleep 100 &", timeout=10).ok
    still_usable(box)
    box.close()
    box.close()  # twice is fine
    client = shared_client(docker_url)
    assert container_id not in [c.id for c in client.containers.list(all=True)]
    with pytest.raises(SandboxError):
        box.exec("true", timeout=5)


# ---------------------------------------------------------------------------------------------
# Infrastructure


def test_infrastructure_failures_raise_sandbox_error(docker_url, tmp_path) -> None:
    with pytest.raises(SandboxError, match="no Docker API answers"):
        DockerSandbox(docker_host=f"unix://{tmp_path}/nothing.sock")
    with pytest.raises(SandboxError, match="missing"):
        DockerSandbox(image="cwm-rl/no-such-image:latest")
    with pytest.raises(ValueError):
        DockerSandbox(user="nobody-by-name")
    with pytest.raises(ValueError, match="unknown sandbox backend"):
        make_sandbox("dockr")


def test_lifetime_ends_the_container(docker_url) -> None:
    box = DockerSandbox(SMALL, lifetime_s=2)
    assert box.exec("echo alive", timeout=5).ok
    time.sleep(4.0)
    with pytest.raises(SandboxError):
        box.exec("echo late", timeout=5)
    box.close()


def test_reaper_removes_expired_containers(docker_url) -> None:
    client = shared_client(docker_url)
    stale = client.containers.run(
        HOST_IMAGE,
        ["sleep", "120"],
        detach=True,
        network_mode="none",
        mounts=[Mount("/usr", "/usr", type="bind", read_only=True)],
        labels={SANDBOX_LABEL: "1", EXPIRES_LABEL: f"{time.time() - 5:.0f}"},
    )
    fresh = DockerSandbox(SMALL)
    try:
        assert reap_stale(client) >= 1
        ids = [c.id for c in client.containers.list(all=True)]
        assert stale.id not in ids
        assert fresh._container_id in ids  # a live, unexpired sandbox is kept
        assert fresh.exec("echo ok", timeout=5).ok
    finally:
        fresh.close()
        try:
            stale.remove(force=True)
        except Exception:
            pass


# ---------------------------------------------------------------------------------------------
# The long-lived shell (an agent's bash session)


def test_the_shell_keeps_state_like_a_terminal(sandbox: DockerSandbox) -> None:
    """cwd, unexported variables, aliases, functions, options and background jobs carry over;
    a command cannot read the session's own input; quoting and here-documents cannot break it."""
    shell = sandbox.start_shell(sandbox.workdir, "export INIT=yes")
    steps = [
        (
            "mkdir -p d && cd d && X=plain && alias ll='ls -d' && f() { echo fn; } && set -o noglob",
            "",
        ),
        ("sleep 61 & echo $! > /tmp/job", ""),
        (
            "pwd; echo $X $INIT; ll .; f; echo *; jobs | wc -l",
            f"{sandbox.workdir}/d\nplain yes\n.\nfn\n*\n1\n",
        ),
        ("read line; echo got:$line", "got:\n"),
        ("cat <<'EOF'\nit's \"quoted\" $X\nEOF", 'it\'s "quoted" $X\n'),
        ("echo err >&2; (exit 7)", "err\n"),
    ]
    for command, expected in steps:
        result = shell.run(command, timeout=10)
        assert result.stdout_text == expected, (command, result)
    assert result.exit_code == 7 and shell.alive
    shell.close()
    assert not shell.alive
    after = sandbox.exec("ps -e -o args= | grep -c '^sleep 61' || true", timeout=10)
    assert after.stdout_text.strip() == "0"  # the background job died with the shell


def test_a_shell_command_past_its_deadline_ends_the_shell_and_its_jobs(
    sandbox: DockerSandbox,
) -> None:
    shell = sandbox.start_shell(sandbox.workdir)
    shell.run("sleep 300 & X=1", timeout=10)
    start = time.monotonic()
    result = shell.run("echo before; sleep 30", timeout=1)
    assert result.timed_out and result.stdout_text == "before\n" and not shell.alive
    assert time.monotonic() - start < 10
    with pytest.raises(SandboxError, match="start another"):
        shell.run("true", timeout=5)
    fresh = sandbox.start_shell(sandbox.workdir)
    result = fresh.run(
        "echo ${X:-unset}; jobs | wc -l; ps -e -o args= | grep -c '^sleep 300' || true", timeout=10
    )
    assert result.stdout_text.split() == ["unset", "0", "0"]
    result = fresh.run("exit 3", timeout=10)
    assert not fresh.alive and result.exit_code != 0


def test_the_shell_caps_output_and_survives_it(sandbox: DockerSandbox) -> None:
    shell = sandbox.start_shell(sandbox.workdir)
    result = shell.run("head -c 50000000 /dev/zero | tr '\\0' x; echo; echo tail-line", timeout=60)
    cap = sandbox.limits.max_output_bytes
    assert result.stdout_truncated and len(result.stdout) <= cap + 2 * 64 * 1024
    assert result.exit_code == 0 and result.stdout_text.endswith("tail-line\n")
    assert shell.run("echo still here", timeout=10).stdout_text == "still here\n"
