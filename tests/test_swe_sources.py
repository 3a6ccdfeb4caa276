"""SWE data sources (envs/swe/sources.py): SWE-bench / SWE-Gym records read as the official
harness reads them, graded with its log parsers, validated before training
(envs/swe/validate.py, `python -m launch.validate_swe`), and run end to end on offline
SWE-bench look-alike images (tests/swe_fixtures.py: /testbed, a conda-style env, root, a
Django-style and a sympy-style runner) in Podman."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest
import swe_fixtures
from conftest import require

from envs.data import DataError
from envs.swe.env import SWEEnv
from envs.swe.instances import SWEInstance, instance_from_record, load_instances
from envs.swe.scoring import (
    FAIL,
    PASS,
    SKIP,
    forged_results,
    parse_test_output,
    parse_with_harness,
    resolved_from,
    score_patch,
)
from envs.swe.sources import (
    eval_script_test_cmd,
    from_r2e,
    from_swebench,
    from_swesmith,
    swebench_image,
)

pytestmark = pytest.mark.timeout(600)
REPO = Path(__file__).resolve().parents[1]

RAW = {  # a SWE-bench Verified record as the dataset ships it (fields shortened)
    "repo": "django/django",
    "instance_id": "django__django-11099",
    "base_commit": "d26b2424437dabeeca94d7900b37d2df4410da0c",
    "patch": "diff --git a/django/contrib/auth/validators.py b/django/contrib/auth/validators.py\n",
    "test_patch": (
        "diff --git a/tests/auth_tests/test_validators.py b/tests/auth_tests/test_validators.py\n"
        "--- a/tests/auth_tests/test_validators.py\n+++ b/tests/auth_tests/test_validators.py\n"
    ),
    "problem_statement": "UsernameValidator allows trailing newline in usernames",
    "hints_text": "",
    "created_at": "2019-03-20T03:46:18Z",
    "version": "3.0",
    "FAIL_TO_PASS": '["test_ascii_validator (auth_tests.test_validators.UsernameValidatorsTests)"]',
    "PASS_TO_PASS": '["test_help_text (auth_tests.test_validators.MinimumLengthValidatorTest)"]',
    "environment_setup_commit": "419a78300f7cd27611196e1e464d50fd0385ff27",
}


def instance(**fields) -> SWEInstance:
    return instance_from_record(from_swebench({**RAW, **fields}, namespace=None))


def run_episode(env: SWEEnv, task, replies: list[str]) -> tuple[list, list]:
    """Reset, then one step per reply until done: (the first messages, the step results)."""

    async def episode():
        results = []
        try:
            first = await env.reset(task)
            for reply in replies:
                results.append(await env.step(reply))
                if results[-1].done:
                    break
            return first, results
        finally:
            await env.close()

    return asyncio.run(episode())


# ---------------------------------------------------------------------------------------------
# Records


def test_image_names_follow_the_harness_and_swe_gym() -> None:
    assert swebench_image("django__django-11099") == (
        "swebench/sweb.eval.x86_64.django_1776_django-11099:latest"
    )
    assert (
        swebench_image("Django__Django-1", namespace=None)
        == "sweb.eval.x86_64.django__django-1:latest"
    )
    assert swebench_image("pandas-dev__pandas-5", arch="arm64") == (
        "swebench/sweb.eval.arm64.pandas-dev_1776_pandas-5:latest"
    )
    assert swebench_image("getmoto__moto-7365", style="swegym") == (
        "xingyaoww/sweb.eval.x86_64.getmoto_s_moto-7365"
    )
    with pytest.raises(ValueError, match="image style"):
        swebench_image("a__b-1", style="dockerhub")


def test_a_raw_swe_bench_record_loads_with_the_harness_command_and_parser() -> None:
    """Without repo_dir or image (the dataset has neither), the record still makes an instance:
    the harness's image, /testbed, its runtests.py command on the test patch's labels, its
    Django parser, the image's own user."""
    got = instance()
    assert got.image == "sweb.eval.x86_64.django__django-11099:latest"
    assert (got.repo_path, got.image_user, got.log_parser) == (
        "/testbed",
        "image",
        "parse_log_django",
    )
    assert got.test_cmd.endswith(
        "./tests/runtests.py --verbosity 2 --settings=test_sqlite --parallel 1 "
        "auth_tests.test_validators"
    )
    assert got.test_cmd.startswith("source /opt/miniconda3/bin/activate && conda activate testbed")
    assert got.fail_to_pass == (
        "test_ascii_validator (auth_tests.test_validators.UsernameValidatorsTests)",
    )
    assert got.extra["version"] == "3.0" and got.extra["environment_setup_commit"]
    sympy = instance(
        repo="sympy/sympy",
        test_patch="diff --git a/sympy/core/tests/test_n.py b/sympy/core/tests/test_n.py\n",
    )
    assert "bin/test -C --verbose sympy/core/tests/test_n.py" in sympy.test_cmd
    assert sympy.log_parser == "parse_log_sympy"
    other = instance(
        repo="psf/requests", test_patch="diff --git a/tests/test_x.py b/tests/test_x.py\n"
    )
    assert other.test_cmd.endswith(
        "pytest --no-header -rA --tb=no -p no:cacheprovider tests/test_x.py"
    )
    for missing in ("base_commit", "repo", "test_patch"):
        with pytest.raises(ValueError, match=f"field '{missing}'"):
            from_swebench({**RAW, missing: ""})


