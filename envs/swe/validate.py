"""Is an SWE instance trainable? Its image exists, its hidden tests apply, its oracle patch is
scored +1 and the empty patch is not resolved. A run checks the first instances of its data
before training (SWEConfig.validate_first); `python -m launch.validate_swe` checks a dataset.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from envs.swe.instances import SWEInstance
from envs.swe.scoring import ScoreResult, score_patch
from envs.swe.workspace import SandboxSpec
from sandbox.base import SandboxError


@dataclass
class Check:
    """One instance's validation: `ok` when the gold patch resolves and the empty one does not."""

    instance_id: str
    ok: bool
    gold: float | None = None  # the gold patch's reward (+scale expected)
    empty: float | None = None  # the empty patch's reward (-scale expected)
    seconds: float = 0.0
    reason: str = ""

    def row(self) -> str:
        def score(x: float | None) -> str:
            return "-" if x is None else f"{x:+g}"

        result = "ok" if self.ok else "FAIL"
        return (
            f"{self.instance_id:<40} {result:<5} {score(self.gold):>5} {score(self.empty):>6} "
            f"{self.seconds:8.1f}  {self.reason}"
        )


HEADER = f"{'instance':<40} {'result':<5} {'gold':>5} {'empty':>6} {'seconds':>8}  reason"


def _why(verdict: ScoreResult, patch: str) -> str:
    if verdict.status == "env_error":
        return f"{patch} patch: reward unavailable: {verdict.error}"[:300]
    if not verdict.applied:
        return f"{patch} patch does not apply: {verdict.log_tail.strip()[-200:]}"
    if verdict.tampering:
        return f"{patch} patch flagged: {verdict.tampering[0]}"[:300]
    failing = [name for name, status in verdict.tests.items() if status == "fail"][:3]
    detail = f"failing {failing}" if failing else verdict.log_tail.strip()[-200:]
    return f"{patch} patch not resolved: {detail}"[:300]


def image_problem(instance: SWEInstance, spec: SandboxSpec) -> str | None:
    """Why the instance's image cannot be used here (None: it exists, or none is needed)."""
    if spec.backend != "docker" or not spec.use_task_images or instance.image is None:
        return None
    from sandbox.docker import docker_unavailable_reason, resolve_docker_host, shared_client

    reason = docker_unavailable_reason(spec.docker_host)
    if reason is not None:
        return reason
    import docker

    try:
        shared_client(spec.docker_host or resolve_docker_host()).images.get(instance.image)
    except docker.errors.ImageNotFound:
        return f"image {instance.image!r} does not exist (pull or build it first)"
    except (docker.errors.DockerException, OSError) as e:
        return f"image {instance.image!r} cannot be inspected: {e}"
    return None


def _harbor_run(instance: SWEInstance, spec: SandboxSpec, solve: bool, timeout_s: float) -> float:
    """A fresh container of a Harbor task, its solution run or not, then its verifier: the
    reward (None where the verifier wrote none)."""
    from envs.swe import harbor
    from envs.swe.workspace import open_workspace

    workspace = open_workspace(instance, spec, scrub=False)
    try:
        if solve:
            harbor.run_solution(workspace, instance, timeout_s)
        return harbor.verify(workspace, instance)[0]
    finally:
        workspace.close()


def _check_harbor(instance: SWEInstance, spec: SandboxSpec, check: Check, timeout_s: float) -> None:
    try:
        gold = _harbor_run(instance, spec, True, timeout_s)
        check.gold = 1.0 if gold is not None and gold >= 1 else -1.0
        if check.gold < 0:
            check.reason = f"the solution scores {gold} (the verifier's reward), not 1"
            return
        empty = _harbor_run(instance, spec, False, timeout_s)
    except SandboxError as e:
        check.reason = f"reward unavailable: {e}"[:300]
        return
    check.empty = 1.0 if empty is not None and empty >= 1 else -1.0
    if check.empty > 0:
        check.reason = "the untouched container passes: the verifier does not test the task"
    else:
        check.ok = True


def check_instance(
    instance: SWEInstance, spec: SandboxSpec, *, timeout_s: float = 300.0, scale: float = 1.0
) -> Check:
    start = time.monotonic()
    check = Check(instance.instance_id, ok=False)
    if instance.verifier == "harbor":
        _check_harbor(instance, spec, check, timeout_s)
        check.seconds = time.monotonic() - start
        return check
    problem = image_problem(instance, spec)
    if problem is not None:
        check.reason = problem
    else:
        gold = score_patch(instance, instance.patch, spec, scale=scale, timeout_s=timeout_s)
        check.gold = gold.reward
        if not gold.resolved or gold.status != "ok":
            check.reason = _why(gold, "gold")
        else:
            empty = score_patch(instance, "", spec, scale=scale, timeout_s=timeout_s)
            check.empty = empty.reward
            if empty.status != "ok":
                check.reason = _why(empty, "empty")
            elif empty.resolved:
                check.reason = "the empty patch resolves it: the hidden tests do not test the fix"
            else:
                check.ok = True
    check.seconds = time.monotonic() - start
    return check


def check_instances(
    instances: Iterable[SWEInstance],
    spec: SandboxSpec,
    *,
    timeout_s: float = 300.0,
    on_check: Callable[[Check], None] | None = None,
) -> list[Check]:
    checks = []
    for instance in instances:
        checks.append(check_instance(instance, spec, timeout_s=timeout_s))
        if on_check is not None:
            on_check(checks[-1])
    return checks
