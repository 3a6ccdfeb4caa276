"""The local sandbox and the fork server refuse to run without the isolation they promise.

Each missing layer (bubblewrap, the pids + memory cgroup, the uid drop as root) raises an
IsolationError naming it and how to get it, unless `allow_unisolated=True`, which runs with what
is there and warns once. How each layer is made missing here:
- bubblewrap: PATH without bwrap (the real look-up, `shutil.which`, then finds none);
- cgroups: `cgroups.CGROUP_ROOT` pointed at an empty directory (the real detection then finds
  no controller), or a v2 layout whose group lacks the controllers;
- not root: a real child process as `nobody` (setpriv);
- the uid drop: run_as=0, or the two readers that decide it (`_effective_caps`, `_id_mapped`)
  monkeypatched, as a container without CAP_SETUID or a rootless user namespace would answer.

cgroup v2: this machine mounts the pids and memory controllers as v1 (a hybrid host: its
/sys/fs/cgroup/unified has no pids or memory controller), so v2 is tested in two parts:
- `FakeV2Kernel`: a temporary directory laid out like a v2 host's /sys/fs/cgroup (it stands in
  for a v2 host, which this machine is not), with the kernel's rules that matter here (a group
  gets only the controllers its parent enables; "no internal processes"; mkdir fills in the
  control files) applied by a patched `write_value` / `make_group`: which files are written,
  where processes move, what is refused.
- the real v2 hierarchy mounted here (no controllers): groups, joining, nesting, cgroup.kill
  and the fork server's v2 plumbing, with the controller list emptied.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import host_processes_with, require

from sandbox import (
    IsolationError,
    SandboxError,
    SandboxLimits,
    cgroups,
    contain,
    forkserver,
    make_sandbox,
)
from sandbox.cgroups import CgroupSet, CgroupUnavailable
from sandbox.forkserver import ForkServer, forkserver_unavailable_reason, shared_forkserver
from sandbox.local import LocalSandbox, bwrap_argv, bwrap_path

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parent.parent
IS_ROOT = os.geteuid() == 0
MiB = 1024 * 1024


def require_bwrap() -> None:
    require("bwrap", bwrap_path() is not None, "bubblewrap is not installed")


def require_root() -> None:
    if not IS_ROOT:
        pytest.skip("needs root")


@pytest.fixture
def fresh_warnings(monkeypatch) -> None:
    """Forget which warnings were logged, so each test sees its first one."""
    monkeypatch.setattr(contain, "_warned", set())


@pytest.fixture
def no_bwrap(monkeypatch, tmp_path) -> None:
    """PATH without bwrap (an empty directory): bwrap_path() finds none, as on a bare host."""
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    assert bwrap_path() is None


@pytest.fixture
def no_cgroups(monkeypatch, tmp_path) -> None:
    """A cgroup root with nothing mounted in it."""
    root = tmp_path / "cgroup"
    root.mkdir()
    monkeypatch.setattr(cgroups, "CGROUP_ROOT", str(root))
    assert cgroups.cgroups_unavailable_reason() is not None


# ---------------------------------------------------------------------------------------------
# Refusals, one layer at a time


def test_missing_bubblewrap_is_refused_and_named(no_bwrap) -> None:
    for make in (LocalSandbox, lambda: make_sandbox("local")):
        with pytest.raises(IsolationError) as raised:
            make()
        message = str(raised.value)
        assert raised.value.layers == ("bubblewrap",)
        assert "bubblewrap is not installed: apt-get install bubblewrap" in message
        assert "host_setup.sh" in message and "allow_unisolated: true" in message
    with pytest.raises(IsolationError, match="use_bwrap=True"):  # required outright
        LocalSandbox(use_bwrap=True, allow_unisolated=True)
    if IS_ROOT:
        assert "bubblewrap is not installed" in forkserver_unavailable_reason()
        with pytest.raises(SandboxError, match="apt-get install bubblewrap"):
            ForkServer(allow_unisolated=True)


def test_turning_bubblewrap_off_needs_allow_unisolated() -> None:
    with pytest.raises(IsolationError, match=r"turned off \(use_bwrap=False\)"):
        LocalSandbox(use_bwrap=False)


def test_missing_bubblewrap_allowed_runs_and_warns_once(no_bwrap, fresh_warnings, caplog) -> None:
    """With allow_unisolated the program runs on the host (as `nobody` when root): it can then
    read a world-readable file outside its work dir, which is what the refusal protects."""
    secret = Path(f"/tmp/cwm-visible-{secrets.token_hex(6)}")
    secret.write_text("on the host")
    secret.chmod(0o644)
    caplog.set_level(logging.WARNING, logger="sandbox.contain")
    try:
        with LocalSandbox(allow_unisolated=True) as sandbox:
            assert sandbox.isolation_gaps == ("bubblewrap",) and not sandbox.use_bwrap
            result = sandbox.exec(f"echo ran; cat {secret}", timeout=10)
            assert result.stdout == b"ran\non the host", result
        with make_sandbox("local", allow_unisolated=True) as sandbox:
            assert sandbox.exec("echo again", timeout=10).stdout == b"again\n"
    finally:
        secret.unlink()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "WITHOUT bubblewrap" in warnings[0] and "apt-get install bubblewrap" in warnings[0]


def test_missing_cgroups_are_refused_and_named(no_cgroups, monkeypatch) -> None:
    require_bwrap()
    with pytest.raises(IsolationError) as raised:
        LocalSandbox()
    assert raised.value.layers == ("cgroups",)
    message = str(raised.value)
    assert "cgroup v1: no pids controller is mounted" in message
    assert "cgroup v2" in message and "allow_unisolated: true" in message
    with pytest.raises(IsolationError, match=r"turned off \(use_cgroups=False\)"):
        LocalSandbox(use_cgroups=False)
    if forkserver_unavailable_reason(allow_unisolated=True) is None:
        assert "no pids controller" in forkserver_unavailable_reason()
        with pytest.raises(IsolationError, match="the fork server refuses") as raised:
            ForkServer()
        assert raised.value.layers == ("cgroups",)
        # a server shared earlier in this process keeps its cgroups; a new one must refuse
        monkeypatch.setattr(forkserver, "_shared", {})
        with pytest.raises(IsolationError):
            shared_forkserver()


def test_missing_cgroups_allowed_still_isolates_files(no_cgroups, fresh_warnings, caplog) -> None:
    require_bwrap()
    caplog.set_level(logging.WARNING, logger="sandbox.contain")
    secret = Path(f"/tmp/cwm-secret-{secrets.token_hex(6)}")
    secret.write_text("hidden")
    secret.chmod(0o644)
    try:
        with LocalSandbox(allow_unisolated=True) as sandbox:
            assert sandbox._cgroups is None and sandbox.isolation_gaps == ("cgroups",)
            result = sandbox.exec(f"cat {secret}; echo done", timeout=10)
        assert b"hidden" not in result.stdout and result.stdout.endswith(b"done\n")
    finally:
        secret.unlink()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "WITHOUT cgroups" in warnings[0]
    if forkserver_unavailable_reason(allow_unisolated=True) is None:
        server = ForkServer(allow_unisolated=True)  # lazy: nothing starts yet
        assert not server.use_cgroups
        assert any(
            "fork server runs untrusted code WITHOUT cgroups" in r.getMessage()
            for r in caplog.records
        )


def test_root_unable_to_drop_uid_is_refused(monkeypatch, fresh_warnings) -> None:
    require_root()
    require_bwrap()
    with pytest.raises(IsolationError, match="run_as=0 keeps programs root") as raised:
        LocalSandbox(run_as=0)
    assert raised.value.layers == ("uid",)
    with LocalSandbox(run_as=0, allow_unisolated=True) as sandbox:  # runs with what is there
        assert sandbox.exec("id -u", timeout=10).stdout == b"0\n"

    no_setuid = (1 << 41) - 1 & ~(1 << contain.CAP_SETUID)
    monkeypatch.setattr(contain, "_effective_caps", lambda: no_setuid)
    with pytest.raises(IsolationError, match="lacks CAP_SETUID/CAP_SETGID") as raised:
        LocalSandbox()
    assert raised.value.layers == ("uid",) and "--cap-add SETUID" in str(raised.value)
    assert "CAP_SETUID" in forkserver_unavailable_reason()
    monkeypatch.undo()

    monkeypatch.setattr(contain, "_id_mapped", lambda number, map_file: False)
    with pytest.raises(IsolationError, match="not mapped in this user namespace"):
        LocalSandbox()
    monkeypatch.undo()

    monkeypatch.setattr(contain, "setpriv_path", lambda: None)
    with pytest.raises(IsolationError, match="apt-get install util-linux"):
        LocalSandbox()


def test_every_missing_layer_is_named_at_once(no_bwrap, no_cgroups) -> None:
    require_root()
    with pytest.raises(IsolationError) as raised:
        LocalSandbox(run_as=0)
    assert set(raised.value.layers) == {"bubblewrap", "uid", "cgroups"}


NOT_ROOT_PROBE = r"""
import io, json, logging, os, sys
sys.path.insert(0, os.getcwd())
from sandbox.base import IsolationError, SandboxError
from sandbox.forkserver import forkserver_unavailable_reason
from sandbox.local import LocalSandbox
report = {"uid": os.geteuid(), "forkserver": forkserver_unavailable_reason()}
try:
    LocalSandbox().close()
    report["strict"] = None
