"""Offline SWE-bench look-alikes for the source adapters (tests/test_swe_sources.py).

Each instance is a small git repository baked into a Podman image laid out as SWE-bench's are:
the repository at /testbed owned by root, no USER (commands run as root), a conda-style
environment at /opt/miniconda3/envs/testbed activated by `source /opt/miniconda3/bin/activate &&
conda activate testbed` (its python puts the env's site-packages on the path; the test runners
import a module that only that environment has, so a sandbox that drops the image's PATH or
environment fails them), and PATH=/opt/miniconda3/bin:... in the image's config. The host's
/usr is bound read-only (its python3 runs everything), as in the cwm-rl/host image.

Three instances, one per way SWE-bench runs tests:
- `fixture__djangoish-1`: a Django-style `tests/runtests.py` (labels, `test_x (module.Class) ...
  ok` lines), with a SWE-bench >= 5 `eval_script` and `log_parser: parse_log_django`;
- `fixture__djangoish-2`: the same repository, an older record (no eval_script, no parser):
  repo "django/django" gives the harness's runtests.py command and parser;
- `fixture__sympyish-1`: a sympy-style `bin/test` (`test_x ok` / `test_x F` lines, failure
  banners), repo "sympy/sympy": the harness's bin/test command and parser.
"""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import tarfile
import textwrap
from pathlib import Path

ENV_DIR = "opt/miniconda3/envs/testbed"
SITE = f"{ENV_DIR}/lib/python3/site-packages"
IMAGE_PATH = "/opt/miniconda3/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
LABEL = "cwm-rl.swe-fixture-digest"
LAYOUT = "2"  # bump when _rootfs changes: older fixture images are rebuilt

ACTIVATE = """\
# a stand-in for miniconda's activate: `conda activate NAME` puts the env first on PATH
conda() {
    if [ "$1" = activate ]; then
        export CONDA_DEFAULT_ENV="$2" CONDA_PREFIX="/opt/miniconda3/envs/$2"
        export PATH="/opt/miniconda3/envs/$2/bin:$PATH"
    fi
}
"""
ENV_PYTHON = f"""\
#!/bin/sh
export PYTHONPATH="/{SITE}${{PYTHONPATH:+:$PYTHONPATH}}"
exec /usr/bin/python3 "$@"
"""

DJANGO_RUNTESTS = '''\
#!/usr/bin/env python
"""Django's tests/runtests.py, as far as its output goes: labels in, `name (module.Class) ...
status` lines out (verbosity 2), FAIL:/ERROR: banners, exit 1 on failure."""
import argparse, os, sys, unittest

import testbed_env  # only the conda environment has it

parser = argparse.ArgumentParser()
parser.add_argument("labels", nargs="*")
parser.add_argument("--verbosity", type=int, default=1)
parser.add_argument("--settings")
parser.add_argument("--parallel")
args = parser.parse_args()
here = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [here, os.path.dirname(here)]


class Result(unittest.TextTestResult):
    def getDescription(self, test):
        cls = type(test)
        return f"{test._testMethodName} ({cls.__module__}.{cls.__qualname__})"


suite = unittest.defaultTestLoader.loadTestsFromNames(args.labels)
runner = unittest.TextTestRunner(verbosity=args.verbosity, resultclass=Result, stream=sys.stderr)
sys.exit(0 if runner.run(suite).wasSuccessful() else 1)
'''

