"""Cgroups for sandboxes, v1 and v2: a process limit that binds root too, a memory limit for a
whole sandbox, and the list of every process to kill (double-forked daemons included).

Which hierarchy: v2 where /sys/fs/cgroup is the unified hierarchy (it holds cgroup.controllers),
else v1 with one mount per controller (/sys/fs/cgroup/pids, /sys/fs/cgroup/memory). A hybrid
host's /sys/fs/cgroup/unified is not used: there the pids and memory controllers are bound to v1.

Where groups go: under this process's own group (/proc/self/cgroup), in `cwm-sandbox/`, named
`LABEL-PID.STARTTIME-N` so that groups left by dead processes can be recognised and removed even
after their pid is reused.
- v1: one directory per controller, `<mount>/<own>/cwm-sandbox/NAME`; limits in pids.max and
  memory.limit_in_bytes (+ memory.memsw.limit_in_bytes), OOM kills in memory.oom_control.
- v2: one directory for both, `<root>/<own>/cwm-sandbox/NAME`; limits in pids.max, memory.max
  and memory.swap.max, OOM kills in memory.events, and cgroup.kill ends the whole subtree at
  once. A group only gets controllers its parent enables in cgroup.subtree_control, and the
  "no internal processes" rule forbids enabling them in a group that holds processes (the root
  excepted): so the processes of <own> are first moved into a leaf, `<own>/cwm-init` (as
  container runtimes do), then pids and memory are enabled in <own> and in cwm-sandbox/. The
  controllers must already be enabled for <own> by its parent: as root that is usual, as a user
  it takes a delegated group (`systemd-run --user --scope -p Delegate=yes -- COMMAND`).

`CgroupSet` is the one interface local.py and forkserver.py use; where no group can be made it
raises `CgroupUnavailable`, whose message says what is missing and how to get it. Stdlib only:
the fork server sends this file's source into its sandbox.
"""

from __future__ import annotations

import errno
import os
import signal
import threading
import time

CGROUP_ROOT = "/sys/fs/cgroup"
PROC_SELF_CGROUP = "/proc/self/cgroup"
CGROUP_PARENT = "cwm-sandbox"  # our groups live under <own group>/cwm-sandbox/
CGROUP_LEAF = "cwm-init"  # v2: where the processes of <own group> move so it may have children
CONTROLLERS = ("pids", "memory")  # what a sandbox's group needs
UNIFIED = "unified"  # the key of a v2 group's one directory in CgroupSet.dirs
KILL_WAIT_S = 5.0
DELEGATE_HINT = (
    "start the run as root, or as a user under `systemd-run --user --scope -p Delegate=yes -- "
    "COMMAND` (a cgroup v2 group delegated to you)"
)


class CgroupUnavailable(RuntimeError):
    """No sandbox group can be made here; the message says what is missing and how to get it."""


def kill_pids_in(procs_files: list[str], timeout_s: float = KILL_WAIT_S) -> bool:
    """SIGKILL every process listed in these cgroup.procs files until none is left (a fork
    bomb forks while we kill: loop). True when the groups are empty."""
    end = time.monotonic() + timeout_s
    pause = 0.0005
    while True:
        pids: set[int] = set()
        for path in procs_files:
            try:
                with open(path) as f:
                    pids.update(int(line) for line in f if line.strip())
            except OSError:  # gone, or removed meanwhile (ENODEV): nothing to kill there
                continue
        # A task being reaped can be listed as 0 (its pid already detached); kill(0) would hit
        # our own process group, so only positive pids, never ourselves.
        pids.discard(0)
        pids.discard(os.getpid())
        if not pids:
            return True
        for pid in pids:
            if pid < 0:
                continue
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if time.monotonic() > end:
            return False
        time.sleep(pause)
        pause = min(pause * 2, 0.05)


# ---------------------------------------------------------------------------------------------
# Finding (and on v2 preparing) the directory our groups go in


def cgroup_version() -> int:
    """2 where CGROUP_ROOT is the unified hierarchy, else 1 (legacy or hybrid)."""
    return 2 if os.path.isfile(os.path.join(CGROUP_ROOT, "cgroup.controllers")) else 1


def _own_cgroup(version: int, controller: str = "") -> str | None:
    """This process's group ("/" for the root): in a v1 controller, or in the v2 hierarchy."""
    try:
        with open(PROC_SELF_CGROUP) as f:
            for line in f:
                hierarchy, controllers, path = line.rstrip("\n").split(":", 2)
                if version == 2 and hierarchy == "0" and controllers == "":
                    return path
                if version == 1 and controller in controllers.split(","):
                    return path
    except (OSError, ValueError):
        return None
    return None


