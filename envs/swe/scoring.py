"""Scoring a submitted patch: hidden tests in a fresh, scrubbed sandbox, then patch similarity.

Reward (CWM): resolved -> +scale; else `rewards.patch.similarity(submitted, oracle) >=
threshold` -> 0; else -scale. A failure of the sandbox, or hidden tests that cannot be set up,
is "reward unavailable" (status env_error, reward None), never a score.

The verdict is the scorer's, not the patch's (DESIGN.md, "Reward integrity"):
1. A new sandbox from the task's base, scrubbed exactly like the agent's (workspace.py: no
   refs but HEAD, no reflog, remote, tag, stash or unreachable object; checked), so the
   repository's history holds nothing of the fix.
2. The patch changes source, not the test machinery. Policy (one, for every patch format):
   after applying it (`git apply`, `git apply --recount`, GNU `patch` only for patches whose
   paths are plain and that create no symlink), every path that differs from the base commit
   and is test machinery is reset to the base (deleted if the base lacks it): test directories
   (tests/, test/, testing/), test_*.py / *_test.py, conftest.py, sitecustomize.py,
   usercustomize.py, *.pth, compiled files (*.pyc, *.so, __pycache__/), package metadata
   (*.egg-info/), test configuration (pytest.ini, tox.ini, setup.cfg, pyproject.toml,
   noxfile.py), .gitattributes / .gitmodules, anything under .git, the files the hidden test
   patch touches, every symlink the patch creates or changes, and new top-level modules that
   shadow a standard-library or test-framework module (unittest.py, pytest.py, _pytest/ ...).
   Paths the oracle patch itself changes are source for that task. The list of reset paths is
   in the verdict (`reset`). See envs.swe.runner.protected_reason.
3. Tests run under a trusted runner (envs/swe/runner.py, copied outside the repository) for
   test commands of the form `[VAR=v ...] python -m unittest ARGS`, `python -m pytest ARGS` or
   `pytest ARGS` (optionally after `cmd && ` / `cmd; ` set-up): its own result class / plugin
   records every result and writes a report outside the repository under a random name,
   authenticated with a key that only the runner reads before importing the repository. The
   verdict is that report: every FAIL_TO_PASS and PASS_TO_PASS test present exactly once and
   passed (without names: a complete run with no failure). No report (a crash, os._exit, a
   hang), a bad key, a test reported twice or a runner-detected violation: not resolved. What
   the code under test prints cannot change it. The runner is first started alone with the
   same set-up and interpreter: if it cannot start, the reward is unavailable. Other test
   commands (tox, runtests.py, pipes, `$VAR`s) fall back to parsing the output (unittest -v,
   pytest -rA lines), which that code can forge: `integrity` says "stdout" then.
4. The lines the patch adds to source that survives step 2 are scanned for reaches into the
   test machinery (unittest / pytest internals, sys.modules, builtins, atexit, os._exit, frame
   and gc introspection, exec / eval / __import__, processes, paths of tests, .git, the
   scorer's files, test environment variables; constructs the oracle patch uses are allowed);
   a match, a source file that cannot be decoded, or a runner violation (envs/swe/runner.py:
   refused operations, framework objects replaced by changed code, results reported from
   changed code, test files changed during the run) scores as unresolved and is listed in
   `tampering`.

What stays open (the code under test runs in the test process, and the static scan reads only
what is spelled out): a patch that gets past the scan (obfuscated names) and then
- walks frames through attributes CPython does not audit (a generator's gi_frame, f_back,
  f_locals) to the runner's own locals, where the results and the report key are;
- patches the framework and restores it before the runner's next check (every test start and
  the end of the run), or plants builtins (not code of a changed file) into test classes while
  the tests are loaded;
- starts processes through code the patch did not change (those escape the audit hook; the
  runner still re-hashes the test files after the run, and unittest mode imports test modules
  from its snapshot), or peeks at test sources through warnings / traceback;
can still forge a pass. pytest mode reads test modules from disk (its assertion rewriting),
Python < 3.8 has no audit hook (`integrity` "report-no-audit"), and the stdout fallback trusts
the output.
"""

from __future__ import annotations

