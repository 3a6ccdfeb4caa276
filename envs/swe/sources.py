"""Where SWE instances come from: one adapter per dataset format, each turning a record into
the fields an instance needs (envs.swe.instances): the image, the repository's path in it, who
runs commands there, the test command, the hidden tests and the log parser.

- "native": this project's field names (and the SWE-bench names it has always read); as is.
- "swesmith": SWE-smith records. An instance is a bug *introduced* into a clean repository by
  its `patch`, on a branch named after the instance; the image (`image_name`) holds the clean
  repository at /testbed. The episode starts from the instance's branch where the image has it,
  else from the bug patch applied to the clean commit, re-committed as a root commit so that
  the clean commit (the fix) is unreachable and scrubbed away (envs.swe.workspace); the oracle
  is the bug patch reversed. Tests: the record's command, else SWE-smith's default pytest run
  (under the scorer's runner); FAIL_TO_PASS / PASS_TO_PASS as pytest ids.
- "r2e": R2E-Gym records. The image (`docker_image`) holds the repository at /testbed at the
  buggy commit, its hidden tests at /r2e_tests and their script at /testbed/run_tests.sh. Both
  are deleted from the agent's sandbox before the episode; the scorer moves them out of the
  repository (a patch cannot touch them) and runs the script with the tests linked in as
  `r2e_tests`. The verdict is R2E-Gym's comparison: every test's outcome equals the record's
  `expected_output_json`, the same tests and no more. The oracle is the record's `patch`, else
  the non-test file diffs of its `parsed_commit_content`.
- "swebench": SWE-bench, SWE-bench Verified / Lite and SWE-Gym records (one schema). The image
  is named as the official harness names it: `sweb.eval.<arch>.<instance_id>:latest`, under a
  registry namespace (default "swebench", Docker Hub) with `__` written `_1776_`, all lower
  case; `image_style="swegym"` gives SWE-Gym's published names (`xingyaoww/sweb.eval.<arch>.`
  with `__` written `_s_`); namespace None: the name a local harness build gives. The test
  command is the one of the record's `eval_script` (SWE-bench >= 5 ships one per instance):
  its set-up lines (conda activation, exports, a re-install) and the lines between the harness's
  start and end markers, without its git checkout / apply lines (the scorer applies the hidden
  tests itself, after resetting what the agent's patch did to the test machinery). A record
  without one gets the command the harness used for its repository (`runtests.py` for Django,
  `bin/test` for sympy, pytest -rA otherwise) on the files its test patch touches. The log
  parser is the harness's (`log_parser`, else the one it keeps for the repository); it reads the
  output when the command is not one the scorer's own runner can run (pytest / unittest commands
  run under the runner, envs.swe.runner, whatever the source).
Commands run as the image's own user, with its environment (the docker sandbox keeps its PATH);
the agent's bash session starts with the testbed conda env activated, as the harness's scripts.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Mapping
from typing import Any

START_MARKER = ">>>>> Start Test Output"  # swebench.harness.constants.START_TEST_OUTPUT
END_MARKER = ">>>>> End Test Output"
SWEBENCH_REPO_PATH = "/testbed"
SWEBENCH_ACTIVATE = "source /opt/miniconda3/bin/activate && conda activate testbed"
# the harness's commands for records without an eval_script (its MAP_REPO_VERSION_TO_SPECS, the
# versions this project has seen); {tests}: labels (Django) or files (the others)
DJANGO_TEST_CMD = "./tests/runtests.py --verbosity 2 --settings=test_sqlite --parallel 1 {tests}"
SYMPY_TEST_CMD = (
    "PYTHONWARNINGS='ignore::UserWarning,ignore::SyntaxWarning' bin/test -C --verbose {tests}"  # noqa: E501
)
PYTEST_TEST_CMD = "pytest --no-header -rA --tb=no -p no:cacheprovider {tests}"
REPO_PARSERS = {  # the harness's parser per repository (swebench.harness.log_parsers)
    "django/django": "parse_log_django",
    "sympy/sympy": "parse_log_sympy",
}
IMAGE_STYLES = ("swebench", "swegym")
HEREDOC = re.compile(r"<<-?\s*['\"]?(\w+)['\"]?")


def swebench_image(
    instance_id: str,
    namespace: str | None = "swebench",
    arch: str = "x86_64",
    style: str = "swebench",
) -> str:
    """The image the official harness (or SWE-Gym) names for an instance."""
    if style == "swegym":
        owner = namespace if namespace not in (None, "swebench") else "xingyaoww"
        return f"{owner}/sweb.eval.{arch}.{instance_id}".replace("__", "_s_").lower()
    if style != "swebench":
        raise ValueError(f"image style must be one of {IMAGE_STYLES}, got {style!r}")
    key = f"sweb.eval.{arch}.{instance_id}:latest"
    if namespace:  # registries reject "__" in names: the harness writes it _1776_
        key = f"{namespace}/{key}".replace("__", "_1776_")
    return key.lower()


def eval_script_test_cmd(script: str) -> str:
    """The test command of a harness eval script: its set-up lines, then the lines between the
    start and end markers; git lines and here-documents (the hidden test patch) dropped."""
    lines = script.splitlines()
    starts = [i for i, line in enumerate(lines) if START_MARKER in line]
    ends = [i for i, line in enumerate(lines) if END_MARKER in line]
    if len(starts) != 1 or len(ends) != 1 or ends[0] <= starts[0]:
        raise ValueError("eval_script has no single start / end test output markers")
    setup, heredoc_end = [], None
    for line in lines[: starts[0]]:
        text = line.strip()
        if heredoc_end is not None:
            if text == heredoc_end:
                heredoc_end = None
            continue
        match = HEREDOC.search(text)
        if match:
            heredoc_end = match.group(1)
            continue
        if not text or text.startswith(("#", "set -", "set +")) or re.match(r"git\b", text):
            continue
        setup.append(text)
    tests = [line.strip() for line in lines[starts[0] + 1 : ends[0]] if line.strip()]
    if not tests:
        raise ValueError("eval_script runs no command between its test output markers")
    return "\n".join(setup + tests)


def django_labels(test_files: list[str]) -> list[str]:
    """tests/queries/test_q.py -> queries.test_q (what runtests.py takes)."""
    labels = []
    for path in test_files:
        if path.endswith(".py") and path.startswith("tests/"):
            labels.append(path[len("tests/") : -len(".py")].replace("/", "."))
    return labels


def default_test_cmd(repo: str, test_files: list[str]) -> str:
    """The harness's test command for a repository, on these test files."""
    if repo == "django/django":
        tests = django_labels(test_files)
        template = DJANGO_TEST_CMD
    else:
        tests = [p for p in test_files if p.endswith(".py")]
        template = SYMPY_TEST_CMD if repo == "sympy/sympy" else PYTEST_TEST_CMD
    if not tests:
        raise ValueError(f"the test patch touches no test file {repo} can run")
    command = template.format(tests=" ".join(shlex.quote(t) for t in tests))
    return f"{SWEBENCH_ACTIVATE} && cd {SWEBENCH_REPO_PATH} && {command}"