def cgroup_parents(controllers: tuple[str, ...] | None = None) -> dict[str, str]:
    """Where our groups go: {controller: directory} on v1, {"unified": directory} on v2;
    created (and on v2 prepared) on first use. CgroupUnavailable says why not."""
    controllers = CONTROLLERS if controllers is None else controllers
    if cgroup_version() == 2:
        return {UNIFIED: _v2_parent(controllers)}
    return {controller: _v1_parent(controller) for controller in controllers}


def cgroups_unavailable_reason(controllers: tuple[str, ...] | None = None) -> str | None:
    """None where a sandbox here can get its pids and memory groups, else what is missing and
    how to get it."""
    try:
        cgroup_parents(controllers)
    except CgroupUnavailable as e:
        return str(e)
    return None


def cgroups_available() -> bool:
    """Whether a sandbox here can get its own pids and memory groups (v1 or v2)."""
    return cgroups_unavailable_reason() is None


def _v1_parent(controller: str) -> str:
    mount = os.path.join(CGROUP_ROOT, controller)
    if not os.path.exists(os.path.join(mount, "cgroup.procs")):
        raise CgroupUnavailable(
            f"cgroup v1: no {controller} controller is mounted at {mount} (nor is {CGROUP_ROOT} "
            f"a cgroup v2 hierarchy): mount it (mount -t cgroup -o {controller} cgroup {mount}) "
            "or boot with the unified cgroup v2 hierarchy"
        )
    own = _own_cgroup(1, controller)
    if own is None:
        raise CgroupUnavailable(f"cgroup v1: this process is in no {controller} group")
    parent = os.path.join(mount, own.lstrip("/"), CGROUP_PARENT)
    try:
        os.makedirs(parent, exist_ok=True)
        if not os.access(parent, os.W_OK):
            raise PermissionError(errno.EACCES, "not writable", parent)
    except OSError as e:
        message = f"cgroup v1: cannot make groups in {parent} ({e}): {_hint(e, 1)}"
        raise CgroupUnavailable(message) from e
    return parent


def _hint(error: OSError, version: int) -> str:
    """How to get a writable group, for the error that stopped us."""
    if error.errno == errno.EROFS:
        return (
            f"{CGROUP_ROOT} is mounted read-only (a container?): give it a writable cgroup file "
            "system (e.g. docker/podman run --cgroupns=private with a rw cgroup mount, or "
            "--privileged)"
        )
    if os.geteuid() != 0 and version == 1:
        return (
            "cgroup v1 groups need root here: start the run as root (on a cgroup v2 host, "
            "`systemd-run --user --scope -p Delegate=yes -- COMMAND` delegates a group to a user)"
        )
    if os.geteuid() != 0:
        return DELEGATE_HINT
    return "make the group writable for this process"


def _v2_parent(controllers: tuple[str, ...]) -> str:
    own = _own_cgroup(2)
    if own is None:
        raise CgroupUnavailable(f"cgroup v2: no v2 group for this process in {PROC_SELF_CGROUP}")
    own_dir = os.path.join(CGROUP_ROOT, own.lstrip("/"))
    if not os.path.isdir(own_dir):
        raise CgroupUnavailable(
            f"cgroup v2: this process's group {own} is not visible under {CGROUP_ROOT} "
            "(mount the hierarchy where the process's cgroup namespace sees it)"
        )
    available = _read_words(os.path.join(own_dir, "cgroup.controllers"))
    missing = [c for c in controllers if c not in available]
    if missing:
        raise CgroupUnavailable(
            f"cgroup v2: the {' and '.join(missing)} controller(s) are not enabled for this "
            f"process's group {own} (its parent's cgroup.subtree_control lacks them): "
            f"{DELEGATE_HINT}, or enable them in the parent group"
        )
    parent = os.path.join(own_dir, CGROUP_PARENT)
    try:
        # The true root may hold processes and never refuses; a container's root (cgroup
        # namespace) is not the true root and does.
        enable_controllers(own_dir, controllers, move_processes=True)
        make_group(parent, exist_ok=True)
        enable_controllers(parent, controllers, move_processes=False)
        if not os.access(os.path.join(parent, "cgroup.procs"), os.W_OK):
            raise PermissionError(errno.EACCES, "not writable", parent)
    except OSError as e:
        message = f"cgroup v2: cannot make groups in {parent} ({e}): {_hint(e, 2)}"
        raise CgroupUnavailable(message) from e
    return parent


