"""MathEnv end to end (reset/step under asyncio), the offline task generator, file sources."""

from __future__ import annotations

import asyncio
import json
import re

import pytest

from envs import registry
from envs.base import Task, hash_split
from envs.math import (
    RETRY_FEEDBACK,
    THINK_SYSTEM_PROMPT,
    MathEnv,
    generate_tasks,
)
from rl.schema import ConfigError

ARITHMETIC_RE = re.compile(r"^What is (\(?\d+(?: [-+*/] \d+\)?)+(?: [-+*/] \d+)*)\?$")


def _episode(env: MathEnv, task: Task, *responses: str):
    """Run reset and one step per response; return (first messages, step results)."""

    async def run():
        messages = await env.reset(task)
        results = [await env.step(text) for text in responses]
        await env.close()
        return messages, results

    return asyncio.run(run())


def test_reset_and_step_score_the_boxed_answer():
    env = registry.get("math")(MathEnv.validate_config({"n_train": 5, "n_test": 5}))
    task = env.load_tasks("test")[0]
    answer = task.payload["answer"]
    messages, [result] = _episode(env, task, f"Let me add.\nThe result is $\\boxed{{{answer}}}$.")
    assert messages == [
        {
            "role": "user",
            "content": f"{task.payload['problem']}\n\nWrap your answer in $\\boxed{{}}$.",
        }
    ]
    assert (result.done, result.reward, result.status, result.messages) == (True, 1.0, "ok", [])
    assert result.info["verdict"] == "match" and result.info["extracted"] == answer

    _, [wrong] = _episode(env, task, f"\\boxed{{{int(answer) + 1}}}")
    assert (wrong.done, wrong.reward, wrong.info["verdict"]) == (True, 0.0, "mismatch")
    _, [missing] = _episode(env, task, "I am not sure.")
    assert (missing.reward, missing.info["verdict"]) == (0.0, "no_answer")


def test_every_generated_answer_is_scorable_at_every_level():
    for level in (1, 2, 3, 4):
        env = MathEnv({"difficulty": level, "n_train": 0, "n_test": 8})
        for task in env.load_tasks("test"):
            _, [result] = _episode(env, task, f"\\boxed{{{task.payload['answer']}}}")
            assert result.reward == 1.0, task


def test_reasoning_mode_needs_one_think_end():
    env = MathEnv({"reasoning": True, "n_train": 0, "n_test": 3})
    task = env.load_tasks("test")[0]
    answer = task.payload["answer"]
    messages, [good] = _episode(env, task, f"<think>\ncompute\n</think>\n\\boxed{{{answer}}}")
    assert messages[0] == {"role": "system", "content": THINK_SYSTEM_PROMPT}
    assert good.reward == 1.0
    _, [bad] = _episode(env, task, f"\\boxed{{{answer}}}")
    assert (bad.reward, bad.info["verdict"]) == (0.0, "bad_think")


def test_retry_feedback_with_max_attempts():
    env = MathEnv({"max_attempts": 2, "n_train": 0, "n_test": 3})
    task = env.load_tasks("test")[0]
    answer = task.payload["answer"]
    _, [first, second] = _episode(env, task, "\\boxed{-1}", f"\\boxed{{{answer}}}")
    assert (first.done, first.reward) == (False, None)
    assert first.messages == [{"role": "user", "content": RETRY_FEEDBACK}]
    assert (second.done, second.reward, second.info["attempts"]) == (True, 1.0, 2)
    _, [first, second] = _episode(env, task, "\\boxed{-1}", "\\boxed{-2}")
    assert (second.done, second.reward) == (True, 0.0)


def test_step_outside_an_episode_is_an_error():
    env = MathEnv({"n_train": 0, "n_test": 1})
    task = env.load_tasks("test")[0]
    with pytest.raises(RuntimeError, match="before reset"):
        asyncio.run(env.step("\\boxed{1}"))
    with pytest.raises(RuntimeError, match="after the episode ended"):
        _episode(env, task, "\\boxed{1}", "\\boxed{2}")


def test_lenient_mode_and_prompt_styles():
    env = MathEnv({"lenient": True, "prompt": "plain", "n_train": 0, "n_test": 2})
    task = env.load_tasks("test")[0]
    answer = task.payload["answer"]
    messages, [result] = _episode(env, task, f"{task.payload['problem'][8:-1]} = {answer}")
    assert messages == [{"role": "user", "content": task.payload["problem"]}]
    assert result.reward == 1.0
    custom = MathEnv({"prompt_template": "Q: {problem}\nA:", "n_train": 0, "n_test": 1})
    assert custom.prompt_messages(task)[0]["content"] == f"Q: {task.payload['problem']}\nA:"
    with pytest.raises(ConfigError, match="key 'prompt_template' must contain"):
        MathEnv.validate_config({"prompt_template": "no placeholder"})


# ---------------------------------------------------------------------------------------------
# The generator