import json
import posixpath
import re
import secrets
import shlex
import time
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from envs.swe import runner
from envs.swe.instances import SWEInstance, patch_paths
from envs.swe.workspace import SETUP_TIMEOUT_S, STATE_DIR, SandboxSpec, Workspace, open_workspace
from rewards.patch import similarity
from sandbox.base import SandboxError

PASS, FAIL, SKIP = "pass", "fail", "skip"
RUNNER_SOURCE = Path(runner.__file__).read_text()
TEST_SCRIPT = 'cd "$1" || exit 97\neval "$2" 2>&1 < /dev/null\n'
PYTHON_WORD = re.compile(r"python(\d+(\.\d+)?)?")
SHELL_SPECIAL = set("|&<>`$(){}*?!#~")
CODE_SUFFIXES = (".py", ".pyw", ".pyi", ".pyx", ".pxd")

UNITTEST_LINE = re.compile(r"^(\w+) \(([\w.]+)\)(?:\s*\.\.\.\s*(.*))?$")
UNITTEST_STATUS = {
    "ok": PASS,
    "FAIL": FAIL,
    "ERROR": FAIL,
    "expected failure": PASS,
    "unexpected success": FAIL,
}
PYTEST_SUMMARY = re.compile(
    r"^(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS) ([^\s(]\S*)"
)  # not unittest's "FAILED (failures=1)"
PYTEST_VERBOSE = re.compile(r"^(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")
PYTEST_STATUS = {"PASSED": PASS, "XFAIL": PASS, "FAILED": FAIL, "ERROR": FAIL, "XPASS": FAIL}

# What source code has no business doing: reaching into the test machinery (step 4 above).
# Only constructs that name the test machinery, the interpreter's hooks or frames: general
# tools a real fix may need (subprocess, importlib, eval, os.environ, sys.modules) are left to
# the runner's audit hook, which refuses them only when patched code uses them on test files
# or processes; a broader scan would teach a policy to avoid them.
SUSPICIOUS = tuple(
    (what, re.compile(pattern))
    for what, pattern in (
        (
            "unittest internals",
            r"\bunittest\b|\bTest(?:Case|Result|Suite|Loader|Program)\b|\bTextTest\w*|\bSkipTest"
            r"|\badd(?:Success|Failure|Error|Skip|ExpectedFailure|UnexpectedSuccess|SubTest)\b"
            r"|\bwasSuccessful\b|\bassert[A-Z]\w*|\bskipTest\b",
        ),
        ("pytest internals", r"\b_?pytest\b|\bpluggy\b|\bpytest_\w+|\bconftest\b|\bjunit"),
        (
            "interpreter hooks",
            r"\bsys\s*\.\s*(?:meta_path|path_hooks|path_importer_cache|settrace"
            r"|setprofile|_getframe|_current_frames|addaudithook|excepthook|displayhook)\b"
            r"|\batexit\b|\bbuiltins\b|__builtins__|\b_exit\b|\bfaulthandler\b"
            r"|\b__main__\b(?!['\"]\s*:)",
        ),
        (
            "introspection",
            r"\bgc\s*\.\s*get_\w+|\binspect\s*\.\s*(?:currentframe|stack|trace|getouterframes"
            r"|getinnerframes|getsource\w*|getfile)\b|\bf_(?:back|globals|locals|builtins|code)\b"
            r"|\btb_(?:frame|next)\b|\bgi_frame\b|__subclasses__|__code__|__globals__"
            r"|__closure__|\bctypes\b|\bwalk_stack\b|\bextract_stack\b",
        ),
        (
            "test or scorer files",
            r"[\"'](?:[^\"'\n]*/)?tests?(?:/[^\"'\n]*)?[\"']|\btest_\w+\.py|\.swe\b|/proc/"
            r"|\btests?\.test_\w+|\b(?:from|import)\s+tests?\b"
            r"|\.git\b|\bgit\s+(?:checkout|show|log|cat-file|stash|reflog|fsck|restore)\b",
        ),
        (
            "test environment",
            r"\bPYTEST_\w+|\bPYTHON(?:PATH|STARTUP|HOME|INSPECT|WARNINGS)\b",
        ),
    )
)