def enable_controllers(group: str, controllers: tuple[str, ...], *, move_processes: bool) -> None:
    """Enable `controllers` for the children of a v2 group. A group that holds processes refuses
    (EBUSY, the "no internal processes" rule): with `move_processes` they first move into the
    leaf child CGROUP_LEAF."""
    control = os.path.join(group, "cgroup.subtree_control")
    todo = [c for c in controllers if c not in _read_words(control)]
    if not todo:
        return
    value = " ".join(f"+{c}" for c in todo)
    try:
        write_value(control, value)
    except OSError as e:
        if e.errno != errno.EBUSY or not move_processes:
            raise
        move_processes_to_leaf(group)
        write_value(control, value)


def move_processes_to_leaf(group: str, attempts: int = 20) -> str:
    """Move every process of a v2 group into its child CGROUP_LEAF (they keep the group's
    limits, which cover the leaf); returns the leaf. Loops: a process may fork meanwhile."""
    leaf = os.path.join(group, CGROUP_LEAF)
    make_group(leaf, exist_ok=True)
    procs = os.path.join(group, "cgroup.procs")
    for _ in range(attempts):
        pids = [line.strip() for line in _read_lines(procs) if line.strip()]
        if not pids:
            break
        for pid in pids:
            try:
                write_value(os.path.join(leaf, "cgroup.procs"), pid)
            except ProcessLookupError:
                pass  # it exited meanwhile
    return leaf


def make_group(path: str, *, exist_ok: bool = False) -> None:
    """mkdir a cgroup (the kernel fills in its control files)."""
    try:
        os.mkdir(path)
    except FileExistsError:
        if not exist_ok:
            raise


# ---------------------------------------------------------------------------------------------
# Limits and counters, version-neutral


def set_process_limit(group: str, max_processes: int) -> None:
    """pids.max: the same file in v1 and v2."""
    write_value(os.path.join(group, "pids.max"), str(max_processes))


def set_memory_limit(version: int, group: str, memory_bytes: int) -> None:
    """Cap memory (and keep the group from swapping past it)."""
    if version == 2:
        write_value(os.path.join(group, "memory.max"), str(memory_bytes))
        swap = os.path.join(group, "memory.swap.max")
        if os.path.exists(swap):  # absent where swap accounting is off
            write_value(swap, "0")
        return
    swap_file = os.path.join(group, "memory.memsw.limit_in_bytes")
    has_swap_file = os.path.exists(swap_file)
    if has_swap_file:  # memsw must stay >= limit: raise it first, then set both
        write_value(swap_file, "-1")
    write_value(os.path.join(group, "memory.limit_in_bytes"), str(memory_bytes))
    if has_swap_file:
        write_value(swap_file, str(memory_bytes))


def oom_kill_count(version: int, group: str) -> int:
    """How many processes the group's memory limit has killed (v2 counts nested groups too)."""
    name = "memory.events" if version == 2 else "memory.oom_control"
    for line in _read_lines(os.path.join(group, name)):
        key, _, value = line.partition(" ")
        if key == "oom_kill":
            return int(value)
    return 0


# ---------------------------------------------------------------------------------------------
# One sandbox's groups

_group_counter = 0
_group_lock = threading.Lock()


