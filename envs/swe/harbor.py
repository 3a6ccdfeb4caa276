"""Harbor tasks (the Terminal-Bench 2 task format) in the SWE environment.

A task is a directory:
    instruction.md          what the agent is asked to do (its prompt)
    task.toml               [verifier] timeout_sec, [agent] timeout_sec, [environment]
                            docker_image (a prebuilt image; else environment/ is built)
    environment/Dockerfile  the container the agent works in (its WORKDIR is where it starts)
    tests/test.sh           the verifier; writes the reward to /logs/verifier/reward.txt
                            (or {"reward": x} to reward.json)
    solution/solve.sh       optional: the oracle, used to validate the task

There is no patch: the agent's container is the answer. When the episode ends, `tests/` is
uploaded to /tests (never before: the agent cannot read it), /logs/verifier is emptied (a
reward the agent planted is gone) and test.sh runs in that same container with the verifier's
timeout; a reward of 1 is resolved. The verifier runs where the agent worked, as Harbor runs it:
an agent with the image's root user can change what the verifier runs (its interpreter, its
tools); `integrity` says "in-place".
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import tarfile
from pathlib import Path
from typing import Any

from sandbox.base import SandboxError

DEFAULT_WORKDIR = "/app"
IMAGE_PREFIX = "cwm-rl-harbor"
LABEL = "cwm-rl.harbor-digest"
# make a root directory writable for its owner for one command (images' / may be 0555)
UPLOAD = r"""
set -e
dest=$1
parent=$(dirname "$dest"); mode=$(stat -c %a "$parent")
chmod u+w "$parent" 2>/dev/null || true
rm -rf "$dest"; mkdir -p "$dest"
chmod "$mode" "$parent" 2>/dev/null || true
base64 -d | tar -x -C "$dest"
"""
VERIFY = r"""
mode=$(stat -c %a /); chmod u+w / 2>/dev/null
rm -rf /logs/verifier; mkdir -p /logs/verifier
chmod "$mode" / 2>/dev/null
cd "$1" || exit 97
bash /tests/test.sh > /logs/verifier/test-output.txt 2>&1
echo "exit $?" >> /logs/verifier/test-output.txt
"""
READ = (
    "cat /logs/verifier/test-output.txt | tail -c 3000; echo '@@reward'; "
    "cat /logs/verifier/reward.txt 2>/dev/null; echo '@@json'; cat /logs/verifier/reward.json "
    "2>/dev/null"
)


def _toml(task: Path) -> dict[str, Any]:
    path = task / "task.toml"
    if not path.is_file():
        return {}
    try:
        import tomllib
    except ImportError:  # Python 3.10
        raise ValueError(f"{path}: reading Harbor tasks needs Python >= 3.11 (tomllib)") from None
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: not valid TOML: {e}") from None


def _workdir(dockerfile: Path) -> str:
    workdir = DEFAULT_WORKDIR
    if dockerfile.is_file():
        for line in dockerfile.read_text().splitlines():
            match = re.match(r"\s*WORKDIR\s+(\S+)", line, re.IGNORECASE)
            if match:
                workdir = match.group(1)
    return workdir


def environment_digest(task: Path) -> str:
    """A digest of the task's environment/ directory (the image is rebuilt when it changes)."""
    h = hashlib.sha256()
    for path in sorted((task / "environment").rglob("*")):
        if path.is_file():
            h.update(str(path.relative_to(task)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def task_record(task: Path) -> dict[str, Any]:
    """A native record for the Harbor task directory `task` (ValueError names what is missing)."""
    task = task.resolve()
    instruction = task / "instruction.md"
    if not instruction.is_file() or not instruction.read_text().strip():
        raise ValueError(f"{task}: no instruction.md")
    if not (task / "tests" / "test.sh").is_file():
        raise ValueError(f"{task}: no tests/test.sh")
    config = _toml(task)
    environment = config.get("environment", {})
    image = environment.get("docker_image")
    dockerfile = task / "environment" / "Dockerfile"
    if not image:
        if not dockerfile.is_file():
            raise ValueError(f"{task}: no environment/Dockerfile and no environment.docker_image")
        image = f"{IMAGE_PREFIX}/{task.name.lower()}:{environment_digest(task)}"
    verifier = config.get("verifier", {})
    return {
        "instance_id": task.name,
        "problem_statement": instruction.read_text().strip(),
        "image": image,
        "repo_path": _workdir(dockerfile),
        "image_user": "image",
        "test_cmd": "bash /tests/test.sh",
        "verifier": "harbor",
        "task_dir": str(task),
        "verifier_timeout_s": float(verifier.get("timeout_sec", 600.0)),
    }


def load_tasks(path: str | Path) -> list[dict[str, Any]]:
    """Records of a task directory, or of every task directory (one with task.toml or
    instruction.md) directly under `path`, in name order."""
    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"{root}: not a directory of Harbor tasks")
    if (root / "instruction.md").is_file():
        return [task_record(root)]
    tasks = [d for d in sorted(root.iterdir()) if (d / "instruction.md").is_file()]
    if not tasks:
        raise ValueError(f"{root}: no Harbor task directories (with instruction.md) in it")
    return [task_record(d) for d in tasks]


def ensure_image(instance: Any, client: Any) -> None:
    """Build the task's image from environment/ when it is missing (offline: no pulls)."""
    import docker

    try:
        client.images.get(instance.image)
        return
    except docker.errors.ImageNotFound:
        pass
    context = Path(instance.task_dir or "") / "environment"
    if not (context / "Dockerfile").is_file():
        raise SandboxError(f"image {instance.image!r} is missing and {context} has no Dockerfile")
    try:
        client.images.build(path=str(context), tag=instance.image, rm=True, network_mode="none")
    except (docker.errors.DockerException, OSError) as e:
        raise SandboxError(f"building {instance.image} from {context} failed: {e}") from e


def _tar_b64(directory: Path) -> str:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for path in sorted(directory.rglob("*")):
            info = tar.gettarinfo(str(path), arcname=str(path.relative_to(directory)))
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            if path.is_file():
                with open(path, "rb") as f:
                    tar.addfile(info, f)
            else:
                tar.addfile(info)
    return base64.b64encode(buffer.getvalue()).decode()


def upload(workspace: Any, directory: Path, dest: str, timeout: float = 60.0) -> None:
    result = workspace.sandbox.exec(
        ["bash", "-c", UPLOAD, "upload", dest], timeout, stdin=_tar_b64(directory)
    )
    if not result.ok:
        raise SandboxError(f"uploading {directory.name}/ to {dest} failed: {result.stderr_text}")


def run_solution(workspace: Any, instance: Any, timeout: float) -> str:
    """Run the task's solution/solve.sh in the workspace (validation's gold run)."""
    solution = Path(instance.task_dir or "") / "solution"
    if not (solution / "solve.sh").is_file():
        raise SandboxError(f"{instance.instance_id}: no solution/solve.sh to validate with")
    upload(workspace, solution, "/solution")
    done = workspace.sandbox.exec(
        ["bash", "-c", 'cd "$1" && bash /solution/solve.sh 2>&1', "solve", workspace.repo_path],
        timeout,
    )
    return done.stdout_text[-2000:]


def verify(workspace: Any, instance: Any) -> tuple[float | None, str]:
    """Upload tests/, run test.sh in the agent's container; (the reward, the output tail).
    The reward is None when the verifier wrote none (a crash, a timeout: not resolved)."""
    upload(workspace, Path(instance.task_dir or "") / "tests", "/tests")
    sandbox = workspace.sandbox
    sandbox.exec(["bash", "-c", VERIFY, "verify", workspace.repo_path], instance.verifier_timeout_s)
    out = sandbox.exec(["bash", "-c", READ], 30).stdout_text
    log, _, rest = out.partition("@@reward")
    text, _, raw_json = rest.partition("@@json")
    reward = None
    try:
        reward = float(text.strip()) if text.strip() else None
        if reward is None and raw_json.strip():
            reward = float(json.loads(raw_json)["reward"])
    except (ValueError, KeyError, TypeError):
        reward = None
    return reward, log.strip()