def default_parser(repo: str) -> str:
    """The harness's log parser for a repository (pytest's where it keeps none)."""
    try:
        from swebench.harness.log_parsers.python import MAP_REPO_TO_PARSER_PY
    except ImportError:
        return REPO_PARSERS.get(repo, "parse_log_pytest")
    parser = MAP_REPO_TO_PARSER_PY.get(repo)
    return parser.__name__ if parser is not None else "parse_log_pytest"


def from_swebench(
    record: Mapping[str, Any],
    *,
    namespace: str | None = "swebench",
    arch: str = "x86_64",
    style: str = "swebench",
) -> dict[str, Any]:
    """A SWE-bench / SWE-Gym record as a native one (ValueError names a missing field)."""
    from envs.swe.instances import patch_paths

    for name in ("instance_id", "repo", "base_commit", "patch", "test_patch"):
        if not isinstance(record.get(name), str) or not record[name].strip():
            raise ValueError(f"SWE-bench record: field '{name}' must be a non-empty string")
    native = dict(record)
    native.setdefault("image", swebench_image(record["instance_id"], namespace, arch, style))
    native.setdefault("repo_path", SWEBENCH_REPO_PATH)
    native.setdefault("image_user", "image")
    native.setdefault("shell_init", SWEBENCH_ACTIVATE)  # the agent works in the testbed env
    native.setdefault("expect_head", record["base_commit"])  # the image's /testbed is there
    if not any(native.get(k) for k in ("test_cmd", "test_command", "eval_cmd")):
        script = record.get("eval_script")
        if isinstance(script, str) and script.strip():
            native["test_cmd"] = eval_script_test_cmd(script)
        else:
            files = list(patch_paths(record["test_patch"]))
            native["test_cmd"] = default_test_cmd(record["repo"], files)
    native.setdefault("log_parser", record.get("log_parser") or default_parser(record["repo"]))
    for key in ("FAIL_TO_PASS", "PASS_TO_PASS"):
        if isinstance(native.get(key), str):
            try:
                native[key] = json.loads(native[key])
            except json.JSONDecodeError:
                raise ValueError(f"SWE-bench record: '{key}' is not a JSON list") from None
    return native