class CgroupSet:
    """The groups holding one sandbox's processes: on v1 a directory per controller, on v2 one
    directory; `dirs` maps "pids"/"memory" (v1) or "unified" (v2) to them.

    `children` are made inside each directory (the fork server: "server" for itself, "run" for
    the programs; on v2 a group with controlled children may hold no process itself).
    """

    def __init__(
        self,
        max_processes: int,
        memory_bytes: int | None,
        label: str = "sb",
        *,
        children: tuple[str, ...] = (),
        controllers: tuple[str, ...] | None = None,
    ) -> None:
        global _group_counter
        self.controllers = CONTROLLERS if controllers is None else tuple(controllers)
        with _group_lock:
            _group_counter += 1
            name = f"{label}-{_process_tag(os.getpid())}-{_group_counter}"
        parents = cgroup_parents(self.controllers)  # CgroupUnavailable where none can be made
        self.version = cgroup_version()
        self.dirs: dict[str, str] = {}
        try:
            for key, parent in parents.items():
                _remove_stale_groups(parent)
                path = os.path.join(parent, name)
                make_group(path)
                self.dirs[key] = path
                if children and self.version == 2:
                    enable_controllers(path, self.controllers, move_processes=False)
                for child in children:
                    make_group(os.path.join(path, child))
            self.set_limits(max_processes, memory_bytes)
        except BaseException:
            self.remove()
            raise

    @classmethod
    def attach(cls, version: int, dirs: dict[str, str], controllers: tuple[str, ...]) -> CgroupSet:
        """Handles on groups made elsewhere (the fork server, inside its sandbox); nothing is
        created."""
        group = cls.__new__(cls)
        group.version, group.dirs, group.controllers = version, dict(dirs), tuple(controllers)
        return group

    def child(self, name: str) -> CgroupSet:
        """The nested group `name` (made by `children=`)."""
        dirs = {key: os.path.join(path, name) for key, path in self.dirs.items()}
        return CgroupSet.attach(self.version, dirs, self.controllers)

    def dir_for(self, controller: str) -> str | None:
        """The directory holding `controller`'s files, or None where it is not ours."""
        if controller not in self.controllers:
            return None
        return self.dirs.get(UNIFIED if self.version == 2 else controller)

    @property
    def has_pids(self) -> bool:
        return self.dir_for("pids") is not None

    def set_limits(self, max_processes: int, memory_bytes: int | None) -> None:
        pids = self.dir_for("pids")
        if pids is not None:
            set_process_limit(pids, max_processes)
        memory = self.dir_for("memory")
        if memory is not None and memory_bytes is not None:
            set_memory_limit(self.version, memory, memory_bytes)

    def join_files(self) -> list[str]:
        """The cgroup.procs files a process writes "0" to, to join these groups."""
        return [os.path.join(path, "cgroup.procs") for path in self.dirs.values()]

    def procs_files(self) -> list[str]:
        """cgroup.procs of our groups and of every group nested in them."""
        return [os.path.join(d, "cgroup.procs") for path in self.dirs.values() for d in _tree(path)]

    def open_procs_fds(self) -> list[int]:
        """fds to cgroup.procs, for a child to join with `os.write(fd, b"0")` before exec."""
        return [os.open(path, os.O_WRONLY | os.O_CLOEXEC) for path in self.join_files()]

    def oom_kills(self) -> int:
        """How many processes the memory limit has killed so far."""
        memory = self.dir_for("memory")
        if memory is None:
            return 0
        try:
            return oom_kill_count(self.version, memory)
        except (OSError, ValueError):
            return 0

    def kill_all(self) -> bool:
        """Kill every process in the groups (nested ones included); True when all are gone.
        v2: cgroup.kill first (atomic, so a fork bomb cannot outrun it)."""
        if self.version == 2:
            for path in self.dirs.values():
                try:
                    write_value(os.path.join(path, "cgroup.kill"), "1")
                except OSError:
                    pass  # kernels before 5.14: the loop below does it
        return kill_pids_in(self.procs_files())

    def remove(self) -> None:
        self.kill_all()
        for path in self.dirs.values():
            _remove_tree(path)
        self.dirs = {}


def _tree(path: str) -> list[str]:
    """A cgroup directory and the groups nested in it, deepest first."""
    found = [root for root, _, _ in os.walk(path)]
    return sorted(found, key=lambda d: d.count("/"), reverse=True)


def _remove_tree(path: str, attempts: int = 50) -> None:
    """rmdir a group and its nested groups; retries while killed processes finish exiting."""
    for directory in _tree(path):
        for _ in range(attempts):
            try:
                os.rmdir(directory)
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.01)


def write_value(path: str, value: str) -> None:
    """Write one value to a cgroup control file."""
    with open(path, "w") as f:
        f.write(value)


def _read_lines(path: str) -> list[str]:
    try:
        with open(path) as f:
            return f.read().splitlines()
    except FileNotFoundError:
        return []


def _read_words(path: str) -> set[str]:
    """The names in a v2 list file (cgroup.controllers, cgroup.subtree_control)."""
    return {word for line in _read_lines(path) for word in line.split()}


def _process_tag(pid: int) -> str | None:
    """ "PID.STARTTIME": names a process uniquely even after its pid is reused."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return f"{pid}.{fields[19]}"  # field 22 of stat, counted after the command name


def _remove_stale_groups(parent: str) -> None:
    """Remove groups left by dead processes (named label-PID.STARTTIME-N)."""
    try:
        names = os.listdir(parent)
    except OSError:
        return
    for name in names:
        parts = name.split("-")
        if len(parts) != 3 or "." not in parts[1]:
            continue
        pid = parts[1].split(".")[0]
        if pid.isdigit() and _process_tag(int(pid)) != parts[1]:
            _remove_tree(os.path.join(parent, name), attempts=1)
