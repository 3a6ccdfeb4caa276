"""Test-run throughput: the fork server vs a fresh interpreter per run, on the same small runs.

Both paths contain the program the same way (bubblewrap, cgroup, rlimits, `nobody`); the only
difference is whether each run starts a Python interpreter. A third row, a bare subprocess with
no sandbox at all, shows what interpreter start-up alone costs. Every output is checked. Prints
a table and a final `RESULT {json}` line.

    python benchmarks/sandbox.py [--runs 1000]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sandbox import SandboxLimits  # noqa: E402
from sandbox.forkserver import ForkServer, forkserver_unavailable_reason  # noqa: E402
from sandbox.local import LocalSandbox  # noqa: E402

# Small test programs of the kind competitive-programming tests run: (program, input -> output).
PROGRAMS = {
    "sum": ("a, b = map(int, input().split())\nprint(a + b)\n", lambda i: (f"{i} {2 * i}", 3 * i)),
    "sort": (
        "import sys\nnums = sorted(map(int, sys.stdin.read().split()))\nprint(*nums)\n",
        lambda i: (" ".join(str((i * 7919 + k * 104729) % 1000) for k in range(50)), None),
    ),
    "fib": (
        "n = int(input())\na, b = 0, 1\nfor _ in range(n):\n    a, b = b, a + b\nprint(a)\n",
        lambda i: (str(i % 90), None),
    ),
    "collections": (
        "from collections import Counter\nimport sys\n"
        "c = Counter(sys.stdin.read().split())\nprint(c.most_common(1)[0][0])\n",
        lambda i: ("a b c " + "z " * (i % 5 + 2), "z"),
    ),
}


def expected_output(name: str, stdin: str, given: object) -> str:
    if given is not None:
        return str(given)
    if name == "sort":
        return " ".join(map(str, sorted(map(int, stdin.split()))))
    a, b = 0, 1
    for _ in range(int(stdin)):
        a, b = b, a + b
    return str(a)


def make_runs(n: int) -> list[tuple[str, str, str]]:
    """n (program, stdin, expected stdout) triples, cycling through PROGRAMS."""
    names = list(PROGRAMS)
    runs = []
    for i in range(n):
        name = names[i % len(names)]
        program, case = PROGRAMS[name]
        stdin, given = case(i)
        runs.append((program, stdin, expected_output(name, stdin, given)))
    return runs


def run_forkserver(runs, limits: SandboxLimits) -> float:
    with ForkServer(limits) as server:
        server.start()
        server.run("print(1)", timeout=5)  # warm
        start = time.perf_counter()
        for program, stdin, expected in runs:
            result = server.run(program, stdin, timeout=5)
            assert result.stdout.decode().split() == expected.split(), (result, expected)
        return time.perf_counter() - start


def run_fresh_interpreter(runs, limits: SandboxLimits) -> float:
    """One local sandbox (bubblewrap + cgroup) and `python3 main.py` per run."""
    with LocalSandbox(limits) as sandbox:
        start = time.perf_counter()
        for program, stdin, expected in runs:
            sandbox.write_file("main.py", program)
            result = sandbox.exec(["python3", "main.py"], timeout=5, stdin=stdin)
            assert result.stdout.decode().split() == expected.split(), (result, expected)
        return time.perf_counter() - start


def run_bare_subprocess(runs) -> float:
    """No sandbox at all: `python -c program` per run, for scale."""
    start = time.perf_counter()
    for program, stdin, expected in runs:
        done = subprocess.run(
            [sys.executable, "-c", program], input=stdin.encode(), capture_output=True, timeout=5
        )
        assert done.stdout.decode().split() == expected.split()
    return time.perf_counter() - start


FUNCTION_PROGRAM = "def add(a, b):\n    return a + b\n"
FUNCTION_TESTS = [
    {
        "check": "def check(candidate):\n"
        + "".join(f"    assert candidate({i}, {2 * i}) == {3 * i}\n" for i in range(20)),
        "entry_point": "add",
    }
]


def run_function_calls(n: int, backend: str) -> float:
    """n function-call cases (20 calls each) through run_tests: judge + candidate processes."""
    from rewards.tests import AC, run_tests

    run_tests(FUNCTION_PROGRAM, FUNCTION_TESTS, backend=backend)  # warm
    start = time.perf_counter()
    for _ in range(n):
        report = run_tests(FUNCTION_PROGRAM, FUNCTION_TESTS, backend=backend)
        assert report.verdicts == [AC], report
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--function-cases", type=int, default=100)
    args = parser.parse_args()
    reason = forkserver_unavailable_reason()
    if reason is not None:
        sys.exit(f"the fork server cannot run here: {reason}")
    runs = make_runs(args.runs)
    limits = SandboxLimits(memory_mb=512)
    timings = {
        "forkserver": run_forkserver(runs, limits),
        "fresh_interpreter": run_fresh_interpreter(runs, limits),
        "bare_subprocess": run_bare_subprocess(runs),
    }
    labels = {
        "forkserver": "fork server (sandboxed)",
        "fresh_interpreter": "fresh interpreter (sandboxed)",
        "bare_subprocess": "bare subprocess (no sandbox)",
    }
    print(f"{len(runs)} runs of {len(PROGRAMS)} small programs, outputs checked\n")
    print(f"{'path':32} {'total s':>9} {'ms/run':>8} {'runs/s':>8}")
    for key, seconds in timings.items():
        print(
            f"{labels[key]:32} {seconds:9.2f} {1000 * seconds / len(runs):8.2f} {len(runs) / seconds:8.1f}"
        )
    speedup = timings["fresh_interpreter"] / timings["forkserver"]
    print(f"\nfork server vs fresh interpreter, same containment: {speedup:.1f}x")
    n = args.function_cases
    calls = {b: run_function_calls(n, b) for b in ("forkserver", "local")}
    print(f"\n{n} function-call cases (judge + candidate, 20 calls each) through run_tests:")
    for backend, seconds in calls.items():
        print(f"{backend:32} {seconds:9.2f} {1000 * seconds / n:8.2f} {n / seconds:8.1f}")
    call_speedup = calls["local"] / calls["forkserver"]
    print(f"fork server vs local backend, function-call cases: {call_speedup:.1f}x")
    result = {
        "runs": len(runs),
        "forkserver_runs_per_s": round(len(runs) / timings["forkserver"], 1),
        "fresh_interpreter_runs_per_s": round(len(runs) / timings["fresh_interpreter"], 1),
        "bare_subprocess_runs_per_s": round(len(runs) / timings["bare_subprocess"], 1),
        "speedup_vs_fresh_interpreter": round(speedup, 2),
        "function_cases_per_s": {b: round(n / t, 1) for b, t in calls.items()},
        "function_case_speedup_vs_local": round(call_speedup, 2),
        "target_speedup": 3.0,
    }
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