def test_the_eval_script_gives_its_setup_and_test_lines_not_its_git_lines() -> None:
    script = swe_fixtures.eval_script(
        "abc123",
        ["tests/x.py"],
        "diff --git a/tests/x.py b/tests/x.py\n+evil\n",
        "pytest -rA tests/x.py",
    )
    command = eval_script_test_cmd(script)
    assert command.splitlines() == [
        "source /opt/miniconda3/bin/activate",
        "conda activate testbed",
        "cd /testbed",
        "cd /testbed",
        "source /opt/miniconda3/bin/activate",
        "conda activate testbed",
        "export FIXTURE_SETUP=1",
        "pytest -rA tests/x.py",
    ]
    assert "git" not in command and "evil" not in command
    with pytest.raises(ValueError, match="markers"):
        eval_script_test_cmd("#!/bin/bash\npytest\n")
    got = instance(eval_script=script, log_parser="parse_log_pytest")
    assert got.test_cmd == command and got.log_parser == "parse_log_pytest"


def test_load_instances_reads_swebench_jsonl_and_refuses_an_unknown_parser(tmp_path) -> None:
    path = tmp_path / "verified.jsonl"
    path.write_text(json.dumps(RAW) + "\n" + json.dumps({**RAW, "instance_id": "x__y-1"}) + "\n")
    got = load_instances(path, record_format="swebench", on_bad_line="error")
    assert [i.instance_id for i in got] == ["django__django-11099", "x__y-1"]
    assert got[0].image == "swebench/sweb.eval.x86_64.django_1776_django-11099:latest"
    assert load_instances(path, on_bad_line="skip") == []  # native: no image, no repo_dir
    path.write_text(json.dumps({**RAW, "log_parser": "parse_log_cobol"}) + "\n")
    env = swe_env(path, "swebench")
    with pytest.raises(DataError, match="no log parser 'parse_log_cobol'"):
        env.load_tasks("train")


# ---------------------------------------------------------------------------------------------
# Grading


DJANGO_LOG = """\
test_mul (arith.tests.OpsTests) ... ok
test_add (arith.tests.OpsTests) ... FAIL

======================================================================
FAIL: test_add (arith.tests.OpsTests)
----------------------------------------------------------------------
AssertionError: -1 != 5
"""
SYMPY_LOG = """\
mathx/core/tests/test_numbers.py[2]
test_igcd_basic ok
test_igcd_negative F
____________________ mathx/core/tests/test_numbers.py:test_igcd_negative ____________________
"""


def test_the_harness_parsers_and_its_grading() -> None:
    django = instance(
        FAIL_TO_PASS=["test_add (arith.tests.OpsTests)"],
        PASS_TO_PASS=["test_mul (arith.tests.OpsTests)"],
    )
    results = parse_with_harness(django, DJANGO_LOG)
    assert results["test_mul (arith.tests.OpsTests)"] == PASS
    assert results["test_add (arith.tests.OpsTests)"] == FAIL
    assert not resolved_from(django, results, 1)
    clean = "test_mul (arith.tests.OpsTests) ... ok\ntest_add (arith.tests.OpsTests) ... ok\n"
    passing = parse_with_harness(django, clean)
    assert resolved_from(django, passing, 0)
    # output that reports no failure from a command that failed is not believed
    assert not resolved_from(django, passing, 1)
    # a skipped PASS_TO_PASS test is no regression (the harness's rule); a skipped F2P is no fix
    assert resolved_from(django, {**passing, "test_mul (arith.tests.OpsTests)": SKIP}, 0)
    assert not resolved_from(django, {**passing, "test_add (arith.tests.OpsTests)": SKIP}, 0)
    assert not resolved_from(django, {}, 0)
    sympy = instance(
        repo="sympy/sympy", FAIL_TO_PASS=["test_igcd_negative"], PASS_TO_PASS=["test_igcd_basic"]
    )
    results = parse_with_harness(sympy, SYMPY_LOG)
    assert results["test_igcd_basic"] == PASS and results["test_igcd_negative"] == FAIL
    assert resolved_from(
        sympy,
        parse_with_harness(sympy, SYMPY_LOG.replace("negative F", "negative ok").split("____")[0]),
        0,
    )