SYMPY_BIN_TEST = '''\
#!/usr/bin/env python
"""sympy's bin/test, as far as its output goes: `test_x ok|F|E` per test (--verbose), then a
`____ path.py:test_x ____` banner per failure, exit 1 on failure."""
import importlib.util, os, sys, traceback

import testbed_env  # only the conda environment has it

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, root)
files = [a for a in sys.argv[1:] if not a.startswith("-")]
print("============================= test process starts ==============================")
failures = []
for path in files:
    spec = importlib.util.spec_from_file_location("t_" + str(abs(hash(path))), os.path.join(root, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    print(f"{path}[{sum(n.startswith('test_') for n in vars(module))}] ")
    for name in sorted(n for n in vars(module) if n.startswith("test_")):
        try:
            getattr(module, name)()
            print(f"{name} ok")
        except AssertionError:
            print(f"{name} F")
            failures.append((path, name, traceback.format_exc()))
        except Exception:
            print(f"{name} E")
            failures.append((path, name, traceback.format_exc()))
for path, name, text in failures:
    print(f"{'_' * 20} {path}:{name} {'_' * 20}")
    print(text)
print(f"tests finished: {len(failures)} failed")
sys.exit(1 if failures else 0)
'''

CALC_BUGGY = "def add(a, b):\n    return a - b\n\n\ndef mul(a, b):\n    return a * b\n"
CALC_TESTS = textwrap.dedent("""\
    import unittest

    from calc.ops import mul


    class OpsTests(unittest.TestCase):
        def test_mul(self):
            self.assertEqual(mul(3, 4), 12)
""")
CALC_TESTS_HIDDEN = CALC_TESTS.replace("import mul", "import add, mul") + (
    "\n    def test_add(self):\n        self.assertEqual(add(2, 3), 5)\n"
)
CALC_FIXED = CALC_BUGGY.replace("a - b", "a + b")
WRONG_INIT = '"""A package."""\n\n__all__ = ["core"]\nVERSION = (1, 0)\n'  # touches no bug

SYMPY_NUMBERS = "def igcd(a, b):\n    while b:\n        a, b = b, a % b\n    return a\n"
SYMPY_TESTS = "from mathx.core.numbers import igcd\n\n\ndef test_igcd_basic():\n    assert igcd(12, 18) == 6\n"
SYMPY_TESTS_HIDDEN = SYMPY_TESTS + "\n\ndef test_igcd_negative():\n    assert igcd(12, -18) == 6\n"
SYMPY_FIXED = SYMPY_NUMBERS.replace("    return a\n", "    return abs(a)\n")


def _git(repo: Path, *args: str) -> str:
    env = {
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
        "GIT_AUTHOR_DATE": "2020-01-01T00:00:00Z",
        "GIT_COMMITTER_DATE": "2020-01-01T00:00:00Z",
        "PATH": "/usr/bin:/bin",
    }
    done = subprocess.run(["git", "-C", str(repo), *args], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"git {args}: {done.stderr}")
    return done.stdout.strip()


def _repo(root: Path, files: dict[str, str], executable: tuple[str, ...] = ()) -> tuple[Path, str]:
    root.mkdir(parents=True)
    for path, text in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text)
        if path in executable:
            (root / path).chmod(0o755)
    _git(root, "init", "-q", "-b", "main")
    _git(root, "add", "-A")
    _git(root, "commit", "-q", "-m", "base")
    return root, _git(root, "rev-parse", "HEAD")


def diff(repo: Path, changes: dict[str, str]) -> str:
    """The patch that makes `changes` (path -> new text) to the repository's HEAD."""
    for path, text in changes.items():
        (repo / path).write_text(text)
    patch = _git(repo, "diff") + "\n"
    _git(repo, "checkout", "--", ".")
    return patch


def djangoish_repo(root: Path) -> tuple[Path, str]:
    return _repo(
        root,
        {
            "calc/__init__.py": "",
            "calc/ops.py": CALC_BUGGY,
            "tests/runtests.py": DJANGO_RUNTESTS,
            "tests/test_sqlite.py": "DATABASES = {}\n",
            "tests/arith/__init__.py": "",
            "tests/arith/tests.py": CALC_TESTS,
        },
        executable=("tests/runtests.py",),
    )


