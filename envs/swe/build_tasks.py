"""Build SWE tasks offline, from scratch: small Python repositories with one injected bug each.

    python -m envs.swe.build_tasks OUT_DIR [--verify] [--images] [--docker-host URL]

For each bug of each project in envs.swe.projects, OUT_DIR/repos/<instance_id>/ becomes a git
repository whose `main` branch holds the buggy package and its visible tests (two commits with
fixed authors and dates, so commit ids are the same on every machine). To make scrubbing
testable the repository also holds what a real clone could leak: a `fix/<bug>` branch and a
tag with the fix, and an `origin` remote; the environment deletes them before the agent starts.
OUT_DIR/instances.jsonl lists the instances in SWE-bench's field names plus `repo_dir`,
`test_cmd` and `image`; hidden tests exist only there (as `test_patch`), and the file is
readable by its owner only. `--verify` runs each instance's tests on this machine before and
after the oracle patch (FAIL_TO_PASS must fail before, everything pass after). `--images` also
imports one container image per instance (the host image's root file system plus the
repository at /testbed, writable by any uid so that the sandbox's unprivileged user can work in
it) through the Docker API (Podman's in tests and CI).

`ensure_tasks()` builds into the cache on first use ($CWM_RL_CACHE, else
$XDG_CACHE_HOME/cwm-rl, else ~/.cache/cwm-rl), renaming a finished build into place.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

from envs.swe.catalog import Bug, Project
from envs.swe.instances import SWEInstance, load_instances, repo_tar

BUILD_VERSION = 1  # bump when the built tasks change: the cache then builds afresh
INSTANCES_FILE = "instances.jsonl"
HIDDEN_TEST_FILE = "tests/test_regression.py"
HIDDEN_TEST_CLASS = "RegressionTest"
IMAGE_PREFIX = "cwm-rl/swe-"
DIGEST_LABEL = "cwm-rl.swe-repo-digest"
IMAGE_LAYOUT = 2  # bump when image_rootfs changes: images with an older digest are rebuilt
GIT_DATE = "2024-01-01T12:00:00+00:00"
GIT_ENV = {
    "GIT_AUTHOR_NAME": "cwm-rl",
    "GIT_AUTHOR_EMAIL": "tasks@cwm-rl.invalid",
    "GIT_COMMITTER_NAME": "cwm-rl",
    "GIT_COMMITTER_EMAIL": "tasks@cwm-rl.invalid",
    "GIT_AUTHOR_DATE": GIT_DATE,
    "GIT_COMMITTER_DATE": GIT_DATE,
    "GIT_CONFIG_GLOBAL": os.devnull,
    "GIT_CONFIG_NOSYSTEM": "1",
    "LC_ALL": "C",
}
TEST_METHOD = re.compile(r"^    def (test_\w+)\(self\)", re.MULTILINE)


def cache_root() -> Path:
    """cwm-rl's cache: $CWM_RL_CACHE, else $XDG_CACHE_HOME/cwm-rl, else ~/.cache/cwm-rl (the
    same rule as model.default_model, which imports torch)."""
    if os.environ.get("CWM_RL_CACHE"):
        return Path(os.environ["CWM_RL_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "cwm-rl"


def default_tasks_dir() -> Path:
    return cache_root() / f"swe-tasks-v{BUILD_VERSION}"


# ---------------------------------------------------------------------------------------------
# Repository content


def _git(repo: Path, *args: str) -> str:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(repo), **GIT_ENV}
    done = subprocess.run(
        ["git", "-c", "init.defaultBranch=main", "-c", "commit.gpgsign=false", *args],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed in {repo}: {done.stderr.strip()}")
    return done.stdout


def _test_module(project: Project) -> str:
    return f"tests.test_{project.module}"


def _test_class(project: Project) -> str:
    return f"{project.module.capitalize()}Test"


def unittest_module(project: Project, class_name: str, methods: str) -> str:
    """A unittest module testing `project` with these test methods."""
    return (
        f"import unittest\n\nfrom {project.name}.{project.module} import "
        f"{', '.join(project.exports)}\n\n\nclass {class_name}(unittest.TestCase):\n"
        f"{methods.rstrip()}\n\n\nif __name__ == '__main__':\n    unittest.main()\n"
    )


def unittest_names(module: str, class_name: str, methods: str) -> list[str]:
    return [f"{module}.{class_name}.{name}" for name in TEST_METHOD.findall(methods)]


def buggy_source(project: Project, bug: Bug) -> str:
    if project.source.count(bug.fixed) != 1:
        raise ValueError(f"{project.name}/{bug.name}: the fixed text must occur exactly once")
    return project.source.replace(bug.fixed, bug.buggy)


def new_file_patch(path: str, content: str) -> str:
    """A git-style patch that creates `path` with `content` (ending in a newline)."""
    lines = content.splitlines()
    body = "".join(f"+{line}\n" for line in lines)
    return (
        f"diff --git a/{path} b/{path}\nnew file mode 100644\n--- /dev/null\n+++ b/{path}\n"
        f"@@ -0,0 +1,{len(lines)} @@\n{body}"
    )


def _write(root: Path, files: dict[str, str]) -> None:
    for relative, content in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)


def build_repository(project: Project, bug: Bug, repo: Path) -> dict[str, Any]:
    """Create the task's git repository; return its instance record (without repo_dir)."""
    package = project.name
    init = (
        f'"""{project.summary}"""\n\nfrom {package}.{project.module} import '
        f"{', '.join(project.exports)}\n\n__all__ = {list(project.exports)!r}\n"
    )
    _write(
        repo,
        {
            "README.md": f"# {package}\n\n{project.summary}\n\nTests: `python3 -m unittest -v`\n",
            "pyproject.toml": f'[project]\nname = "{package}"\nversion = "0.1.0"\n',
            ".gitignore": "__pycache__/\n*.pyc\n",
            f"{package}/__init__.py": init,
            f"{package}/{project.module}.py": buggy_source(project, bug),
        },
    )
    _git(repo, "init", "-q")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", f"Initial version of {package}")
    visible = unittest_module(project, _test_class(project), project.visible_tests)
    _write(repo, {"tests/__init__.py": "", f"tests/test_{project.module}.py": visible})
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "Add tests")
    base_commit = _git(repo, "rev-parse", "HEAD").strip()
    # What a real clone could leak, for the environment to scrub: the fix on a branch and a tag.
    title = bug.issue.split("\n", 1)[0]
    _git(repo, "checkout", "-q", "-b", f"fix/{bug.name}")
    _write(repo, {f"{package}/{project.module}.py": project.source})
    _git(repo, "commit", "-q", "-am", f"Fix: {title}")
    fix_commit = _git(repo, "rev-parse", "HEAD").strip()
    _git(repo, "tag", "v0.1.1")
    _git(repo, "remote", "add", "origin", f"https://git.invalid/{package}.git")
    _git(repo, "update-ref", "refs/remotes/origin/main", fix_commit)
    oracle = _git(repo, "diff", base_commit, fix_commit)
    _git(repo, "checkout", "-q", "main")
    hidden_methods = bug.fail_to_pass.rstrip() + "\n\n" + bug.pass_to_pass
    hidden = unittest_module(project, HIDDEN_TEST_CLASS, hidden_methods)
    hidden_module = HIDDEN_TEST_FILE[: -len(".py")].replace("/", ".")
    visible_names = unittest_names(
        _test_module(project), _test_class(project), project.visible_tests
    )
    return {
        "instance_id": f"{package}__{bug.name}",
        "repo": f"cwm-rl/{package}",
        "base_commit": base_commit,
        "problem_statement": bug.issue,
        "patch": oracle,
        "test_patch": new_file_patch(HIDDEN_TEST_FILE, hidden),
        "FAIL_TO_PASS": unittest_names(hidden_module, HIDDEN_TEST_CLASS, bug.fail_to_pass),
        "PASS_TO_PASS": unittest_names(hidden_module, HIDDEN_TEST_CLASS, bug.pass_to_pass)
        + visible_names,
        "test_cmd": f"python3 -m unittest -v {_test_module(project)} {hidden_module}",
        "version": "0.1",
        "created_at": GIT_DATE,
    }