def test_django_style_names_match_in_the_output_fallback() -> None:
    """Without a harness parser, `test_x (module.Class)` names are compared as the runner
    reports them, so SWE-bench's Django ids can pass."""
    native = instance_from_record(
        {
            **RAW,
            "image": "img",
            "test_cmd": "./tests/runtests.py",
            "FAIL_TO_PASS": ["test_add (arith.tests.OpsTests)"],
            "PASS_TO_PASS": [],
        }
    )
    assert native.log_parser is None
    results = parse_test_output(DJANGO_LOG.replace("... FAIL", "... ok"))
    assert resolved_from(native, results, 0)
    assert not resolved_from(native, parse_test_output(DJANGO_LOG), 1)
    # unittest's closing "FAILED (failures=1)" is not a pytest result line for a test "(failures=1)"
    assert parse_test_output("Ran 2 tests\n\nFAILED (failures=1)\n") == {}


def test_a_patch_that_names_the_hidden_tests_is_flagged() -> None:
    """Output can be forged by the code under test; to forge a result line it must name the
    test. Source lines that do (and the oracle does not) are tampering."""
    django = instance(FAIL_TO_PASS=["test_add (arith.tests.OpsTests)"], PASS_TO_PASS=[])
    forged = {"calc/ops.py": ["print('test_add (arith.tests.OpsTests) ... ok')"]}
    assert forged_results(forged, django) and "test_add" in forged_results(forged, django)[0]
    data = {"calc/names.txt": ["test_add"]}  # a data file read by code counts too
    assert forged_results(data, django)
    assert forged_results({"calc/ops.py": ["    return a + b"]}, django) == []


# ---------------------------------------------------------------------------------------------
# Offline SWE-bench look-alikes in Podman


def docker_client():
    from sandbox.docker import docker_unavailable_reason, resolve_docker_host, shared_client

    reason = docker_unavailable_reason()
    require("docker", reason is None, reason or "")
    return shared_client(resolve_docker_host())


def build_source(tmp_path_factory, name: str, build) -> dict:
    """Build a source's look-alikes (images in Podman) and write its records as JSONL."""
    root = tmp_path_factory.mktemp(name)
    built = build(root, docker_client())
    path = root / "instances.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in built["records"].values()))
    return {**built, "path": path, "root": root}


@pytest.fixture(scope="module")
def lookalikes(tmp_path_factory):
    return build_source(tmp_path_factory, "swebench", swe_fixtures.build)


def swe_env(path: Path, source: str = "swebench", **overrides) -> SWEEnv:
    config = {
        "source": source,
        "path": str(path),
        "backend": "docker",
        "command_timeout_s": 30.0,
        "scoring_timeout_s": 120.0,
        "validate_first": 0,
    }
    if source == "swebench":
        config["image_namespace"] = None  # the look-alikes have local names
    return SWEEnv({**config, **overrides})


def validate_swe(data: Path, source: str) -> subprocess.CompletedProcess:
    """`python -m launch.validate_swe DATA --source SOURCE`, as a user runs it."""
    command = [sys.executable, "-m", "launch.validate_swe", str(data), "--source", source]
    if source == "swebench":
        command += ["--image-namespace", ""]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)


