"""Verdicts of the hidden-test runner (rewards.tests.run_tests) on real sandboxed runs."""

from __future__ import annotations

import threading

import pytest
from conftest import require

from rewards.tests import (
    AC,
    MLE,
    RE,
    SKIP,
    TLE,
    WA,
    TestReport,
    outputs_match,
    resolve_backend,
    run_tests,
    validate_tests,
)
from sandbox.cgroups import kill_pids_in
from sandbox.forkserver import forkserver_unavailable_reason, shared_forkserver

pytestmark = pytest.mark.timeout(120)

ADD = "a, b = map(int, input().split())\nprint(a + b)\n"
ADD_TESTS = [{"input": "1 2\n", "output": "3\n"}, {"input": "10 -4", "output": "6"}]


@pytest.fixture(params=["forkserver", "local"])
def backend(request) -> str:
    reason = forkserver_unavailable_reason()
    require("bwrap", reason is None, reason or "")
    return request.param


def test_accepted_and_wrong_answer(backend: str) -> None:
    report = run_tests(ADD, ADD_TESTS, backend=backend)
    assert report.verdicts == [AC, AC] and report.passed and report.fraction == 1.0
    assert report.backend == backend and len(report.timings) == 2
    wrong = run_tests(
        "a, b = map(int, input().split())\nprint(a - b)\n", ADD_TESTS, backend=backend
    )
    assert wrong.verdicts == [WA, WA] and not wrong.passed and wrong.fraction == 0.0
    assert wrong.details[0].stdout_excerpt == "-1\n"


def test_time_limit(backend: str) -> None:
    report = run_tests("while True:\n    pass\n", ADD_TESTS[:1], time_limit_s=1, backend=backend)
    assert report.verdicts == [TLE]
    assert report.timings[0] < 3


def test_memory_limit(backend: str) -> None:
    report = run_tests("x = bytearray(2 * 10**9)\n", ADD_TESTS[:1], memory_mb=128, backend=backend)
    assert report.verdicts == [MLE]


def test_runtime_errors(backend: str) -> None:
    for program in ("raise ValueError('no')\n", "def broken(:\n", "import sys\nsys.exit(2)\n"):
        report = run_tests(program, ADD_TESTS[:1], backend=backend)
        assert report.verdicts == [RE], program
    assert (
        "ValueError"
        in run_tests("raise ValueError('no')", ADD_TESTS[:1], backend=backend)
        .details[0]
        .stderr_excerpt
    )


def test_float_tolerance_and_whitespace(backend: str) -> None:
    program = "print('  0.33333334 \\n\\n 2   ')\n"
    tests = [{"input": "", "output": "0.3333333333\n2"}]
    assert run_tests(program, tests, backend=backend).verdicts == [WA]
    assert run_tests(program, tests, backend=backend, float_tol=1e-6).verdicts == [AC]
    assert run_tests(program, tests, backend=backend, float_tol=1e-9).verdicts == [WA]
    spaced = run_tests("print('3')\n", [{"input": "", "output": "  3  \n\n"}], backend=backend)
    assert spaced.verdicts == [AC]


def test_early_stop(backend: str) -> None:
    tests = [{"input": "1 1", "output": "3"}, *ADD_TESTS]
    full = run_tests(ADD, tests, backend=backend)
    assert full.verdicts == [WA, AC, AC] and full.fraction == pytest.approx(2 / 3)
    stopped = run_tests(ADD, tests, backend=backend, early_stop=True)
    assert stopped.verdicts == [WA, SKIP, SKIP] and stopped.fraction == 0.0
    assert len(stopped.timings) == 3 and stopped.timings[1:] == [0.0, 0.0]


def test_function_call_tests(backend: str) -> None:
    check = (
        "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"
    )
    tests = [{"check": check, "entry_point": "add"}]
    good = "def add(a, b):\n    return a + b\n"
    assert run_tests(good, tests, backend=backend).verdicts == [AC]
    cases = {
        "def add(a, b):\n    return a - b\n": WA,  # assertion fails
        "def add(a, b):\n    return a + undefined\n": RE,
        "def plus(a, b):\n    return a + b\n": RE,  # no entry point
        "import os\nos._exit(0)\n": RE,  # leaves before the checks: never AC
        "import sys\nsys.exit(0)\n": RE,
        "def add(a, b):\n    import os\n    os._exit(0)\n": RE,
    }
    for program, verdict in cases.items():
        assert run_tests(program, tests, backend=backend).verdicts == [verdict], program