def test_generator_is_deterministic_and_ids_are_stable():
    first = generate_tasks("train", 50, levels=[1, 3], seed=7)
    again = generate_tasks("train", 50, levels=[1, 3], seed=7)
    assert first == again
    other_seed = generate_tasks("train", 50, levels=[1, 3], seed=8)
    assert [t.id for t in first] != [t.id for t in other_seed]
    # Ids come from the problem's content: the same problem has the same id in any run.
    assert len({t.id for t in first}) == 50 and all(t.id.startswith("arith-") for t in first)
    by_id = {t.id: t.payload for t in first + other_seed}
    assert all(by_id[t.id] == t.payload for t in other_seed)
    # Pinned values: a change here breaks resuming old runs (task ids are in checkpoints).
    pinned = generate_tasks("test", 1, levels=[1], seed=0)[0]
    assert (pinned.id, pinned.payload["problem"], pinned.payload["answer"]) == (
        "arith-0f6d3653fafa",
        "What is 3 + 12?",
        "15",
    )


def test_train_and_test_are_disjoint_by_construction():
    for levels in ([1], [2], [3], [4], [1, 2, 3, 4]):
        test = generate_tasks("test", None, levels=levels, seed=0)
        for seed in (0, 1):
            train = generate_tasks("train", None, levels=levels, seed=seed)
            assert not {t.id for t in train} & {t.id for t in test}
            assert not {t.payload["problem"] for t in train} & {t.payload["problem"] for t in test}
        assert all(t.split == "test" for t in test)


def test_hash_split_is_a_fixed_fraction():
    keys = [f"k{i}" for i in range(20000)]
    held_out = sum(hash_split(k) == "test" for k in keys) / len(keys)
    assert 0.09 < held_out < 0.11
    assert sum(hash_split(k, 0.3) == "test" for k in keys) / len(keys) == pytest.approx(
        0.3, abs=0.015
    )


def test_levels_have_the_promised_shape_and_correct_answers():
    level1 = generate_tasks("train", None, levels=[1], seed=0)
    assert 500 < len(level1) < 700  # operands 0-20, +/-: a small space, mostly train
    for task in level1:
        a, op, b = ARITHMETIC_RE.match(task.payload["problem"]).group(1).split()
        assert op in "+-" and 0 <= int(a) <= 20 and 0 <= int(b) <= 20
        assert int(task.payload["answer"]) == (int(a) + int(b) if op == "+" else int(a) - int(b))
    for level in (2, 3, 4):
        tasks = generate_tasks("train", 300, levels=[level], seed=0)
        kinds = {t.payload["kind"] for t in tasks}
        assert kinds == {"arithmetic", "word"}, level
        for task in tasks:
            assert int(task.payload["answer"]) >= 0
            match = ARITHMETIC_RE.match(task.payload["problem"])
            if match:  # plain expressions are checked against Python's arithmetic
                assert eval(match.group(1).replace("/", "//")) == int(task.payload["answer"])


def test_asking_for_more_problems_than_a_level_holds_is_an_error():
    with pytest.raises(
        ValueError, match=r"difficulty \[1\] holds only \d+ distinct 'test' problems"
    ):
        generate_tasks("test", 500, levels=[1], seed=0)


# ---------------------------------------------------------------------------------------------
# File sources


def _jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_jsonl_source_with_held_out_fraction(tmp_path):
    rows = [{"problem": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(200)]
    rows.append(rows[0])  # a duplicate is dropped
    path = _jsonl(tmp_path / "train.jsonl", rows)
    env = MathEnv({"source": "jsonl", "path": path, "test_fraction": 0.25})
    train, test = env.load_tasks("train"), env.load_tasks("test")
    assert len(train) + len(test) == 200 and 30 < len(test) < 70
    assert not {t.id for t in train} & {t.id for t in test}
    assert all(t.id.startswith("math-") for t in train + test)
    task = test[0]
    _, [result] = _episode(env, task, f"\\boxed{{{task.payload['answer']}}}")
    assert result.reward == 1.0


def test_hf_source_gsm8k_with_test_file_and_bad_lines(tmp_path):
    train_path = tmp_path / "gsm_train.jsonl"
    train_path.write_text(
        json.dumps({"question": "Shared?", "answer": "so\n#### 3"})
        + "\n{not json\n"
        + json.dumps({"question": "Train only?", "answer": "so\n#### 1,000"})
        + "\n"
    )
    test_path = _jsonl(tmp_path / "gsm_test.jsonl", [{"question": "Shared?", "answer": "#### 3"}])
    config = {"source": "hf", "preset": "gsm8k", "path": str(train_path), "test_path": test_path}
    env = MathEnv(config)
    assert [t.payload["problem"] for t in env.load_tasks("test")] == ["Shared?"]
    train = env.load_tasks("train")  # the held-out problem is removed from training
    assert [(t.payload["problem"], t.payload["answer"]) for t in train] == [
        ("Train only?", "1,000")
    ]
    assert train[0].payload["origin"] == f"{train_path}:3"
    _, [result] = _episode(env, train[0], "It is \\boxed{1000}.")
    assert result.reward == 1.0
    strict = MathEnv({**config, "on_bad_line": "error"})
    with pytest.raises(ValueError, match=f"{re.escape(str(train_path))}:2: bad JSON"):
        strict.load_tasks("train")