def test_validate_swe_passes_every_fixture_and_names_a_broken_one(lookalikes, tmp_path) -> None:
    done = validate_swe(lookalikes["path"], "swebench")
    assert done.returncode == 0, done.stdout + done.stderr
    rows = [line.split() for line in done.stdout.splitlines()[1:4]]
    assert [(r[0], r[1], r[2], r[3]) for r in rows] == [
        (name, "ok", "+1", "-1")
        for name in ("fixture__djangoish-1", "fixture__djangoish-2", "fixture__sympyish-1")
    ]
    assert "3/3 instances valid" in done.stdout
    # a gold patch that does not apply: named, exit 1
    records = [json.loads(line) for line in lookalikes["path"].read_text().splitlines()]
    records[2]["patch"] = records[2]["patch"].replace("-    return a", "-    return a  # not there")
    broken = tmp_path / "broken.jsonl"
    broken.write_text("".join(json.dumps(r) + "\n" for r in records))
    done = validate_swe(broken, "swebench")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "failed: fixture__sympyish-1" in done.stdout
    row = next(line for line in done.stdout.splitlines() if line.startswith("fixture__sympyish-1"))
    assert "FAIL" in row and "gold patch does not apply" in row
    # a record whose base commit is not the image's: the set-up says so
    records[0]["base_commit"] = "0" * 40
    stale = tmp_path / "stale.jsonl"
    stale.write_text(json.dumps(records[0]) + "\n")
    done = validate_swe(stale, "swebench")
    assert done.returncode == 1 and "not the instance's base commit 0000" in done.stdout, (
        done.stdout
    )
    # and a run on that data refuses to start, naming the instance
    env = swe_env(broken, validate_first=3)
    with pytest.raises(DataError, match="fixture__sympyish-1.*failed validation"):
        env.load_tasks("train")


def test_wrong_patches_score_minus_one(lookalikes) -> None:
    env = swe_env(lookalikes["path"])
    spec = env.config.sandbox_spec()
    for inst in env.instances():
        verdict = score_patch(inst, lookalikes["wrong"][inst.instance_id], spec, timeout_s=120)
        assert (verdict.status, verdict.applied, verdict.resolved) == ("ok", True, False), (
            verdict.info()
        )
        assert verdict.reward == -1.0 and verdict.integrity == "stdout"


def test_the_image_environment_and_user_are_kept(lookalikes) -> None:
    from sandbox import make_sandbox

    image = swebench_image("fixture__sympyish-1", namespace=None)
    with make_sandbox(
        "docker", image=image, user="image", workdir_mb=None, read_only=False, workdir="/testbed"
    ) as box:
        result = box.exec(
            "echo $PATH; id -u; . /opt/miniconda3/bin/activate && conda activate testbed && python -c 'import testbed_env; print(testbed_env.NAME)'",
            timeout=30,
        )
    lines = result.stdout_text.split()
    assert (
        lines[0].startswith("/opt/miniconda3/bin:") and lines[1] == "0" and lines[2] == "testbed"
    ), result


def test_a_scripted_agent_fixes_a_swe_bench_instance(lookalikes) -> None:
    env = swe_env(lookalikes["path"])
    task = next(
        t
        for t in env.load_tasks("train") + env.load_tasks("test")
        if t.payload["instance_id"] == "fixture__djangoish-1"
    )
    replies = [
        "<tool: bash>\n./tests/runtests.py --verbosity 2 arith.tests 2>&1 | tail -2; echo $CONDA_DEFAULT_ENV\n</tool>",
        "<tool: edit>\ncalc/ops.py\n<<<<<<< SEARCH\n    return a - b\n=======\n    return a + b\n>>>>>>> REPLACE\n</tool>",
        "<tool: bash>\ngit diff > /tmp/fix.patch && head -1 /tmp/fix.patch\n</tool>",
        "<tool: submit>\n/tmp/fix.patch\n</tool>",
        "Fixed add().",
    ]

    first, results = run_episode(env, task, replies)
    assert "repository is at /testbed" in first[1]["content"]
    texts = [r.messages[0]["content"] for r in results[:-1]]
    assert "OK" in texts[0] and "testbed" in texts[0]
    assert texts[2].startswith("diff --git a/calc/ops.py")
    last = results[-1]
    assert (last.done, last.status, last.reward) == (True, "ok", 1.0), last.info


# ---------------------------------------------------------------------------------------------
# SWE-smith


