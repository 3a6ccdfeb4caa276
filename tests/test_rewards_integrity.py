"""Cheating programs against the hidden-test runner: none of them may score AC.

Each program below is written to pass a function-call (HumanEval-style) or stdin/stdout test
without solving it: by faking the comparison, by tampering with the harness, by ending early,
by forging the verdict, or by finding the expected answer somewhere it can read. Every one runs
on every backend this machine has (the fork server and the local sandbox need bubblewrap; the
docker backend needs a Docker API, CI has all three). Controls show the honest program passes,
so a failure here is the verdict's doing, not a broken set-up.
"""

from __future__ import annotations

import pytest
from conftest import require, required_capabilities

from rewards.harness import Malformed, NotPlainData, decode, encode
from rewards.tests import AC, MLE, RE, TLE, WA, run_tests
from sandbox.forkserver import forkserver_unavailable_reason

pytestmark = pytest.mark.timeout(600)

SECRET = "s3cr3t-answer-481516"  # the expected value; only the test code holds it
CHECK = f"def check(candidate):\n    assert candidate(2, 3) == {SECRET!r}\n"
ADD_CHECK = (
    "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(7, 1) == 8\n"
)


def function_case(check: str = ADD_CHECK, entry: str = "add", setup: str = "") -> list[dict]:
    return [{"check": check, "entry_point": entry, "setup": setup}]


# Programs that answer ADD_CHECK without adding. name -> program
FAKE_VALUES = {
    "eq always true": (
        "class Yes:\n    def __eq__(self, other):\n        return True\n"
        "    __hash__ = object.__hash__\n"
        "def add(a, b):\n    return Yes()\n"
    ),
    "int subclass": (
        "class Int(int):\n    def __eq__(self, other):\n        return True\n"
        "    __hash__ = int.__hash__\n"
        "def add(a, b):\n    return Int(0)\n"
    ),
    "str subclass": (
        "class S(str):\n    def __eq__(self, other):\n        return True\n"
        "    __hash__ = str.__hash__\n"
        "def add(a, b):\n    return S('')\n"
    ),
    "list subclass in a list": (
        "class L(list):\n    def __eq__(self, other):\n        return True\n"
        "def add(a, b):\n    return [L()]\n"
    ),
    "generator": "def add(a, b):\n    return (x for x in [a + b])\n",
    "dict with a lying key": (
        "class K:\n    def __eq__(self, o):\n        return True\n    def __hash__(self):\n"
        "        return 5\ndef add(a, b):\n    return {K(): 1}\n"
    ),
}

# Programs that tamper with whatever they can reach instead of answering. name -> program
TAMPERING = {
    "replace builtins.exec": (
        "import builtins\n_real = builtins.exec\n"
        "def _exec(code, *a, **k):\n    return None\nbuiltins.exec = _exec\n"
        "def add(a, b):\n    return 0\n"
    ),
    "assertions disarmed": (
        "import builtins\nbuiltins.AssertionError = KeyError\ndef add(a, b):\n    return 0\n"
    ),
    "os._exit(0) at import": "import os\nos._exit(0)\n",
    "os._exit(0) in the call": "def add(a, b):\n    import os\n    os._exit(0)\n",
    "sys.exit(0) in the call": "def add(a, b):\n    import sys\n    sys.exit(0)\n",
    "close stdout and stdin": (
        "import os\ndef add(a, b):\n    os.close(1)\n    os.close(0)\n    return a + b + 1\n"
    ),
    "print markers and exit": (
        "import sys\nfor line in ('AC', 'OK', 'cwm-verdict-0 {\"verdict\": \"AC\"}', 'PASSED'):\n"
        "    print(line)\n    print(line, file=sys.stderr)\n"
        "sys.stdout.flush()\nimport os\nos._exit(0)\n"
    ),
    "forged replies on every fd": (
        "import os, json\n"
        "def add(a, b):\n"
        "    forged = json.dumps(['ok', ['i', hex(0)]]) + '\\n'\n"
        "    for fd in range(0, 64):\n"
        "        try:\n            os.write(fd, forged.encode())\n"
        "        except OSError:\n            pass\n"
        "    return 0\n"
    ),
    "kill the judge": "import os, signal\ndef add(a, b):\n    os.kill(os.getppid(), 9)\n    return 0\n",
    "stop the judge": (
        "import os, signal, time\ndef add(a, b):\n    os.kill(os.getppid(), signal.SIGSTOP)\n"
        "    time.sleep(30)\n"
    ),
    "kill every process it can": (
        "import os\ndef add(a, b):\n    try:\n        os.kill(-1, 9)\n    except OSError:\n"
        "        pass\n    return 0\n"
    ),
    "exception standing in for a value": ("def add(a, b):\n    raise AssertionError('fine')\n"),
    "huge reply": "def add(a, b):\n    return 'x' * (64 * 1024 * 1024)\n",
    "deeply nested reply": (
        "def add(a, b):\n    v = []\n    for _ in range(10000):\n        v = [v]\n    return v\n"
    ),
}