def build_tasks(out_dir: str | os.PathLike, *, projects: tuple[Project, ...] | None = None) -> Path:
    """Build every task into `out_dir` (which must not exist or be empty); returns the JSONL."""
    from envs.swe.projects import PROJECTS

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty")
    out.mkdir(parents=True, exist_ok=True)
    out.chmod(0o700)  # the instances hold the hidden tests
    records = []
    for project in projects or PROJECTS:
        for bug in project.bugs:
            instance_id = f"{project.name}__{bug.name}"
            repo = out / "repos" / instance_id
            repo.mkdir(parents=True)
            record = build_repository(project, bug, repo)
            record["repo_dir"] = f"repos/{instance_id}"
            record["image"] = f"{IMAGE_PREFIX}{instance_id}:latest"
            record["image_user"] = "sandbox"  # see image_rootfs: the repository is writable
            records.append(record)
    jsonl = out / INSTANCES_FILE
    fd = os.open(jsonl, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        for record in records:
            f.write(json.dumps(record, sort_keys=True) + "\n")
    return jsonl


def ensure_tasks(tasks_dir: str | os.PathLike | None = None) -> Path:
    """The built tasks' JSONL in `tasks_dir` (default: the cache), building it when missing."""
    target = Path(tasks_dir) if tasks_dir is not None else default_tasks_dir()
    jsonl = target / INSTANCES_FILE
    if jsonl.exists():
        return jsonl
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    try:
        build_tasks(scratch / "tasks")
        try:
            os.rename(scratch / "tasks", target)
        except OSError:
            if not jsonl.exists():  # not a concurrent build that won the race
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return jsonl


# ---------------------------------------------------------------------------------------------
# Checks and images


def verify_instance(instance: SWEInstance, timeout_s: float = 60.0) -> list[str]:
    """Run the instance's tests here, before and after the oracle patch; the problems found."""
    from envs.swe.scoring import parse_test_output

    problems = []
    assert instance.repo_dir is not None
    env = {
        "PATH": f"{os.path.dirname(sys.executable)}:/usr/bin:/bin",
        "PYTHONDONTWRITEBYTECODE": "1",
        **{k: v for k, v in GIT_ENV.items() if k.startswith("GIT_CONFIG")},
    }
    with tempfile.TemporaryDirectory(prefix="cwm-swe-verify-") as tmp:
        work = Path(tmp) / "repo"
        shutil.copytree(instance.repo_dir, work, symlinks=True)
        patches = Path(tmp) / "test.patch", Path(tmp) / "oracle.patch"
        patches[0].write_text(instance.test_patch)
        patches[1].write_text(instance.patch)
        for stage in ("before", "after"):
            steps = [["git", "apply", str(patches[0])]] if stage == "before" else []
            steps += [["git", "apply", str(patches[1])]] if stage == "after" else []
            for step in steps:
                subprocess.run(step, cwd=work, env=env, check=True, capture_output=True)
            done = subprocess.run(
                ["bash", "-c", instance.test_cmd],
                cwd=work,
                env=env,
                capture_output=True,
                text=True,
                timeout=timeout_s,
            )
            results = parse_test_output(done.stdout + done.stderr)
            for name in instance.fail_to_pass:
                expected = "fail" if stage == "before" else "pass"
                if (results.get(name) == "pass") != (expected == "pass"):
                    problems.append(f"{stage}: {name} is {results.get(name)}, not {expected}")
            for name in instance.pass_to_pass:
                if results.get(name) != "pass":
                    problems.append(f"{stage}: {name} is {results.get(name)}, not pass")
    return problems


def image_rootfs(instance: SWEInstance) -> bytes:
    """The host image's root file system plus the repository at /testbed, as one tar."""
    from sandbox.images import host_rootfs_tar

    assert instance.repo_dir is not None
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as out:
        with tarfile.open(fileobj=io.BytesIO(host_rootfs_tar())) as base:
            for member in base.getmembers():
                out.addfile(member, base.extractfile(member) if member.isfile() else None)
        prefix = instance.repo_path.strip("/") + "/"
        with tarfile.open(fileobj=io.BytesIO(repo_tar(instance.repo_dir, prefix))) as repo:
            for member in repo.getmembers():
                # writable by any uid: the sandbox runs commands as a fresh unprivileged one
                member.mode |= 0o777 if member.isdir() else 0o666
                out.addfile(member, repo.extractfile(member) if member.isfile() else None)
    return buffer.getvalue()


def build_images(
    instances: list[SWEInstance], client: Any = None, *, rebuild: bool = False
) -> list[str]:
    """Import each instance's image (skipped when one with the same repository digest exists);
    returns the names built. `client`: a docker-py client (default: the sandbox's)."""
    import hashlib

    import docker

    from sandbox.docker import resolve_docker_host, shared_client
    from sandbox.images import HOST_MOUNTS_LABEL, IMAGE_ENV, import_rootfs

    client = client or shared_client(resolve_docker_host())
    built = []
    for instance in instances:
        if instance.image is None or instance.repo_dir is None:
            continue
        content = repo_tar(instance.repo_dir) + f"{IMAGE_LAYOUT}:{instance.repo_path}".encode()
        digest = hashlib.sha256(content).hexdigest()[:16]
        if not rebuild:
            try:
                labels = client.images.get(instance.image).labels or {}
                if labels.get(DIGEST_LABEL) == digest:
                    continue
            except docker.errors.ImageNotFound:
                pass
        changes = [
            f"LABEL {HOST_MOUNTS_LABEL}=/usr",
            f"LABEL {DIGEST_LABEL}={digest}",
            f"ENV {IMAGE_ENV}",
            f"WORKDIR {instance.repo_path}",
            'CMD ["/bin/sh"]',
        ]
        import_rootfs(client, image_rootfs(instance), changes, instance.image)
        built.append(instance.image)
    return built


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", nargs="?", help="where to build (default: the cache)")
    parser.add_argument("--verify", action="store_true", help="run the tests before/after")
    parser.add_argument("--images", action="store_true", help="also import container images")
    args = parser.parse_args(argv)
    start = time.monotonic()
    if args.out_dir is None:
        jsonl = ensure_tasks()
    else:
        jsonl = build_tasks(args.out_dir)
    instances = load_instances(jsonl, on_bad_line="error")
    print(f"{len(instances)} tasks in {jsonl} ({time.monotonic() - start:.1f} s)")
    failed = 0
    if args.verify:
        for instance in instances:
            for problem in verify_instance(instance):
                failed += 1
                print(f"{instance.instance_id}: {problem}", file=sys.stderr)
        print(f"verified: {len(instances)} tasks, {failed} problem(s)")
    if args.images:
        start = time.monotonic()
        built = build_images(instances)
        print(f"images: {len(built)} built ({time.monotonic() - start:.1f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