def _unittest_status(text: str) -> str | None:
    text = text.strip()
    if text in UNITTEST_STATUS:
        return UNITTEST_STATUS[text]
    if text.startswith("skipped"):
        return SKIP
    return None


def parse_test_output(output: str) -> dict[str, str]:
    """Test name -> pass / fail / skip, from unittest -v or pytest output (a test reported
    twice keeps its worst result). Only for test commands the runner cannot run (and for
    checking built tasks): the code under test can print these lines itself."""
    results: dict[str, str] = {}

    def record(name: str, status: str) -> None:
        if results.get(name) != FAIL:
            results[name] = status

    lines = output.splitlines()
    for i, line in enumerate(lines):
        match = UNITTEST_LINE.match(line)
        if match:
            method, where, rest = match.groups()
            name = where if where.endswith("." + method) else f"{where}.{method}"
            status = _unittest_status(rest or "")
            for later in lines[i + 1 : i + 50]:  # the test printed before its status
                if status is not None or UNITTEST_LINE.match(later):
                    break
                status = _unittest_status(later)
            if status is not None:
                record(name, status)
            continue
        match = PYTEST_SUMMARY.match(line)
        if match:
            record(match.group(2), PYTEST_STATUS.get(match.group(1), SKIP))
            continue
        match = PYTEST_VERBOSE.match(line)
        if match:
            record(match.group(1), PYTEST_STATUS.get(match.group(2), SKIP))
    return results


HARNESS_STATUS = {"PASSED": PASS, "XFAIL": PASS, "FAILED": FAIL, "ERROR": FAIL, "SKIPPED": SKIP}


def harness_parser(name: str):
    """The SWE-bench harness's log parser `name` (swebench.harness.log_parsers); ValueError
    when the package is missing or has no such parser."""
    try:
        from swebench.harness.log_parsers import PARSER_REGISTRY
    except ImportError as e:
        raise ValueError(
            f"log parser {name!r} is the SWE-bench harness's: install it (pip install "
            f"'cwm-rl[swe]', the swebench package): {e}"
        ) from None
    if name not in PARSER_REGISTRY:
        raise ValueError(f"the SWE-bench harness has no log parser {name!r}")
    return PARSER_REGISTRY[name]


def parse_with_harness(instance: SWEInstance, output: str) -> dict[str, str]:
    """Test name -> pass / fail / skip by the harness's parser for this instance."""
    from swebench.types import TestSpec

    spec = TestSpec(
        instance_id=instance.instance_id,
        image=instance.image or "",
        eval_script_list=[],
        repo=instance.repo,
        version=str(instance.extra.get("version", "")),
        FAIL_TO_PASS=list(instance.fail_to_pass),
        PASS_TO_PASS=list(instance.pass_to_pass),
        log_parser=instance.log_parser or "",
    )
    statuses = harness_parser(instance.log_parser or "")(output, spec)
    return {name: HARNESS_STATUS.get(status, FAIL) for name, status in statuses.items()}


# ---------------------------------------------------------------------------------------------
# The test command under the runner


@dataclass(frozen=True)
class TestPlan:
    """A test command the runner can run: `prefix` (set-up commands), then `mode` with `args`."""

    prefix: str
    assignments: tuple[str, ...]
    python: str | None  # None: bare `pytest`, run by the first python3 on PATH
    mode: str  # "unittest" | "pytest"
    args: tuple[str, ...]
    cwd_on_path: bool  # `python -m ...` puts the working directory first on sys.path

    def command(self, runner_path: str, config_path: str, *, check: bool = False) -> str:
        """The shell command that runs the tests under the runner (`check`: that only starts
        the runner with the same set-up and interpreter)."""
        python = (
            shlex.quote(self.python) if self.python else '"$(command -v python3 || echo python)"'
        )
        mode, args = ("check", ()) if check else (self.mode, self.args)
        words = [shlex.quote(w) for w in (runner_path, mode, config_path, "--", *args)]
        assignments = [
            f"{k}={shlex.quote(v)}" for k, v in (a.split("=", 1) for a in self.assignments)
        ]
        return " ".join([self.prefix.strip(), *assignments, python, "-s", *words]).lstrip()


