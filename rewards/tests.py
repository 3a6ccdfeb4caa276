"""Hidden-test runner: run a Python program against test cases in a sandbox, one verdict each.

Two kinds of test case:
- stdin/stdout: `{"input": str, "output": str}`; the program reads the input and its output is
  compared token by token (whitespace-normalised), numbers optionally within `float_tol`;
- function call (HumanEval style): `{"check": test_code, "entry_point": name, "setup": code}`
  (`setup` optional: trusted code the test code relies on, e.g. HumanEval's prompt with its
  helpers). The verdict is decided outside the program (rewards/harness.py): the program runs
  in a process of its own and answers calls of its entry point with plain data; `setup`, the
  test code and `check(candidate)` run in a judge process it cannot reach, so patching
  builtins, exiting early, printing markers or returning objects with a custom `__eq__` cannot
  pass a check. The arguments are copies (a check cannot see the program mutate them).

Verdicts: AC (accepted), WA (wrong answer), TLE (time), MLE (memory), RE (runtime error), and
SKIP for cases not run after a failure with `early_stop`. A failure of the sandbox itself is
not a wrong answer: the report carries `infrastructure_error` and no reward.

Backends: "forkserver" (the fast path: one warm interpreter forks per test), "local" (a fresh
interpreter per test in a local sandbox), "docker" (one container per program, reused across
its tests); None picks the fork server where it can run, else "local".
"""

from __future__ import annotations

import json
import math
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from rewards.harness import judge_program
from sandbox import BACKENDS, ExecResult, SandboxError, SandboxLimits, make_sandbox

AC, WA, TLE, MLE, RE, SKIP = "AC", "WA", "TLE", "MLE", "RE", "SKIP"
VERDICTS = (AC, WA, TLE, MLE, RE, SKIP)
EXCERPT_CHARS = 300
MEMORY_MARKERS = (b"MemoryError", b"Cannot allocate memory", b"std::bad_alloc")


@dataclass
class TestCaseResult:
    """One test case's outcome; `message` says why it is not AC."""

    __test__ = False  # not a pytest test class

    verdict: str
    duration_s: float = 0.0
    exit_code: int | None = None
    message: str = ""
    stdout_excerpt: str = ""
    stderr_excerpt: str = ""


@dataclass
class TestReport:
    """All test cases of one program. `fraction` counts AC over all cases (skipped ones fail)."""

    __test__ = False  # not a pytest test class

    passed: bool
    verdicts: list[str]
    fraction: float
    timings: list[float]
    details: list[TestCaseResult] = field(default_factory=list)
    infrastructure_error: str | None = None
    backend: str = ""

    def reward(self, mode: str = "all_pass") -> float | None:
        """1.0/0.0 for all_pass, the AC fraction for "fraction"; None when the sandbox failed."""
        if self.infrastructure_error is not None:
            return None
        if mode == "all_pass":
            return 1.0 if self.passed else 0.0
        if mode == "fraction":
            return self.fraction
        raise ValueError(f"reward mode must be 'all_pass' or 'fraction', got {mode!r}")


# ---------------------------------------------------------------------------------------------
# Test cases and comparison


def validate_tests(tests: Sequence[Mapping]) -> list[dict]:
    """Check the test-case list; ValueError names the first bad case and what is wrong."""
    if isinstance(tests, str | bytes) or not isinstance(tests, Sequence):
        raise ValueError(f"tests must be a list of test cases, got {type(tests).__name__}")
    if not tests:
        raise ValueError("tests is empty: nothing would be checked")
    checked = []
    for index, case in enumerate(tests):
        if not isinstance(case, Mapping):
            raise ValueError(f"test {index}: expected a mapping, got {type(case).__name__}")
        if "check" in case or "entry_point" in case:
            keys, kind = ("check", "entry_point"), "function-call"
        elif "input" in case or "output" in case:
            keys, kind = ("input", "output"), "stdin/stdout"
        else:
            raise ValueError(
                f"test {index}: needs 'input'/'output' or 'check'/'entry_point', got {sorted(case)}"
            )
        for key in keys:
            if not isinstance(case.get(key), str):
                raise ValueError(f"test {index} ({kind}): '{key}' must be a string")
        entry = {key: case[key] for key in keys}
        if kind == "function-call":
            if not entry["entry_point"].isidentifier():
                raise ValueError(
                    f"test {index}: entry_point {entry['entry_point']!r} is not a name"
                )
            if not isinstance(case.get("setup", ""), str):
                raise ValueError(f"test {index} (function-call): 'setup' must be a string")
            entry["setup"] = case.get("setup", "")
        checked.append(entry)
    return checked


