"""The code env's generated problems (envs/code_gen.py): determinism, disjoint splits, every
reference passing its own hidden tests in the sandbox, wrong and gaming answers failing, levels."""

from __future__ import annotations

import ast
import asyncio
import functools
import re

import pytest
from conftest import require

from envs.base import Task
from envs.code import CodeEnv
from envs.code_gen import LEVELS, N_HIDDEN, TEMPLATES, generate_tasks, templates_of
from rl.schema import ConfigError
from sandbox.forkserver import forkserver_unavailable_reason

pytestmark = pytest.mark.timeout(300)


def require_sandbox() -> None:
    reason = forkserver_unavailable_reason()
    require("bwrap", reason is None, reason or "")


def answer(code: str) -> str:
    return f"Here you go.\n```python\n{code}```\n"


def score(env: CodeEnv, task: Task, text: str):
    async def run():
        await env.reset(task)
        result = await env.step(text)
        await env.close()
        return result

    return asyncio.run(run())


def template_of(task: Task) -> str:
    return task.payload["origin"].split("/")[1].split(":")[0]


@functools.cache
def one_task_per_template() -> list[Task]:
    found: dict[str, Task] = {}
    for task in generate_tasks("train", None, levels=list(LEVELS), seed=0):
        found.setdefault(template_of(task), task)
    assert set(found) == {t.name for t in TEMPLATES}
    return list(found.values())


def examples_of(task: Task) -> list[tuple[str, str]]:
    """The docstring's worked examples: (call text, shown value)."""
    return re.findall(r">>> (.*)\n    (.*)\n", task.payload["problem"])


def test_generator_is_deterministic_per_seed() -> None:
    first = generate_tasks("train", 60, levels=[1, 2, 3], seed=3)
    again = generate_tasks("train", 60, levels=[1, 2, 3], seed=3)
    assert [(t.id, t.payload) for t in first] == [(t.id, t.payload) for t in again]
    other = generate_tasks("train", 60, levels=[1, 2, 3], seed=4)
    assert {t.id for t in first} != {t.id for t in other}
    assert len({t.id for t in first}) == 60  # distinct problems
    assert [t.payload["level"] for t in first[:6]] == [1, 2, 3, 1, 2, 3]
    # a problem is its key: the same key gives the same prompt and tests under any seed
    by_id = {t.id: t.payload for t in other}
    assert all(by_id[t.id] == t.payload for t in first if t.id in by_id)


def test_train_and_test_do_not_overlap() -> None:
    for levels in ([1], [2], [3], [1, 2, 3]):
        test = generate_tasks("test", None, levels=levels, seed=0)
        assert test and all(t.split == "test" for t in test)
        for seed in (0, 1):
            train = generate_tasks("train", None, levels=levels, seed=seed)
            assert not {t.id for t in train} & {t.id for t in test}
            assert not {t.payload["problem"] for t in train} & {t.payload["problem"] for t in test}
    with pytest.raises(ValueError, match="holds only"):
        generate_tasks("test", 5000, levels=[1], seed=0)


def test_config_and_env_tasks() -> None:
    env = CodeEnv({"source": "generated", "difficulty": [1, 2], "n_train": 40, "n_test": 8})
    train, test = env.load_tasks("train"), env.load_tasks("test")
    assert (len(train), len(test)) == (40, 8)
    assert {t.payload["level"] for t in train} == {1, 2} and train[0].env == "code"
    prompt = env.prompt_messages(test[0])[-1]["content"]
    assert "Complete the following Python function" in prompt
    assert test[0].payload["problem"] in prompt
    with pytest.raises(ConfigError, match="difficulty"):
        CodeEnv({"source": "generated", "difficulty": 4})


def test_hidden_tests_are_hidden_and_discriminating() -> None:
    for task in generate_tasks("test", None, levels=list(LEVELS), seed=0):
        prompt = task.payload["problem"]
        tests = task.payload["tests"]
        assert len(tests) == N_HIDDEN
        shown_calls = {call for call, _ in examples_of(task)}
        assert len(shown_calls) == 2
        values = []
        for case in tests:
            expr = re.fullmatch(
                r"def check\(candidate\):\n    assert candidate\((.*)\) == (.*)\n", case["check"]
            )
            assert expr, case["check"]
            call = f"{case['entry_point']}({expr.group(1)})"
            assert call not in shown_calls and call not in prompt  # no hidden input is shown
            values.append(expr.group(2))
        # no one value holds more than half of the cases: a constant answer cannot pass
        assert max(values.count(v) for v in values) <= N_HIDDEN // 2, task.payload["origin"]


def test_difficulty_levels_differ() -> None:
    names = [{t.name for t in templates_of(level)} for level in LEVELS]
    assert all(names) and not (names[0] & names[1] or names[1] & names[2] or names[0] & names[2])

    def statements(task: Task) -> list[ast.AST]:
        tree = ast.parse(task.payload["reference"])
        return [n for n in ast.walk(tree) if isinstance(n, ast.stmt)][1:]  # less the def

    sizes = []
    for level in LEVELS:
        bodies = [statements(t) for t in generate_tasks("train", 40, levels=[level], seed=0)]
        if level == 1:  # one expression
            assert all(len(b) == 1 and isinstance(b[0], ast.Return) for b in bodies)
        if level == 2:  # one loop
            assert all(sum(isinstance(n, ast.For | ast.While) for n in b) == 1 for b in bodies)
        sizes.append(sum(map(len, bodies)) / len(bodies))
    assert sizes[0] < sizes[1] < sizes[2], sizes


def test_every_reference_passes_its_hidden_tests() -> None:
    require_sandbox()
    env = CodeEnv({"source": "generated"})
    for task in one_task_per_template():
        reference = task.payload["reference"]
        result = score(env, task, answer(reference))
        assert result.reward == 1.0 and result.status == "ok", (template_of(task), result.info)
        body = reference.split("\n", 1)[1]  # the body alone completes the stub, as in HumanEval
        assert score(env, task, answer(body)).reward == 1.0, template_of(task)


def test_wrong_and_gaming_answers_fail() -> None:
    require_sandbox()
    env = CodeEnv({"source": "generated"})
    graded = CodeEnv({"source": "generated", "reward": "fraction"})
    for task in one_task_per_template():
        stub = task.payload["problem"]
        name = task.payload["tests"][0]["entry_point"]
        signature = stub.split("\n", 1)[0]
        shown = {call: value for call, value in examples_of(task)}
        # answers the docstring's examples by heart, and its first example's value otherwise
        lookup = "\n".join(
            f"    if args == ({call[len(name) + 1 : -1]},):\n        return {value}"
            for call, value in shown.items()
        )
        memorised = f"def {name}(*args):\n{lookup}\n    return {next(iter(shown.values()))}\n"
        wrong = [
            "pass\n",  # the stub alone: returns None
            f"{signature}\n    return 0\n",
            f"{signature}\n    print('AC')\n    return True\n",
            f"{stub}\n    raise SystemExit(0)\n",
            "import sys\nsys.exit(0)\n",
            memorised,
        ]
        for code in wrong:
            result = score(env, task, answer(code))
            assert result.reward == 0.0 and result.status == "ok", (template_of(task), code)
        constant = score(graded, task, answer(f"{signature}\n    return 0\n"))
        assert constant.reward <= 0.5, template_of(task)