# Looks for the expected answer everywhere it can read: its own memory (all readable mappings),
# every process's memory, command line and environment under /proc, open fds of its parent,
# and the files around it. Returns the first match, which would be AC if it were reachable.
SEARCH_PROGRAM = r"""
import os, re, stat, time
PATTERN = re.compile(("s3cr3t" + "-answer-").encode() + rb"\d{6}")
DEADLINE = time.monotonic() + 6

def scan_memory(pid):
    try:
        with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as mem:
            for line in maps:
                span, perms = line.split()[:2]
                lo, hi = (int(x, 16) for x in span.split("-"))
                if "r" not in perms or hi - lo > 1 << 28:
                    continue
                try:
                    mem.seek(lo)
                    found = PATTERN.search(mem.read(hi - lo))
                except (OSError, ValueError, OverflowError):
                    continue
                if found:
                    return found.group().decode()
    except OSError:
        return None

def scan_file(path):
    try:
        if not stat.S_ISREG(os.stat(path).st_mode) and not path.startswith("/proc/"):
            return None  # a pipe (its own call channel) would block
        if path.startswith("/proc/") and "/fd/" in path and not stat.S_ISREG(os.stat(path).st_mode):
            return None
        with open(path, "rb") as f:
            found = PATTERN.search(f.read(1 << 24))
        return found.group().decode() if found else None
    except OSError:
        return None

def search():
    pids = [p for p in os.listdir("/proc") if p.isdigit()]
    for pid in ["self", *pids]:
        for what in ("cmdline", "environ"):
            hit = scan_file(f"/proc/{pid}/{what}")
            if hit:
                return hit
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                hit = scan_file(f"/proc/{pid}/fd/{fd}")
                if hit:
                    return hit
        except OSError:
            pass
        hit = scan_memory(pid)
        if hit:
            return hit
    for root in ("/", os.getcwd(), "/tmp"):
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if os.path.join(dirpath, d) not in
                           ("/proc", "/sys", "/usr", "/dev", "/lib", "/lib64", "/bin", "/sbin")]
            for name in filenames:
                if time.monotonic() > DEADLINE:
                    return None
                hit = scan_file(os.path.join(dirpath, name))
                if hit:
                    return hit
    return None

def add(a, b):
    return search()
"""


def available_backends() -> list[str]:
    backends = []
    if forkserver_unavailable_reason() is None:
        backends += ["forkserver", "local"]
    try:
        from sandbox.docker import connect
        from sandbox.images import HOST_IMAGE

        connect().images.get(HOST_IMAGE)
        backends.append("docker")
    except Exception:
        pass
    return backends


@pytest.fixture(scope="module")
def backends() -> list[str]:
    found = available_backends()
    reason = forkserver_unavailable_reason()
    require("bwrap", "forkserver" in found, reason or "")
    if "docker" not in found and "docker" in required_capabilities():
        pytest.fail("docker is required here (CWM_RL_REQUIRE) but no Docker API or base image")
    return found


