"""A task's repository in a sandbox, and the persistent bash session the agent works in.

`open_workspace(instance, spec)` starts a sandbox of the configured backend with the
repository in it: copied in as a tar archive (local backend; docker backend without task
images), or already inside the instance's image (docker backend, `use_task_images`). With
`scrub=True` the repository's history is then cut down to what the agent may see: remotes,
every ref but the checked-out branch (other branches, tags, stash, notes, remote-tracking
refs), the reflogs, ORIG_HEAD / FETCH_HEAD and the other state files of git commands (commit
messages included), worktrees, grafts, alternates (their objects copied in first), .keep marks
and every unreachable object (gc) are deleted, and the setup fails unless every object left is
reachable from HEAD or the index: no later commit can leak the fix. The scorer scrubs its
sandbox the same way. `find_leaks` checks a workspace for the hidden tests and the oracle.

The bash session is one long-lived bash per episode (sandbox.base.Shell: under bubblewrap, the
cgroup and the uid drop on the local backend, in the container on docker): commands are sourced
in it one after another, so the working directory, variables (exported or not), aliases,
functions, background jobs and /tmp carry over; the tool helper (edit, create, submit's read)
runs through it too, since any other exec of the sandbox would end it. A command that times out
kills the shell and everything it started; the next call starts a fresh one in the repository.
With `real_shell=False` the session is emulated instead: every command runs in a fresh `bash`
exec that restores the previous call's working directory, exported variables and functions
(saved in the state directory by an EXIT trap) and, under bubblewrap, /tmp (up to 64 MiB);
un-exported variables, aliases, options and background jobs do not survive a call there.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import posixpath
import re
import shlex
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from envs.swe.instances import SWEInstance, repo_tar
from sandbox import ExecResult, Sandbox, SandboxLimits, make_sandbox
from sandbox.base import SandboxError

STATE_DIR = ".swe"  # relative to the sandbox's work dir; outside the repository
REPO_DIR = "testbed"  # the repository's directory in the work dir, when copied in
SETUP_TIMEOUT_S = 120.0
# Docker sandboxes: git accepts a repository that belongs to another uid (an image's /testbed).
DOCKER_ENV = {
    "PYTHONDONTWRITEBYTECODE": "1",
    "GIT_CONFIG_COUNT": "1",
    "GIT_CONFIG_KEY_0": "safe.directory",
    "GIT_CONFIG_VALUE_0": "*",
}

SETUP_SCRIPT = r"""
set -e
state=$1; repo=$2; tarball=$3; scrub=$4; branch=$5; basepatch=$6; hide=$7; hidden=$8; head=$9
mkdir -p "$state"
if [ -n "$tarball" ]; then
  mkdir -p "$repo"
  tar -xf "$tarball" -C "$repo"
  rm -f "$tarball"
fi
cd "$repo"
if [ -n "$head" ] && [ "$(git rev-parse HEAD 2>&1)" != "$head" ]; then
  echo "the repository is at $(git rev-parse HEAD 2>&1), not the instance's base commit $head" >&2
  exit 6
fi
if [ -n "$hidden" ]; then  # out of the agent's reach (delete), or the scorer's (stash)
  mkdir -p "$state/hidden"
  printf '%s\n' "$hidden" | while IFS= read -r path; do
    if [ ! -e "$path" ] && [ ! -L "$path" ]; then echo "hidden path $path is missing" >&2; exit 5; fi
    parent=$(dirname "$path"); mode=$(stat -c %a "$parent")
    chmod u+w "$parent" 2>/dev/null || true  # / may be read-only to its owner (0555)
    if [ "$hide" = stash ]; then mv "$path" "$state/hidden/"; else rm -rf "$path"; fi
    chmod "$mode" "$parent" 2>/dev/null || true
  done