def _number(token: str) -> float | None:
    try:
        value = float(token)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def outputs_match(actual: str, expected: str, float_tol: float | None = None) -> bool:
    """Token-by-token equality ignoring whitespace; with `float_tol`, two numeric tokens match
    when they differ by at most float_tol absolutely or relatively."""
    got, want = actual.split(), expected.split()
    if len(got) != len(want):
        return False
    for a, b in zip(got, want):
        if a == b:
            continue
        if float_tol is None:
            return False
        x, y = _number(a), _number(b)
        if x is None or y is None or not math.isclose(x, y, rel_tol=float_tol, abs_tol=float_tol):
            return False
    return True


def judge_job(solution: str, case: dict, nonce: str) -> str:
    """The judge's stdin for a function-call case (the program it runs is judge_program())."""
    job = {
        "solution": solution,
        "entry_point": case["entry_point"],
        "check": case["check"],
        "setup": case.get("setup", ""),
        "nonce": nonce,
    }
    return json.dumps(job)


def _excerpt(data: bytes) -> str:
    text = data.decode("utf-8", errors="replace")
    return text if len(text) <= EXCERPT_CHARS else "..." + text[-EXCERPT_CHARS:]


def judge(result: ExecResult, case: dict, nonce: str, float_tol: float | None) -> TestCaseResult:
    """ExecResult of one case -> TestCaseResult."""
    detail = TestCaseResult(
        verdict=AC,
        duration_s=result.duration_s,
        exit_code=result.exit_code,
        stdout_excerpt=_excerpt(result.stdout),
        stderr_excerpt=_excerpt(result.stderr),
    )
    stderr_tail = result.stderr[-4000:]
    if result.killed_reason in ("timeout", "cpu"):
        detail.verdict, detail.message = TLE, f"killed: {result.killed_reason} limit"
    elif result.killed_reason == "memory" or (
        result.exit_code != 0 and any(m in stderr_tail for m in MEMORY_MARKERS)
    ):
        detail.verdict, detail.message = MLE, "memory limit exceeded"
    elif result.killed_reason == "output_limit":
        detail.verdict, detail.message = WA, "output limit exceeded"
    elif "check" in case:
        _judge_verdict(detail, result, nonce)
    elif result.exit_code != 0:
        detail.verdict, detail.message = RE, f"exit code {result.exit_code}"
    elif not outputs_match(
        result.stdout.decode("utf-8", errors="replace"), case["output"], float_tol
    ):
        detail.verdict, detail.message = WA, "output differs from the expected output"
    return detail


def _judge_verdict(detail: TestCaseResult, result: ExecResult, nonce: str) -> None:
    """The judge's verdict line (`<nonce> {json}`, its last line); without it, RE."""
    lines = result.stdout.decode("utf-8", errors="replace").rstrip("\n").split("\n")
    reported = None
    if lines and lines[-1].startswith(nonce + " "):
        try:
            reported = json.loads(lines[-1][len(nonce) + 1 :])
        except ValueError:
            reported = None
    if not isinstance(reported, dict) or reported.get("verdict") not in (AC, WA, RE, MLE, TLE):
        if isinstance(reported, dict) and reported.get("verdict") == "ERROR":
            raise JudgeError(str(reported.get("message")))
        detail.verdict = RE
        detail.message = f"the judge gave no verdict (exit code {result.exit_code})"
        return
    detail.verdict, detail.message = reported["verdict"], str(reported.get("message", ""))
    detail.stdout_excerpt = _excerpt("\n".join(lines[:-1]).encode())
    detail.stderr_excerpt = _excerpt(str(reported.get("log", "")).encode())


class JudgeError(RuntimeError):
    """The function-call judge could not judge (its set-up failed, or the test code is unusable):
    no verdict on the program, so no reward."""


