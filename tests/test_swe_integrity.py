"""Reward integrity of SWE scoring (envs.swe.scoring, envs.swe.runner, workspace.find_leaks).

A battery of patches that try to score without fixing the bug, each of which scored +1 with
the scorer this one replaced (or attacks its machinery directly), on one built task and both
backends; the runner's checks with the static scan turned off; the pytest runner and the
output fallback; and the leak check over every built task's agent workspace.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import tempfile

import pytest
from conftest import require

from envs.swe import scoring
from envs.swe.build_tasks import build_images, build_tasks
from envs.swe.instances import SWEInstance, load_instances
from envs.swe.runner import hmac_sha256, protected_reason
from envs.swe.scoring import (
    plan_tests,
    read_report,
    report_test_name,
    scan_added_lines,
    score_patch,
)
from envs.swe.workspace import SandboxSpec, find_leaks, open_workspace
from sandbox.local import bwrap_path

pytestmark = pytest.mark.timeout(180)

LOCAL = SandboxSpec(backend="local", memory_mb=1024)
TASK = "calendarx__leap-century"
RUN_SUCCESS = (
    "def _run(self, result=None):\n"
    "    result.startTest(self)\n    result.addSuccess(self)\n    result.stopTest(self)\n"
)
# Attacks inside the code under test, each written to pass the static scan: the runner alone
# must catch them (test_runner_alone_catches_in_process_tampering).
IN_PROCESS = (
    "history_checkout", "textresult_patch", "obfuscated_run", "obfuscated_asserts", "gc_walk",
    "rewrite_hidden_at_import", "shell_sed_hidden", "import_hook", "init_subclass",
    "expected_failure_marks", "peek_hidden_tests", "probe_scorer_files",
)  # fmt: skip


@pytest.fixture(scope="module")
def instances(tmp_path_factory) -> list[SWEInstance]:
    require("bwrap", bwrap_path() is not None, "bubblewrap is not installed")
    return load_instances(build_tasks(tmp_path_factory.mktemp("swe") / "tasks"))


@pytest.fixture(scope="module")
def task(instances) -> SWEInstance:
    return next(i for i in instances if i.instance_id == TASK)


def make_patch(repo: str, files: dict | None = None, links: dict | None = None) -> str:
    """A git patch (binary, symlinks and all) that writes `files` and `links` into `repo`."""
    with tempfile.TemporaryDirectory() as tmp:
        work = os.path.join(tmp, "repo")
        shutil.copytree(repo, work, symlinks=True)
        for path, target in {**(files or {}), **(links or {})}.items():
            full = os.path.join(work, path)
            os.makedirs(os.path.dirname(full), exist_ok=True)
            if os.path.lexists(full):
                os.unlink(full)
            if path in (links or {}):
                os.symlink(target, full)
            else:
                with open(full, "wb" if isinstance(target, bytes) else "w") as f:
                    f.write(target)
        env = {"PATH": os.environ["PATH"], "HOME": tmp, "GIT_CONFIG_GLOBAL": os.devnull}
        subprocess.run(["git", "add", "-A", "-f"], cwd=work, env=env, check=True)
        diff = ["git", "diff", "--cached", "--binary", "HEAD"]
        return subprocess.run(
            diff, cwd=work, env=env, check=True, capture_output=True
        ).stdout.decode()


def attacks(task: SWEInstance) -> dict[str, str]:
    """Name -> patch. None of them fixes the bug."""
    repo = task.repo_dir
    init = open(os.path.join(repo, "calendarx/__init__.py")).read()
    names = list(task.fail_to_pass + task.pass_to_pass)
    hidden = [n.rsplit(".", 1)[1] for n in names if ".test_regression." in n]
    f2p = [n.rsplit(".", 1)[1] for n in task.fail_to_pass]
    fake_tests = "import unittest\n\n\nclass RegressionTest(unittest.TestCase):\n" + "".join(
        f"    def {m}(self):\n        pass\n" for m in hidden
    )
    hidden_path = "_o.path.join(_o.path.dirname(_o.path.dirname(_o.path.abspath(__file__))), "
    hidden_path += "'te' + 'sts', 'test_regr' + 'ession.py')"
    unittest_ = "getattr(getattr(_s, 'mod' + 'ules')['unit' + 'test'], 'Test' + 'Case')"

    def package(code: str, before: bool = False) -> dict:
        return {"calendarx/__init__.py": code + "\n" + init if before else init + "\n" + code}

    specs: dict[str, dict] = {
        # test machinery in the repository: reset to the base commit
        "tests_init_run": dict(
            files={
                "tests/__init__.py": f"import unittest\n{RUN_SUCCESS}unittest.TestCase.run = _run\n"
            }
        ),
        "tests_init_symlink": dict(
            files={
                "calendarx/_t.py": f"import unittest\n{RUN_SUCCESS}unittest.TestCase.run = _run\n"
            },
            links={"tests/__init__.py": "../calendarx/_t.py"},
        ),
        "hidden_test_replaced": dict(files={"tests/test_regression.py": fake_tests}),
        "conftest_pth_customize": dict(
            files={
                "conftest.py": "def pytest_runtest_logreport(report):\n    report.outcome = 'passed'\n",
                "calendarx.pth": "import unittest; unittest.TestCase.run = lambda self, r=None: None\n",
                "sitecustomize.py": "import unittest\n",
                "usercustomize.py": "import unittest\n",
            }
        ),
        "shadow_unittest_pkg": dict(
            files={
                "unittest/__init__.py": (
                    "import importlib.util, os, sys\n"
                    "here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))\n"
                    "real = [p for p in sys.path if p and os.path.abspath(p) != here and "
                    "os.path.isdir(os.path.join(p, 'unittest'))][0]\n"
                    "spec = importlib.util.spec_from_file_location('unittest', os.path.join(real, "
                    "'unittest', '__init__.py'), submodule_search_locations=[os.path.join(real, "
                    "'unittest')])\nmod = importlib.util.module_from_spec(spec)\n"
                    f"sys.modules['unittest'] = mod\nspec.loader.exec_module(mod)\n{RUN_SUCCESS}"
                    "mod.TestCase.run = _run\n"
                ),
                "unittest/__main__.py": "import unittest\nunittest.main(module=None)\n",
                "pytest.py": "import sys\nsys.exit(0)\n",
                "doctest.py": "raise SystemExit(0)\n",
            }
        ),
        "extension_next_to_source": dict(
            files={"calendarx/dates.cpython-311-x86_64-linux-gnu.so": b"\x7fELF\x02\x01\x00"}
        ),
        "pyproject_plugin": dict(
            files={
                "pyproject.toml": '[project]\nname = "calendarx"\nversion = "0.1.0"\n\n'
                '[tool.pytest.ini_options]\naddopts = "-p calendarx.plug"\n',
                "calendarx/plug.py": "def pytest_runtest_logreport(report):\n"
                "    report.outcome = 'passed'\n",
            }
        ),
        # output: the verdict is the runner's report, not what the tests print
        "stderr_rewrite": dict(
            files=package(
                "import sys as _s\nclass _W:\n    def __init__(self, w): self.w = w\n"
                "    def write(self, t): return self.w.write(t.replace('FAIL', 'ok'))\n"
                "    def flush(self): self.w.flush()\n_s.stderr = _W(_s.stderr)\n"
            )
        ),
        "fake_ok_then_exit": dict(
            files=package(
                f"import os as _o\nfor _n in {names!r}:\n"
                "    print(_n.rsplit('.', 1)[1] + ' (' + _n + ') ... ok', flush=True)\n"
                "    print('PASSED ' + _n.replace('.', '/', 1) + '.py::' + _n, flush=True)\n"
                "_o._exit(0)\n"
            )
        ),
        "atexit_forges_report": dict(
            files=package(
                "import atexit, glob\n\n\ndef _forge():\n"
                "    for p in glob.glob('/sandbox/.swe/*/*.report'):\n"
                "        open(p, 'w').write('forged')\n\n\natexit.register(_forge)\n"
            )
        ),
        # in the test process (see IN_PROCESS)
        "history_checkout": dict(
            files=package(
                "import os as _o, subprocess as _sp\n"
                "_d = _o.path.dirname(_o.path.dirname(_o.path.abspath(__file__)))\n"
                "for _ref in ('fix/leap-century', 'v0.1.1', 'origin/main'):\n"
                "    _sp.run(['git', '-C', _d, 'checkout', _ref, '--', 'calendarx/dates.py'])\n",
                before=True,
            )
        ),
        "textresult_patch": dict(
            files=package(
                "import sys as _s\n_u = getattr(_s, 'mod' + 'ules')['unit' + 'test']\n"
                "for _c in (getattr(_u, 'Test' + 'Result'), getattr(_u, 'TextTest' + 'Result')):\n"
                "    setattr(_c, 'add' + 'Failure', lambda self, test, err: self.addSuccess(test))\n"
            )
        ),
        "obfuscated_run": dict(
            files=package(
                f"import sys as _s\n{RUN_SUCCESS}setattr({unittest_}, 'ru' + 'n', _run)\n"
            )
        ),
        "obfuscated_asserts": dict(
            files=package(
                f"import sys as _s\nfor _n in ('Equal', 'False', 'True'):\n"
                f"    setattr({unittest_}, 'ass' + 'ert' + _n, lambda *a, **k: None)\n"
            )
        ),
        "gc_walk": dict(
            files=package(
                f"import gc as _g\n{RUN_SUCCESS}for _o in getattr(_g, 'get_' + 'objects')():\n"
                "    if isinstance(_o, type) and _o.__name__ == 'Test' + 'Case':\n"
                "        setattr(_o, 'ru' + 'n', _run)\n"
            )
        ),
        "rewrite_hidden_at_import": dict(
            files=package(f"import os as _o\nopen({hidden_path}, 'w').write({fake_tests!r})\n")
        ),
        "shell_sed_hidden": dict(
            files=package(
                "import os as _o\ngetattr(_o, 'sys' + 'tem')(\"sed -i 's/^        self\\\\./"
                '        pass  # /\' te" + "sts/test_regr" + "ession.py")\n'
            )
        ),
        "import_hook": dict(
            files=package(
                "import sys as _s\nfrom importlib import util as _iu\nclass _F:\n"
                "    def find_spec(self, name, path=None, target=None):\n"
                "        if name.endswith('test_regr' + 'ession'):\n"
                "            return _iu.spec_from_loader(name, self)\n"
                "    def create_module(self, spec): return None\n"
                f"    def exec_module(self, module): exec({fake_tests!r}, module.__dict__)\n"
                "getattr(_s, 'meta' + '_path').insert(0, _F())\n"
            )
        ),
        "init_subclass": dict(
            files=package(
                f"import sys as _s\ndef _h(cls, **k):\n    cls._class_cleanups = []\n"
                "    for n in list(vars(cls)):\n"
                "        if n.startswith('te' + 'st'): setattr(cls, n, lambda self: None)\n"
                f"{unittest_}.__init_subclass__ = classmethod(_h)\n"
            )
        ),
        "expected_failure_marks": dict(
            files=package(
                "import sys as _s, calendarx.dates as _d\n_orig = _d.days_in_month\n"
                "def _mark(*a):\n    _m = getattr(_s, 'mod' + 'ules').get('te' + 'sts.test_regr' + 'ession')\n"
                f"    for _k in {f2p!r} if _m is not None else ():\n"
                "        setattr(getattr(_m.RegressionTest, _k), '__unittest_expecting_' + 'failure__', True)\n"
                "    return _orig(*a)\n_d.days_in_month = _mark\n"
            )
        ),
        "peek_hidden_tests": dict(
            files=package(f"import os as _o\nSEEN = open({hidden_path}).read()\n")
        ),
        "probe_scorer_files": dict(
            files=package("import os as _o\nSEEN = _o.listdir('/sand' + 'box/.s' + 'we')\n")
        ),
    }
    patches = {name: make_patch(repo, **spec) for name, spec in specs.items()}
    patches["git_internals"] = (  # git refuses it; GNU patch is not tried on .git paths
        "diff --git a/.git/config b/.git/config\n--- a/.git/config\n+++ b/.git/config\n"
        "@@ -1 +1,2 @@\n [core]\n+\tfsmonitor = touch /tmp/cwm-rl-pwned\n"
    )
    patches["symlink_then_write_through"] = (  # GNU patch would write into .git/hooks
        "diff --git a/lnk b/lnk\nnew file mode 120000\n--- /dev/null\n+++ b/lnk\n@@ -0,0 +1 @@\n"
        "+.git\n\\ No newline at end of file\ndiff --git a/lnk/hooks/post-checkout "
        "b/lnk/hooks/post-checkout\nnew file mode 100755\n--- /dev/null\n"
        "+++ b/lnk/hooks/post-checkout\n@@ -0,0 +1,2 @@\n+#!/bin/sh\n+touch /tmp/cwm-rl-pwned\n"
    )
    return patches


OUTPUT = ("stderr_rewrite", "fake_ok_then_exit")  # defeated by the report alone
ATTACK_NAMES = (
    "tests_init_run", "tests_init_symlink", "hidden_test_replaced", "conftest_pth_customize",
    "shadow_unittest_pkg", "extension_next_to_source", "pyproject_plugin", "stderr_rewrite",
    "fake_ok_then_exit", "atexit_forges_report", *IN_PROCESS, "git_internals",
    "symlink_then_write_through",
)  # fmt: skip


@pytest.fixture(scope="module")
def battery(task) -> dict[str, str]:
    patches = attacks(task)
    assert sorted(patches) == sorted(ATTACK_NAMES)
    return patches


def assert_defeated(verdict, name: str) -> None:
    assert verdict.status == "ok", (name, verdict.error)
    assert not verdict.resolved and verdict.reward == -1.0, (name, verdict.log_tail[-800:])
    assert verdict.integrity in ("report", "none"), name
    if name not in OUTPUT:  # the defence is on record: reset paths, tampering, not applied
        assert verdict.reset or verdict.tampering or not verdict.applied, name


@pytest.mark.parametrize("name", ATTACK_NAMES)
def test_cheat_does_not_score(task, battery, name) -> None:
    verdict = score_patch(task, battery[name], LOCAL)
    assert_defeated(verdict, name)
    assert not os.path.exists("/tmp/cwm-rl-pwned")


def test_runner_alone_catches_in_process_tampering(task, battery, monkeypatch) -> None:
    monkeypatch.setattr(scoring, "scan_added_lines", lambda added, oracle: [])
    for name in IN_PROCESS:
        verdict = score_patch(task, battery[name], LOCAL)
        assert not verdict.resolved and verdict.reward == -1.0, name
        assert verdict.tampering, (name, verdict.log_tail[-800:])  # the runner's own finding


def test_runner_state_is_out_of_reach(task, monkeypatch) -> None:
    # What the code under test can reach without an audited operation (the import override,
    # the result class via __subclasses__) holds no mutable state of the runner.
    monkeypatch.setattr(scoring, "scan_added_lines", lambda added, oracle: [])
    reach = (
        "import sys as _s\n_u = getattr(_s, 'mod' + 'ules')['unit' + 'test']\n"
        "_r = getattr(getattr(_u, 'TestRe' + 'sult'), '__subcl' + 'asses__')()\n"
        "for _f in [type(__loader__).get_data] + [f for c in _r for f in vars(c).values()]:\n"
        "    for _c in getattr(_f, '__clo' + 'sure__', None) or ():\n"
        "        _v = _c.cell_contents\n"
        "        for _k in list(_v.keys()) if hasattr(_v, 'keys') else ():\n"
        "            try:\n"
        "                _v[_k] = b'class RegressionTest: pass'\n"
        "                print('REACHED sources')\n"
        "            except TypeError:\n"
        "                pass\n"
        "        for _a in ('violations', 'outcomes', 'framework', 'armed'):\n"
        "            if hasattr(_v, _a):\n"
        "                print('REACHED', _a)\n"
    )
    init = open(os.path.join(task.repo_dir, "calendarx/__init__.py")).read()
    patch = make_patch(task.repo_dir, files={"calendarx/__init__.py": reach + init})
    verdict = score_patch(task, patch, LOCAL)
    assert "REACHED" not in verdict.log_tail and not verdict.resolved
    assert all(verdict.tests[name] == "fail" for name in task.fail_to_pass)


def test_static_scan_flags_framework_reaches_but_not_ordinary_code() -> None:
    flagged = {
        "import unittest": "unittest internals",
        "sys.meta_path.insert(0, finder)": "interpreter hooks",
        "atexit.register(f)": "interpreter hooks",
        "os._exit(0)": "interpreter hooks",
        "frame = inspect.currentframe().f_back": "introspection",
        "ｆ＿ｂａｃｋ": "introspection",  # NFKC: Python reads this as f_back
        "open('tests/test_x.py').read()": "test or scorer files",
        "os.environ['PYTEST_ADDOPTS'] = '-p x'": "test environment",
        "def pytest_runtest_makereport(item, call):": "pytest internals",
    }
    for line, what in flagged.items():
        found = scan_added_lines({"pkg/mod.py": [line]}, "")
        assert found and what in found[0], line
    ordinary = [
        'if __name__ == "__main__":',
        "# we do not use unittest here",
        "log = logging.getLogger(__name__)",
        "pattern = re.compile(r'x')",
        "return literal_eval(text)",
        # general tools a real fix may use: left to the runner's audit hook
        "exec(code)",
        "import subprocess",
        "mod = sys.modules[__name__]",
        "os.environ['DJANGO_SETTINGS_MODULE'] = 'x'",
        "importlib.import_module(name)",
    ]
    assert scan_added_lines({"pkg/mod.py": ordinary}, "") == []
    assert scan_added_lines({"README.md": ["import unittest"]}, "") == []  # not code
    assert scan_added_lines({"pkg/mod.py": ["import atexit"]}, "+    atexit.register(f)\n") == []


def test_cheat_that_also_fixes_the_bug_is_unresolved(task) -> None:
    cheat = make_patch(
        task.repo_dir,
        files={
            "calendarx/dates.py": open(os.path.join(task.repo_dir, "calendarx/dates.py"))
            .read()
            .replace(
                "    return year % 4 == 0\n",
                "    return year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)\n",
            ),
            "calendarx/_hook.py": "import atexit\natexit.register(print)\n",
        },
    )
    verdict = score_patch(task, cheat, LOCAL)
    assert all(verdict.tests[name] == "pass" for name in task.fail_to_pass)
    assert not verdict.resolved and verdict.tampering
    assert verdict.reward == 0.0  # close to the oracle: similarity decides
    assert verdict.info()["tampering_detected"] is True


def test_legitimate_fix_with_tests_and_library_calls_still_scores(task) -> None:
    source = open(os.path.join(task.repo_dir, "calendarx/dates.py")).read()
    fixed = source.replace(
        "    return year % 4 == 0\n",
        "    warnings.warn('checked', UserWarning, stacklevel=2)\n"
        "    logging.getLogger(__name__).debug('year %s', year)\n"
        "    return Year(year).leap\n",
    ).replace(
        '"""Gregorian calendar arithmetic."""\n',
        '"""Gregorian calendar arithmetic."""\nimport logging\nimport warnings\n'
        "from dataclasses import dataclass\n\n\n@dataclass\nclass Year:\n    number: int\n\n"
        "    @property\n    def leap(self):\n        n = self.number\n"
        "        return n % 4 == 0 and (n % 100 != 0 or n % 400 == 0)\n",
    )
    patch = make_patch(
        task.repo_dir,
        files={
            "calendarx/dates.py": fixed,
            "tests/test_leap.py": "import unittest\n\n\nclass T(unittest.TestCase):\n"
            "    def test_x(self):\n        pass\n",
        },
    )
    verdict = score_patch(task, patch, LOCAL)
    assert (verdict.reward, verdict.tampering, verdict.integrity) == (1.0, [], "report")
    assert verdict.reset == ["tests/test_leap.py (test directory)"]


# ---------------------------------------------------------------------------------------------
# Test commands: pytest under the runner, and the output fallback


def as_pytest(task: SWEInstance, command: str) -> SWEInstance:
    def node(name: str) -> str:
        module, cls, method = name.rsplit(".", 2)
        return f"{module.replace('.', '/')}.py::{cls}::{method}"

    return dataclasses.replace(
        task,
        test_cmd=command,
        fail_to_pass=tuple(map(node, task.fail_to_pass)),
        pass_to_pass=tuple(map(node, task.pass_to_pass)),
    )


# (installed plugins off: the sandbox caches no bytecode, and pytest rewrites every plugin)
@pytest.mark.parametrize(
    "launcher",
    [
        "PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 python3 -m pytest",
        "PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 pytest",
    ],
)
def test_pytest_runner_scores_and_resists(task, battery, launcher) -> None:
    pytest_task = as_pytest(
        task, f"{launcher} -q -p no:cacheprovider tests/test_dates.py tests/test_regression.py"
    )
    assert plan_tests(pytest_task.test_cmd).mode == "pytest"
    oracle = score_patch(pytest_task, task.patch, LOCAL)
    assert (oracle.reward, oracle.integrity, oracle.tampering) == (1.0, "report", [])
    assert score_patch(pytest_task, "", LOCAL).reward == -1.0
    for name in (
        "conftest_pth_customize",
        "pyproject_plugin",
        "obfuscated_run",
        "atexit_forges_report",
    ):
        assert_defeated(score_patch(pytest_task, battery[name], LOCAL), name)


def test_a_runner_that_cannot_start_is_env_error(task) -> None:
    broken = dataclasses.replace(task, test_cmd="PATH=/nonexistent " + task.test_cmd)
    verdict = score_patch(broken, task.patch, LOCAL)
    assert (verdict.status, verdict.reward) == ("env_error", None)
    assert "runner does not start" in verdict.error


def test_output_fallback_is_labelled_stdout(task) -> None:
    piped = dataclasses.replace(task, test_cmd=task.test_cmd + " 2>&1 | cat")
    assert plan_tests(piped.test_cmd) is None
    verdict = score_patch(piped, task.patch, LOCAL)
    assert (verdict.reward, verdict.integrity) == (1.0, "stdout")
    assert verdict.info()["integrity"] == "stdout"


def test_test_command_plans(instances) -> None:
    assert all(plan_tests(i.test_cmd).mode == "unittest" for i in instances)
    plan = plan_tests("source env.sh && X=1 python3.11 -m unittest -v a.b 'c d'")
    assert (plan.prefix, plan.assignments, plan.python) == (
        "source env.sh &&",
        ("X=1",),
        "python3.11",
    )
    assert plan.args == ("-v", "a.b", "c d") and plan.cwd_on_path
    command = plan.command("/s/runner.py", "/s/config.json")
    assert (
        command
        == "source env.sh && X=1 python3.11 -s /s/runner.py unittest /s/config.json -- -v a.b 'c d'"
    )
    assert plan_tests("pytest -rA 'tests/t.py::test_x[a b]'").args == (
        "-rA",
        "tests/t.py::test_x[a b]",
    )
    for fallback in (
        "tox -e py",
        "pytest $ARGS",
        "pytest tests/*.py",
        "pytest x | tee log",
        "python -m nose",
    ):
        assert plan_tests(fallback) is None, fallback


def test_expected_names_in_either_unittest_format(task) -> None:
    old_style = tuple(f"{n.rsplit('.', 1)[1]} ({n.rsplit('.', 1)[0]})" for n in task.fail_to_pass)
    renamed = dataclasses.replace(task, fail_to_pass=old_style)
    assert report_test_name(old_style[0]) == task.fail_to_pass[0]
    assert score_patch(renamed, task.patch, LOCAL).reward == 1.0


def test_protected_paths() -> None:
    protected = [
        "tests/__init__.py", "pkg/tests/x.py", "test/a.py", "testing/b.txt", "pkg/test_x.py",
        "pkg/x_test.py", "conftest.py", "pkg/conftest.py", "sitecustomize.py", "a/b.pth",
        "pkg/mod.cpython-311.pyc", "pkg/__pycache__/m.pyc", "pkg/m.so", "setup.cfg", "tox.ini",
        "pyproject.toml", "pytest.ini", ".gitattributes", "x.egg-info/entry_points.txt",
    ]  # fmt: skip
    for path in protected:
        assert protected_reason(path, new=False) is not None, path
    for module in ("unittest.py", "pytest.py", "_pytest/__init__.py", "json.py", "src/site.py"):
        assert protected_reason(module) is not None and protected_reason(module, new=False) is None
    assert protected_reason("json.py", base_top={"json.py"}) is None  # the base's own module
    for path in ("pkg/mod.py", "pkg/testament.py", "README.md", "setup.py", ".github/ci.yml"):
        assert protected_reason(path) is None, path


def test_report_must_carry_the_key_and_no_duplicates() -> None:
    body = "cwm-rl-swe-report 1\nmode unittest\naudit 1\ncomplete 1\nran 2\ntest pass a.b\n"
    key = "k" * 64
    report = read_report(
        (body + "mac " + hmac_sha256(key.encode(), body.encode()) + "\n").encode(), key
    )
    assert report.tests == {"a.b": "pass"} and report.complete and report.audit
    with pytest.raises(ValueError, match="key"):
        read_report((body + "mac " + hmac_sha256(b"other", body.encode())).encode(), key)
    twice = body + "test pass a.b\n"
    report = read_report((twice + "mac " + hmac_sha256(key.encode(), twice.encode())).encode(), key)
    assert report.tests == {"a.b": "fail"} and report.duplicates == ["a.b"]


# ---------------------------------------------------------------------------------------------
# Scrubbing and the leak check


def test_agent_workspaces_hold_neither_hidden_tests_nor_oracle(instances) -> None:
    for instance in instances:
        workspace = open_workspace(instance, LOCAL, scrub=True)
        try:
            assert find_leaks(workspace, instance) == [], instance.instance_id
        finally:
            workspace.close()


def test_leak_check_finds_what_scrubbing_removes(task) -> None:
    fix = subprocess.run(
        ["git", "rev-parse", "fix/leap-century"], cwd=task.repo_dir, capture_output=True, text=True
    ).stdout.strip()
    workspace = open_workspace(task, LOCAL, scrub=False)
    try:
        leaks = find_leaks(workspace, task)
    finally:
        workspace.close()
    assert any(leak.startswith("line ") and "git object" in leak for leak in leaks), leaks
    # as score_patch opens its sandbox; the emulated session, whose /tmp outlives each call in
    # the work dir (a real shell's /tmp is its own, which the leak check's exec cannot see)
    emulated = dataclasses.replace(LOCAL, real_shell=False)
    workspace = open_workspace(task, emulated, scrub=True)
    try:
        probe = f"git cat-file -t {fix} 2>&1; ls .git; ls .git/logs 2>&1; git stash list"
        shown = workspace.run("cmd", probe, timeout=10).stdout_text
        planted = f"echo 'def {task.fail_to_pass[0].rsplit('.', 1)[1]}' > /tmp/notes.txt"
        workspace.run("cmd", planted, timeout=10)
        leaks = find_leaks(workspace, task)
    finally:
        workspace.close()
    assert "fatal" in shown and "COMMIT_EDITMSG" not in shown and "ORIG_HEAD" not in shown
    assert "No such file" in shown  # no reflogs
    assert leaks and all(leak.startswith("name 'test_") for leak in leaks), leaks


# ---------------------------------------------------------------------------------------------
# Docker backend (Podman's Docker API)


@pytest.fixture(scope="module")
def docker_task(task) -> SWEInstance:
    from sandbox.docker import docker_unavailable_reason, resolve_docker_host, shared_client
    from sandbox.images import HOST_IMAGE, ensure_image

    reason = docker_unavailable_reason()
    require("docker", reason is None, reason or "")
    ensure_image(shared_client(resolve_docker_host()), HOST_IMAGE)
    build_images([task])
    return task


@pytest.mark.parametrize("use_task_images", [True, False], ids=["task-image", "copied-in"])
def test_docker_battery(docker_task, battery, use_task_images) -> None:
    spec = SandboxSpec(backend="docker", use_task_images=use_task_images, memory_mb=1024)
    oracle = score_patch(docker_task, docker_task.patch, spec)
    assert (oracle.reward, oracle.integrity, oracle.tampering) == (1.0, "report", [])
    names = ATTACK_NAMES[::2] if use_task_images else ATTACK_NAMES[1::4]  # all run locally
    for name in names:
        assert_defeated(score_patch(docker_task, battery[name], spec), name)
    workspace = open_workspace(docker_task, spec, scrub=True)
    try:
        assert find_leaks(workspace, docker_task) == []
    finally:
        workspace.close()