fi
if [ -n "$branch" ] || [ -n "$basepatch" ]; then  # start elsewhere than HEAD (SWE-smith)
  if [ -n "$branch" ] && git rev-parse -q --verify "refs/heads/$branch" >/dev/null; then
    git checkout -q -f "$branch"
  elif [ -n "$basepatch" ]; then
    git apply --whitespace=nowarn "$basepatch" || { echo "the base patch does not apply" >&2; exit 4; }
  else
    echo "the instance's branch $branch is missing and it has no base patch" >&2; exit 4
  fi
  rm -f "$basepatch"
  git add -A
  tree=$(git write-tree)
  root=$(GIT_AUTHOR_NAME=swe GIT_AUTHOR_EMAIL=swe@localhost GIT_AUTHOR_DATE=2001-01-01T00:00:00Z \
    GIT_COMMITTER_NAME=swe GIT_COMMITTER_EMAIL=swe@localhost GIT_COMMITTER_DATE=2001-01-01T00:00:00Z \
    git commit-tree "$tree" -m "base")
  git reset -q --hard "$root"  # a root commit: the commit before it (the fix) is unreachable
fi
if [ "$scrub" = 1 ]; then
  for remote in $(git remote); do git remote remove "$remote"; done
  head_ref=$(git symbolic-ref -q HEAD || true)
  git for-each-ref --format='%(refname)' | while read -r ref; do
    if [ "$ref" != "$head_ref" ]; then git update-ref --no-deref -d "$ref"; fi
  done
  gitdir=$(git rev-parse --git-dir)
  rm -rf "$gitdir/logs" "$gitdir/refs/original" "$gitdir/worktrees" "$gitdir/rr-cache" \
    "$gitdir/rebase-merge" "$gitdir/rebase-apply" "$gitdir/sequencer" "$gitdir/info/grafts" \
    "$gitdir/objects/info/commit-graph" "$gitdir/objects/info/commit-graphs" \
    "$gitdir/objects/pack/multi-pack-index"
  for f in FETCH_HEAD ORIG_HEAD MERGE_HEAD MERGE_MSG MERGE_MODE CHERRY_PICK_HEAD REVERT_HEAD \
    AUTO_MERGE SQUASH_MSG COMMIT_EDITMSG TAG_EDITMSG BISECT_LOG BISECT_START BISECT_TERMS \
    BISECT_NAMES BISECT_EXPECTED_REV BISECT_ANCESTORS_OK; do rm -f "$gitdir/$f"; done
  find "$gitdir/objects/pack" -name '*.keep' -delete 2>/dev/null || true
  if [ -s "$gitdir/objects/info/alternates" ]; then
    git repack -a -d -q  # copy in the borrowed objects still needed, then drop the link
    rm -f "$gitdir/objects/info/alternates"
  fi
  git -c gc.reflogExpire=now -c gc.reflogExpireUnreachable=now -c gc.pruneExpire=now \
    -c gc.cruftPacks=false -c gc.worktreePruneExpire=now gc --prune=now --quiet
  # check: every object left is reachable from HEAD or the index
  git cat-file --batch-all-objects --batch-check='%(objectname)' | sort > "$state/.objects"
  git rev-list --objects --all --indexed-objects | cut -d' ' -f1 | sort -u > "$state/.reachable"
  left=$(comm -23 "$state/.objects" "$state/.reachable" | wc -l)
  rm -f "$state/.objects" "$state/.reachable"
  if [ "$left" != 0 ]; then echo "scrubbing left $left unreachable objects" >&2; exit 3; fi
fi
"""

# $1 state dir, $2 repo, $3 mode (cmd | tool), $4 payload (a command, or the helper's source),
# $5 1 = restart the session, $6 1 = keep /tmp across calls; the rest go to the helper.
SESSION_SCRIPT = r"""
__swe_state=$1; __swe_repo=$2; __swe_mode=$3; __swe_payload=$4; __swe_tmp=$6
if [ "$5" = 1 ]; then
  rm -f "$__swe_state/cwd" "$__swe_state/env" "$__swe_state/functions" "$__swe_state/tmp.tar"