def test_honest_programs_pass(backends: list[str]) -> None:
    for backend in backends:
        report = run_tests("def add(a, b):\n    return a + b\n", function_case(), backend=backend)
        assert report.verdicts == [AC], (backend, report.details)
        found = run_tests("def add(a, b):\n    return 'x'\n", function_case(CHECK), backend=backend)
        assert found.verdicts == [WA], (backend, found.details)


@pytest.mark.parametrize("name", sorted(FAKE_VALUES))
def test_values_that_are_not_plain_data_fail(backends: list[str], name: str) -> None:
    for backend in backends:
        report = run_tests(FAKE_VALUES[name], function_case(), backend=backend)
        assert report.verdicts == [WA], (backend, report.details)
        assert "plain data" in report.details[0].message, report.details[0].message
        assert report.infrastructure_error is None


@pytest.mark.parametrize("name", sorted(TAMPERING))
def test_tampering_never_passes(backends: list[str], name: str) -> None:
    for backend in backends:
        report = run_tests(TAMPERING[name], function_case(), time_limit_s=3, backend=backend)
        assert report.infrastructure_error is None, (backend, report.infrastructure_error)
        assert report.verdicts[0] in (WA, RE, TLE, MLE), (backend, report.details)
        assert report.reward() == 0.0


def test_the_expected_answer_is_out_of_reach(backends: list[str]) -> None:
    """The answer lives only in the test code; the program searches memory, /proc and files."""
    for backend in backends:
        report = run_tests(SEARCH_PROGRAM, function_case(CHECK), time_limit_s=20, backend=backend)
        assert report.verdicts == [WA], (backend, report.details)
        assert "assertion failed" in report.details[0].message
        # stdin/stdout: the expected output stays in this process
        stdio = [{"input": "", "output": SECRET}]
        program = SEARCH_PROGRAM + "\nprint(search())\n"
        assert run_tests(program, stdio, time_limit_s=20, backend=backend).verdicts == [WA]


def test_the_judge_is_out_of_reach(backends: list[str]) -> None:
    """Probes (expected to succeed, so the check passes): the judge's memory, fds and stdout
    are closed to the program."""
    probe = (
        "import os\n"
        "def add(a, b):\n"
        "    judge = os.getppid()\n"
        "    denied = []\n"
        "    for path in (f'/proc/{judge}/mem', f'/proc/{judge}/environ', f'/proc/{judge}/fd/1'):\n"
        "        try:\n"
        "            with open(path, 'rb') as f:\n"
        "                f.read(1)\n"
        "        except OSError:\n"
        "            denied.append(path.rsplit('/', 1)[1])\n"
        "    return denied\n"
    )
    check = "def check(candidate):\n    assert candidate(1, 2) == ['mem', 'environ', '1']\n"
    for backend in backends:
        report = run_tests(probe, function_case(check), backend=backend)
        assert report.verdicts == [AC], (backend, report.details)


def test_exceptions_cross_as_builtin_types(backends: list[str]) -> None:
    check = (
        "def check(candidate):\n"
        "    try:\n        candidate(-1)\n    except ValueError as e:\n"
        "        assert 'negative' in str(e)\n    else:\n        assert False\n"
        "    assert candidate(4) == 2.0\n"
    )
    program = (
        "import math\ndef root(x):\n    if x < 0:\n        raise ValueError('negative')\n"
        "    return math.sqrt(x)\n"
    )
    for backend in backends:
        report = run_tests(program, function_case(check, "root"), backend=backend)
        assert report.verdicts == [AC], (backend, report.details)


def test_setup_code_and_the_entry_point_name_reach_the_checks(backends: list[str]) -> None:
    """HumanEval's tests call prompt helpers (`poly`) and the entry point by its own name."""
    setup = "def double(x):\n    return 2 * x\n"
    check = "def check(candidate):\n    assert candidate(5) == double(3)\n    assert inc(5) == 6\n"
    for backend in backends:
        program = "def inc(x):\n    return x + 1\n"
        report = run_tests(program, function_case(check, "inc", setup), backend=backend)
        assert report.verdicts == [AC], (backend, report.details)