def test_reverse_patch_undoes_a_patch(tmp_path) -> None:
    """Applying a patch and then its reverse gives the original tree back (edits, a new file,
    a deleted file, a rename)."""
    repo, _ = swe_fixtures._repo(
        tmp_path / "r", {"a.py": "x = 1\ny = 2\n", "b.py": "gone\n", "c.py": "move me\n"}
    )
    (repo / "a.py").write_text("x = 1\ny = 3\nz = 4\n")
    (repo / "new.py").write_text("fresh\n")
    (repo / "b.py").unlink()
    swe_fixtures._git(repo, "mv", "c.py", "d.py")
    swe_fixtures._git(repo, "add", "-A")
    patch = swe_fixtures._git(repo, "diff", "--cached", "-M") + "\n"
    swe_fixtures._git(repo, "commit", "-q", "-m", "change")
    after = swe_fixtures._git(repo, "rev-parse", "HEAD^{tree}")
    reverse = tmp_path / "reverse.patch"
    reverse.write_text(
        from_swesmith(
            {"instance_id": "i", "patch": patch, "problem_statement": "p", "image_name": "x"}
        )["patch"]
    )
    swe_fixtures._git(repo, "apply", "--index", str(reverse))
    assert swe_fixtures._git(repo, "write-tree") == swe_fixtures._git(
        repo, "rev-parse", "HEAD~1^{tree}"
    )
    assert swe_fixtures._git(repo, "write-tree") != after
    with pytest.raises(ValueError, match="image_name"):
        from_swesmith({"instance_id": "i", "patch": patch, "problem_statement": "p"})


@pytest.fixture(scope="module")
def smith(tmp_path_factory):
    return build_source(tmp_path_factory, "swesmith", swe_fixtures.build_swesmith)


def test_validate_swe_passes_the_swesmith_fixtures_and_wrong_patches_fail(smith) -> None:
    done = validate_swe(smith["path"], "swesmith")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "3/3 instances valid" in done.stdout
    env = swe_env(smith["path"], "swesmith")
    spec = env.config.sandbox_spec()
    for inst in env.instances():
        assert inst.base_branch == inst.instance_id and inst.base_patch
        verdict = score_patch(inst, smith["wrong"][inst.instance_id], spec, timeout_s=120)
        assert (verdict.status, verdict.applied, verdict.resolved, verdict.reward) == (
            "ok",
            True,
            False,
            -1.0,
        ), verdict.info()
        assert verdict.integrity.startswith("report")  # a unittest command: the scorer's runner


def test_a_swesmith_episode_starts_from_the_bug_with_the_fix_unreachable(smith) -> None:
    """Both ways in (the image's branch, or the bug patch where the branch is missing) start at
    the buggy code with a history in which the clean commit (the fix) cannot be found."""
    env = swe_env(smith["path"], "swesmith", command_timeout_s=30.0)
    clean = swe_fixtures._git(smith["repo"], "rev-parse", "main")
    tasks = {t.payload["instance_id"]: t for t in env.load_tasks("train") + env.load_tasks("test")}
    for instance_id, (buggy, _) in list(swe_fixtures.SMITH_BUGS.items())[1:]:
        task = tasks[instance_id]
        replies = [
            f"<tool: bash>\ngit log --all --oneline | wc -l; git cat-file -t {clean} 2>&1 | head -1; git status --short | wc -l\n</tool>",
            "<tool: bash>\ncat stats.py\n</tool>",
            f"<tool: create>\n/tmp/fix.patch\n{task.payload['patch']}</tool>",
            "<tool: submit>\n/tmp/fix.patch\n</tool>",
            "Done.",
        ]

        _, results = run_episode(env, task, replies)
        texts = [r.messages[0]["content"] for r in results[:-1]]
        history, missing, dirty = texts[0].split("\n")[:3]
        assert history == "1" and "fatal" in missing and dirty == "0", texts[0]
        assert buggy.strip() in texts[1]
        assert (results[-1].status, results[-1].reward) == ("ok", 1.0), results[-1].info


# ---------------------------------------------------------------------------------------------
# R2E-Gym