fi
shift 6
mkdir -p "$__swe_state" 2>/dev/null
if [ -f "$__swe_state/env" ]; then . "$__swe_state/env" 2>/dev/null
elif [ -n "$__swe_init" ]; then eval "$__swe_init" >/dev/null 2>&1 </dev/null; fi
if [ -f "$__swe_state/functions" ]; then . "$__swe_state/functions" 2>/dev/null; fi
cd "$__swe_repo" 2>/dev/null
if [ -s "$__swe_state/cwd" ]; then cd "$(cat "$__swe_state/cwd")" 2>/dev/null || cd "$__swe_repo"; fi
if [ "$__swe_tmp" = 1 ] && [ -f "$__swe_state/tmp.tar" ]; then
  tar -xf "$__swe_state/tmp.tar" -C /tmp 2>/dev/null
fi
__swe_save() {
  mkdir -p "$__swe_state" 2>/dev/null
  pwd > "$__swe_state/cwd"
  export -p > "$__swe_state/env"
  declare -f > "$__swe_state/functions"
  if [ "$__swe_tmp" = 1 ]; then
    if [ -n "$(ls -A /tmp 2>/dev/null)" ] \
      && [ "$(du -skx /tmp 2>/dev/null | cut -f1)" -lt 65536 ]; then
      tar --one-file-system -cf "$__swe_state/tmp.tar" -C /tmp . 2>/dev/null
    else
      rm -f "$__swe_state/tmp.tar"
    fi
  fi
}
trap '__swe_save 2>/dev/null' EXIT
if [ "$__swe_mode" = tool ]; then
  command "$__swe_python" -I -c "$__swe_payload" "$@"
else
  exec 2>&1 </dev/null
  eval "$__swe_payload"
