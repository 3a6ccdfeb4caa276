"""The `docker` sandbox: one container per sandbox, through the Docker API (Docker or Podman).

The container is started once (PID 1 is a shell loop that reaps orphans and exits after
`lifetime_s`, which ends every process in the container) and reused: `exec` runs each command
in it with `docker exec`, so the test cases of one program cost one container start and one
exec each. Containment:
- no network (`network_mode="none"`: only a loopback interface of its own), all capabilities
  dropped but KILL, no-new-privileges, read-only root file system with size-capped tmpfs at
  /tmp and the work dir; nothing of the host is visible except what the image asks for (the
  `cwm-rl/host` image binds the host's /usr read-only, see images.py);
- memory limit for the whole container (swap included; tmpfs files count too), pids limit,
  CPU quota;
- programs run as a fresh unprivileged uid per sandbox (`user=None`), so the per-uid process
  limit (nproc) binds this sandbox alone and leaves room in the pids limit for the root
  `docker exec` that kills everything at a deadline;
- every exec ends by killing every process of that uid (daemons, double-forked children), and a
  deadline, too much output or a signal death also runs a root sweep (`kill -9 -1` from inside
  the container: every process but PID 1).
Output is read straight from the exec's socket with a deadline, so a hung program never hangs
the caller. Containers carry the label `cwm-rl.sandbox` and an expiry time; `reap_stale()`
removes leftovers of crashed processes.

Limits of the mapping onto the Docker API: a program's exit status above 128 is reported as a
signal (-N), the shell's convention; a memory kill is told apart from other SIGKILLs by the
container's cgroup OOM counter.
"""

from __future__ import annotations

import io
import json
import math
import os
import posixpath
import re
import secrets
import select
import socket
import struct
import tarfile
import threading
import time
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from sandbox.base import (
    KILLED_CPU,
    KILLED_MEMORY,
    KILLED_OUTPUT,
    KILLED_TIMEOUT,
    SHELL_LOOP,
    ExecResult,
    Sandbox,
    SandboxError,
    SandboxLimits,
    Shell,
    check_relative_path,
)
from sandbox.images import HOST_IMAGE, HOST_MOUNTS_LABEL, IMAGE_HINT, build_host_image

DEFAULT_SOCKET = "/run/podman/podman.sock"  # where host_setup.sh serves Podman's Docker API
FALLBACK_SOCKET = "/var/run/docker.sock"
SANDBOX_LABEL = "cwm-rl.sandbox"
EXPIRES_LABEL = "cwm-rl.expires"  # unix time after which the container may be reaped
PIDS_HEADROOM = 16  # pids above the program's nproc: PID 1, its sleep, the kill sweep
SANDBOX_UID_RANGE = (200_000, 1_200_000)  # fresh uids, no passwd entry, used by nobody else
STDIN_DIR = "/run/cwm"  # tmpfs for each exec's stdin: writable, not listable (mode 1733)
STDIN_DIR_MB = 64
API_TIMEOUT_S = 60
SWEEP_TIMEOUT_S = 15.0
DRAIN_GRACE_S = 2.0
DEFAULT_PATH = (
    "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"  # where the image sets none
)
SIGKILL, SIGXCPU = 9, 24
GO_MODE_SYMLINK = 1 << 27  # os.ModeSymlink in the API's path-stat header

# Runs every command: stdin from a file under a random name that is opened and deleted before
# the command starts, so only the command's own fd 0 holds it (the wrapper keeps no copy: a
# program of the same uid could read it through /proc/PID/fd); CPU seconds capped (SIGXCPU at
# the limit, SIGKILL a second later); then every process this uid still has is killed, so
# nothing the command started outlives the exec.
EXEC_WRAPPER = """
stdin_file=$1; cpu_s=$2; shift 2
if [ -n "$stdin_file" ]; then exec 3<"$stdin_file"; rm -f "$stdin_file"; else exec 3</dev/null; fi
ulimit -H -t $((cpu_s + 1)) 2>/dev/null; ulimit -S -t "$cpu_s" 2>/dev/null
"$@" 0<&3 3<&- &
exec 3<&-
wait $!
rc=$?
# repeated: a process that forks while one sweep runs can miss it (bounded: zombies still count)
i=0; while kill -9 -1 2>/dev/null && [ $i -lt 20 ]; do i=$((i+1)); done
exit $rc
"""

