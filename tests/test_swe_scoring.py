"""Scoring submitted patches in fresh sandboxes (envs.swe.scoring), local and docker backends.
Attacks on the scorer itself are in test_swe_integrity.py."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time

import pytest
from conftest import require

from envs.swe.build_tasks import build_images, build_tasks
from envs.swe.instances import load_instances
from envs.swe.scoring import score_patch
from envs.swe.workspace import SandboxSpec
from rewards.patch import similarity
from sandbox.local import bwrap_path

pytestmark = pytest.mark.timeout(180)

LOCAL = SandboxSpec(backend="local", memory_mb=1024)


@pytest.fixture(scope="module")
def instances(tmp_path_factory):
    require("bwrap", bwrap_path() is not None, "bubblewrap is not installed")
    return load_instances(build_tasks(tmp_path_factory.mktemp("swe") / "tasks"))


def by_id(instances, instance_id):
    return next(i for i in instances if i.instance_id == instance_id)


def near_miss(instance) -> str:
    """The oracle's place, left buggy: a comment on each line the oracle removes, or (an oracle
    that only adds lines) its added lines commented out."""
    removed: dict[str, list[str]] = {}
    for line in instance.patch.splitlines():
        if line.startswith("--- a/"):
            path = line[len("--- a/") :]
        elif line.startswith("-") and not line.startswith("---"):
            removed.setdefault(path, []).append(line[1:])
    if not removed:
        return re.sub(r"^\+(\s*)(?=[^\s+])", r"+\1# ", instance.patch, flags=re.M)
    with tempfile.TemporaryDirectory() as tmp:
        work = os.path.join(tmp, "repo")
        shutil.copytree(instance.repo_dir, work, symlinks=True)
        for path, lines in removed.items():
            with open(os.path.join(work, path)) as f:
                text = f.read()
            for line in lines:
                text = text.replace(line + "\n", line + "  # handled\n", 1)
            with open(os.path.join(work, path), "w") as f:
                f.write(text)
        return subprocess.run(["git", "diff"], cwd=work, capture_output=True, text=True).stdout


def test_oracle_patch_scores_plus_one_on_every_task(instances) -> None:
    start = time.monotonic()
    verdicts = {i.instance_id: score_patch(i, i.patch, LOCAL) for i in instances}
    took = time.monotonic() - start
    wrong = {
        k: (v.reward, v.error, v.log_tail[-300:]) for k, v in verdicts.items() if v.reward != 1.0
    }
    assert wrong == {}
    assert all(v.resolved and v.applied and v.similarity == 1.0 for v in verdicts.values())
    assert all(v.integrity == "report" and not v.tampering for v in verdicts.values())
    print(f"scored {len(instances)} oracle patches in {took:.1f} s")


def test_empty_patch_scores_minus_one_and_hidden_tests_fail(instances) -> None:
    for instance in instances[::6]:
        verdict = score_patch(instance, "", LOCAL)
        assert (verdict.reward, verdict.status, verdict.resolved) == (-1.0, "ok", False)
        failing = [n for n in instance.fail_to_pass if verdict.tests.get(n) != "pass"]
        assert failing == list(instance.fail_to_pass)  # all ran and failed
        assert all(verdict.tests[n] == "pass" for n in instance.pass_to_pass)


def test_near_miss_scores_zero_on_every_task(instances) -> None:
    verdicts = {i.instance_id: score_patch(i, near_miss(i), LOCAL) for i in instances}
    wrong = {k: (v.reward, v.similarity, v.applied) for k, v in verdicts.items() if v.reward != 0}
    assert wrong == {}
    assert all(v.applied and not v.resolved and not v.tampering for v in verdicts.values())


def test_wrong_patch_scores_minus_one(instances) -> None:
    instance = by_id(instances, "numerals__zero-range")
    wrong = (
        "diff --git a/README.md b/README.md\n--- a/README.md\n+++ b/README.md\n"
        "@@ -1,1 +1,1 @@\n-# numerals\n+# numerals (fixed!)\n"
    )
    verdict = score_patch(instance, wrong, LOCAL)
    assert verdict.applied and not verdict.resolved
    assert verdict.similarity == 0.0 and verdict.reward == -1.0


def test_near_miss_scores_zero(instances) -> None:
    # The right line of the right file, changed the wrong way: tests fail, similarity is high.
    instance = by_id(instances, "numerals__zero-range")
    near = instance.patch.replace(
        "+    if not 0 < number < 4000:", "+    if not 0 <= number <= 4000:"
    )
    assert near != instance.patch
    verdict = score_patch(instance, near, LOCAL)
    assert verdict.applied and not verdict.resolved
    assert verdict.similarity == pytest.approx(similarity(near, instance.patch))
    assert 0.5 <= verdict.similarity < 1.0
    assert verdict.reward == 0.0
    # the threshold and scale are configurable
    assert score_patch(instance, near, LOCAL, threshold=1.0, scale=2.0).reward == -2.0
    assert score_patch(instance, instance.patch, LOCAL, scale=2.0).reward == 2.0


def test_patch_that_does_not_apply_is_not_resolved(instances) -> None:
    instance = by_id(instances, "statskit__mode-ties")
    lines = instance.patch.split("\n")
    removed = next(k for k, line in enumerate(lines) if line.startswith("-") and line[1:2] != "-")
    lines[removed] += "  # not in the file"
    broken = "\n".join(lines)
    verdict = score_patch(instance, broken, LOCAL)
    assert not verdict.applied and not verdict.resolved
    assert verdict.reward == 0.0  # still close to the oracle: similarity decides
    assert score_patch(instance, "not a patch at all", LOCAL).reward == -1.0


def test_hidden_tests_cannot_be_replaced_by_the_patch(instances) -> None:
    # A patch that writes its own (passing) tests/test_regression.py: the hidden file wins.
    instance = by_id(instances, "textkit__wrap-last-line")
    fake = (
        "diff --git a/tests/test_regression.py b/tests/test_regression.py\nnew file mode 100644\n"
        "--- /dev/null\n+++ b/tests/test_regression.py\n@@ -0,0 +1,6 @@\n+import unittest\n+\n"
        "+\n+class RegressionTest(unittest.TestCase):\n+    def test_wrap_keeps_last_line(self):\n"
        "+        pass\n"
    )
    verdict = score_patch(instance, fake, LOCAL)
    assert verdict.applied and not verdict.resolved and verdict.reward == -1.0


def test_sandbox_failure_is_env_error_not_a_score(instances) -> None:
    spec = SandboxSpec(backend="docker", docker_host="unix:///nonexistent/docker.sock")
    verdict = score_patch(instances[0], instances[0].patch, spec)
    assert verdict.status == "env_error" and verdict.reward is None
    assert "nonexistent" in verdict.error


def test_hanging_tests_fail_within_the_scoring_timeout(instances) -> None:
    instance = by_id(instances, "statskit__median-even")
    hang = instance.patch.replace(
        "+    return (ordered[middle - 1] + ordered[middle]) / 2",
        "+    while True:\n+        pass",
    )  # the hunk's line counts are now wrong: applied by the `git apply --recount` fallback
    assert hang != instance.patch
    start = time.monotonic()
    verdict = score_patch(instance, hang, LOCAL, timeout_s=5)
    assert time.monotonic() - start < 20
    assert verdict.status == "ok" and not verdict.resolved and verdict.reward in (0.0, -1.0)


# ---------------------------------------------------------------------------------------------
# Docker backend (Podman's Docker API)


@pytest.fixture(scope="module")
def docker_instances(instances):
    from sandbox.docker import docker_unavailable_reason, resolve_docker_host, shared_client
    from sandbox.images import HOST_IMAGE, ensure_image

    reason = docker_unavailable_reason()
    require("docker", reason is None, reason or "")
    ensure_image(shared_client(resolve_docker_host()), HOST_IMAGE)
    chosen = [instances[0], instances[10], instances[-1]]
    build_images(chosen)
    return chosen


@pytest.mark.parametrize("use_task_images", [True, False], ids=["task-image", "copied-in"])
def test_docker_backend_scores_oracle_and_empty(docker_instances, use_task_images) -> None:
    spec = SandboxSpec(backend="docker", use_task_images=use_task_images, memory_mb=1024)
    for instance in docker_instances:
        verdict = score_patch(instance, instance.patch, spec)
        assert (verdict.reward, verdict.resolved) == (1.0, True), verdict.log_tail[-500:]
        assert verdict.integrity == "report" and not verdict.tampering
        assert score_patch(instance, near_miss(instance), spec).reward == 0.0
    empty = score_patch(docker_instances[0], "", spec)
    assert (empty.reward, empty.resolved) == (-1.0, False)


def test_docker_backend_oracle_and_near_miss_on_every_task(docker_instances, instances) -> None:
    """Every built task on the docker backend (repository copied into the host image): the
    oracle +1, a near miss 0; the empty patch -1 on a spread of them."""
    spec = SandboxSpec(backend="docker", use_task_images=False, memory_mb=1024)
    wrong = {}
    for i, instance in enumerate(instances):
        got = (
            score_patch(instance, instance.patch, spec).reward,
            score_patch(instance, near_miss(instance), spec).reward,
        )
        if i % 6 == 0:
            got += (score_patch(instance, "", spec).reward,)
        if got != (1.0, 0.0, -1.0)[: len(got)]:
            wrong[instance.instance_id] = got
    assert wrong == {}