fi
"""


@dataclass(frozen=True)
class SandboxSpec:
    """How to start sandboxes for SWE tasks (from the env config)."""

    backend: str = "local"  # local | docker
    memory_mb: int = 2048
    max_processes: int = 128
    use_task_images: bool = True  # docker: run in the instance's image when it has one
    docker_host: str | None = None
    lifetime_s: float = 3600.0  # docker: the container ends itself after this long
    cpus: float | None = 1.0
    allow_unisolated: bool = False  # local: run without bwrap/cgroups/uid drop (warned)
    real_shell: bool = True  # a long-lived bash per episode (False: the emulation)

    def limits(self) -> SandboxLimits:
        return SandboxLimits(
            memory_mb=self.memory_mb,
            max_processes=self.max_processes,
            max_output_bytes=1024 * 1024,
            max_open_files=1024,
        )


@dataclass
class Workspace:
    """A sandbox holding a task's repository, plus the bash session's state."""

    sandbox: Sandbox
    repo_path: str  # absolute, as commands see it
    state_dir: str  # absolute, as commands see it
    python: str  # the interpreter that runs the tool helper
    persist_tmp: bool
    fresh_session: bool = False  # the next call restarts the session
    shell_init: str = ""  # run when the session (re)starts, e.g. a conda env's activation
    # one long-lived bash (sandbox.base.Shell) instead of the emulation
    real_shell: bool = False
    _shell: Any = None
    timings: dict[str, float] = field(default_factory=dict)

    def run(
        self, mode: str, payload: str, args: tuple[str, ...] = (), *, timeout: float
    ) -> ExecResult:
        """One call of the session: `mode` "cmd" runs `payload` in bash (stdout and stderr
        merged), "tool" runs the Python source `payload` with `args`."""
        start = time.monotonic()
        if self.real_shell:
            result = self._shell_run(mode, payload, args, timeout)
        else:
            argv = ["bash", "-c", SESSION_SCRIPT, "swe-session", self.state_dir, self.repo_path]
            argv += [mode, payload, "1" if self.fresh_session else "0"]
            argv += ["1" if self.persist_tmp else "0", *args]
            self.fresh_session = False
            env = ["env", f"__swe_python={self.python}", f"__swe_init={self.shell_init}"]
            result = self.sandbox.exec([*env, *argv], timeout)
            if result.timed_out:
                self.fresh_session = True
        self.timings["exec_s"] = self.timings.get("exec_s", 0.0) + time.monotonic() - start
        self.timings["execs"] = self.timings.get("execs", 0) + 1
        return result

    def _shell_run(
        self, mode: str, payload: str, args: tuple[str, ...], timeout: float
    ) -> ExecResult:
        """Through the long-lived shell (docker): started on first use and after it ended (a
        timeout, an `exit`): then it starts fresh, in the repository, its env re-initialised."""
        if self._shell is None or not self._shell.alive:
            self._shell = self.sandbox.start_shell(self.repo_path, self.shell_init)
        if mode == "tool":  # the helper runs in the shell too: any other exec would end it
            name = f"{STATE_DIR}/helper.py"  # written each time: the agent may have removed it
            self.sandbox.write_file(name, payload)
            words = [self.python, "-I", posixpath.join(self.sandbox.workdir, name), *args]
            payload = " ".join(shlex.quote(w) for w in words)
        result = self._shell.run(payload, timeout)
        if not self._shell.alive and not result.timed_out:  # `exit`, or the shell died
            note = b"\n[the shell exited: the next command starts a new one in the repository]"
            result = dataclasses.replace(result, stdout=result.stdout + note)
        return result

    def tool(self, helper_source: str, op: str, request: dict, *, timeout: float) -> dict:
        """Run one operation of the tool helper; its JSON answer (SandboxError if none)."""
        result = self.run("tool", helper_source, (op, json.dumps(request)), timeout=timeout)
        lines = result.stdout_text.strip().splitlines()
        try:
            answer = json.loads(lines[-1]) if lines else None
        except json.JSONDecodeError:
            answer = None
        if not isinstance(answer, dict):
            if result.timed_out:
                return {"ok": False, "message": f"the {op} tool timed out after {timeout:g} s"}
            detail = (result.stderr_text or result.stdout_text).strip()[-500:]
            return {"ok": False, "message": f"the {op} tool failed: {detail or 'no output'}"}
        return answer

    def close(self) -> None:
        if self._shell is not None:
            try:
                self._shell.close()
            except SandboxError:
                pass  # the sandbox goes next, and everything in it
        self.sandbox.close()


def _start_sandbox(instance: SWEInstance, spec: SandboxSpec) -> tuple[Sandbox, bool]:
    """A sandbox for `instance`; True when the repository is already inside (task image)."""
    limits = spec.limits()
    if spec.backend == "docker":
        in_image = spec.use_task_images and instance.image is not None
        if not in_image and instance.repo_dir is None:
            raise SandboxError(f"{instance.instance_id}: no repo_dir to copy and no image")
        options: dict[str, Any] = {
            "lifetime_s": spec.lifetime_s,
            "cpus": spec.cpus,
            "docker_host": spec.docker_host,
            "env": DOCKER_ENV,
        }
        if in_image:
            # The repository lives in the image's own file system: a writable root file system.
            # Images built here keep it writable by anyone, so commands run as the sandbox's
            # fresh unprivileged uid; other images run as root or as their own USER (SWE-bench's:
            # root), which has no capability but KILL yet can damage the container itself (then:
            # env_error).
            user = None if instance.image_user == "sandbox" else instance.image_user
            options.update(image=instance.image, workdir_mb=256, read_only=False, user=user)
        return make_sandbox("docker", limits=limits, **options), in_image
    if spec.backend != "local":
        raise ValueError(f"unknown sandbox backend {spec.backend!r}")
    if instance.repo_dir is None:
        raise SandboxError(f"{instance.instance_id}: the local backend needs a repo_dir")
    return make_sandbox("local", limits=limits, allow_unisolated=spec.allow_unisolated), False


def open_workspace(
    instance: SWEInstance, spec: SandboxSpec, *, scrub: bool, hide: str = "delete"
) -> Workspace:
    """Start a sandbox with the task's repository at its base commit (see the module doc).
    The instance's hidden paths are deleted ("delete": the agent's sandbox) or moved into the
    state dir's `hidden/` ("stash": the scorer's, whose test command runs them)."""
    if hide not in ("delete", "stash"):
        raise ValueError(f"hide must be delete or stash, got {hide!r}")
    if instance.verifier == "harbor":  # a container is the task: no repository to scrub
        if spec.backend != "docker":
            raise SandboxError(f"{instance.instance_id}: Harbor tasks need the docker backend")
        from envs.swe import harbor
        from sandbox.docker import resolve_docker_host, shared_client

        harbor.ensure_image(instance, shared_client(spec.docker_host or resolve_docker_host()))
        scrub = False
    start = time.monotonic()
    sandbox, in_image = _start_sandbox(instance, spec)
    started = time.monotonic()
    try:
        state_dir = posixpath.join(sandbox.workdir, STATE_DIR)
        tarball = ""
        if in_image:
            repo_path = instance.repo_path
        else:
            repo_path = posixpath.join(sandbox.workdir, REPO_DIR)
            assert instance.repo_dir is not None
            tarball = posixpath.join(state_dir, "repo.tar")
            sandbox.write_file(f"{STATE_DIR}/repo.tar", repo_tar(instance.repo_dir))
        base_patch = ""
        if instance.base_patch:
            base_patch = posixpath.join(state_dir, "base.patch")
            sandbox.write_file(f"{STATE_DIR}/base.patch", instance.base_patch)
        argv = ["bash", "-c", SETUP_SCRIPT, "swe-setup", state_dir, repo_path, tarball]
        argv += ["1" if scrub else "0", instance.base_branch or "", base_patch]
        argv += [hide, "\n".join(instance.hidden_paths), instance.expect_head or ""]
        result = sandbox.exec(argv, SETUP_TIMEOUT_S)
        if not result.ok:
            detail = (result.stderr_text + result.stdout_text).strip()[-800:]
            raise SandboxError(f"setting up the repository failed ({result.exit_code}): {detail}")
    except BaseException:
        sandbox.close()
        raise
    local = spec.backend == "local"
    return Workspace(
        sandbox=sandbox,
        repo_path=repo_path,
        state_dir=state_dir,
        python=sys.executable if local else "python3",
        persist_tmp=local and bool(getattr(sandbox, "use_bwrap", False)),
        shell_init=instance.shell_init,
        real_shell=spec.real_shell,
        timings={
            "sandbox_start_s": started - start,
            "repo_setup_s": time.monotonic() - started,
        },
    )


# ---------------------------------------------------------------------------------------------
# Leak check: the hidden tests and the oracle must not be in the agent's workspace

# Run in the sandbox: needle hashes come on stdin (never written to disk), hits go to stdout.
LEAK_SCAN = r"""
import hashlib, json, os, re, subprocess, sys
needles = json.loads(sys.stdin.read())
lines, names, paths = (set(needles[k]) for k in ("lines", "names", "paths"))
repo, roots = os.path.realpath(sys.argv[1]), sys.argv[1:]
word = re.compile(r"[A-Za-z_][A-Za-z0-9_]{5,}")
hits = []
def digest(text):
    return hashlib.sha256(text.encode("utf-8", "replace")).hexdigest()[:16]
