"""The SWE environment end to end: a scripted agent (fixed tool calls, no model) through
reset/step, the tools, budgets, format errors, history scrubbing, and hostile actions through
bash on the local backend (the docker backend in test_swe_env_docker.py)."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import time
from pathlib import Path

import pytest
from conftest import require

from envs import registry
from envs.base import StepResult, Task
from envs.swe import SWEEnv
from envs.swe.instances import SWEInstance
from envs.swe.projects import PROJECTS
from envs.swe.tools import FormatError, parse_edit, parse_tool_call
from sandbox.base import SandboxError
from sandbox.local import bwrap_path

pytestmark = pytest.mark.timeout(120)

TASK_ID = "textkit__truncate-width"
BASE = {
    "source": "builtin",
    "command_timeout_s": 10.0,
    "episode_timeout_s": 120.0,
    "max_turns": 12,
    "memory_mb": 1024,
    "max_processes": 32,
}


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory) -> str:
    require("bwrap", bwrap_path() is not None, "bubblewrap is not installed")
    return str(tmp_path_factory.mktemp("swe") / "tasks")  # built by the env on first use


def make_env(tasks_dir: str, **overrides) -> SWEEnv:
    return SWEEnv({**BASE, "tasks_dir": tasks_dir, **overrides})


def task_by_id(env: SWEEnv, instance_id: str) -> Task:
    tasks = env.load_tasks("train") + env.load_tasks("test")
    return next(t for t in tasks if t.payload["instance_id"] == instance_id)


def bash(command: str) -> str:
    return f"Let me look.\n<tool: bash>\n{command}\n</tool>"


def create(path: str, content: str) -> str:
    return f"<tool: create>\n{path}\n{content}</tool>"


def bug_of(instance_id: str):
    project_name, bug_name = instance_id.split("__")
    project = next(p for p in PROJECTS if p.name == project_name)
    return project, next(b for b in project.bugs if b.name == bug_name)


def run(coro):
    return asyncio.run(coro)


async def episode(env: SWEEnv, task: Task, replies: list[str]) -> tuple[list, list[StepResult]]:
    """Reset, then one step per reply until done; returns (first messages, step results)."""
    results = []
    try:
        first = await env.reset(task)
        for reply in replies:
            result = await env.step(reply)
            results.append(result)
            if result.done:
                break
        return first, results
    finally:
        await env.close()


def finish_with_oracle(task: Task) -> list[str]:
    """Replies that write the oracle patch to /tmp, submit it and finish."""
    return [
        create("/tmp/oracle.patch", task.payload["patch"]),
        "<tool: submit>\n/tmp/oracle.patch\n</tool>",
        "Submitted; done.",
    ]


# ---------------------------------------------------------------------------------------------
# Parsing


def test_tool_call_parsing() -> None:
    call = parse_tool_call("thinking...\n<tool: bash>\nls -la\n</tool>")
    assert (call.name, call.body) == ("bash", "ls -la")
    assert parse_tool_call("no call here") is None
    for bad, message in [
        ("<tool: bash>\nls\n</tool>\n<tool: bash>\npwd\n</tool>", "one tool call per reply"),
        ("<tool: python>\nprint(1)\n</tool>", "unknown tool"),
        ("<tool: bash>\nls\n", "must end with </tool>"),
    ]:
        with pytest.raises(FormatError, match=message):
            parse_tool_call(bad)
    body = "a.py\n<<<<<<< SEARCH\nold\n  two\n=======\nnew\n>>>>>>> REPLACE"
    assert parse_edit(body) == ("a.py", "old\n  two", "new")
    with pytest.raises(ValueError, match="exactly one block"):
        parse_edit("a.py\nold\nnew")


# ---------------------------------------------------------------------------------------------
# A scripted agent solves a task


def test_scripted_agent_solves_a_task_end_to_end(tasks_dir) -> None:
    env = make_env(tasks_dir)
    assert isinstance(env, registry.get("swe"))
    task = task_by_id(env, TASK_ID)
    _, bug = bug_of(TASK_ID)
    replies = [
        bash("ls && git log --oneline | cat"),
        bash("cd textkit && export MARK=persisted"),
        bash("pwd; echo $MARK"),
        f"<tool: edit>\ntext.py\n<<<<<<< SEARCH\n    {bug.buggy}\n=======\n    {bug.fixed}\n"
        ">>>>>>> REPLACE\n</tool>",
        bash(
            "cd .. && python3 -m unittest tests.test_text 2>&1 | tail -1 && git diff > /tmp/fix.patch"
        ),
        bash("cat /tmp/fix.patch | head -3"),
        "<tool: submit>\n/tmp/fix.patch\n</tool>",
        "I fixed truncate() so the suffix counts towards the width.",
    ]
    start = time.monotonic()
    first, results = run(episode(env, task, replies))
    took = time.monotonic() - start
    assert [m["role"] for m in first] == ["system", "user"]
    assert "<tool: bash>" in first[0]["content"]
    assert "truncate() returns strings longer" in first[1]["content"]
    outputs = [r.messages[0]["content"] for r in results[:-1]]
    assert all(r.messages[0]["role"] == "tool" for r in results[:-1])
    assert "README.md" in outputs[0] and "Add tests" in outputs[0]
    assert outputs[2].split("\n")[:2] == ["/sandbox/testbed/textkit", "persisted"]
    assert "Edited text.py" in outputs[3] and bug.fixed in outputs[3]
    assert outputs[4].startswith("OK")
    assert outputs[5].startswith("diff --git a/textkit/text.py")  # /tmp survived the call
    assert "Submitted /tmp/fix.patch" in outputs[6] and bug.fixed in outputs[6]
    for turn, text in enumerate(outputs, start=1):
        assert text.endswith("tokens left.]") and f"[Budget: {12 - turn} turns" in text
    last = results[-1]
    assert (last.done, last.status, last.reward) == (True, "ok", 1.0)
    assert last.info["resolved"] and last.info["similarity"] == 1.0
    assert last.info["tool_calls"] == {"bash": 5, "edit": 1, "submit": 1}
    print(f"episode of {len(results)} steps in {took:.1f} s")


def test_reasoning_mode_reads_the_call_after_think_only(tasks_dir) -> None:
    """A call inside <think> is reasoning, not an action; a reply without </think> is a format
    error (require_think)."""
    env = make_env(tasks_dir, reasoning=True)
    task = task_by_id(env, TASK_ID)
    replies = [
        "<think>\nmaybe\n<tool: bash>\ntouch THOUGHT\n</tool>\n</think>\n"
        "<tool: bash>\nls THOUGHT 2>&1; echo acted\n</tool>",
        "<think>\nno call after the reasoning\n</think>\nI am not sure yet.",
        "<tool: bash>\necho no think\n</tool>",
    ]
    first, results = run(episode(env, task, replies))
    assert "Only the text after </think> is read" in first[0]["content"]
    texts = [r.messages[0]["content"] for r in results]
    assert "No such file" in texts[0] and "acted" in texts[0]  # the thought's call never ran
    assert texts[1].startswith("Format error: no tool call")
    assert texts[2].startswith("Format error: no </think> closing the reasoning")
    assert env._info["format_errors"] == 2


def test_tool_errors_are_reported_and_the_episode_goes_on(tasks_dir) -> None:
    env = make_env(tasks_dir)
    task = task_by_id(env, TASK_ID)
    edit = "<tool: edit>\n{path}\n<<<<<<< SEARCH\n{search}\n=======\nx\n>>>>>>> REPLACE\n</tool>"
    replies = [
        edit.format(path="textkit/text.py", search="no such text"),
        edit.format(path="textkit/text.py", search="    return"),
        edit.format(path="textkit/missing.py", search="x"),
        create("README.md", "again"),
        create("nowhere/new.py", "x = 1"),
        create("textkit/new.py", "x = 1"),
        bash("echo 'not a diff' > /tmp/p.txt"),
        "<tool: submit>\n/tmp/p.txt\n</tool>",
        "Nothing submitted yet, no tool call.",
        "<tool: bash>\nls\n</tool><tool: bash>\npwd\n</tool>",
        bash("cat textkit/new.py"),
    ]
    _, results = run(episode(env, task, replies))
    texts = [r.messages[0]["content"] for r in results]
    assert "SEARCH text was not found" in texts[0]
    assert re.search(r"occurs \d+ times", texts[1])
    assert "does not exist" in texts[2]
    assert "already exists" in texts[3]
    assert "does not exist" in texts[4]
    assert "Created textkit/new.py" in texts[5]
    assert "does not start with `diff`" in texts[7]
    assert texts[8].startswith("Format error: no tool call")
    assert results[8].messages[0]["role"] == "user"
    assert texts[9].startswith("Format error: one tool call per reply")
    assert texts[10].startswith("x = 1")
    assert not any(r.done for r in results)
    assert results[-1].info["format_errors"] == 2


def test_strict_format_ends_the_episode_with_the_failure_reward(tasks_dir) -> None:
    env = make_env(tasks_dir, strict_format=True, reward_scale=2.0)
    _, results = run(episode(env, task_by_id(env, TASK_ID), ["I will just talk."]))
    assert (results[0].done, results[0].reward, results[0].status) == (True, -2.0, "ok")
    assert "no tool call" in results[0].info["format_error"]


def test_turn_budget_ends_the_episode(tasks_dir) -> None:
    env = make_env(tasks_dir, max_turns=3)
    _, results = run(episode(env, task_by_id(env, TASK_ID), [bash("true")] * 5))
    assert [r.done for r in results] == [False, False, True]
    assert (results[-1].status, results[-1].reward, results[-1].info["end"]) == (
        "truncated",
        -1.0,
        "max_turns",
    )
    assert env.truncation_reward == -1.0  # what the rollout uses at its own limits


def test_unsubmitted_work_is_scored_when_configured(tasks_dir) -> None:
    env = make_env(tasks_dir, max_turns=2, score_unsubmitted=True)
    task = task_by_id(env, TASK_ID)
    apply_oracle = create("/tmp/o.patch", task.payload["patch"])
    _, results = run(episode(env, task, [apply_oracle, bash("git apply /tmp/o.patch")]))
    assert (results[-1].status, results[-1].reward) == ("truncated", 1.0)


def test_token_budget_note_counts_down_and_ends_the_episode(tasks_dir) -> None:
    env = make_env(tasks_dir, max_tokens=3000)
    _, results = run(
        episode(env, task_by_id(env, TASK_ID), [bash("seq 1 1500 | tr '\\n' ' '")] * 5)
    )
    assert results[-1].done and results[-1].info["end"] == "max_tokens"
    assert results[-1].reward == -1.0


def test_history_is_scrubbed_and_hidden_tests_are_out_of_reach(tasks_dir) -> None:
    env = make_env(tasks_dir, command_timeout_s=30.0)
    task = task_by_id(env, TASK_ID)
    instance = SWEInstance.from_payload(task.payload)
    fix_commit = subprocess.run(
        ["git", "rev-parse", "fix/truncate-width"],
        cwd=instance.repo_dir,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    jsonl_dir = str(Path(tasks_dir))
    replies = [
        bash(
            "git branch -a; git tag; git remote -v; git stash list; git log --all --oneline | wc -l"
        ),
        bash(f"git cat-file -t {fix_commit} 2>&1; git fsck --lost-found 2>&1 | grep -c commit"),
        bash(
            # outside the system's read-only trees (numpy ships its own test_regression.py)
            "find / -name 'test_regression*' -not -path '/proc/*' -not -path '/usr/*' "
            "-not -path '*/lib/python3*' 2>/dev/null | head -3; "
            "grep -rl test_truncate_respects_width /sandbox /tmp /home /root 2>/dev/null | head; "
            f"ls {jsonl_dir} 2>&1 | head -2"
        ),
    ]
    _, results = run(episode(env, task, replies))
    refs, lost, search = (r.messages[0]["content"] for r in results)
    assert refs.split("\n")[0] == "* main" and refs.split("\n")[1] == "2"
    assert "fix/" not in refs and "v0.1.1" not in refs and "origin" not in refs
    assert "fatal" in lost and lost.split("\n")[1] == "0"
    assert "test_regression" not in search and "respects_width" not in search
    assert "No such file or directory" in search


def test_leak_check_at_reset(tasks_dir, monkeypatch) -> None:
    env = make_env(tasks_dir, leak_check=True)
    task = task_by_id(env, TASK_ID)
    _, results = run(episode(env, task, finish_with_oracle(task)))
    assert (results[-1].reward, results[-1].info["integrity"]) == (1.0, "report")
    monkeypatch.setattr("envs.swe.env.find_leaks", lambda workspace, instance: ["name 'x' in y"])
    with pytest.raises(SandboxError, match="leaks into the workspace"):
        run(env.reset(task))
    assert env._workspace is None  # released


# ---------------------------------------------------------------------------------------------
# Hostile actions through bash (local backend); each episode still ends with a verdict


def test_deleting_the_filesystem_is_contained(tasks_dir, tmp_path) -> None:
    canary = tmp_path / "canary.txt"
    canary.write_text("still here")
    env = make_env(tasks_dir)
    task = task_by_id(env, TASK_ID)
    replies = [bash("rm -rf --no-preserve-root / 2>/dev/null; echo done"), bash("echo alive")]
    _, results = run(episode(env, task, replies + finish_with_oracle(task)))
    assert "alive" in results[1].messages[0]["content"]
    assert (results[-1].done, results[-1].reward) == (True, 1.0)
    assert canary.read_text() == "still here" and os.path.exists("/usr/bin/python3")


def test_fork_bomb_is_contained_after_the_process_limit_is_shown_to_bind(tasks_dir) -> None:
    env = make_env(tasks_dir, command_timeout_s=5.0, max_processes=32)
    task = task_by_id(env, TASK_ID)
    probe = (
        'python3 -c "\nimport os, time\nstarted = 0\nfor _ in range(50):\n    try:\n'
        "        pid = os.fork()\n    except OSError:\n        break\n    if pid == 0:\n"
        "        time.sleep(30)\n        os._exit(0)\n    started += 1\nprint('started', started)\n\""
    )

    async def scenario():
        try:
            await env.reset(task)
            shown = (await env.step(bash(probe))).messages[0]["content"]
            started = int(shown.split("started ")[1].split()[0])
            if not 1 <= started < 32:
                pytest.fail(f"the process limit does not bind ({started} started): no fork bomb")
            load_before = os.getloadavg()[0]
            start = time.monotonic()
            bomb = await env.step(bash(":(){ :|:& };:"))
            elapsed = time.monotonic() - start
            alive = await env.step(bash("echo alive"))
            results = [await env.step(reply) for reply in finish_with_oracle(task)]
            return bomb, elapsed, alive, results, load_before
        finally:
            await env.close()

    bomb, elapsed, alive, results, load_before = run(scenario())
    assert elapsed < 20
    # the bomb ran into the process limit ("fork: retry") until the call ended and everything
    # it started was killed
    assert "fork" in bomb.messages[0]["content"] or "timed out" in bomb.messages[0]["content"]
    assert "alive" in alive.messages[0]["content"]
    assert os.getloadavg()[0] < load_before + 25
    assert (results[-1].done, results[-1].reward) == (True, 1.0)


def test_network_is_unreachable(tasks_dir) -> None:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.setblocking(False)
    port = server.getsockname()[1]
    env = make_env(tasks_dir)
    task = task_by_id(env, TASK_ID)
    probe = (
        f"python3 -c \"\nimport socket\nfor host, port in (('127.0.0.1', {port}), ('1.1.1.1', 53)):\n"
        "    try:\n        socket.create_connection((host, port), timeout=3)\n"
        "        print('connected', host)\n    except OSError as e:\n"
        "        print('refused', host, e)\n\""
    )
    try:
        _, results = run(episode(env, task, [bash(probe)] + finish_with_oracle(task)))
        with pytest.raises(BlockingIOError):
            server.accept()
    finally:
        server.close()
    lines = results[0].messages[0]["content"].split("\n")
    assert [line.split()[:2] for line in lines[:2]] == [
        ["refused", "127.0.0.1"],
        ["refused", "1.1.1.1"],
    ]
    assert results[-1].reward == 1.0


def test_hanging_command_times_out_and_the_episode_ends_in_its_deadline(tasks_dir) -> None:
    env = make_env(tasks_dir, command_timeout_s=3.0, episode_timeout_s=40.0)
    task = task_by_id(env, TASK_ID)
    replies = [bash("cd textkit; export X=1"), bash("sleep 1000"), bash("pwd; echo X=$X")]
    start = time.monotonic()
    _, results = run(episode(env, task, replies + finish_with_oracle(task)))
    took = time.monotonic() - start
    hang = results[1].messages[0]["content"]
    assert "timed out after 3 s" in hang and "restarted" in hang
    assert results[2].messages[0]["content"].startswith("/sandbox/testbed\nX=\n")
    assert results[-1].reward == 1.0
    assert took < 40


# ---------------------------------------------------------------------------------------------
# The docker backend (Podman's Docker API): the repository copied into a `cwm-rl/host`
# container, or baked into the task's own image


@pytest.fixture(scope="module")
def docker_tasks_dir(tasks_dir) -> str:
    from envs.swe.build_tasks import build_images
    from sandbox.docker import docker_unavailable_reason, resolve_docker_host, shared_client
    from sandbox.images import HOST_IMAGE, ensure_image

    reason = docker_unavailable_reason()
    require("docker", reason is None, reason or "")
    ensure_image(shared_client(resolve_docker_host()), HOST_IMAGE)
    env = make_env(tasks_dir)
    build_images([SWEInstance.from_payload(task_by_id(env, TASK_ID).payload)])
    return tasks_dir


@pytest.mark.parametrize("use_task_images", [True, False], ids=["task-image", "copied-in"])
def test_docker_scripted_agent_and_hostile_actions(docker_tasks_dir, use_task_images) -> None:
    env = make_env(
        docker_tasks_dir, backend="docker", use_task_images=use_task_images, command_timeout_s=4.0
    )
    task = task_by_id(env, TASK_ID)
    _, bug = bug_of(TASK_ID)
    replies = [
        bash("cd textkit && export MARK=persisted"),
        bash("pwd; echo $MARK; git branch -a; git log --all --oneline | wc -l"),
        f"<tool: edit>\ntext.py\n<<<<<<< SEARCH\n    {bug.buggy}\n=======\n    {bug.fixed}\n"
        ">>>>>>> REPLACE\n</tool>",
        bash(
            "cd .. && git diff > /tmp/fix.patch && python3 -m unittest tests.test_text 2>&1 | tail -1"
        ),
        bash("python3 -c \"import socket; socket.create_connection(('1.1.1.1', 53), timeout=3)\""),
        bash("sleep 1000"),
        bash("rm -rf --no-preserve-root / 2>/dev/null; echo alive"),
        create("/tmp/oracle.patch", task.payload["patch"]),
        "<tool: submit>\n/tmp/oracle.patch\n</tool>",
        "Done.",
    ]
    start = time.monotonic()
    first, results = run(episode(env, task, replies))
    took = time.monotonic() - start
    texts = [r.messages[0]["content"] for r in results[:-1]]
    assert len(results) == len(replies), (texts, results[-1])
    repo = "/testbed" if use_task_images else "/sandbox/testbed"
    assert f"repository is at {repo}" in first[1]["content"]
    assert texts[1].split("\n")[:4] == [f"{repo}/textkit", "persisted", "* main", "2"]
    assert "Edited text.py" in texts[2] and texts[3].startswith("OK")
    assert "OSError" in texts[4] or "unreachable" in texts[4]
    assert "timed out after 4 s" in texts[5]
    assert "alive" in texts[6]
    last = results[-1]
    assert (last.done, last.status, last.reward) == (True, "ok", 1.0)
    assert took < 90


def test_docker_bash_is_one_real_shell(docker_tasks_dir) -> None:
    """On docker the agent's bash is one long-lived shell: unexported variables, aliases and
    background jobs survive between calls (the emulation loses them); a timeout restarts it."""
    env = make_env(docker_tasks_dir, backend="docker", use_task_images=False, command_timeout_s=4.0)
    task = task_by_id(env, TASK_ID)
    replies = [
        bash("X=plain; alias st='git status --short'; (sleep 1; echo finished > /tmp/bg) &"),
        bash("echo $X; st | wc -l; sleep 2; cat /tmp/bg"),
        bash("sleep 100"),
        bash("echo ${X:-gone}; pwd"),
    ]
    _, results = run(episode(env, task, replies))
    texts = [r.messages[0]["content"] for r in results]
    assert texts[1].split("\n")[:3] == ["plain", "0", "finished"], texts[1]
    assert "timed out after 4 s" in texts[2]
    assert texts[3].split("\n")[:2] == ["gone", "/sandbox/testbed"], texts[3]


def test_tiny_swe_config_validates_and_budgets_agree() -> None:
    from rl.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "tiny_swe.yaml")
    swe = SWEEnv.validate_config(cfg.envs["swe"].config)
    assert swe.backend == "local" and swe.source == "builtin"
    assert swe.max_turns == cfg.rollout.max_turns
    assert swe.max_tokens == cfg.rollout.max_context
    assert swe.episode_timeout_s <= cfg.rollout.episode_timeout_s