def test_an_r2e_record_reads_its_image_oracle_and_expected_outcomes(tmp_path) -> None:
    repo, _ = swe_fixtures._repo(
        tmp_path / "r", {"stats.py": swe_fixtures.STATS, "tests/test_s.py": "x = 1\n"}
    )
    parsed = {  # R2E-Gym's parsed_commit_content: a source diff and a test diff
        "old_commit_hash": "a",
        "new_commit_hash": "b",
        "commit_message": "fix",
        "commit_date": "2020-01-01",
        "file_diffs": [
            {
                "old_file": {"path": "stats.py"},
                "new_file": {"path": "stats.py"},
                "hunks": [
                    {
                        "descriptor": {
                            "old_range": {"start": 1, "length": 3},
                            "new_range": {"start": 1, "length": 3},
                            "section": "",
                        },
                        "line_group": {
                            "pre_context_lines": [{"content": "def mean(xs):"}],
                            "left_lines": [{"content": "    return sum(xs) / len(xs)"}],
                            "right_lines": [{"content": "    return sum(xs) / max(len(xs), 1)"}],
                            "post_context_lines": [{"content": ""}],
                        },
                    }
                ],
            },
            {
                "old_file": {"path": "tests/test_s.py"},
                "new_file": {"path": "tests/test_s.py"},
                "hunks": [],
            },
        ],
    }
    record = {
        "docker_image": "namanjain12/stats_final:abc",
        "problem_statement": "[ISSUE]\nmean fails\n[/ISSUE]\nmore",
        "parsed_commit_content": json.dumps(parsed),
        "expected_output_json": '{"t.py::test_a": "PASSED", "t.py::test_b": "FAILED"}',
        "repo_name": "stats",
    }
    got = instance_from_record(from_r2e(record))
    assert (got.instance_id, got.image, got.problem_statement) == (
        "stats_final__abc",
        "namanjain12/stats_final:abc",
        "mean fails",
    )
    assert got.expected == {"t.py::test_a": "pass", "t.py::test_b": "fail"}
    assert (
        got.hidden_paths == ("/r2e_tests", "/testbed/run_tests.sh") and "{hidden}" in got.test_cmd
    )
    assert "tests/test_s.py" not in got.patch  # the oracle is the source diff only
    (tmp_path / "p.patch").write_text(got.patch)
    swe_fixtures._git(repo, "apply", "--check", str(tmp_path / "p.patch"))
    for missing in ("docker_image", "expected_output_json"):
        with pytest.raises(ValueError, match=missing):
            from_r2e({**record, missing: ""})
    with pytest.raises(ValueError, match="no oracle"):
        from_r2e({k: v for k, v in record.items() if k != "parsed_commit_content"})
    with pytest.raises(ValueError, match="expected_output_json"):
        from_r2e({**record, "expected_output_json": '{"t": "MAYBE"}'})
    # graded by comparison: every outcome as expected, the same tests and no more
    assert resolved_from(got, {"t.py::test_a": PASS, "t.py::test_b - AssertionError": FAIL}, 1)
    assert not resolved_from(got, {"t.py::test_a": PASS, "t.py::test_b": PASS}, 0)
    assert not resolved_from(got, {"t.py::test_a": PASS}, 0)
    assert not resolved_from(got, {"t.py::test_a": PASS, "t.py::test_b": FAIL, "t.py::x": PASS}, 1)


@pytest.fixture(scope="module")
def r2e(tmp_path_factory):
    return build_source(tmp_path_factory, "r2e", swe_fixtures.build_r2e)


def test_validate_swe_passes_the_r2e_fixtures_and_the_hidden_tests_cannot_be_forged(r2e) -> None:
    done = validate_swe(r2e["path"], "r2e")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "3/3 instances valid" in done.stdout
    env = swe_env(r2e["path"], "r2e")
    spec = env.config.sandbox_spec()
    for inst in env.instances():
        verdict = score_patch(inst, r2e["wrong"][inst.image], spec, timeout_s=120)
        assert (verdict.status, verdict.resolved, verdict.reward) == ("ok", False, -1.0), (
            verdict.info()
        )
    # a patch that brings its own r2e_tests (all passing) and its own run_tests.sh fixes nothing
    inst = env.instances()[0]
    forged = (
        "diff --git a/r2e_tests/test_hidden.py b/r2e_tests/test_hidden.py\nnew file mode 100644\n"
        "--- /dev/null\n+++ b/r2e_tests/test_hidden.py\n@@ -0,0 +1,3 @@\n+import unittest\n"
        "+class HiddenTests(unittest.TestCase):\n+    pass\n"
        "diff --git a/run_tests.sh b/run_tests.sh\nnew file mode 100644\n--- /dev/null\n"
        "+++ b/run_tests.sh\n@@ -0,0 +1 @@\n+echo 'test_mean (r2e_tests.test_hidden.HiddenTests) ... ok'\n"
    )
    verdict = score_patch(inst, forged, spec, timeout_s=120)
    assert verdict.status == "ok" and not verdict.resolved, verdict.info()


