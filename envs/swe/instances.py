"""SWE task instances: what one repository task holds, and reading them from JSONL.

An instance is a repository snapshot (a local git directory for the local backend, and/or a
container image holding it at `repo_path`), an issue text, the oracle patch, the hidden tests
(`test_patch`, applied only when scoring), the command that runs them and the test names that
decide "resolved" (FAIL_TO_PASS and PASS_TO_PASS, SWE-bench's semantics: all must pass).

The JSONL loader takes this project's field names and, where they exist, those of SWE-bench,
SWE-Gym and SWE-smith: `instance_id`, `problem_statement`, `patch`, `test_patch`,
`FAIL_TO_PASS` / `PASS_TO_PASS` (lists, or JSON strings of lists as SWE-bench ships them),
`base_commit`, `repo`, `image_name` (SWE-smith) / `image` / `docker_image`, and a test command
from `test_cmd` / `test_command` / `eval_cmd`. SWE-bench itself ships no test command (its
harness keeps one per repository version): give `default_test_cmd`, where `{test_files}` is
replaced by the files the test patch touches. Commands in an image run as root unless the record
says `"image_user": "sandbox"` (the images built here: their repository is writable by anyone).
The test command decides how far the verdict can be trusted (envs.swe.scoring): a command that
ends in `python -m unittest ARGS`, `python -m pytest ARGS` or `pytest ARGS` (plain words, after
optional `setup && ` commands) runs under the scorer's own runner and report; anything else is
judged from its output, which the code under test can forge (`integrity` "stdout").
"""

from __future__ import annotations

import functools
import io
import json
import logging
import os
import posixpath
import re
import shlex
import stat
import tarfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from envs.data import MAX_WARNINGS, DataError, read_records

logger = logging.getLogger(__name__)

DEFAULT_REPO_PATH = "/testbed"  # where SWE-bench style images keep the repository
ID_FIELDS = ("instance_id", "id")
PROBLEM_FIELDS = ("problem_statement", "problem", "issue")
PATCH_FIELDS = ("patch", "gold_patch", "oracle_patch")
IMAGE_FIELDS = ("image", "image_name", "docker_image")
TEST_CMD_FIELDS = ("test_cmd", "test_command", "eval_cmd")
GIT_DIFF_HEADER = re.compile(r"^diff --git a/(\S+) b/(\S+)$", re.MULTILINE)
PLUS_HEADER = re.compile(r"^\+\+\+ b/(\S+)", re.MULTILINE)


@dataclass(frozen=True)
class SWEInstance:
    """One repository task. `repo_dir` (absolute, local) and/or `image` must be set."""

    instance_id: str
    problem_statement: str
    patch: str  # the oracle fix
    test_patch: str  # adds/changes the hidden tests
    test_cmd: str  # shell command run in the repository root
    fail_to_pass: tuple[str, ...] = ()
    pass_to_pass: tuple[str, ...] = ()
    base_commit: str | None = None
    repo: str = ""  # "owner/name", informational
    repo_dir: str | None = None
    image: str | None = None
    repo_path: str = DEFAULT_REPO_PATH  # the repository inside `image`
    # who runs commands in `image`: "root"; "image" (the image's own USER, root where it sets
    # none: SWE-bench's images); or "sandbox" (a fresh unprivileged uid; images built here,
    # whose repository is writable by anyone)
    image_user: str = "root"
    # how the test output is read when the scorer's runner cannot run the command: None (unittest
    # -v / pytest -rA lines) or a parser of the SWE-bench harness (`parse_log_django`...),
    # graded as the harness grades (a skipped PASS_TO_PASS test is no regression)
    log_parser: str | None = None
    # where the episode starts when it is not the repository's HEAD (SWE-smith): `base_branch`
    # checked out where the repository has it, else `base_patch` applied to HEAD; either way
    # re-committed as a root commit, so the commit before (the fix) is unreachable and scrubbed
    base_branch: str | None = None
    base_patch: str = ""
    # shell commands the agent's bash session runs when it (re)starts: SWE-bench images' conda
    # env activation, so `python` is the repository's interpreter as in the harness
    shell_init: str = ""
    # paths of the image the agent must not reach (R2E-Gym's hidden tests, its test script):
    # deleted from the agent's sandbox before the episode; in the scoring sandbox moved out of
    # the repository into the scorer's state dir, which `{hidden}` in test_cmd names
    hidden_paths: tuple[str, ...] = ()
    # graded by comparison (R2E-Gym): every test's outcome (pass / fail / skip) must equal this
    # map, the same tests and no more (None: FAIL_TO_PASS / PASS_TO_PASS)
    expected: dict | None = None
    # "harbor": a Harbor task (envs/swe/harbor.py): no patch; the agent's container is the
    # answer, verified in place by the task's tests/test.sh after the episode
    verifier: str | None = None
    task_dir: str | None = None  # harbor: the task directory (tests/, solution/, environment/)
    verifier_timeout_s: float = 600.0
    # the commit the image's repository must be at (SWE-bench: base_commit); a mismatch fails
    # the set-up loudly instead of training on the wrong code
    expect_head: str | None = None
    extra: dict = field(default_factory=dict)  # other fields of the record, kept for analysis

    def __post_init__(self) -> None:
        if not self.instance_id:
            raise ValueError("instance_id must be non-empty")
        if self.repo_dir is None and self.image is None:
            raise ValueError("needs a repository: 'repo_dir' (local) or an image field")
        if not self.test_cmd.strip():
            raise ValueError("test command is empty")
        for path in self.hidden_paths:
            if not path.startswith("/") or posixpath.normpath(path) != path or path == "/":
                raise ValueError(f"hidden path {path!r} must be an absolute, normal path")
        if self.verifier not in (None, "harbor"):
            raise ValueError(f"verifier must be None or 'harbor', got {self.verifier!r}")
        if self.image_user not in ("root", "image", "sandbox"):
            raise ValueError(f"image_user must be root, image or sandbox, got {self.image_user!r}")

    @property
    def test_files(self) -> tuple[str, ...]:
        """Files the test patch touches (reset to the base before it is applied)."""
        return patch_paths(self.test_patch)

    def to_payload(self) -> dict:
        """A plain dict for Task.payload (JSON- and Ray-serialisable)."""
        payload = asdict(self)
        for key in ("fail_to_pass", "pass_to_pass", "hidden_paths"):
            payload[key] = list(getattr(self, key))
        return payload

    @classmethod
    def from_payload(cls, payload: Mapping) -> SWEInstance:
        known = {k: v for k, v in payload.items() if k in cls.__dataclass_fields__}
        for key in ("fail_to_pass", "pass_to_pass", "hidden_paths"):
            known[key] = tuple(known.get(key, ()))
        return cls(**known)