# ---------------------------------------------------------------------------------------------
# Running


def resolve_backend(backend: str | None, allow_unisolated: bool = False) -> str:
    """None -> "forkserver" where it can run here, else "local"."""
    if backend is None:
        from sandbox.forkserver import forkserver_unavailable_reason

        reason = forkserver_unavailable_reason(allow_unisolated)
        return "forkserver" if reason is None else "local"
    if backend not in BACKENDS:
        raise ValueError(f"unknown test backend {backend!r}; known: {', '.join(BACKENDS)}")
    return backend


class _Runner:
    """Runs each case as `python3 main.py` in one sandbox per program (any backend of
    `sandbox.make_sandbox`; the fork server's is a view of the process's shared warm server)."""

    def __init__(self, backend: str, memory_mb: int, allow_unisolated: bool) -> None:
        limits = SandboxLimits(memory_mb=memory_mb)
        self.sandbox = make_sandbox(backend, limits=limits, allow_unisolated=allow_unisolated)

    def run(self, program: str, stdin: str, timeout: float, judge: bool = False) -> ExecResult:
        self.sandbox.write_file("main.py", program)
        # the judge runs isolated (-I): no user site-packages the program could have planted
        argv = ["python3", "-I", "main.py"] if judge else ["python3", "main.py"]
        return self.sandbox.exec(argv, timeout=timeout, stdin=stdin)

    def close(self) -> None:
        self.sandbox.close()


def run_tests(
    program: str,
    tests: Sequence[Mapping],
    time_limit_s: float = 2.0,
    memory_mb: int = 512,
    backend: str | None = None,
    early_stop: bool = False,
    float_tol: float | None = None,
    allow_unisolated: bool = False,
) -> TestReport:
    """Run `program` on every test case; see the module docstring for formats and verdicts.

    time_limit_s is the wall-clock limit of each case (CPU seconds are capped at the same
    value, rounded up); memory_mb the address-space limit of each process. allow_unisolated
    lets the local sandbox run where bubblewrap or cgroups are missing (see sandbox/local.py);
    without it such a host gives an infrastructure error naming what is missing.
    """
    if not isinstance(program, str):
        raise ValueError(f"program must be a string of Python source, got {type(program).__name__}")
    if time_limit_s <= 0 or memory_mb <= 0:
        raise ValueError("time_limit_s and memory_mb must be positive")
    if float_tol is not None and float_tol < 0:
        raise ValueError(f"float_tol must be >= 0, got {float_tol}")
    cases = validate_tests(tests)
    backend = resolve_backend(backend, allow_unisolated)
    details: list[TestCaseResult] = []
    infrastructure_error = None
    runner = None
    try:
        runner = _Runner(backend, memory_mb, allow_unisolated)
        for case in cases:
            if early_stop and details and details[-1].verdict != AC:
                details.append(TestCaseResult(verdict=SKIP, message="not run (early stop)"))
                continue
            nonce = ""
            if "check" in case:
                nonce = f"cwm-verdict-{secrets.token_hex(16)}"
                source, stdin = judge_program(), judge_job(program, case, nonce)
            else:
                source, stdin = program, case["input"]
            result = runner.run(source, stdin, time_limit_s, judge="check" in case)
            details.append(judge(result, case, nonce, float_tol))
    except (SandboxError, OSError) as e:
        infrastructure_error = f"{backend} sandbox failed: {type(e).__name__}: {e}"
    except JudgeError as e:
        infrastructure_error = f"the function-call judge failed: {e}"
    finally:
        if runner is not None:
            try:
                runner.close()
            except (SandboxError, OSError) as e:
                infrastructure_error = infrastructure_error or f"closing the sandbox failed: {e}"
    verdicts = [d.verdict for d in details]
    n_ac = verdicts.count(AC)
    complete = infrastructure_error is None and len(details) == len(cases)
    return TestReport(
        passed=complete and n_ac == len(cases),
        verdicts=verdicts,
        fraction=n_ac / len(cases),
        timings=[d.duration_s for d in details],
        details=details,
        infrastructure_error=infrastructure_error,
        backend=backend,
    )
