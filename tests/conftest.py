"""Shared test helpers.

Optional capabilities (a Docker API socket, bubblewrap, a GPU, vllm) make their tests skip with a
reason, except where CI asks for them: `CWM_RL_REQUIRE=docker,bwrap` turns those skips into
failures, so a CI machine that should provide a capability cannot silently skip its tests.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

# Two cores: one thread per test process keeps Ray actors and FSDP workers from oversubscribing.
BIN = Path(sys.executable).parent

torch.set_num_threads(int(os.environ.get("CWM_RL_TEST_THREADS", "1")))


def required_capabilities() -> set[str]:
    return {c.strip() for c in os.environ.get("CWM_RL_REQUIRE", "").split(",") if c.strip()}


def host_processes_with(marker: str) -> list[int]:
    """Pids of this host's processes whose command line contains `marker` (leftover checks)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if marker.encode() in Path(f"/proc/{entry}/cmdline").read_bytes():
                    found.append(int(entry))
            except OSError:
                continue
    return found


def require(capability: str, available: bool, reason: str) -> None:
    """Skip the calling test when `capability` is missing, or fail if CI demands it."""
    if available:
        return
    if capability in required_capabilities():
        pytest.fail(f"{capability} is required here (CWM_RL_REQUIRE) but missing: {reason}")
    pytest.skip(f"{capability} unavailable: {reason}")


def init_local_ray() -> None:
    """Start the local Ray instance the actor tests share (start-up ~6 s)."""
    import ray

    from rl.orchestrator import local_ray_options

    ray.init(
        num_cpus=4,  # logical slots: actors here are light; two cores do the work
        log_to_driver=False,
        runtime_env={"env_vars": {"CWM_RL_TEST_THREADS": "1"}},
        **local_ray_options(),  # as a run's: loopback only, the user's RAY_AUTH_MODE
    )


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray instance shared by the tests that need actors (start-up ~6 s)."""
    import ray

    if not ray.is_initialized():
        init_local_ray()
    yield ray
    ray.shutdown()


def listening_sockets() -> dict[int, tuple[str, str, int]]:
    """Socket inode -> (protocol, local address, port) of every TCP socket in LISTEN state and
    every bound, unconnected UDP socket of this network namespace (/proc/net/tcp, tcp6, udp,
    udp6; addresses there are little-endian 32-bit words)."""
    import ipaddress

    out = {}
    for proto in ("tcp", "tcp6", "udp", "udp6"):
        path = Path(f"/proc/net/{proto}")
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], int(fields[9])
            if state != ("0A" if proto.startswith("tcp") else "07"):
                continue
            host, port = local.split(":")
            raw = bytes.fromhex(host)
            address = ipaddress.ip_address(
                b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            )
            if address.version == 6 and address.ipv4_mapped:
                address = address.ipv4_mapped
            out[inode] = (proto, str(address), int(port, 16))
    return out


def socket_inodes(pid: int) -> set[int]:
    """The inodes of the sockets process `pid` holds open (none if it is gone)."""
    inodes = set()
    try:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
    except OSError:
        pass
    return inodes


def process_tree(root: int) -> list[int]:
    """root and all its descendants (/proc/PID/task/*/children)."""
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        for task in Path(f"/proc/{pid}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
    return pids


def process_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:120]
    except OSError:
        return "?"


def non_loopback_listeners(pids) -> list[str]:
    """The listening TCP / bound UDP sockets of processes `pids` on an address other than
    loopback, as text."""
    import ipaddress

    sockets = listening_sockets()
    found = []
    for pid in pids:
        for inode in socket_inodes(pid):
            if inode in sockets and not ipaddress.ip_address(sockets[inode][1]).is_loopback:
                proto, address, port = sockets[inode]
                found.append(f"{proto} {address}:{port} ({process_name(pid)[-80:]}, pid {pid})")
    return found


def free_ports(n: int) -> list[int]:
    """n TCP ports free on loopback right now (held together, so they differ)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@pytest.fixture
def ray_head():
    """A Ray head of its own on loopback (`ray start --head --block` in a new session), stopped by
    killing that session: `ray stop` would stop every other Ray instance here. Every port is
    chosen free: a default one (the dashboard agent's 52365, the client server's 10001) may be
    held by another Ray instance on the machine, and the head then never accepts a job. Its
    environment has no PYTHONPATH: jobs get packages only from their runtime environment. Token
    authentication is on, with a token of its own (RAY_AUTH_TOKEN, as Ray documents): every
    `ray` command and every job must present it.
    Yields (dashboard address, environment for `ray` commands, holding the token)."""
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # the jobs' `python` and `pip`
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    env.pop("RAY_ADDRESS", None)
    env.pop("PYTHONPATH", None)
    temp_dir = tempfile.mkdtemp(prefix="cwmray-", dir="/tmp")  # socket paths must be short
    ray = str(BIN / "ray") if (BIN / "ray").exists() else shutil.which("ray")
    gcs, dashboard, *others = free_ports(9)
    start = [
        ray, "start", "--head", "--block", "--num-cpus=2", f"--port={gcs}",
        "--node-ip-address=127.0.0.1",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--disable-usage-stats",
        f"--temp-dir={temp_dir}",
        *(f"--{flag}={port}" for flag, port in zip(
            ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
             "metrics-export-port", "ray-client-server-port", "node-manager-port",
             "object-manager-port"),
            others,
        )),
    ]  # fmt: skip
    head = subprocess.Popen(
        start, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        yield f"http://127.0.0.1:{dashboard}", env
    finally:
        for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):  # a throwaway head
            try:
                os.killpg(head.pid, sig)
                head.wait(wait)
                break
            except (ProcessLookupError, subprocess.TimeoutExpired):
                continue
        shutil.rmtree(temp_dir, ignore_errors=True)