# The long-lived shell (sandbox.base.Shell): CPU seconds over its whole life, then the loop.
SHELL_START = "ulimit -H -t $(({cpu_s} + 1)) 2>/dev/null; ulimit -S -t {cpu_s} 2>/dev/null\n"

# PID 1: reaps orphans (a plain `sleep` would not, and zombies count against the pids limit),
# ignores the signals it can, and exits after the lifetime, which kills everything left.
KEEPALIVE = 'trap "" HUP INT TERM QUIT; i=0; while [ $i -lt {seconds} ]; do sleep 1 & wait; i=$((i+1)); done'

# Root sweep: kill every process but PID 1 (and itself), then print the cgroup OOM counters.
SWEEP = (
    "kill -9 -1 2>/dev/null; cat /sys/fs/cgroup/memory/memory.oom_control 2>/dev/null"
    " || cat /sys/fs/cgroup/memory.events 2>/dev/null; true"
)


def resolve_docker_host() -> str:
    """The Docker API address: $DOCKER_HOST, else host_setup.sh's Podman socket, else Docker's."""
    from_env = os.environ.get("DOCKER_HOST")
    if from_env:
        return from_env
    if os.path.exists(DEFAULT_SOCKET):
        return f"unix://{DEFAULT_SOCKET}"
    return f"unix://{FALLBACK_SOCKET}"


def connect(base_url: str | None = None, timeout: float = API_TIMEOUT_S) -> Any:
    """A docker-py client that has answered a ping; SandboxError (with the fix) if none does."""
    try:
        import docker
    except ImportError as e:
        raise SandboxError("the docker backend needs docker-py: pip install docker") from e
    url = base_url or resolve_docker_host()
    try:
        client = docker.DockerClient(base_url=url, timeout=timeout)
        client.ping()
    except Exception as e:
        raise SandboxError(
            f"no Docker API answers at {url} ({type(e).__name__}: {e}); run "
            "sandbox/host_setup.sh as root (Podman) and export the DOCKER_HOST it prints"
        ) from e
    return client


_clients: dict[tuple[int, str], Any] = {}
_clients_lock = threading.Lock()


def shared_client(url: str) -> Any:
    """One client per API address and process: creating one asks the daemon for its version,
    which Podman answers slowly (~0.5 s). Stale containers are reaped on first use."""
    key = (os.getpid(), url)
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            client = _clients[key] = connect(url)
            try:
                reap_stale(client)
            except Exception:
                pass  # reaping is housekeeping; a failure here must not block sandboxes
        return client


def docker_unavailable_reason(base_url: str | None = None) -> str | None:
    """None when a Docker API answers (quick ping), else why not."""
    try:
        connect(base_url, timeout=5).close()
    except SandboxError as e:
        return str(e)
    return None


def reap_stale(client: Any, now: float | None = None) -> int:
    """Remove sandbox containers that have expired or stopped; returns how many."""
    now = time.time() if now is None else now
    removed = 0
    for container in client.containers.list(all=True, filters={"label": SANDBOX_LABEL}):
        expires = float(container.labels.get(EXPIRES_LABEL, "0") or 0)
        if container.status == "running" and expires > now:
            continue
        if container.status == "created" and expires > now:
            continue  # another process may be starting it right now
        try:
            container.remove(force=True)
            removed += 1
        except Exception:
            pass  # already gone (auto-remove) or being removed by someone else
    return removed


@dataclass
class _Output:
    """What one exec printed, capped per stream."""

    stdout: bytearray
    stderr: bytearray
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    stop_reason: str | None = None  # KILLED_TIMEOUT / KILLED_OUTPUT when we stopped it

    def add(self, kind: int, payload: bytes, cap: int) -> None:
        target = self.stderr if kind == 2 else self.stdout
        room = cap - len(target)
        target += payload[: max(room, 0)]
        if len(payload) > room:
            setattr(self, "stderr_truncated" if kind == 2 else "stdout_truncated", True)
            self.stop_reason = KILLED_OUTPUT