def sympyish_repo(root: Path) -> tuple[Path, str]:
    return _repo(
        root,
        {
            "mathx/__init__.py": "",
            "mathx/core/__init__.py": "",
            "mathx/core/numbers.py": SYMPY_NUMBERS,
            "mathx/core/tests/__init__.py": "",
            "mathx/core/tests/test_numbers.py": SYMPY_TESTS,
            "bin/test": SYMPY_BIN_TEST,
        },
        executable=("bin/test",),
    )


def eval_script(base: str, test_files: list[str], test_patch: str, command: str) -> str:
    """An eval script shaped as SWE-bench >= 5 ships them."""
    files = " ".join(test_files)
    return "\n".join(
        [
            "#!/bin/bash",
            "set -uxo pipefail",
            "source /opt/miniconda3/bin/activate",
            "conda activate testbed",
            "cd /testbed",
            "git config --global --add safe.directory /testbed",
            "cd /testbed",
            "git status",
            f"git -c core.fileMode=false diff {base}",
            "source /opt/miniconda3/bin/activate",
            "conda activate testbed",
            "export FIXTURE_SETUP=1",
            f"git checkout {base} {files}",
            "git apply -v - <<'EOF_114329324912'",
            test_patch.rstrip("\n"),
            "EOF_114329324912",
            ": '>>>>> Start Test Output'",
            command,
            ": '>>>>> End Test Output'",
            f"git checkout {base} {files}",
        ]
    )


def _rootfs(repo: Path, extra: dict[str, bytes] | None = None) -> bytes:
    from envs.swe.instances import repo_tar
    from sandbox.images import host_rootfs_tar

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as out:
        root = tarfile.TarInfo(".")  # / as images have it: root's, 0755
        root.type, root.mode = tarfile.DIRTYPE, 0o755
        out.addfile(root)
        with tarfile.open(fileobj=io.BytesIO(host_rootfs_tar())) as base:
            for member in base.getmembers():
                out.addfile(member, base.extractfile(member) if member.isfile() else None)

        def add(path: str, data: bytes | None, mode: int = 0o644) -> None:
            info = tarfile.TarInfo(path)
            if data is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                out.addfile(info)
            else:
                info.size, info.mode = len(data), mode
                out.addfile(info, io.BytesIO(data))

        parts = SITE.split("/")
        for i in range(1, len(parts) + 1):
            add("/".join(parts[:i]), None)
        add("opt/miniconda3/bin", None)
        add(f"{ENV_DIR}/bin", None)
        add("opt/miniconda3/bin/activate", ACTIVATE.encode())
        add(f"{ENV_DIR}/bin/python", ENV_PYTHON.encode(), 0o755)
        add(f"{SITE}/testbed_env.py", b"NAME = 'testbed'\n")
        made = set()
        for path, data in sorted((extra or {}).items()):
            parent = path.rsplit("/", 1)[0]
            if "/" in path and parent not in made:
                add(parent, None)
                made.add(parent)
            add(path, data)
        with tarfile.open(fileobj=io.BytesIO(repo_tar(str(repo), "testbed/"))) as tree:
            for member in tree.getmembers():
                out.addfile(member, tree.extractfile(member) if member.isfile() else None)
    return buffer.getvalue()


def build_image(client, repo: Path, name: str, extra: dict[str, bytes] | None = None) -> None:
    """Import the SWE-bench-style image of `repo` as `name` (skipped when it is current);
    `extra`: more files of the image (path without the leading / -> content)."""
    import docker

    from envs.swe.instances import repo_tar
    from sandbox.images import HOST_MOUNTS_LABEL, import_rootfs

    digest = hashlib.sha256(
        repo_tar(str(repo))
        + (ACTIVATE + ENV_PYTHON + IMAGE_PATH + LAYOUT).encode()
        + json.dumps({k: v.decode() for k, v in sorted((extra or {}).items())}).encode()
    ).hexdigest()[:16]
    try:
        if (client.images.get(name).labels or {}).get(LABEL) == digest:
            return
    except docker.errors.ImageNotFound:
        pass
    changes = [
        f"LABEL {HOST_MOUNTS_LABEL}=/usr",
        f"LABEL {LABEL}={digest}",
        f"ENV PATH={IMAGE_PATH}",
        "WORKDIR /testbed",
        'CMD ["/bin/sh"]',
    ]
    import_rootfs(client, _rootfs(repo, extra), changes, name)