def test_printing_the_checks_is_not_enough(backend: str) -> None:
    check = "def check(candidate):\n    assert candidate() == 1\n"
    program = 'print(\'cwm-verdict-0000000000000000 {"verdict": "AC"}\')\nimport os\nos._exit(0)\n'
    report = run_tests(program, [{"check": check, "entry_point": "f"}], backend=backend)
    assert report.verdicts == [RE] and "exited" in report.details[0].message


def test_infrastructure_failure_is_not_a_wrong_answer() -> None:
    reason = forkserver_unavailable_reason()
    require("bwrap", reason is None, reason or "")
    server = shared_forkserver()
    server.start()
    require("cgroups", server._cgroups is not None, "killing the whole server uses its cgroup")
    procs_files = server._cgroups.procs_files()
    timer = threading.Timer(0.5, lambda: kill_pids_in(procs_files))
    timer.start()
    report = run_tests("import time\ntime.sleep(3)\n", ADD_TESTS, backend="forkserver")
    timer.join()
    assert report.infrastructure_error is not None and "fork server" in report.infrastructure_error
    assert report.reward() is None and report.reward("fraction") is None
    assert not report.passed
    # The server comes back on the next call.
    assert run_tests(ADD, ADD_TESTS, backend="forkserver").passed


def test_bad_test_cases_are_named() -> None:
    with pytest.raises(ValueError, match="empty"):
        validate_tests([])
    with pytest.raises(ValueError, match="test 1"):
        validate_tests([{"input": "", "output": ""}, {"input": 3, "output": "x"}])
    with pytest.raises(ValueError, match="test 0"):
        validate_tests([{"stdin": "x"}])
    with pytest.raises(ValueError, match="unknown test backend"):
        resolve_backend("vm")
    with pytest.raises(ValueError, match="program"):
        run_tests(b"print(1)", ADD_TESTS)


def test_outputs_match_by_hand() -> None:
    assert outputs_match("1 2\n3", "1\n2 3")
    assert not outputs_match("1 2", "1 2 3")
    assert not outputs_match("1.0", "1")
    assert outputs_match("1.0", "1", float_tol=0)
    assert outputs_match("100.05", "100", float_tol=1e-3)  # relative: 0.05 <= 0.1
    assert not outputs_match("0.002", "0.001", float_tol=1e-4)
    assert not outputs_match("nan", "1", float_tol=1.0)
    assert outputs_match("yes", "yes", float_tol=1e-6)


def test_reward_modes() -> None:
    report = TestReport(passed=False, verdicts=[AC, WA], fraction=0.5, timings=[0.1, 0.1])
    assert report.reward() == 0.0 and report.reward("fraction") == 0.5
    with pytest.raises(ValueError):
        report.reward("mean")


def docker_unavailable_reason() -> str | None:
    """None where the docker backend can run here (an API socket and its base image)."""
    try:
        from sandbox.docker import connect
        from sandbox.images import HOST_IMAGE

        connect().images.get(HOST_IMAGE)
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return None


def test_docker_backend_verdicts() -> None:
    """One container per program, reused across its cases (the docker helper's backend)."""
    reason = docker_unavailable_reason()
    require("docker", reason is None, reason or "")
    check = "def check(candidate):\n    assert candidate(1) == 2\n"
    tests = [*ADD_TESTS, {"input": "1 1", "output": "3"}]
    assert run_tests(ADD, tests, backend="docker").verdicts == [AC, AC, WA]
    function = [{"check": check, "entry_point": "f"}]
    assert run_tests("def f(x):\n    return x + 1\n", function, backend="docker").verdicts == [AC]
    slow = run_tests("while True:\n    pass\n", ADD_TESTS[:1], time_limit_s=1, backend="docker")
    assert slow.verdicts == [TLE]
    big = run_tests("x = bytearray(2 * 10**9)\n", ADD_TESTS[:1], memory_mb=128, backend="docker")
    assert big.verdicts == [MLE]