SWESMITH_TEST_CMD = "pytest --disable-warnings --color=no --tb=no --verbose"


def reverse_patch(patch: str) -> str:
    """The git diff that undoes `patch` (old and new sides swapped: file headers, modes,
    renames, index lines, hunk ranges, + and - lines)."""
    out: list[str] = []
    lines = patch.splitlines()
    i = 0
    hunk = re.compile(r"^@@ -(\d+(?:,\d+)?) \+(\d+(?:,\d+)?) @@(.*)$")
    while i < len(lines):
        line = lines[i]
        if line.startswith("diff --git "):
            match = re.match(r"^diff --git a/(\S+) b/(\S+)$", line)
            out.append(f"diff --git a/{match[2]} b/{match[1]}" if match else line)
        elif line.startswith("--- ") and i + 1 < len(lines) and lines[i + 1].startswith("+++ "):
            old, new = line[4:], lines[i + 1][4:]
            out.append("--- " + ("a/" + new[2:] if new.startswith("b/") else new))
            out.append("+++ " + ("b/" + old[2:] if old.startswith("a/") else old))
            i += 1
        elif line.startswith(("new file mode ", "deleted file mode ")):
            kind, mode = ("deleted", line[14:]) if line.startswith("new") else ("new", line[18:])
            out.append(f"{kind} file mode {mode}")
        elif line.startswith(("rename from ", "rename to ")):
            out.append(
                ("rename to " + line[12:])
                if line.startswith("rename from")
                else ("rename from " + line[10:])
            )
        elif line.startswith(("old mode ", "new mode ")):
            out.append(
                ("new mode " + line[9:]) if line.startswith("old") else ("old mode " + line[9:])
            )
        elif line.startswith("index "):
            match = re.match(r"^index (\w+)\.\.(\w+)(.*)$", line)
            out.append(f"index {match[2]}..{match[1]}{match[3]}" if match else line)
        elif hunk.match(line):
            match = hunk.match(line)
            out.append(f"@@ -{match[2]} +{match[1]} @@{match[3]}")
        elif line[:1] == "+":
            out.append("-" + line[1:])
        elif line[:1] == "-":
            out.append("+" + line[1:])
        else:
            out.append(line)
        i += 1
    # rename headers come as "rename from / rename to": keep that order after the swap
    for k in range(len(out) - 1):
        if out[k].startswith("rename to ") and out[k + 1].startswith("rename from "):
            out[k], out[k + 1] = out[k + 1], out[k]
    return "\n".join(out) + ("\n" if patch.endswith("\n") else "")


def from_swesmith(record: Mapping[str, Any], **_: Any) -> dict[str, Any]:
    """A SWE-smith record as a native one (ValueError names a missing field)."""
    for name in ("instance_id", "patch", "problem_statement"):
        if not isinstance(record.get(name), str) or not record[name].strip():
            raise ValueError(f"SWE-smith record: field '{name}' must be a non-empty string")
    if not any(isinstance(record.get(k), str) and record[k] for k in ("image_name", "image")):
        raise ValueError("SWE-smith record: field 'image_name' (the repository's image) is missing")
    native = dict(record)
    native["patch"] = reverse_patch(record["patch"])
    native["base_patch"] = record["patch"]
    native.setdefault("base_branch", record["instance_id"])
    native.setdefault("test_patch", "")
    native.setdefault("repo_path", SWEBENCH_REPO_PATH)
    native.setdefault("image_user", "image")
    if not any(native.get(k) for k in ("test_cmd", "test_command", "eval_cmd")):
        native["test_cmd"] = SWESMITH_TEST_CMD
    return native


