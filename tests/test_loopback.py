"""Nothing a local run starts listens beyond loopback: a short training run (Ray's GCS, raylet,
workers and agents; the learners' gloo group and its rendezvous store; the weight-sync group with
weight_sync.method=collective; the sandboxes) is watched while it runs, and every TCP socket in
LISTEN state and every bound UDP socket of its processes (read from /proc/net/tcp, tcp6, udp,
udp6 and matched to the processes by socket inode) must be on 127.0.0.0/8 or ::1."""

from __future__ import annotations

import ipaddress
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import listening_sockets, process_name, process_tree, socket_inodes

REPO = Path(__file__).resolve().parents[1]


def test_a_local_run_listens_on_loopback_only(tmp_path):
    if not Path("/proc/net/tcp").exists() or not Path("/proc/self/task").exists():
        pytest.skip("needs Linux /proc")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "GLOO_SOCKET_IFNAME")}
    cmd = [
        sys.executable, "-m", "launch.train", "configs/smoke.yaml", "steps=3", "progress=false",
        "groups_per_step=2", "group_size=2", "eval.num_tasks=2", "checkpoint.export_hf=false",
        "num_learners=2", "weight_sync.method=collective", f"--run-dir={tmp_path / 'run'}",
        "--num-cpus=4",
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    seen: dict[tuple, str] = {}  # (proto, address, port) -> the process that held it
    polls = 0
    try:
        while proc.poll() is None:
            sockets = listening_sockets()
            for pid in process_tree(proc.pid):
                for inode in socket_inodes(pid):
                    if inode in sockets:
                        seen.setdefault(sockets[inode], process_name(pid))
            polls += 1
            time.sleep(0.2)
        output = proc.stdout.read().decode(errors="replace")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, output[-4000:]
    assert polls > 10 and len(seen) > 5, f"too little seen to judge: {seen}"  # Ray's servers
    names = " ".join(seen.values())
    assert "gcs_server" in names and "raylet" in names, names  # Ray's servers were watched
    outside = {k: v for k, v in seen.items() if not ipaddress.ip_address(k[1]).is_loopback}
    assert not outside, "listening beyond loopback:\n" + "\n".join(
        f"  {proto} {addr}:{port}  {who}" for (proto, addr, port), who in sorted(outside.items())
    )