def _split_last_command(command: str) -> tuple[str, str, bool]:
    """(everything up to the last top-level `;` / `&&` / newline, the last command, whether
    that command uses shell syntax beyond plain words)."""
    quote: str | None = None
    cut, special, i = 0, False, 0
    while i < len(command):
        c = command[i]
        if quote is not None:
            if c == quote:
                quote = None
            elif quote == '"' and c in "$`":
                special = True  # expands inside double quotes
            elif c == "\\" and quote == '"':
                i += 1
        elif c in "'\"":
            quote = c
        elif c == "\\":
            i += 1
        elif c in ";\n" or command.startswith("&&", i):
            cut, special = i + (2 if c == "&" else 1), False
            i += 1 if c == "&" else 0
        elif c in SHELL_SPECIAL:
            special = True
        i += 1
    return command[:cut], command[cut:], special or quote is not None


def plan_tests(test_cmd: str) -> TestPlan | None:
    """The runner's plan for `test_cmd`, or None when only its output can be parsed."""
    prefix, last, special = _split_last_command(test_cmd)
    if special or not last.strip():
        return None
    words = shlex.split(last)
    assignments = []
    while words and re.fullmatch(r"[A-Za-z_]\w*=.*", words[0], re.DOTALL):
        assignments.append(words.pop(0))
    if not words:
        return None
    program = posixpath.basename(words[0])
    if PYTHON_WORD.fullmatch(program) and words[1:2] == ["-m"] and len(words) > 2:
        module = words[2]
        mode = {"unittest": "unittest", "pytest": "pytest", "py.test": "pytest"}.get(module)
        if mode is None:
            return None
        return TestPlan(prefix, tuple(assignments), words[0], mode, tuple(words[3:]), True)
    if program in ("pytest", "py.test"):
        return TestPlan(prefix, tuple(assignments), None, "pytest", tuple(words[1:]), False)
    return None


# ---------------------------------------------------------------------------------------------
# The report and the static scan


@dataclass
class Report:
    """The runner's report (envs/swe/runner.py, report_text)."""

    tests: dict[str, str] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    complete: bool = False
    audit: bool = False


def read_report(raw: bytes, key: str) -> Report:
    """The report, if its key checks out (ValueError otherwise)."""
    text = raw.decode("utf-8")
    body, sep, mac = text.rpartition("mac ")
    expected = runner.hmac_sha256(key.encode(), body.encode("utf-8"))
    if not sep or not secrets.compare_digest(mac.strip(), expected):
        raise ValueError("the report's key does not check out")
    lines = body.splitlines()
    if not lines or lines[0] != runner.REPORT_MAGIC:
        raise ValueError("not a runner report")
    report = Report()
    for line in lines[1:]:
        kind, _, rest = line.partition(" ")
        if kind == "test":
            outcome, _, test_id = rest.partition(" ")
            if test_id in report.tests or outcome == "dup":
                report.duplicates.append(test_id)
                outcome = FAIL
            report.tests[test_id] = outcome if outcome in (PASS, FAIL, SKIP) else FAIL
        elif kind == "violation":
            report.violations.append(rest)
        elif kind == "error":
            report.errors.append(rest)
        elif kind in ("complete", "audit"):
            setattr(report, kind, rest == "1")
    return report


def _added_tokens(text: str) -> set[tuple[str, str]]:
    found = set()
    for line in text.splitlines():
        line = unicodedata.normalize("NFKC", line)
        if line.lstrip().startswith("#"):
            continue
        for what, pattern in SUSPICIOUS:
            found.update((what, m.group(0)) for m in pattern.finditer(line))
    return found


def scan_added_lines(added: dict[str, list[str]], oracle_patch: str) -> list[str]:
    """Why the lines a patch adds to source look like tampering (empty: they do not). Only
    code files count; constructs the oracle patch adds itself are allowed."""
    oracle_lines = [line[1:] for line in oracle_patch.splitlines() if line.startswith("+")]
    allowed = _added_tokens("\n".join(oracle_lines))
    found = []
    for path, lines in sorted(added.items()):
        if not path.endswith(CODE_SUFFIXES) and not (lines and lines[0].startswith("#!")):
            continue
        for line in lines:
            for what, token in sorted(_added_tokens(line) - allowed):
                found.append(f"{path}: {what}: {token!r} in {line.strip()[:120]!r}")
    return found