def patch_paths(test_patch: str) -> tuple[str, ...]:
    """Paths a patch touches (old and new names), in order of appearance."""
    paths: list[str] = []
    for old, new in GIT_DIFF_HEADER.findall(test_patch):
        paths += [old, new]
    if not paths:
        paths = PLUS_HEADER.findall(test_patch)
    return tuple(dict.fromkeys(paths))


def _first(record: Mapping, names: tuple[str, ...]) -> Any:
    for name in names:
        if record.get(name) not in (None, ""):
            return record[name]
    return None


def _test_names(record: Mapping, upper: str) -> tuple[str, ...]:
    value = record.get(upper, record.get(upper.lower()))
    if value in (None, ""):
        return ()
    if isinstance(value, str):  # SWE-bench ships these as JSON-encoded strings
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise ValueError(f"field '{upper}' is a string but not a JSON list") from None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"field '{upper}' must be a list of test names")
    return tuple(value)


def instance_from_record(
    record: Any, *, base_dir: Path | None = None, default_test_cmd: str | None = None
) -> SWEInstance:
    """An instance from one JSON record; ValueError says which field is wrong."""
    if isinstance(record, Exception):  # an unparseable line, as envs.data reports it
        raise ValueError(str(record))
    if not isinstance(record, Mapping):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    instance_id = _first(record, ID_FIELDS)
    if not isinstance(instance_id, str | int):
        raise ValueError("missing field 'instance_id'")
    problem = _first(record, PROBLEM_FIELDS)
    if not isinstance(problem, str) or not problem.strip():
        raise ValueError("field 'problem_statement' must be a non-empty string")
    oracle = _first(record, PATCH_FIELDS)
    if record.get("verifier") == "harbor" and oracle is None:
        oracle = ""  # verified in place: the oracle is the task's solution/, not a patch
    elif not isinstance(oracle, str) or not oracle.strip():
        raise ValueError("field 'patch' (the oracle patch) must be a non-empty string")
    test_patch = record.get("test_patch") or ""
    if not isinstance(test_patch, str):
        raise ValueError("field 'test_patch' must be a string")
    test_cmd = _first(record, TEST_CMD_FIELDS)
    if test_cmd is None and default_test_cmd is not None:
        files = " ".join(shlex.quote(p) for p in patch_paths(test_patch))
        test_cmd = default_test_cmd.replace("{test_files}", files)
    if not isinstance(test_cmd, str) or not test_cmd.strip():
        raise ValueError("no test command: field 'test_cmd' (or config default_test_cmd)")
    repo_dir = record.get("repo_dir")
    if repo_dir is not None:
        if not isinstance(repo_dir, str):
            raise ValueError("field 'repo_dir' must be a string")
        path = Path(repo_dir)
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        if not (path / ".git").exists():
            raise ValueError(f"repo_dir {str(path)!r} is not a git repository")
        repo_dir = str(path.resolve())
    image = _first(record, IMAGE_FIELDS)
    if image is not None and not isinstance(image, str):
        raise ValueError("field 'image' must be a string")
    known = set(ID_FIELDS + PROBLEM_FIELDS + PATCH_FIELDS + IMAGE_FIELDS + TEST_CMD_FIELDS)
    known |= {"test_patch", "FAIL_TO_PASS", "PASS_TO_PASS", "fail_to_pass", "pass_to_pass"}
    known |= {"base_commit", "repo", "repo_dir", "repo_path", "image_user", "log_parser"}
    known |= {"base_branch", "base_patch", "shell_init", "hidden_paths", "expected"}
    known |= {"verifier", "task_dir", "verifier_timeout_s", "expect_head"}
    extra = {k: v for k, v in record.items() if k not in known}
    return SWEInstance(
        instance_id=str(instance_id),
        problem_statement=problem,
        patch=oracle,
        test_patch=test_patch,
        test_cmd=test_cmd,
        fail_to_pass=_test_names(record, "FAIL_TO_PASS"),
        pass_to_pass=_test_names(record, "PASS_TO_PASS"),
        base_commit=record.get("base_commit"),
        repo=str(record.get("repo") or ""),
        repo_dir=repo_dir,
        image=image,
        repo_path=str(record.get("repo_path") or DEFAULT_REPO_PATH),
        image_user=str(record.get("image_user") or "root"),
        log_parser=record.get("log_parser") or None,
        base_branch=record.get("base_branch") or None,
        base_patch=str(record.get("base_patch") or ""),
        shell_init=str(record.get("shell_init") or ""),
        hidden_paths=tuple(record.get("hidden_paths") or ()),
        expected=record.get("expected") or None,
        verifier=record.get("verifier") or None,
        task_dir=record.get("task_dir") or None,
        verifier_timeout_s=float(record.get("verifier_timeout_s") or 600.0),
        expect_head=record.get("expect_head") or None,
        extra=extra,
    )