def build(root: Path, client) -> dict[str, dict]:
    """The three SWE-bench records (and their images); also `wrong` patches, by instance."""
    from envs.swe.sources import swebench_image

    django_dir, django_base = djangoish_repo(root / "djangoish")
    sympy_dir, sympy_base = sympyish_repo(root / "sympyish")
    calc_gold = diff(django_dir, {"calc/ops.py": CALC_FIXED})
    calc_wrong = diff(django_dir, {"calc/__init__.py": WRONG_INIT})
    calc_tests = diff(django_dir, {"tests/arith/tests.py": CALC_TESTS_HIDDEN})
    sympy_gold = diff(sympy_dir, {"mathx/core/numbers.py": SYMPY_FIXED})
    sympy_wrong = diff(sympy_dir, {"mathx/__init__.py": WRONG_INIT})
    sympy_tests = diff(sympy_dir, {"mathx/core/tests/test_numbers.py": SYMPY_TESTS_HIDDEN})
    test_file = ["tests/arith/tests.py"]
    runtests = "./tests/runtests.py --verbosity 2 --settings=test_sqlite --parallel 1 arith.tests"
    common = {"problem_statement": "add() subtracts instead of adding.", "hints_text": ""}
    records = {
        "fixture__djangoish-1": {
            **common,
            "repo": "fixture/djangoish",
            "base_commit": django_base,
            "patch": calc_gold,
            "test_patch": calc_tests,
            "FAIL_TO_PASS": json.dumps(["test_add (arith.tests.OpsTests)"]),
            "PASS_TO_PASS": json.dumps(["test_mul (arith.tests.OpsTests)"]),
            "version": "4.0",
            "environment_setup_commit": django_base,
            "eval_script": eval_script(django_base, test_file, calc_tests, runtests),
            "log_parser": "parse_log_django",
        },
        "fixture__djangoish-2": {
            **common,
            "repo": "django/django",
            "base_commit": django_base,
            "patch": calc_gold,
            "test_patch": calc_tests,
            "FAIL_TO_PASS": ["test_add (arith.tests.OpsTests)"],
            "PASS_TO_PASS": ["test_mul (arith.tests.OpsTests)"],
            "version": "3.2",
        },
        "fixture__sympyish-1": {
            "problem_statement": "igcd(12, -18) returns -6; gcds are never negative.",
            "hints_text": "",
            "repo": "sympy/sympy",
            "base_commit": sympy_base,
            "patch": sympy_gold,
            "test_patch": sympy_tests,
            "FAIL_TO_PASS": '["test_igcd_negative"]',
            "PASS_TO_PASS": '["test_igcd_basic"]',
            "version": "1.1",
        },
    }
    repos = {"djangoish": django_dir, "sympyish": sympy_dir}
    for instance_id, record in records.items():
        record["instance_id"] = instance_id
        repo = repos[instance_id.split("__")[1].split("-")[0]]
        build_image(client, repo, swebench_image(instance_id, namespace=None))
    wrong = {
        "fixture__djangoish-1": calc_wrong,
        "fixture__djangoish-2": calc_wrong,
        "fixture__sympyish-1": sympy_wrong,
    }
    return {"records": records, "wrong": wrong}


# ---------------------------------------------------------------------------------------------
# SWE-smith look-alikes: one image per repository (the clean code at /testbed), bugs introduced
# by patches on branches named after the instances (the third instance's branch is missing from
# the image: it starts from its patch)