def scan(text, kind, where):
    for line in text.splitlines():
        if len(line.strip()) >= 8 and digest(line.strip()) in lines:
            hits.append([digest(line.strip()), kind, where])
        hits.extend([digest(w), kind, where] for w in word.findall(line) if digest(w) in names)
def git(*args):
    return subprocess.run(("git", "-C", repo) + args, stdout=subprocess.PIPE).stdout
tracked = set(git("ls-files", "-z").decode("utf-8", "replace").split("\0"))
dirty = set(git("ls-files", "-z", "-m", "-d").decode("utf-8", "replace").split("\0"))
for path in tracked - {""}:
    if digest(path) in paths:
        hits.append([digest(path), "files", path])
for path in git("ls-files", "-z", "--others").decode("utf-8", "replace").split("\0"):
    if path and digest(path) in paths:
        hits.append([digest(path), "files", path])
done = set()
def same_device(path, device):
    try:
        return os.lstat(path).st_dev == device
    except OSError:
        return False
for root in roots:
    try:
        device = os.stat(root).st_dev  # not into other mounts (the Python prefix bound in /tmp)
    except OSError:
        continue
    for directory, dirs, files in os.walk(root):
        directory = os.path.realpath(directory)
        if directory in done or directory == os.path.join(repo, ".git", "objects"):
            dirs[:] = []
            continue
        done.add(directory)
        dirs[:] = [d for d in dirs if same_device(os.path.join(directory, d), device)]
        for name in files:
            full = os.path.join(directory, name)
            relative = os.path.relpath(full, repo)
            if relative in tracked and relative not in dirty or os.path.islink(full):
                continue  # clean: its content is a blob of HEAD's tree
            try:
                with open(full, "rb") as f:
                    scan(f.read(4 << 20).decode("utf-8", "replace"), "files", full)
            except OSError:
                pass