def forged_results(added: dict[str, list[str]], instance: SWEInstance) -> list[str]:
    """For verdicts read from the output (which the code under test can print): source lines
    the patch adds that name a hidden test (its function name), as a forged result line must.
    A real fix has no business spelling the names of the tests that judge it."""
    names = set()
    for test in instance.fail_to_pass + instance.pass_to_pass + tuple(instance.expected or ()):
        names.update(re.findall(r"\btest\w{3,}", test))
    oracle_lines = "\n".join(line for line in instance.patch.splitlines() if line.startswith("+"))
    names -= set(re.findall(r"\btest\w{3,}", oracle_lines))  # the fix itself names them
    if not names:
        return []
    pattern = re.compile(r"\b(?:" + "|".join(map(re.escape, sorted(names))) + r")\b")
    found = []
    for path, lines in sorted(added.items()):
        for line in lines:
            match = pattern.search(unicodedata.normalize("NFKC", line))
            if match:
                found.append(
                    f"{path}: names hidden test {match.group(0)!r} in {line.strip()[:120]!r}"
                )
    return found


# ---------------------------------------------------------------------------------------------
# The verdict


def reward_for(resolved: bool, patch_similarity: float, scale: float, threshold: float) -> float:
    """CWM's SWE reward: +scale resolved, 0 close to the oracle, -scale otherwise."""
    if resolved:
        return scale
    return 0.0 if patch_similarity >= threshold else -scale


@dataclass
class ScoreResult:
    """The verdict on one submission. `reward` is None when status is "env_error".

    integrity: where the test results came from: "report" (the runner's authenticated report,
    audit hook on), "report-no-audit" (the same, Python < 3.8), "stdout" (parsed from output:
    forgeable), "none" (no tests ran: the patch did not apply). `tampering`: why the patch was
    judged to reach into the test machinery (then never resolved). `reset`: protected paths
    the patch changed, reset to the base commit."""

    reward: float | None
    status: str  # "ok" | "env_error"
    resolved: bool = False
    similarity: float = 0.0
    applied: bool = False
    tests: dict[str, str] = field(default_factory=dict)
    error: str | None = None
    log_tail: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    integrity: str = "none"
    tampering: list[str] = field(default_factory=list)
    reset: list[str] = field(default_factory=list)

    def info(self) -> dict:
        """The fields worth logging with a trajectory."""
        failing = sorted(name for name, status in self.tests.items() if status != PASS)
        info = {
            "resolved": self.resolved,
            "similarity": round(self.similarity, 4),
            "patch_applied": self.applied,
            "tests_failing": failing[:20],
            "integrity": self.integrity,
            "tampering_detected": bool(self.tampering),
            **{f"score_{k}": round(v, 3) for k, v in self.timings.items()},
        }
        if self.tampering:
            info["tampering"] = self.tampering[:10]
        if self.reset:
            info["protected_paths_reset"] = self.reset[:20]
        if self.error:
            info["env_error"] = self.error
        return info


def resolved_from(instance: SWEInstance, results: dict[str, str], exit_code: int | None) -> bool:
    """From parsed output: every FAIL_TO_PASS and PASS_TO_PASS test passed (names compared as
    the runner reports them); without names, the command exited 0. Instances graded by the
    SWE-bench harness's parser are graded as the harness grades: a PASS_TO_PASS test may be
    skipped, and output that reports no failure from a command that failed is not believed."""
    if instance.expected is not None:  # R2E-Gym: the same outcome for every test, no more
        found = {_outcome_key(k): v for k, v in results.items()}
        return bool(found) and found == {_outcome_key(k): v for k, v in instance.expected.items()}
    names = instance.fail_to_pass + instance.pass_to_pass
    if not names:
        return exit_code == 0
    if instance.log_parser is not None:
        if not results:
            return False
        if exit_code not in (None, 0) and FAIL not in results.values():
            return False
        return all(results.get(n) == PASS for n in instance.fail_to_pass) and all(
            results.get(n) in (PASS, SKIP) for n in instance.pass_to_pass
        )
    found = {report_test_name(name): status for name, status in results.items()}
    return all(found.get(report_test_name(name)) == PASS for name in names)