def load_instances(
    path: str | os.PathLike,
    *,
    default_test_cmd: str | None = None,
    on_bad_line: str = "skip",
    record_format: str = "native",
    **adapter_options: Any,
) -> list[SWEInstance]:
    """Instances of a JSONL file (relative `repo_dir`s are relative to the file's directory),
    each record read by the `record_format` adapter (envs.swe.sources, with `adapter_options`).
    A bad record is reported as `path:line: why` and skipped, or raised with "error"."""
    from envs.swe.sources import ADAPTERS

    adapt = ADAPTERS[record_format]
    base_dir = Path(path).resolve().parent
    instances: list[SWEInstance] = []
    seen: set[str] = set()
    skipped = 0
    for origin, record in read_records(path):
        try:
            if isinstance(record, Mapping):
                record = adapt(record, **adapter_options)
            instance = instance_from_record(
                record, base_dir=base_dir, default_test_cmd=default_test_cmd
            )
            if instance.instance_id in seen:
                raise ValueError(f"duplicate instance_id {instance.instance_id!r}")
        except (ValueError, TypeError) as e:
            message = f"{origin}: {e}"
            if on_bad_line == "error":
                raise DataError(message) from None
            skipped += 1
            if skipped <= MAX_WARNINGS:
                logger.warning("skipping bad SWE instance %s", message)
            continue
        seen.add(instance.instance_id)
        instances.append(instance)
    if skipped:
        logger.warning("%s: skipped %d bad instance(s), loaded %d", path, skipped, len(instances))
    return instances


# ---------------------------------------------------------------------------------------------
# The repository as a tar archive (copied into a sandbox, or baked into an image)


def _add_tree(tar: tarfile.TarFile, root: Path, prefix: str) -> None:
    """Add `root`'s files (sorted, fixed mtime and owner: the archive is deterministic)."""
    entries = []
    for directory, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in [*dirnames, *sorted(filenames)]:
            entries.append(Path(directory) / name)
    for full in sorted(entries, key=lambda p: p.relative_to(root).as_posix()):
        relative = full.relative_to(root).as_posix()
        info = tarfile.TarInfo(f"{prefix}{relative}")
        st = full.lstat()
        info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
        if stat.S_ISLNK(st.st_mode):
            info.type, info.linkname, info.mode = tarfile.SYMTYPE, os.readlink(full), 0o777
            tar.addfile(info)
        elif stat.S_ISDIR(st.st_mode):
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        elif stat.S_ISREG(st.st_mode):
            info.mode = 0o755 if st.st_mode & 0o111 else 0o644
            info.size = st.st_size
            with open(full, "rb") as f:
                tar.addfile(info, f)


@functools.lru_cache(maxsize=64)
def repo_tar(repo_dir: str, prefix: str = "") -> bytes:
    """The repository directory (with its .git) as a deterministic tar archive; member names
    start with `prefix` (e.g. "testbed/")."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        if prefix:
            info = tarfile.TarInfo(prefix.rstrip("/"))
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 0
            tar.addfile(info)
        _add_tree(tar, Path(repo_dir), prefix)
    return buffer.getvalue()