class _ExecStream:
    """The raw, multiplexed output of one exec: frames of [kind, 0, 0, 0, size (u32 BE)] then
    `size` bytes, kind 1 = stdout, 2 = stderr."""

    def __init__(self, conn: socket.socket, head: bytes) -> None:
        conn.setblocking(False)
        self.conn, self.pending, self.eof = conn, bytearray(head), False

    def frames(self, until: float) -> list[tuple[int, bytes]]:
        """Complete frames: those pending, else those one read before `until` brings; at the
        end of the stream sets `eof`."""
        frames = self._parse()
        if not frames:
            wait = until - time.monotonic()
            if wait > 0 and select.select([self.conn], [], [], wait)[0]:
                try:
                    chunk: bytes | None = self.conn.recv(1 << 20)
                except (BlockingIOError, InterruptedError):
                    chunk = None
                except OSError:
                    chunk = b""
                if chunk == b"":
                    self.eof = True
                elif chunk:
                    self.pending += chunk
            frames = self._parse()
        return frames

    def _parse(self) -> list[tuple[int, bytes]]:
        frames, at, pending = [], 0, self.pending
        while len(pending) - at >= 8:
            size = struct.unpack_from(">I", pending, at + 4)[0]
            if len(pending) - at < 8 + size:
                break
            frames.append((pending[at], bytes(pending[at + 8 : at + 8 + size])))
            at += 8 + size
        del pending[:at]
        return frames

    def close(self) -> None:
        self.conn.close()