STATS = """\
def mean(xs):
    return sum(xs) / len(xs)


def median(xs):
    s = sorted(xs)
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2


def clamp(x, low, high):
    return max(low, min(x, high))
"""
STATS_TESTS = """\
import unittest

from stats import clamp, mean, median


class StatsTests(unittest.TestCase):
    def test_mean(self):
        self.assertEqual(mean([1, 2, 3, 4]), 2.5)

    def test_median(self):
        self.assertEqual(median([3, 1, 4, 2]), 2.5)

    def test_clamp(self):
        self.assertEqual(clamp(12, 0, 10), 10)
"""
SMITH_BUGS = {  # instance -> (the buggy text of stats.py, the test it breaks)
    "fixture__smithish.c0ffee.func_pm_op_change__mean1": (
        STATS.replace("/ len(xs)", "/ (len(xs) - 1)"),
        "test_mean",
    ),
    "fixture__smithish.c0ffee.func_pm_remove_assign__med2": (
        STATS.replace("(s[mid - 1] + s[mid]) / 2", "s[mid]"),
        "test_median",
    ),
    "fixture__smithish.c0ffee.func_pm_ctrl_shuffle__clp3": (
        STATS.replace("max(low, min(x, high))", "min(low, max(x, high))"),
        "test_clamp",
    ),
}
SMITH_IMAGE = "fixture/swesmith.x86_64.smithish.c0ffee"
SMITH_TEST_CMD = "python3 -m unittest -v tests.test_stats"


def build_swesmith(root: Path, client) -> dict[str, dict]:
    repo, _ = _repo(
        root / "smithish",
        {"stats.py": STATS, "tests/__init__.py": "", "tests/test_stats.py": STATS_TESTS},
    )
    records, wrong = {}, {}
    for k, (instance_id, (buggy, broken)) in enumerate(SMITH_BUGS.items()):
        bug = diff(repo, {"stats.py": buggy})
        if k < 2:  # the image holds these instances' branches
            _git(repo, "checkout", "-q", "-b", instance_id)
            (repo / "stats.py").write_text(buggy)
            _git(repo, "commit", "-q", "-am", "bug")
            _git(repo, "checkout", "-q", "main")
        names = [
            f"tests.test_stats.StatsTests.{t}" for t in ("test_mean", "test_median", "test_clamp")
        ]
        records[instance_id] = {
            "instance_id": instance_id,
            "repo": "swesmith/fixture__smithish.c0ffee",
            "patch": bug,
            "FAIL_TO_PASS": [n for n in names if n.endswith(broken)],
            "PASS_TO_PASS": [n for n in names if not n.endswith(broken)],
            "image_name": SMITH_IMAGE,
            "problem_statement": f"{broken[5:]}() gives wrong results.",
            "test_cmd": SMITH_TEST_CMD,
        }
        wrong[instance_id] = diff(repo, {"util.py": WRONG_INIT})
    build_image(client, repo, SMITH_IMAGE)
    return {"records": records, "wrong": wrong, "repo": repo}


# ---------------------------------------------------------------------------------------------
# R2E-Gym look-alikes: one image per instance, the repository at its buggy commit (the fix was
# never committed), the hidden tests at /r2e_tests and their script at /testbed/run_tests.sh
# (untracked); expected outcomes include a test that fails even with the fix

R2E_HIDDEN_TESTS = STATS_TESTS.replace("StatsTests", "HiddenTests") + (
    "\n    def test_known_failure(self):\n        self.assertEqual(mean([1]), 2)\n"
)
R2E_RUN_TESTS = "#!/bin/bash\npython3 -m unittest -v r2e_tests.test_hidden 2>&1\n"