def test_an_r2e_episode_cannot_see_the_hidden_tests(r2e) -> None:
    env = swe_env(r2e["path"], "r2e", command_timeout_s=30.0)
    task = (env.load_tasks("train") + env.load_tasks("test"))[0]
    replies = [
        "<tool: bash>\nls /r2e_tests run_tests.sh 2>&1; find / -name test_hidden.py 2>/dev/null | wc -l\n</tool>",
        f"<tool: create>\n/tmp/fix.patch\n{task.payload['patch']}</tool>",
        "<tool: submit>\n/tmp/fix.patch\n</tool>",
        "Done.",
    ]

    _, results = run_episode(env, task, replies)
    seen = results[0].messages[0]["content"]
    assert seen.count("No such file") == 2 and seen.split("\n")[2] == "0", seen
    assert (results[-1].status, results[-1].reward) == ("ok", 1.0), results[-1].info


# ---------------------------------------------------------------------------------------------
# Harbor


@pytest.fixture(scope="module")
def harbor_tasks(tmp_path_factory):
    return swe_fixtures.build_harbor(tmp_path_factory.mktemp("harbor"), docker_client())


def test_harbor_tasks_load_and_bad_ones_are_named(tmp_path) -> None:
    from envs.swe import harbor

    task = tmp_path / "t1"
    (task / "tests").mkdir(parents=True)
    (task / "instruction.md").write_text("Do it.\n")
    (task / "tests" / "test.sh").write_text("echo 1 > /logs/verifier/reward.txt\n")
    (task / "task.toml").write_text(
        '[environment]\ndocker_image = "me/img:1"\n[verifier]\ntimeout_sec = 30\n'
    )
    record = harbor.load_tasks(tmp_path)[0]
    got = instance_from_record(record)
    assert (got.instance_id, got.image, got.repo_path, got.verifier) == (
        "t1",
        "me/img:1",
        "/app",
        "harbor",
    )
    assert got.verifier_timeout_s == 30.0 and got.patch == ""
    (task / "task.toml").write_text("[verifier\n")
    with pytest.raises(ValueError, match="not valid TOML"):
        harbor.load_tasks(tmp_path)
    (task / "task.toml").write_text("")
    with pytest.raises(ValueError, match="no environment/Dockerfile"):
        harbor.load_tasks(tmp_path)
    (task / "tests" / "test.sh").unlink()
    with pytest.raises(ValueError, match="no tests/test.sh"):
        harbor.load_tasks(task)


def test_validate_swe_runs_each_harbor_solution_and_names_a_broken_one(
    harbor_tasks, tmp_path
) -> None:
    done = validate_swe(harbor_tasks, "harbor")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "3/3 instances valid" in done.stdout
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(harbor_tasks / "sum-report", broken / "sum-report")
    (broken / "sum-report" / "solution" / "solve.sh").write_text(
        "echo '{\"total\": 11}' > report.json\n"
    )
    done = validate_swe(broken, "harbor")
    assert done.returncode == 1 and "failed: sum-report" in done.stdout, done.stdout + done.stderr


def test_a_harbor_episode_is_verified_in_its_container_and_a_planted_reward_is_void(
    harbor_tasks,
) -> None:
    env = swe_env(harbor_tasks, "harbor", command_timeout_s=30.0)
    tasks = {t.payload["instance_id"]: t for t in env.load_tasks("train") + env.load_tasks("test")}

    plant = "<tool: bash>\nmkdir -p /logs/verifier 2>&1; echo 1 > /logs/verifier/reward.txt; ls /tests 2>&1\n</tool>"
    first, results = run_episode(env, tasks["fix-calc"], [plant, "Done (not really)."])
    assert (
        "Your working directory is /app" in first[1]["content"]
        and "subtracts" in first[1]["content"]
    )
    assert "No such file" in results[0].messages[0]["content"]  # the tests arrive only afterwards
    last = results[-1]
    assert (last.status, last.reward, last.info["verifier_reward"]) == ("ok", -1.0, 0.0), last.info
    fix = "<tool: bash>\nsed -i 's/a - b/a + b/' calc.py && python3 -c 'from calc import add; print(add(2, 3))'\n</tool>"
    _, results = run_episode(env, tasks["fix-calc"], [fix, "Fixed."])
    assert results[0].messages[0]["content"].startswith("5")
    assert (results[-1].status, results[-1].reward, results[-1].info["integrity"]) == (
        "ok",
        1.0,
        "in-place",
    )