def _outcome_key(name: str) -> str:
    """A test's key for outcome comparison: the runner's name, without a " - reason" tail."""
    return report_test_name(name.split(" - ")[0].strip())


def report_test_name(name: str) -> str:
    """An expected test name as the runner reports it: unittest's `test_x (pkg.mod.Class)` and
    `test_x (pkg.mod.Class.test_x)` become `pkg.mod.Class.test_x`; others stay."""
    match = UNITTEST_LINE.match(name)
    if match is None or match.group(3) is not None:
        return name
    method, where, _ = match.groups()
    return where if where.endswith("." + method) else f"{where}.{method}"


def _resolved_by_report(instance: SWEInstance, report: Report) -> bool:
    if instance.expected is not None:
        return report.complete and resolved_from(instance, report.tests, None)
    names = instance.fail_to_pass + instance.pass_to_pass
    if names:
        return all(report.tests.get(report_test_name(name)) == PASS for name in names)
    outcomes = set(report.tests.values())
    return report.complete and not report.errors and PASS in outcomes and FAIL not in outcomes


def _run_dir_files(
    workspace: Workspace, instance: SWEInstance, patch: str, plan: TestPlan | None
) -> tuple[dict[str, str], str]:
    """Write the runner, its config and the patches into a fresh directory of the state dir;
    the config and the report key."""
    sandbox = workspace.sandbox
    run_dir = f"{STATE_DIR}/run-{secrets.token_hex(8)}"
    where = posixpath.join(sandbox.workdir, run_dir)
    key = secrets.token_hex(32)
    config = {
        "repo": workspace.repo_path,
        "state_dir": workspace.state_dir,
        "runner": f"{where}/runner.py",
        "config": f"{where}/config.json",
        "report": f"{where}/{secrets.token_hex(16)}.report",
        "key": f"{where}/key",
        "prepared": f"{where}/prepared.json",
        "model_patch": f"{where}/model.patch",
        "test_patch": f"{where}/test.patch",
        "test_files": list(instance.test_files),
        "exempt": list(patch_paths(instance.patch)),
        "cwd_on_path": bool(plan and plan.cwd_on_path),
    }
    if patch.strip():
        sandbox.write_file(
            f"{run_dir}/model.patch", patch if patch.endswith("\n") else patch + "\n"
        )
    if instance.test_patch.strip():
        sandbox.write_file(f"{run_dir}/test.patch", instance.test_patch)
    sandbox.write_file(f"{run_dir}/runner.py", RUNNER_SOURCE)
    sandbox.write_file(f"{run_dir}/key", key)
    sandbox.write_file(f"{run_dir}/config.json", json.dumps(config))
    return config, key


def _relative(workspace: Workspace, path: str) -> str:
    return posixpath.relpath(path, workspace.sandbox.workdir)