def build_r2e(root: Path, client) -> dict[str, dict]:
    records, wrong = {}, {}
    base = "r2e_tests.test_hidden.HiddenTests."
    for k, (smith_id, (buggy, broken)) in enumerate(SMITH_BUGS.items()):
        name = f"stats{k}"
        repo, _ = _repo(root / name, {"stats.py": buggy, "util.py": "VERSION = 1\n"})
        (repo / "run_tests.sh").write_text(R2E_RUN_TESTS)  # untracked, as in R2E's images
        image = f"fixture/{name}_final:{smith_id.rsplit('__', 1)[1]}"
        gold = diff(repo, {"stats.py": STATS})
        wrong[image] = diff(repo, {"util.py": WRONG_INIT})
        extra = {
            "r2e_tests/__init__.py": b"",
            "r2e_tests/test_hidden.py": R2E_HIDDEN_TESTS.encode(),
        }
        build_image(client, repo, image, extra)
        expected = {base + t: "PASSED" for t in ("test_mean", "test_median", "test_clamp")}
        expected[base + "test_known_failure"] = "FAILED"
        records[image] = {
            "repo_name": "stats",
            "docker_image": image,
            "commit_hash": _git(repo, "rev-parse", "HEAD"),
            "problem_statement": f"[ISSUE]\n{broken[5:]}() gives wrong results.\n[/ISSUE]",
            "patch": gold,
            "expected_output_json": json.dumps(expected),
        }
    return {"records": records, "wrong": wrong}


# ---------------------------------------------------------------------------------------------
# Harbor look-alikes: task directories (instruction.md, task.toml, environment/Dockerfile built
# from the cwm-rl/host image, tests/test.sh writing /logs/verifier/reward.txt, solution/)

HARBOR_TEST_SH = """#!/bin/bash
if python3 /tests/check.py; then echo 1 > /logs/verifier/reward.txt; else echo 0 > /logs/verifier/reward.txt; fi
"""
HARBOR_TASKS = {
    "fix-calc": {
        "instruction": "calc.py's add() subtracts. Make it add.",
        "app": {"calc.py": CALC_BUGGY},
        "check": "import sys; sys.path.insert(0, '/app')\nfrom calc import add\nassert add(2, 3) == 5\n",
        "solve": "sed -i 's/a - b/a + b/' calc.py\n",
    },
    "sum-report": {
        "instruction": 'Write report.json with {"total": N}, N the sum of the numbers in data.txt.',
        "app": {"data.txt": "3\n4\n5\n"},
        "check": "import json\nassert json.load(open('/app/report.json')) == {'total': 12}\n",
        "solve": "python3 -c \"import json; json.dump({'total': sum(map(int, open('data.txt')))}, open('report.json', 'w'))\"\n",
    },
    "rename-docs": {
        "instruction": "Rename every .txt file in docs/ to .md.",
        "app": {"docs/a.txt": "a\n", "docs/b.txt": "b\n"},
        "check": "import os\nassert sorted(os.listdir('/app/docs')) == ['a.md', 'b.md']\n",
        "solve": 'cd docs && for f in *.txt; do mv "$f" "${f%.txt}.md"; done\n',
    },
}


def build_harbor(root: Path, client) -> Path:
    from sandbox.images import HOST_IMAGE, ensure_image

    ensure_image(client, HOST_IMAGE)
    for name, task in HARBOR_TASKS.items():
        d = root / name
        files = {
            "instruction.md": task["instruction"] + "\n",
            "task.toml": '[metadata]\ndifficulty = "easy"\n\n[verifier]\ntimeout_sec = 60.0\n\n'
            "[agent]\ntimeout_sec = 600.0\n",
            "environment/Dockerfile": f"FROM {HOST_IMAGE}\nWORKDIR /app\nCOPY app/ /app/\n",
            "tests/test.sh": HARBOR_TEST_SH,
            "tests/check.py": task["check"],
            "solution/solve.sh": "#!/bin/bash\nset -e\n" + task["solve"],
        }
        files.update({f"environment/app/{p}": text for p, text in task["app"].items()})
        for path, text in files.items():
            (d / path).parent.mkdir(parents=True, exist_ok=True)
            (d / path).write_text(text)
    return root