def open_exec_stream(api: Any, url: str, exec_id: str) -> _ExecStream:
    """Start an exec and return its output stream.

    The HTTP upgrade is done by hand on unix and plain tcp sockets, so no byte of the stream
    can be lost in an HTTP client's read buffer; other transports go through docker-py."""
    if not url.startswith(("unix://", "tcp://")) or api.base_url.startswith("https"):
        raw = api.exec_start(exec_id, socket=True)
        return _ExecStream(getattr(raw, "_sock", raw), b"")
    if url.startswith("unix://"):
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.settimeout(API_TIMEOUT_S)
        conn.connect(url[len("unix://") :])
    else:
        host, _, port = url[len("tcp://") :].rstrip("/").rpartition(":")
        conn = socket.create_connection((host, int(port)), timeout=API_TIMEOUT_S)
    body = json.dumps({"Detach": False, "Tty": False}).encode()
    conn.sendall(
        f"POST /v{api.api_version}/exec/{exec_id}/start HTTP/1.1\r\nHost: docker\r\n"
        "Content-Type: application/json\r\nConnection: Upgrade\r\nUpgrade: tcp\r\n"
        f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    response = b""
    while b"\r\n\r\n" not in response:
        chunk = conn.recv(65536)
        if not chunk:
            conn.close()
            raise OSError(f"the Docker API closed the exec stream: {response[:200]!r}")
        response += chunk
    header, head = response.split(b"\r\n\r\n", 1)
    status = header.split(b"\r\n", 1)[0].split()
    if len(status) < 2 or status[1] not in (b"101", b"200"):
        conn.close()
        raise OSError(f"exec start refused: {header.decode(errors='replace')[:300]}")
    return _ExecStream(conn, head)


def _remove_container(client: Any, container_id: str) -> None:
    try:
        client.api.remove_container(container_id, force=True)
    except Exception:
        pass  # gone already


class DockerSandbox(Sandbox):
    """A container holding the work dir; each `exec` runs in it under the limits above.

    limits: memory_mb caps the container, max_processes the program's processes (nproc),
      max_output_bytes each stream, max_file_mb each file, max_open_files the fds, cpu_s the CPU
      seconds of each exec (default: its timeout). `memory_mb` / `pids_limit` override them.
    image: an image built by images.py (default `cwm-rl/host`, built here when missing), or any
      image with /bin/sh and sleep.
    cpus: CPU quota (None: unlimited). network: "none" (default) or a Docker network mode.
    workdir / workdir_mb: the work dir and the size of the tmpfs holding it (None: the work dir
      lives in the container's own file system, e.g. a repository baked into the image; needs
      read_only=False, and user="root" unless the image's files belong to the sandbox uid).
    lifetime_s: the container ends itself after this long, whatever happens to this process.
    user: None = a fresh unprivileged uid; "root"; "uid:gid"; or "image": the image's own
      USER (root where it sets none; a name is resolved to its ids inside the container).
    read_only: read-only root file system (writable: the work dir and /tmp).
    env: extra environment variables for every exec, over the image's own (its PATH, a conda
      environment's variables...: kept), over the defaults (a standard PATH where the image sets
      none, HOME = the work dir unless user="image", TMPDIR, LANG).
    docker_host: the API address (default: `resolve_docker_host()`).
    """

    def __init__(
        self,
        limits: SandboxLimits | None = None,
        *,
        image: str = HOST_IMAGE,
        memory_mb: int | None = None,
        pids_limit: int | None = None,
        cpus: float | None = 1.0,
        network: str = "none",
        workdir: str = "/sandbox",
        workdir_mb: int | None = 1024,
        tmp_mb: int = 256,
        lifetime_s: float = 3600.0,
        user: str | None = None,
        read_only: bool = True,
        env: Mapping[str, str] | None = None,
        docker_host: str | None = None,
    ) -> None:
        limits = limits or SandboxLimits()
        if memory_mb is not None:
            limits = replace(limits, memory_mb=memory_mb)
        if pids_limit is not None:
            limits = replace(limits, max_processes=pids_limit)
        if not posixpath.isabs(workdir) or posixpath.normpath(workdir) in ("/", "/run", "/tmp"):
            raise ValueError(f"workdir must be an absolute path of its own, got {workdir!r}")
        if lifetime_s <= 0 or tmp_mb <= 0 or (workdir_mb is not None and workdir_mb <= 0):
            raise ValueError("lifetime_s, tmp_mb and workdir_mb must be positive")
        if workdir_mb is None and read_only:
            raise ValueError(
                "workdir_mb=None keeps the work dir in the image: needs read_only=False"
            )
        if cpus is not None and cpus <= 0:
            raise ValueError(f"cpus must be positive or None, got {cpus}")
        self.limits = limits
        self.image = image
        self.workdir = posixpath.normpath(workdir)
        self.lifetime_s = lifetime_s
        self._lock = threading.Lock()
        self._closed = False
        self._container_id: str | None = None
        self._oom_kills = 0
        self._image_user = user == "image"
        self.uid, self.gid = (0, 0) if self._image_user else _parse_user(user)
        self._user = f"{self.uid}:{self.gid}"
        self._extra_env = dict(env or {})
        self._env = {}  # set by _start, from the image's config
        self._url = docker_host or resolve_docker_host()
        self._client = shared_client(self._url)
        self._start(network, cpus, workdir_mb, tmp_mb, read_only)
        self._finalizer = weakref.finalize(
            self, _remove_container, self._client, self._container_id
        )

    # -----------------------------------------------------------------------------------------
    # Container life

    def _inspect_image(self) -> list[str]:
        """The image's host mounts (label); sets the exec environment from its config."""
        import docker

        try:
            try:
                image = self._client.images.get(self.image)
            except docker.errors.ImageNotFound:
                if self.image != HOST_IMAGE:
                    raise
                build_host_image(self._client)  # a fraction of a second: build it on first use
                image = self._client.images.get(self.image)
        except docker.errors.ImageNotFound:
            raise SandboxError(
                f"image {self.image!r} is missing at {self._url}; {IMAGE_HINT}"
            ) from None
        except (docker.errors.DockerException, OSError, RuntimeError) as e:
            raise SandboxError(f"could not inspect or build image {self.image!r}: {e}") from e
        config = image.attrs.get("Config") or {}
        self._env = {"PATH": DEFAULT_PATH, "TMPDIR": "/tmp", "LANG": "C.UTF-8"}
        if not self._image_user:
            self._env["HOME"] = self.workdir
        for item in config.get("Env") or []:
            key, _, value = item.partition("=")
            self._env[key] = value
        self._env.update(self._extra_env)
        self._image_user_name = (config.get("User") or "").strip()
        mounts = (image.labels or {}).get(HOST_MOUNTS_LABEL, "")
        return [m for m in mounts.split(",") if m]

    def _resolve_image_user(self) -> None:
        """user="image": the ids of the image's USER (root where it sets none)."""
        name = self._image_user_name
        if not name or name in ("root", "0", "0:0"):
            self.uid, self.gid = 0, 0
        elif re.fullmatch(r"\d+(:\d+)?", name):
            self.uid, self.gid = _parse_user(name)
        else:
            user, _, group = name.partition(":")
            api = self._client.api
            ids = []
            for flag in ("-u", "-g"):
                exec_id = api.exec_create(self._container_id, ["id", flag], user=name)["Id"]
                ids.append(api.exec_start(exec_id).decode(errors="replace").strip())
            if not all(i.isdigit() for i in ids):
                raise SandboxError(f"the image's user {name!r} has no ids here: {ids}")
            self.uid, self.gid = int(ids[0]), int(ids[1])
        self._user = f"{self.uid}:{self.gid}"

    def _start(
        self, network: str, cpus: float | None, workdir_mb: int | None, tmp_mb: int, ro: bool
    ) -> None:
        import docker
        from docker.types import Mount, Ulimit

        limits = self.limits
        memory = f"{limits.memory_mb}m"
        tmpfs = {"/tmp": f"size={tmp_mb}m,mode=1777", STDIN_DIR: f"size={STDIN_DIR_MB}m,mode=1733"}
        if workdir_mb is not None:
            tmpfs[self.workdir] = f"size={workdir_mb}m,mode=0755"
        file_bytes = limits.max_file_mb * 1024 * 1024  # docker takes fsize in bytes
        ulimits = [
            Ulimit(name="nproc", soft=limits.max_processes, hard=limits.max_processes),
            Ulimit(name="nofile", soft=limits.max_open_files, hard=limits.max_open_files),
            Ulimit(name="fsize", soft=file_bytes, hard=file_bytes),
            Ulimit(name="core", soft=0, hard=0),
        ]
        api = self._client.api
        host_config = api.create_host_config(
            network_mode=network,
            mem_limit=memory,
            memswap_limit=memory,
            pids_limit=limits.max_processes + PIDS_HEADROOM,
            nano_cpus=int(cpus * 1e9) if cpus else None,
            cap_drop=["ALL"],
            cap_add=["KILL"],
            security_opt=["no-new-privileges"],
            read_only=ro,
            tmpfs=tmpfs,
            mounts=[Mount(p, p, type="bind", read_only=True) for p in self._inspect_image()],
            ulimits=ulimits,
            auto_remove=True,
        )
        keepalive = KEEPALIVE.format(seconds=max(1, math.ceil(self.lifetime_s)))
        labels = {SANDBOX_LABEL: "1", EXPIRES_LABEL: f"{time.time() + self.lifetime_s:.0f}"}
        try:
            created = api.create_container(
                self.image,
                command=["/bin/sh", "-c", keepalive],
                host_config=host_config,
                labels=labels,
                working_dir=self.workdir,
                network_disabled=network == "none",
            )
            self._container_id = created["Id"]
            api.start(self._container_id)
            if self._image_user:
                self._resolve_image_user()
            # The work dir belongs to the sandbox user (a tmpfs mount point starts as root's).
            parent, name = posixpath.split(self.workdir)
            self._put_tar(parent, _tar([(name, None)], self.uid, self.gid))
        except (docker.errors.DockerException, OSError, SandboxError) as e:
            if self._container_id is not None:
                _remove_container(self._client, self._container_id)
            self._closed = True
            raise SandboxError(f"could not start a container from {self.image!r}: {e}") from e

    def _check_open(self, what: str) -> str:
        if self._closed or self._container_id is None:
            raise SandboxError(f"{what} on a closed sandbox")
        return self._container_id

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._finalizer()  # removes the container (force) once

    # -----------------------------------------------------------------------------------------
    # Files

    def _put_tar(self, directory: str, data: bytes) -> None:
        import docker

        try:
            self._client.api.put_archive(self._container_id, directory, data)
        except docker.errors.NotFound as e:
            raise SandboxError(f"the sandbox container is gone ({e})") from e
        except (docker.errors.DockerException, OSError) as e:
            raise SandboxError(f"copying into the container failed: {e}") from e

    def write_file(self, path: str, data: str | bytes) -> None:
        relative = check_relative_path(path)
        payload = data.encode() if isinstance(data, str) else bytes(data)
        parts = relative.split("/")
        entries: list[tuple[str, bytes | None]] = [
            ("/".join(parts[: i + 1]), None) for i in range(len(parts) - 1)
        ]
        entries.append((relative, payload))
        with self._lock:
            self._check_open("write_file")
            self._put_tar(self.workdir, _tar(entries, self.uid, self.gid))

    def read_file(self, path: str) -> bytes:
        import docker

        relative = check_relative_path(path)
        with self._lock:
            container_id = self._check_open("read_file")
            full = posixpath.join(self.workdir, relative)
            try:
                chunks, stat = self._client.api.get_archive(container_id, full)
                archive = b"".join(chunks)
            except docker.errors.NotFound:
                if not self._container_running():
                    raise SandboxError("the sandbox container is gone") from None
                raise FileNotFoundError(f"no file {path!r} in the sandbox") from None
            except (docker.errors.DockerException, OSError) as e:
                raise SandboxError(f"copying out of the container failed: {e}") from e
        if int(stat.get("mode", 0)) & GO_MODE_SYMLINK:  # the API followed a link: refuse
            raise ValueError(f"sandbox path {path!r} is a symlink")
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            member = tar.next()
            if member is None or not member.isfile():
                raise ValueError(f"sandbox path {path!r} is not a regular file")
            extracted = tar.extractfile(member)
            return extracted.read() if extracted is not None else b""

    def _container_running(self) -> bool:
        try:
            state = self._client.api.inspect_container(self._container_id)["State"]
        except Exception:
            return False
        return bool(state.get("Running"))

    # -----------------------------------------------------------------------------------------
    # Exec

    def exec(
        self, cmd: str | list[str], timeout: float, stdin: str | bytes | None = None
    ) -> ExecResult:
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        argv = ["/bin/sh", "-c", cmd] if isinstance(cmd, str) else [str(a) for a in cmd]
        if not argv:
            raise ValueError("empty command")
        stdin_data = stdin.encode() if isinstance(stdin, str) else stdin
        if stdin_data and len(stdin_data) > STDIN_DIR_MB * 1024 * 1024:
            raise ValueError(f"stdin is larger than the sandbox's {STDIN_DIR_MB} MiB for it")
        with self._lock:
            self._check_open("exec")
            return self._exec(argv, timeout, stdin_data)

    def _exec(self, argv: list[str], timeout: float, stdin_data: bytes | None) -> ExecResult:
        import docker

        stdin_path = ""
        if stdin_data:
            name = f"stdin-{secrets.token_hex(16)}"
            stdin_path = f"{STDIN_DIR}/{name}"
            tar = _tar([(name, stdin_data)], self.uid, self.gid, mode=0o400)
            self._put_tar(STDIN_DIR, tar)
        cpu_s = math.ceil(self.limits.cpu_s or timeout)
        command = ["/bin/sh", "-c", EXEC_WRAPPER, "cwm-exec", stdin_path, str(cpu_s), *argv]
        api = self._client.api
        try:
            exec_id = api.exec_create(
                self._container_id,
                command,
                user=self._user,
                workdir=self.workdir,
                environment=self._env,
            )["Id"]
            start = time.monotonic()
            stream = open_exec_stream(api, self._url, exec_id)
        except (docker.errors.DockerException, OSError) as e:
            raise self._infra_error("starting the command failed", e) from e
        try:
            out = self._pump(stream, start + timeout)
        finally:
            stream.close()
        # (a little grace past the deadline: the daemon records an exit a moment after EOF)
        status_by = max(start + timeout, time.monotonic() + 0.5)
        exit_code = None if out.stop_reason else self._exit_code(exec_id, status_by)
        if exit_code is None:
            if out.stop_reason is None:  # closed its output but ran on past the deadline
                out.stop_reason = KILLED_TIMEOUT
                self._sweep()
            exit_code = -SIGKILL
        duration = time.monotonic() - start
        reason = out.stop_reason
        if reason is None and exit_code < 0:
            # A signal death: the wrapper may not have run its cleanup; sweep and see if the
            # cgroup's OOM killer did it.
            if self._sweep() and exit_code == -SIGKILL:
                reason = KILLED_MEMORY
            elif exit_code == -SIGXCPU:
                reason = KILLED_CPU
        return ExecResult(
            exit_code=exit_code,
            stdout=bytes(out.stdout),
            stderr=bytes(out.stderr),
            duration_s=duration,
            timed_out=reason == KILLED_TIMEOUT,
            killed_reason=reason,
            stdout_truncated=out.stdout_truncated,
            stderr_truncated=out.stderr_truncated,
        )

    def start_shell(self, cwd: str, init: str = "") -> DockerShell:
        """A long-lived bash in the container (see DockerShell), started in `cwd` after `init`
        (e.g. a conda env's activation; its output is discarded)."""
        import docker

        with self._lock:
            self._check_open("start_shell")
            cpu_s = math.ceil(self.limits.cpu_s or self.lifetime_s)
            script = (
                SHELL_START.format(cpu_s=cpu_s)
                + 'exec bash --norc --noprofile -c "$0" cwm-shell "$1" "$2"'
            )
            try:
                exec_id = self._client.api.exec_create(
                    self._container_id,
                    ["/bin/sh", "-c", script, SHELL_LOOP, cwd, init],  # $0 is the loop
                    stdin=True,
                    user=self._user,
                    workdir=self.workdir,
                    environment=self._env,
                )["Id"]
                stream = open_exec_stream(self._client.api, self._url, exec_id)
            except (docker.errors.DockerException, OSError) as e:
                raise self._infra_error("starting the shell failed", e) from e
        return DockerShell(self, stream)

    def _infra_error(self, what: str, error: BaseException) -> SandboxError:
        gone = "" if self._container_running() else " (the container is gone: lifetime over?)"
        return SandboxError(f"{what}{gone}: {type(error).__name__}: {error}")

    def _pump(self, stream: _ExecStream, deadline: float) -> _Output:
        """Read the exec's output until it ends, the deadline passes or a stream passes its
        cap; in the last two cases sweep the container, then drain briefly."""
        out = _Output(bytearray(), bytearray())
        stop_at: float | None = None  # set once swept: then only drain until the grace ends
        while not stream.eof:
            if stop_at is None:
                if out.stop_reason is None and time.monotonic() >= deadline:
                    out.stop_reason = KILLED_TIMEOUT
                if out.stop_reason is not None:
                    self._sweep()
                    stop_at = time.monotonic() + DRAIN_GRACE_S
            elif time.monotonic() >= stop_at:
                break
            for kind, payload in stream.frames(stop_at or deadline):
                if stop_at is None:
                    out.add(kind, payload, self.limits.max_output_bytes)
        if out.stop_reason is not None and stop_at is None:
            self._sweep()  # went over the cap in its last words
        return out

    def _exit_code(self, exec_id: str, deadline: float) -> int | None:
        """The exec's exit status once the daemon has recorded it (128+N becomes -N); None if
        it still runs at the deadline (its output closed early)."""
        while True:
            try:
                info = self._client.api.exec_inspect(exec_id)
            except Exception as e:
                raise self._infra_error("reading the exit status failed", e) from e
            if not info.get("Running") and info.get("ExitCode") is not None:
                break
            if time.monotonic() > deadline:
                return None
            time.sleep(0.02)
        code = int(info["ExitCode"])
        return -(code - 128) if 128 < code < 160 else code

    def _sweep(self) -> bool:
        """Kill every process but PID 1 (as root, from inside); True if the OOM killer has
        struck since the last sweep."""
        import docker

        api = self._client.api
        try:
            exec_id = api.exec_create(self._container_id, ["/bin/sh", "-c", SWEEP], user="0:0")[
                "Id"
            ]
            stream = open_exec_stream(api, self._url, exec_id)
        except (docker.errors.DockerException, OSError) as e:
            self._kill_container()
            raise SandboxError(f"could not kill the sandbox's processes; removed it: {e}") from e
        report = b""
        deadline = time.monotonic() + SWEEP_TIMEOUT_S
        try:
            while not stream.eof:
                if time.monotonic() >= deadline:
                    self._kill_container()
                    raise SandboxError("the sandbox's kill sweep hung; removed the container")
                report += b"".join(data for kind, data in stream.frames(deadline) if kind == 1)
        finally:
            stream.close()
        oom_kills = self._oom_kills
        for line in report.decode(errors="replace").splitlines():
            name, _, value = line.partition(" ")
            if name == "oom_kill" and value.strip().isdigit():
                oom_kills = int(value)
        struck = oom_kills > self._oom_kills
        self._oom_kills = oom_kills
        return struck

    def _kill_container(self) -> None:
        """Last resort when the container cannot be cleaned from inside: remove it."""
        self._closed = True
        self._finalizer()


def _parse_user(user: str | None) -> tuple[int, int]:
    if user is None:
        uid = SANDBOX_UID_RANGE[0] + secrets.randbelow(SANDBOX_UID_RANGE[1] - SANDBOX_UID_RANGE[0])
        return uid, uid
    if user == "root":
        return 0, 0
    uid_text, _, gid_text = user.partition(":")
    if not uid_text.isdigit() or (gid_text and not gid_text.isdigit()):
        raise ValueError(f"user must be None, 'root' or 'uid[:gid]' with numbers, got {user!r}")
    return int(uid_text), int(gid_text or uid_text)


def _tar(entries: list[tuple[str, bytes | None]], uid: int, gid: int, mode: int = 0o644) -> bytes:
    """A tar archive of directories (data None) and files owned by uid:gid."""
    buffer = io.BytesIO()
    now = time.time()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            info.uid, info.gid, info.mtime = uid, gid, now
            if data is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            else:
                info.size, info.mode = len(data), mode
                tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


class DockerShell(Shell):
    """The long-lived shell of a docker sandbox (see sandbox.base.Shell): one exec whose stdin
    stays attached; commands are copied into the container's stdin directory; the end is the
    sandbox's sweep (every process but PID 1: background jobs too)."""

    def __init__(self, sandbox: DockerSandbox, stream: _ExecStream) -> None:
        super().__init__(sandbox.limits.max_output_bytes)
        self.sandbox, self.stream = sandbox, stream

    def _put_command(self, name: str, text: str) -> str:
        sandbox = self.sandbox
        with sandbox._lock:
            sandbox._check_open("shell run")
            tar = _tar([(name, text.encode())], sandbox.uid, sandbox.gid, 0o400)
            sandbox._put_tar(STDIN_DIR, tar)
        return f"{STDIN_DIR}/{name}"

    def _send(self, data: bytes) -> None:
        self.stream.conn.setblocking(True)
        try:
            self.stream.conn.sendall(data)
        finally:
            self.stream.conn.setblocking(False)

    def _read(self, deadline: float) -> bytes | None:
        if self.stream.eof:
            return None
        return b"".join(payload for _, payload in self.stream.frames(deadline))

    def _kill(self) -> None:
        try:
            if not self.sandbox._closed:
                with self.sandbox._lock:
                    self.sandbox._sweep()
        finally:
            self.stream.close()