except IsolationError as e:
    report["strict"] = [str(e), list(e.layers)]
log = io.StringIO()
logging.basicConfig(stream=log)
try:
    with LocalSandbox(allow_unisolated=True) as sandbox:
        result = sandbox.exec(["sh", "-c", "id -u; cat " + sys.argv[1] + " || echo unreadable"], 10)
        report["run"] = result.stdout_text
        report["gaps"] = list(sandbox.isolation_gaps)
except SandboxError as e:
    report["run_error"] = str(e)
report["log"] = log.getvalue()
print(json.dumps(report))
"""


def test_not_root_is_refused_with_a_hint_and_bwrap_still_isolates() -> None:
    """A laptop user: no uid to drop, and (here, cgroup v1) no groups to make; bubblewrap
    still hides the host's files once allow_unisolated accepts the missing cgroups."""
    require_root()
    require_bwrap()
    setpriv = contain.setpriv_path()
    require("bwrap", setpriv is not None, "setpriv is not installed (apt-get install util-linux)")
    secret = Path(f"/tmp/cwm-secret-{secrets.token_hex(6)}")
    secret.write_text("hidden")
    secret.chmod(0o644)
    uid, gid = contain.nobody_ids()
    # An interpreter `nobody` can read in full (this one may live under /root): the sandbox
    # modules are stdlib-only, so the system's Python imports them.
    python = shutil.which("python3", path="/usr/bin:/bin") or sys.executable
    try:
        completed = subprocess.run(
            [setpriv, f"--reuid={uid}", f"--regid={gid}", "--clear-groups", python]
            + ["-I", "-c", NOT_ROOT_PROBE, str(secret)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
            env={"PATH": os.environ["PATH"], "HOME": "/tmp"},
        )
    finally:
        secret.unlink()
    assert completed.returncode == 0, completed.stderr
    report = json.loads(completed.stdout.splitlines()[-1])
    assert report["uid"] == uid
    assert "needs root" in report["forkserver"]
    if report["strict"] is not None:  # where this user may make groups, nothing is missing
        message, layers = report["strict"]
        assert layers == ["cgroups"], message  # no "uid": not root, nothing to drop
        assert "Delegate=yes" in message and "allow_unisolated: true" in message
    if "run_error" in report:
        pytest.skip(f"unprivileged bubblewrap does not work here: {report['run_error']}")
    assert report["run"] == f"{uid}\nunreadable\n", report
    if report["strict"] is not None:
        assert report["gaps"] == ["cgroups"] and "WITHOUT cgroups" in report["log"]


# ---------------------------------------------------------------------------------------------
def test_forkserver_backend_runs_python_programs_only() -> None:
    """make_sandbox("forkserver") is the shared warm server behind the Sandbox interface: a
    written Python file runs (stdin in, stdout out, limits applied); a shell command, a missing
    file or a path out of the work dir is refused, not run some other way."""
    reason = forkserver_unavailable_reason()
    require("bwrap", reason is None, reason or "")
    with make_sandbox("forkserver", limits=SandboxLimits(memory_mb=128)) as box:
        box.write_file("main.py", "import sys\nprint(sys.stdin.read()[::-1])")
        result = box.exec(["python3", "-I", "main.py"], timeout=10, stdin="abc")
        assert (result.exit_code, result.stdout) == (0, b"cba\n")
        box.write_file("hog.py", "x = bytearray(512 * 1024 * 1024)")
        assert box.exec(["python3", "hog.py"], timeout=10).exit_code != 0  # 128 MB limit
        for cmd in ("ls -la", ["bash", "-c", "id"], ["python3", "-c", "print(1)"]):
            with pytest.raises(SandboxError, match="Python programs only"):
                box.exec(cmd, timeout=5)
        with pytest.raises(FileNotFoundError):
            box.exec(["python3", "absent.py"], timeout=5)
        with pytest.raises(ValueError, match="escapes"):
            box.write_file("../main.py", "print(1)")
    assert shared_forkserver().running  # closing the view leaves the shared server warm


# Isolated: the host's files outside the work dir are out of reach


@pytest.mark.parametrize("backend", ["local", "forkserver"])
def test_isolated_program_cannot_read_host_files_outside_its_work_dir(backend: str) -> None:
    """Files a test leaves in /tmp, in the repository and in another sandbox's work dir, all
    readable by anyone on the host, are invisible from inside."""
    require_bwrap()
    if backend == "forkserver":
        reason = forkserver_unavailable_reason()
        require("bwrap", reason is None, reason or "")
    token = secrets.token_hex(8)
    tmp_secret = Path(f"/tmp/cwm-secret-{token}")
    repo_secret = REPO / f".cwm-secret-{token}"
    other = LocalSandbox()
    try:
        for path in (tmp_secret, repo_secret):
            path.write_text(f"secret {token}")
            path.chmod(0o644)
        other.write_file("hidden_tests.py", f"secret {token}")
        other_file = os.path.join(other.host_dir, "hidden_tests.py")
        paths = [str(tmp_secret), str(repo_secret), other_file, str(REPO / "README.md")]
        code = (
            "import os\nfound = []\n"
            f"for path in {paths!r}:\n"
            "    try:\n        found.append(open(path).read())\n"
            "    except OSError as e:\n        found.append(type(e).__name__)\n"
            "print(found)\n"
            "print(sorted(n for n in os.listdir('/tmp') if 'cwm' in n))\n"
        )
        with make_sandbox(backend, limits=SandboxLimits(memory_mb=256)) as sandbox:
            sandbox.write_file("main.py", code)
            result = sandbox.exec(["python3", "main.py"], timeout=10)
    finally:
        other.close()
        for path in (tmp_secret, repo_secret):
            path.unlink(missing_ok=True)
    assert result.exit_code == 0, result.stderr
    assert token.encode() not in result.stdout
    assert b"cwm-rl" not in result.stdout  # README.md's text
    found = result.stdout_text.splitlines()
    assert found[0].count("Error") == 4 and found[1] == "[]", found


# ---------------------------------------------------------------------------------------------
# cgroup v2 by its files: a temporary directory stands in for a v2 host


class FakeV2Kernel:
    """A temp dir laid out like a cgroup v2 host's /sys/fs/cgroup, with the rules of the kernel
    that matter here, applied by `write` and `mkdir` (patched over cgroups.write_value and
    cgroups.make_group): a group's cgroup.controllers is what its parent enables; enabling a
    controller it lacks fails (ENOENT); a non-root group with processes cannot enable
    controllers for children, nor take processes once it has (EBUSY); writing a pid to
    cgroup.procs moves it there."""

    def __init__(self, root: Path, own: str, own_controllers: str, procs: list[int]) -> None:
        self.root = root
        root.mkdir()
        self._fill(root, "cpu io memory pids")
        (root / "cgroup.subtree_control").write_text("cpu io memory pids\n")
        parent = root
        for part in own.strip("/").split("/"):
            parent = parent / part
            parent.mkdir()
            self._fill(parent, own_controllers)
            (parent / "cgroup.subtree_control").write_text(own_controllers + "\n")
        (parent / "cgroup.subtree_control").write_text("\n")
        (parent / "cgroup.procs").write_text("".join(f"{pid}\n" for pid in procs))
        self.own = parent

    @staticmethod
    def _fill(group: Path, controllers: str) -> None:
        (group / "cgroup.controllers").write_text(controllers + "\n")
        (group / "cgroup.subtree_control").write_text("\n")
        (group / "cgroup.procs").write_text("")
        (group / "cgroup.kill").write_text("")
        if "pids" in controllers.split():
            (group / "pids.max").write_text("max\n")
        if "memory" in controllers.split():
            (group / "memory.max").write_text("max\n")
            (group / "memory.swap.max").write_text("max\n")
            (group / "memory.events").write_text("low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\n")

    def mkdir(self, path: str, *, exist_ok: bool = False) -> None:
        group = Path(path)
        try:
            group.mkdir()
        except FileExistsError:
            if not exist_ok:
                raise
            return
        self._fill(group, (group.parent / "cgroup.subtree_control").read_text().strip())

    def write(self, path: str, value: str) -> None:
        file, group = Path(path), Path(path).parent
        if file.name == "cgroup.subtree_control":
            available = (group / "cgroup.controllers").read_text().split()
            enabled = file.read_text().split()
            for token in value.split():
                if token[1:] not in available:
                    raise OSError(errno.ENOENT, "no such controller", path)
                if group != self.root and (group / "cgroup.procs").read_text().strip():
                    raise OSError(errno.EBUSY, "Device or resource busy", path)
                enabled = sorted(set(enabled) | {token[1:]})
            file.write_text(" ".join(enabled) + "\n")
        elif file.name == "cgroup.procs":
            pid = str(os.getpid()) if value == "0" else value
            if group != self.root and (group / "cgroup.subtree_control").read_text().strip():
                raise OSError(errno.EBUSY, "Device or resource busy", path)
            for procs in self.root.rglob("cgroup.procs"):
                lines = [line for line in procs.read_text().split() if line != pid]
                procs.write_text("".join(f"{line}\n" for line in lines))
            file.write_text(file.read_text() + pid + "\n")
        else:
            file.write_text(value)


@pytest.fixture
def fake_v2(monkeypatch, tmp_path):
    """A v2 host where this process sits in /job/task with pid 4242 beside it."""

    def make(own_controllers: str = "memory pids") -> FakeV2Kernel:
        kernel = FakeV2Kernel(
            tmp_path / "cgroup", "/job/task", own_controllers, [os.getpid(), 4242]
        )
        proc_self_cgroup = tmp_path / "proc-self-cgroup"
        proc_self_cgroup.write_text("0::/job/task\n")
        monkeypatch.setattr(cgroups, "CGROUP_ROOT", str(kernel.root))
        monkeypatch.setattr(cgroups, "PROC_SELF_CGROUP", str(proc_self_cgroup))
        monkeypatch.setattr(cgroups, "write_value", kernel.write)
        monkeypatch.setattr(cgroups, "make_group", kernel.mkdir)
        monkeypatch.setattr(cgroups, "_remove_tree", lambda path, attempts=50: shutil.rmtree(path))
        return kernel

    return make


def test_hierarchy_detection(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(cgroups, "CGROUP_ROOT", str(tmp_path))
    assert cgroups.cgroup_version() == 1  # nothing mounted: v1 rules, and it finds nothing
    for controller in ("pids", "memory", "unified"):  # a hybrid host (this machine's layout)
        (tmp_path / controller).mkdir()
    (tmp_path / "pids" / "cgroup.procs").write_text("")
    (tmp_path / "unified" / "cgroup.controllers").write_text("\n")
    assert cgroups.cgroup_version() == 1
    (tmp_path / "cgroup.controllers").write_text("memory pids\n")  # the unified hierarchy
    assert cgroups.cgroup_version() == 2


def test_v2_group_files_and_the_no_internal_processes_rule(fake_v2) -> None:
    kernel = fake_v2()
    group = CgroupSet(20, 100 * MiB, label="t")
    own = kernel.own
    path = Path(group.dirs["unified"])
    assert group.version == 2 and list(group.dirs) == ["unified"]
    assert path.parent == own / cgroups.CGROUP_PARENT
    # Our group held processes: they moved to the leaf, then the controllers were enabled.
    assert (own / "cgroup.procs").read_text() == ""
    assert (own / cgroups.CGROUP_LEAF / "cgroup.procs").read_text().split() == [
        str(os.getpid()),
        "4242",
    ]
    assert (own / "cgroup.subtree_control").read_text().split() == ["memory", "pids"]
    assert (path.parent / "cgroup.subtree_control").read_text().split() == ["memory", "pids"]
    # The limits, in v2's files (and none of v1's).
    assert (path / "pids.max").read_text() == "20"
    assert (path / "memory.max").read_text() == str(100 * MiB)
    assert (path / "memory.swap.max").read_text() == "0"
    assert not (path / "memory.limit_in_bytes").exists()
    assert group.has_pids and group.join_files() == [str(path / "cgroup.procs")]
    (path / "memory.events").write_text("low 0\nhigh 0\nmax 5\noom 2\noom_kill 2\n")
    assert group.oom_kills() == 2
    assert group.kill_all() and (path / "cgroup.kill").read_text() == "1"
    # A second sandbox reuses the prepared parent; nothing moves again.
    second = CgroupSet(5, None, label="t")
    assert Path(second.dirs["unified"]).parent == path.parent
    assert (Path(second.dirs["unified"]) / "memory.max").read_text() == "max\n"
    for made in (group, second):
        made.remove()
    assert not path.exists()


def test_v2_fork_server_groups_have_children(fake_v2) -> None:
    """On v2 a group with controlled children holds no process: the fork server gets "server"
    (itself) and "run" (the programs), the controllers enabled before anyone joins."""
    fake_v2()
    group = CgroupSet(40, None, label="fs", children=("server", "run"))
    path = Path(group.dirs["unified"])
    assert (path / "cgroup.subtree_control").read_text().split() == ["memory", "pids"]
    assert (path / "pids.max").read_text() == "40"
    run = CgroupSet.attach(2, {"unified": str(path)}, cgroups.CONTROLLERS).child("run")
    run.set_limits(7, 64 * MiB)
    assert (path / "run" / "pids.max").read_text() == "7"
    assert (path / "run" / "memory.max").read_text() == str(64 * MiB)
    server = group.child("server")
    cgroups.write_value(server.join_files()[0], "0")  # what bubblewrap's preexec does
    assert str(os.getpid()) in (path / "server" / "cgroup.procs").read_text()
    assert str(os.getpid()) not in (path / "cgroup.procs").read_text()
    assert len(group.procs_files()) == 3  # the kill covers the children too
    group.remove()


def test_v2_without_delegated_controllers_names_them(fake_v2) -> None:
    fake_v2(own_controllers="memory")  # the parent enables memory but not pids
    reason = cgroups.cgroups_unavailable_reason()
    assert "cgroup v2: the pids controller(s) are not enabled" in reason
    assert "systemd-run --user --scope -p Delegate=yes" in reason
    with pytest.raises(CgroupUnavailable):
        CgroupSet(10, None)
    require_bwrap()
    with pytest.raises(IsolationError, match="cgroup v2: the pids") as raised:
        LocalSandbox()
    assert raised.value.layers == ("cgroups",)


def test_v2_local_sandbox_is_made_in_the_v2_layout(fake_v2) -> None:
    require_bwrap()
    fake_v2()
    with LocalSandbox(SandboxLimits(memory_mb=100, max_processes=9)) as sandbox:
        assert sandbox.isolation_gaps == ()
        path = Path(sandbox._cgroups.dirs["unified"])
        assert (path / "pids.max").read_text() == "9"
        assert (path / "memory.max").read_text() == str((100 + contain.MEMORY_SLACK_MB) * MiB)
    assert not path.exists()


def test_fork_server_keeps_the_cgroup_namespace_only_on_v2() -> None:
    require_bwrap()
    assert "--unshare-cgroup-try" in bwrap_argv(None, uid=None, gid=None, tmp_size_bytes=MiB)
    argv = bwrap_argv(None, uid=None, gid=None, tmp_size_bytes=MiB, unshare_cgroup=False)
    assert "--unshare-cgroup-try" not in argv


# ---------------------------------------------------------------------------------------------
# The real v2 hierarchy of this host (no controllers in it here)


def cgroup2_mount() -> str | None:
    """Where a cgroup2 file system is mounted (this hybrid host: /sys/fs/cgroup/unified)."""
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                fields = line.split()
                if fields[2] == "cgroup2" and os.access(fields[1], os.W_OK):
                    return fields[1]
    except OSError:
        pass
    return None


@pytest.fixture
def real_v2(monkeypatch):
    """CGROUP_ROOT at the host's cgroup2 mount, asking for no controllers (none are there)."""
    require_root()
    mount = cgroup2_mount()
    if mount is None:
        pytest.skip("no writable cgroup2 mount")
    monkeypatch.setattr(cgroups, "CGROUP_ROOT", mount)
    monkeypatch.setattr(cgroups, "CONTROLLERS", ())
    assert cgroups.cgroup_version() == 2
    yield mount
    own = cgroups._own_cgroup(2) or "/"
    try:  # the parent we made, if no one else uses it
        os.rmdir(os.path.join(mount, own.lstrip("/"), cgroups.CGROUP_PARENT))
    except OSError:
        pass


def test_real_v2_groups_join_nest_and_cgroup_kill(real_v2, monkeypatch) -> None:
    group = CgroupSet(10, None, label="t", children=("run",))
    path = Path(group.dirs["unified"])
    assert (path / "run" / "cgroup.procs").exists()
    marker = f"{4000 + secrets.randbelow(10**6)}.{secrets.randbelow(10**6)}"
    run_fds = group.child("run").open_procs_fds()

    def join_run() -> None:
        for fd in run_fds:
            os.write(fd, b"0")

    try:  # a double-forked daemon in the nested group, then its parent exits
        subprocess.run(
            ["sh", "-c", f"setsid sleep {marker} & exit 0"], preexec_fn=join_run, check=True
        )
    finally:
        for fd in run_fds:
            os.close(fd)
    for _ in range(100):
        if host_processes_with(marker):
            break
        time.sleep(0.01)
    daemon = host_processes_with(marker)
    assert daemon and str(daemon[0]) in (path / "run" / "cgroup.procs").read_text()
    assert "populated 1" in (path / "cgroup.events").read_text()

    def wait_only(files: list[str], timeout_s: float = 5.0) -> bool:  # no kill(): cgroup.kill's
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if not any(Path(f).read_text().strip() for f in files):
                return True
            time.sleep(0.01)
        return False

    monkeypatch.setattr(cgroups, "kill_pids_in", wait_only)
    assert group.kill_all(), "cgroup.kill did not empty the groups"
    assert host_processes_with(marker) == []
    group.remove()
    assert not path.exists()


def test_real_v2_fork_server_and_local_sandbox_kill_leftovers(real_v2) -> None:
    """The v2 plumbing with real cgroup files: bind mount, the "server"/"run" split, moving
    each program into "run" from inside (host cgroup namespace), cgroup.kill at the end."""
    require_bwrap()
    marker = f"{5000 + secrets.randbelow(10**6)}.{secrets.randbelow(10**6)}"
    daemon = (
        "import os, time\n"
        "if os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
        f"        os.execv('/bin/sleep', ['sleep', '{marker}'])\n    os._exit(0)\n"
        "print(open('/proc/self/cgroup').read().strip().splitlines()[-1])\n"
        "time.sleep(0.3)\n"
    )
    if forkserver_unavailable_reason() is None:
        with ForkServer(SandboxLimits(memory_mb=256, max_processes=16)) as server:
            result = server.run(daemon, timeout=10)
            assert result.exit_code == 0, result.stderr
            assert result.stdout_text.strip().endswith("/run"), result.stdout
            assert server.running and host_processes_with(marker) == []
            assert server._cgroups.version == 2
    # The local sandbox without bubblewrap (its pid namespace would kill the daemon anyway).
    with LocalSandbox(use_bwrap=False, allow_unisolated=True) as sandbox:
        assert sandbox._cgroups.version == 2
        result = sandbox.exec(
            f"(setsid sleep {marker} &); sleep 0.3; grep -qs {marker} /proc/[0-9]*/cmdline "
            "&& echo running",
            timeout=10,
        )
        assert result.stdout == b"running\n"
        assert host_processes_with(marker) == []