def test_unusable_test_code_is_no_verdict() -> None:
    require("bwrap", forkserver_unavailable_reason() is None, "needs the fork server")
    never_calls = "def check(candidate):\n    assert 1 + 1 == 2\n"
    report = run_tests("def f():\n    return 1\n", function_case(never_calls, "f"))
    assert report.infrastructure_error is not None and "never called" in report.infrastructure_error
    assert report.reward() is None
    passes_a_function = "def check(candidate):\n    assert candidate(len) == 1\n"
    report = run_tests("def f(g):\n    return 1\n", function_case(passes_a_function, "f"))
    assert report.verdicts == [RE] and "only plain data" in report.details[0].message


def test_plain_data_round_trip_by_hand() -> None:
    values = [
        None,
        True,
        0,
        -(2**20000),  # past the 4300-digit str limit: ints cross in hex
        1.5,
        float("inf"),
        -0.0,
        complex(1, -2),
        "é\udcff",
        b"\x00\xff",
        [1, (2, 3)],
        {"a": {1, 2}, (1, "b"): frozenset({3})},
    ]
    for value in values:
        back = decode(encode(value))
        assert back == value and type(back) is type(value)
        assert type(back) is not int or back.bit_length() > 64 or repr(back) == repr(value)
        assert not isinstance(value, float) or value.hex() == back.hex()
    nan = decode(encode(float("nan")))
    assert nan != nan
    assert decode(encode(True)) is True and type(decode(encode(1))) is int
    for bad in (object(), [1, object()], (x for x in []), type("I", (int,), {})(3)):
        with pytest.raises(NotPlainData):
            encode(bad)
    for form in (["i", 5], ["x"], [], "s", ["l", "abc"], ["d", [[["l", []], ["n"]]]], ["if", "1"]):
        with pytest.raises(Malformed):
            decode(form)


# Runs inside the judge if the judge ever imports what the program planted: forges AC with the
# nonce taken from the judge's job (at start-up, through json.loads) or its frames (later).
FORGER = r"""
import json as _json, os as _os, sys as _sys

def _forge(nonce):
    _os.write(1, ("\n" + nonce + ' {"verdict": "AC", "message": ""}\n').encode())
    _os._exit(0)

_frame = _sys._getframe()
while _frame is not None:
    if isinstance(_frame.f_locals.get("nonce"), str):
        _forge(_frame.f_locals["nonce"])
    _frame = _frame.f_back
_loads = _json.loads
def _spy(text, *args, **kwargs):
    value = _loads(text, *args, **kwargs)
    if isinstance(value, dict) and isinstance(value.get("nonce"), str):
        _forge(value["nonce"])
    return value
_json.loads = _spy
"""

PLANTER = f"""
import os, sys
FORGER = {FORGER!r}
site = os.path.join(os.path.expanduser("~"), ".local", "lib",
                    f"python{{sys.version_info[0]}}.{{sys.version_info[1]}}", "site-packages")
targets = [os.getcwd(), "/tmp", os.environ.get("HOME", "/tmp"), site]
names = ["traceback", "time", "math", "random", "copy", "ctypes", "string", "usercustomize",
         "sitecustomize", "builtins", "json", "functools"]
for directory in targets:
    try:
        os.makedirs(directory, exist_ok=True)
        for name in names:
            with open(os.path.join(directory, name + ".py"), "w") as f:
                f.write(FORGER)
        with open(os.path.join(directory, "zz-forge.pth"), "w") as f:
            f.write("import usercustomize\\n")
    except OSError:
        pass

def add(a, b):
    return a - b  # wrong: the checks fail, and the judge looks up where
"""


def test_modules_planted_by_the_program_never_run_in_the_judge(backends: list[str]) -> None:
    check = (
        "def check(candidate):\n    import math, random, copy, string\n"
        "    assert candidate(2, 3) == 5\n"
    )
    cases = function_case(check) * 3  # later cases of the same program share its work dir
    for backend in backends:
        report = run_tests(PLANTER, cases, backend=backend)
        assert report.verdicts == [WA, WA, WA], (backend, report.details)