def _score_in(
    workspace: Workspace, instance: SWEInstance, patch: str, verdict: ScoreResult, timeout_s: float
) -> None:
    """Prepare, scan, run the tests, read the verdict (raises SandboxError for env errors)."""
    sandbox = workspace.sandbox
    test_cmd = instance.test_cmd.replace("{hidden}", posixpath.join(workspace.state_dir, "hidden"))
    plan = plan_tests(test_cmd)
    config, key = _run_dir_files(workspace, instance, patch, plan)
    argv = [workspace.python, "-I", "-S", config["runner"], "prepare", config["config"]]
    start = time.monotonic()
    done = sandbox.exec(argv, SETUP_TIMEOUT_S)
    verdict.timings["prepare_s"] = time.monotonic() - start
    try:
        prepared = json.loads(sandbox.read_file(_relative(workspace, config["prepared"])))
    except (OSError, ValueError) as e:
        detail = (done.stdout_text + done.stderr_text).strip()[-800:]
        raise SandboxError(f"preparing the repository failed ({e}): {detail}") from None
    verdict.log_tail = prepared["log"][-2000:]
    verdict.reset = [f"{path} ({why})" for path, why in prepared["reset"]]
    if prepared["error"]:
        raise SandboxError(f"preparing the repository failed: {prepared['error']}")
    if not prepared["test_patch"]:
        raise SandboxError("the hidden tests could not be set up: " + prepared["log"][-500:])
    verdict.applied = bool(prepared["applied"])
    if not verdict.applied:
        if prepared["refused"]:
            verdict.log_tail += "\n" + prepared["refused"]
        return
    verdict.tampering = scan_added_lines(prepared["added"], instance.patch)
    verdict.tampering += [
        f"{path}: source that cannot be decoded"
        for path in prepared["undecodable"]
        if path.endswith(CODE_SUFFIXES)
    ]
    start = time.monotonic()
    if plan is not None:  # the runner starts: otherwise no verdict could be a score
        check = plan.command(config["runner"], config["config"], check=True)
        done = sandbox.exec(
            ["bash", "-c", TEST_SCRIPT, "swe-test", workspace.repo_path, check], SETUP_TIMEOUT_S
        )
        if "cwm-rl-runner ok" not in done.stdout_text:
            detail = (done.stdout_text + done.stderr_text).strip()[-800:]
            raise SandboxError(f"the test runner does not start in the sandbox: {detail}")
    command = plan.command(config["runner"], config["config"]) if plan else test_cmd
    result = sandbox.exec(
        ["bash", "-c", TEST_SCRIPT, "swe-test", workspace.repo_path, command], timeout_s
    )
    verdict.timings["tests_s"] = time.monotonic() - start
    output = result.stdout_text + result.stderr_text
    verdict.log_tail = output[-3000:]
    if result.exit_code == 97:
        raise SandboxError("the repository is missing in the scoring sandbox")
    if plan is None:
        verdict.integrity = "stdout"
        verdict.tampering += forged_results(prepared["added"], instance)
        if instance.log_parser is not None:
            verdict.tests = parse_with_harness(instance, output)
        else:
            verdict.tests = parse_test_output(output)
        exit_code = None if result.timed_out else result.exit_code
        verdict.resolved = resolved_from(instance, verdict.tests, exit_code)
    else:
        try:
            report = read_report(sandbox.read_file(_relative(workspace, config["report"])), key)
        except FileNotFoundError:
            report = Report(errors=["no report: the test run did not finish"], audit=True)
        except (OSError, ValueError, UnicodeDecodeError) as e:
            report = Report(violations=[f"the report is not the runner's: {e}"])
        verdict.integrity = "report" if report.audit else "report-no-audit"
        verdict.tests = report.tests
        verdict.tampering += report.violations
        verdict.tampering += [f"test reported more than once: {t}" for t in report.duplicates]
        verdict.resolved = _resolved_by_report(instance, report)
        if report.errors:
            verdict.log_tail += "\n" + "\n".join(report.errors)[-1000:]
    if verdict.tampering:
        verdict.resolved = False


def score_patch(
    instance: SWEInstance,
    patch: str,
    spec: SandboxSpec,
    *,
    scale: float = 1.0,
    threshold: float = 0.5,
    timeout_s: float = 300.0,
) -> ScoreResult:
    """Score `patch` against `instance` (see the module docstring); never raises for a bad
    patch, and turns sandbox failures into status env_error."""
    started = time.monotonic()
    patch_similarity = similarity(patch, instance.patch)
    try:
        workspace = open_workspace(instance, spec, scrub=True, hide="stash")
    except (SandboxError, OSError) as e:
        return ScoreResult(None, "env_error", similarity=patch_similarity, error=str(e))
    verdict = ScoreResult(None, "ok", similarity=patch_similarity, timings=dict(workspace.timings))
    try:
        _score_in(workspace, instance, patch, verdict, timeout_s)
    except (SandboxError, OSError) as e:
        verdict.status, verdict.error = "env_error", str(e)
        return verdict
    finally:
        workspace.close()
    verdict.timings["total_s"] = time.monotonic() - started
    verdict.reward = reward_for(verdict.resolved, patch_similarity, scale, threshold)
    return verdict