head = set(git("ls-tree", "-r", "-z", "HEAD").decode().replace("\t", " ").split("\0"))
head = {entry.split()[2] for entry in head if entry}
stream = subprocess.Popen(["git", "-C", repo, "cat-file", "--batch-all-objects", "--batch"],
                          stdout=subprocess.PIPE).stdout
while True:
    header = stream.readline().split()
    if len(header) < 3:
        break
    data = stream.read(int(header[2]) + 1)[:-1].decode("utf-8", "replace")
    sha = header[0].decode()
    scan(data, "head" if sha in head else "objects", "git object " + sha)
print(json.dumps(hits))
"""


def _patch_lines(patch: str) -> tuple[set[str], set[str]]:
    """(added, other) stripped lines of a patch's hunks."""
    added, other = set(), set()
    for line in patch.splitlines():
        if line.startswith(("+++", "---")):
            continue
        if line[:1] == "+":
            added.add(line[1:].strip())
        elif line[:1] in (" ", "-"):
            other.add(line[1:].strip())
    return added, other


def leak_needles(instance: SWEInstance) -> dict[str, tuple[str, str]]:
    """What would leak the task, by hash: hidden test names, the hidden tests' and the oracle's
    added lines (but for lines that the patches keep or remove: those are in the base), and
    the files the test patch creates. Hash -> (kind, text)."""
    needles: dict[str, tuple[str, str]] = {}

    def add(kind: str, text: str) -> None:
        needles[hashlib.sha256(text.encode()).hexdigest()[:16]] = (kind, text)

    for patch in (instance.test_patch, instance.patch):
        added, other = _patch_lines(patch)
        for line in added - other:
            if len(line) >= 12:
                add("line", line)
    added, other = _patch_lines(instance.test_patch)
    kept = {name for line in other for name in re.findall(r"def (test_\w+)", line)}
    for line in added:
        for name in re.findall(r"def (test_\w+)", line):
            if name not in kept:
                add("name", name)
    created = re.findall(r"^diff --git a/\S+ b/(\S+)\nnew file mode", instance.test_patch, re.M)
    for path in created:
        add("path", path)
    return needles


def find_leaks(workspace: Workspace, instance: SWEInstance, *, timeout: float = 120.0) -> list[str]:
    """Where the agent's workspace holds the hidden tests or the oracle patch: files of the
    repository that differ from HEAD, untracked ones, the sandbox's work dir, /tmp, $HOME,
    and every git object (a hidden test name anywhere, an added line outside HEAD's tree, a
    file the hidden tests create). Slow on big repositories (it reads every object)."""
    needles = leak_needles(instance)
    kinds = {"line": [], "name": [], "path": []}
    for digest, (kind, _) in needles.items():
        kinds[kind].append(digest)
    request = json.dumps({"lines": kinds["line"], "names": kinds["name"], "paths": kinds["path"]})
    script = 'exec "$0" -I -S -c "$1" "$2" "$3" /tmp "$HOME"'
    argv = ["bash", "-c", script, workspace.python, LEAK_SCAN, workspace.repo_path]
    argv.append(workspace.sandbox.workdir)
    result = workspace.sandbox.exec(argv, timeout, stdin=request)
    try:
        hits = json.loads(result.stdout_text.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        detail = (result.stderr_text or result.stdout_text).strip()[-500:]
        raise SandboxError(f"the leak check failed: {detail or 'no output'}") from None
    found = []
    for digest, where_kind, where in hits:
        kind, text = needles[digest]
        if kind == "name" or kind == "path" or where_kind != "head":
            found.append(f"{kind} {text!r} in {where}")
    return sorted(set(found))