R2E_HIDDEN = ("/r2e_tests", "/testbed/run_tests.sh")
R2E_TEST_CMD = (
    "rm -rf r2e_tests && ln -s {hidden}/r2e_tests r2e_tests && bash {hidden}/run_tests.sh"
)
R2E_STATUS = {
    "PASSED": "pass",
    "XFAIL": "pass",
    "FAILED": "fail",
    "ERROR": "fail",
    "SKIPPED": "skip",
}


def _is_test_path(path: str) -> bool:
    parts = path.split("/")
    name = parts[-1]
    return any(p in ("tests", "test", "testing") for p in parts[:-1]) or name.startswith("test_")


def parsed_commit_patch(parsed: Mapping[str, Any]) -> str:
    """The non-test file diffs of an R2E-Gym `parsed_commit` as a git diff."""
    out = []
    for diff in parsed["file_diffs"]:
        old, new = diff["old_file"]["path"], diff["new_file"]["path"]
        path = new if new != "/dev/null" else old  # the file's name, created or deleted
        if _is_test_path(path):
            continue
        a = old if old == "/dev/null" else f"a/{old}"
        b = new if new == "/dev/null" else f"b/{new}"
        out += [
            f"diff --git a/{path if old == '/dev/null' else old} b/{path}",
            f"--- {a}",
            f"+++ {b}",
        ]
        for hunk in diff["hunks"]:
            d = hunk["descriptor"]
            old_range, new_range = d["old_range"], d["new_range"]
            section = d.get("section") or ""
            out.append(
                f"@@ -{old_range['start']},{old_range.get('length', 1)} "
                f"+{new_range['start']},{new_range.get('length', 1)} @@"
                + (f" {section}" if section else "")
            )
            group = hunk["line_group"]
            for key, mark in (
                ("pre_context_lines", " "),
                ("left_lines", "-"),
                ("right_lines", "+"),
                ("post_context_lines", " "),
            ):
                out += [mark + line["content"] for line in group.get(key, [])]
    if not out:
        raise ValueError("parsed_commit_content changes no non-test file")
    return "\n".join(out) + "\n"


def from_r2e(record: Mapping[str, Any], **_: Any) -> dict[str, Any]:
    """An R2E-Gym record as a native one (ValueError names a missing field)."""
    for name in ("docker_image", "problem_statement", "expected_output_json"):
        if not record.get(name):
            raise ValueError(f"R2E-Gym record: field '{name}' is missing")
    native = dict(record)
    image = str(record["docker_image"])
    native.setdefault("instance_id", image.rsplit("/", 1)[-1].replace(":", "__"))
    native["image"] = image
    problem = str(record["problem_statement"])
    issue = re.search(r"\[ISSUE\](.*)\[/ISSUE\]", problem, re.DOTALL)
    native["problem_statement"] = issue.group(1).strip() if issue else problem
    if not record.get("patch"):
        parsed = record.get("parsed_commit_content") or record.get("parsed_commit")
        if not parsed:
            raise ValueError("R2E-Gym record: no oracle ('patch' or 'parsed_commit_content')")
        try:
            parsed = json.loads(parsed) if isinstance(parsed, str) else parsed
            native["patch"] = parsed_commit_patch(parsed)
        except (KeyError, TypeError, json.JSONDecodeError) as e:
            raise ValueError(f"R2E-Gym record: parsed_commit_content unreadable: {e!r}") from None
    expected = record["expected_output_json"]
    try:
        expected = json.loads(expected) if isinstance(expected, str) else dict(expected)
        native["expected"] = {str(k): R2E_STATUS[str(v).upper()] for k, v in expected.items()}
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"R2E-Gym record: expected_output_json unreadable: {e!r}") from None
    native.setdefault("test_patch", "")
    native.setdefault("repo", str(record.get("repo_name") or ""))
    native.setdefault("repo_path", SWEBENCH_REPO_PATH)
    native.setdefault("image_user", "image")
    native.setdefault("hidden_paths", list(R2E_HIDDEN))
    native.setdefault("test_cmd", R2E_TEST_CMD)
    return native


def native(record: Mapping[str, Any], **_: Any) -> Mapping[str, Any]:
    return record


ADAPTERS = {
    "native": native,
    "swebench": from_swebench,
    "swesmith": from_swesmith,
    "r2e": from_r2e,
}
