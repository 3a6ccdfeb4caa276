"""The math environment: one problem, one answer in `\\boxed{}`, reward 1 if it is right.

Tasks come from an offline generator (arithmetic and GSM-style word problems at four difficulty
levels, deterministic from a seed) or from local files (JSONL, or MATH / GSM8K style columns via
envs.data). The prompt follows CWM's math environment ("{problem}\\n\\nWrap your answer in
$\\boxed{}$."); the reward comes from rewards.math. Like CWM's, it can give a wrong answer
`max_attempts - 1` more tries with "Your answer is incorrect. Please try again."
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from envs.base import (
    Environment,
    Message,
    StepResult,
    Task,
    generated_split,
    hash_split,
    require_config,
)
from envs.data import ColumnMapping, Example, load_examples, resolve_mapping
from rewards.math import Verdict, judge

logger = logging.getLogger(__name__)

# CWM's prompt templates (cwm/rl/envs/envs/math_think_dialog.py): "direct" is what its RL used.
PROMPT_TEMPLATES = {
    "direct": "{problem}\n\nWrap your answer in $\\boxed{}$.",
    "cot": "{problem}\nPlease reason step by step, and put your final answer within $\\boxed{}$.",
    "plain": "{problem}",
}
# CWM's system prompt for reasoning with think tags.
THINK_SYSTEM_PROMPT = (
    "You are a helpful AI assistant. You always reason before responding, using the following "
    "format:\n\n<think>\nyour internal reasoning\n</think>\nyour external response"
)
RETRY_FEEDBACK = "Your answer is incorrect. Please try again."
LEVELS = (1, 2, 3, 4)


@dataclass
class MathConfig:
    """Config of the `math` environment.

    source: "arithmetic" (generated offline), "jsonl" (a JSONL file with problem/answer fields) or
    "hf" (HF-datasets style columns: preset "math" / "gsm8k", any .jsonl/.json/.parquet file or a
    saved dataset directory). For files, `test_path` is the held-out split; without it a
    `test_fraction` slice of `path`, chosen by a hash of the problem text, is held out.
    n_train / n_test cap the split sizes (None: all of a file; up to 2000 / 200 generated
    problems). Generated problems are split by a hash of their content, `test_fraction` held out.
    prompt: CWM's "direct" ("Wrap your answer in $\\boxed{}$."), "cot", or "plain" (the problem
    alone); prompt_template overrides it ("{problem}" is replaced). lenient: with no answer
    marker, score the last number of the response (for models too small to follow a format).
    """

    source: Literal["arithmetic", "jsonl", "hf"] = "arithmetic"
    path: str | None = None
    test_path: str | None = None
    test_fraction: float = 0.1
    preset: Literal["plain", "math", "gsm8k"] = "plain"
    problem_key: str | None = None
    answer_key: str | None = None
    answer_format: Literal["raw", "last_boxed", "after_hashes"] | None = None
    id_key: str | None = None
    on_bad_line: Literal["skip", "error"] = "skip"
    difficulty: int | list[int] = 1
    n_train: int | None = None
    n_test: int | None = None
    seed: int = 0
    prompt: Literal["direct", "cot", "plain"] = "direct"
    prompt_template: str | None = None
    system_prompt: str | None = None
    reasoning: bool = False
    require_think: bool = True
    max_attempts: int = 1
    timeout_s: float = 5.0
    lenient: bool = False

    def __post_init__(self) -> None:
        if self.source != "arithmetic":
            require_config(
                self.path is not None, "path", f"is required when source is '{self.source}'"
            )
        levels = self.difficulty if isinstance(self.difficulty, list) else [self.difficulty]
        require_config(
            bool(levels) and all(level in LEVELS for level in levels),
            "difficulty",
            f"must be a level in {list(LEVELS)} (or a list of them), got {self.difficulty!r}",
        )
        for key in ("n_train", "n_test"):
            value = getattr(self, key)
            require_config(value is None or value >= 0, key, f"must be >= 0, got {value}")
        require_config(0 < self.test_fraction < 1, "test_fraction", "must be in (0, 1)")
        require_config(self.max_attempts >= 1, "max_attempts", "must be >= 1")
        require_config(self.timeout_s > 0, "timeout_s", "must be > 0")
        if self.prompt_template is not None:
            require_config(
                "{problem}" in self.prompt_template,
                "prompt_template",
                "must contain the placeholder {problem}",
            )

    @property
    def levels(self) -> list[int]:
        return list(self.difficulty) if isinstance(self.difficulty, list) else [self.difficulty]

    def column_mapping(self) -> ColumnMapping:
        return resolve_mapping(
            self.preset,
            problem=self.problem_key,
            answer=self.answer_key,
            answer_format=self.answer_format,
            id=self.id_key,
        )


# ---------------------------------------------------------------------------------------------
# The offline task family: arithmetic and GSM-style word problems


@dataclass(frozen=True)
class Problem:
    """A generated problem. `key` names its mathematical content (template and numbers, not the
    names or items in the story): it decides the split and the task id."""

    text: str
    answer: int
    key: str
    kind: str


NAMES = ("Tom", "Mia", "Sam", "Lena", "Omar", "Ava", "Raj", "Zoe", "Ben", "Ivy")
ITEMS = ("apples", "pencils", "stickers", "marbles", "cookies", "books", "cards", "shells")


def _binary(
    rng: random.Random, op: str, a_range: tuple[int, int], b_range: tuple[int, int]
) -> Problem:
    a, b = rng.randint(*a_range), rng.randint(*b_range)
    if op == "-" and b > a:
        a, b = b, a
    if op == "/":
        a = a * b  # exact division: a / b with a whole answer
    answer = {"+": a + b, "-": a - b, "*": a * b, "/": a // b if b else 0}[op]
    return Problem(f"What is {a} {op} {b}?", answer, f"{op}:{a}:{b}", "arithmetic")


def _word_one_step(rng: random.Random, hi: int) -> Problem:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    template = rng.randrange(4)
    a, b = rng.randint(2, hi), rng.randint(2, min(hi, 12))
    if template == 0:
        text = f"{name} has {a} {item}. {name} buys {b} more. How many {item} does {name} have now?"
        answer = a + b
    elif template == 1:
        a, b = max(a, b), min(a, b)
        text = f"{name} has {a} {item} and gives {b} away. How many {item} does {name} have left?"
        answer = a - b
    elif template == 2:
        text = f"A bag holds {a} {item}. How many {item} are in {b} bags?"
        answer = a * b
    else:
        text = f"{name} shares {a * b} {item} equally among {b} friends. How many {item} does each friend get?"
        answer = a
    return Problem(text, answer, f"w1.{template}:{a}:{b}", "word")


def _word_two_step(rng: random.Random, hi: int) -> Problem:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    template = rng.randrange(3)
    a, b = rng.randint(2, 12), rng.randint(2, hi)
    if template == 0:
        c = rng.randint(1, a * b - 1)
        text = (
            f"{name} buys {a} packs of {item} with {b} {item} in each pack, then gives away {c}. "
            f"How many {item} does {name} have left?"
        )
        answer, numbers = a * b - c, (a, b, c)
    elif template == 1:
        bill = next(v for v in (10, 20, 50, 100, 200, 500, 1000) if v >= a * b)
        text = (
            f"{item.capitalize()} cost ${b} each. {name} buys {a} of them and pays with a ${bill} "
            f"bill. How many dollars of change does {name} get?"
        )
        answer, numbers = bill - a * b, (a, b, bill)
    else:
        text = (
            f"{name} reads {b} pages on Monday and {a} times as many pages on Tuesday. "
            f"How many pages does {name} read in the two days?"
        )
        answer, numbers = b + a * b, (a, b)
    return Problem(text, answer, f"w2.{template}:" + ":".join(map(str, numbers)), "word")


def _word_three_step(rng: random.Random) -> Problem:
    name = rng.choice(NAMES)
    template = rng.randrange(2)
    a, b, c = rng.randint(5, 40), rng.randint(2, 9), rng.randint(2, 7)
    if template == 0:
        text = (
            f"{name} earns ${a} per hour, works {b} hours a day for {c} days and then spends "
            f"${a} on lunch. How many dollars does {name} have left from those earnings?"
        )
        answer = a * b * c - a
    else:
        d = rng.randint(1, min(20, a * c - 1))
        text = (
            f"A school has {c} classes with {a} students each. {d} students are absent and the "
            f"rest sit in rows of {b}. How many rows are completely full?"
        )
        answer = (a * c - d) // b
        return Problem(text, answer, f"w3.{template}:{a}:{b}:{c}:{d}", "word")
    return Problem(text, answer, f"w3.{template}:{a}:{b}:{c}", "word")


def _expression(rng: random.Random) -> Problem:
    a, b, c, d = (rng.randint(2, 30) for _ in range(4))
    return Problem(
        f"What is ({a} + {b}) * {c} - {d}?", (a + b) * c - d, f"expr:{a}:{b}:{c}:{d}", "arithmetic"
    )


def generate_problem(rng: random.Random, level: int) -> Problem:
    """One random problem of difficulty `level`:
    1: "What is 12 + 7?" (addition/subtraction, operands 0-20: within a 135M model's reach);
    2: two-digit +/-, times tables, exact division, one-step word problems;
    3: two-digit x one-digit, two-step word problems;
    4: bracketed expressions, 3-digit x 2-digit, three-step word problems."""
    roll = rng.random()
    if level == 1:
        return _binary(rng, rng.choice("+-"), (0, 20), (0, 20))
    if level == 2:
        if roll < 0.4:
            return _binary(rng, rng.choice("+-"), (10, 99), (10, 99))
        if roll < 0.6:
            return _binary(rng, "*", (2, 9), (2, 9))
        if roll < 0.7:
            return _binary(rng, "/", (2, 9), (2, 9))
        return _word_one_step(rng, hi=20)
    if level == 3:
        if roll < 0.4:
            return _binary(rng, "*", (11, 99), (2, 9))
        return _word_two_step(rng, hi=30)
    if level == 4:
        if roll < 0.3:
            return _expression(rng)
        if roll < 0.5:
            return _binary(rng, "*", (100, 999), (11, 99))
        return _word_three_step(rng)
    raise ValueError(f"difficulty level must be one of {LEVELS}, got {level}")


def generate_tasks(
    split: str,
    n: int | None,
    *,
    levels: list[int],
    seed: int,
    test_fraction: float = 0.1,
    env: str = "math",
) -> list[Task]:
    """`n` distinct generated tasks of one split, cycling through `levels`; the same arguments
    always give the same tasks. n=None takes up to the default count (2000 train / 200 test),
    fewer if the levels hold fewer distinct problems; an explicit `n` that the levels cannot
    fill raises ValueError."""

    def draw(rng: random.Random, level: int) -> tuple[str, Callable[[], dict]]:
        problem = generate_problem(rng, level)
        payload = {
            "problem": problem.text,
            "answer": str(problem.answer),
            "level": level,
            "kind": problem.kind,
        }
        return f"L{level}/{problem.key}", lambda: payload

    rng = random.Random(f"cwm-rl-math:{seed}:{split}:{','.join(map(str, levels))}")
    problems = generated_split(draw, split, n, levels=levels, rng=rng, test_fraction=test_fraction)
    tasks = [
        Task(id=f"arith-{_digest(key)}", env=env, payload=payload, split=split)
        for key, payload in problems
    ]
    return tasks


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


# ---------------------------------------------------------------------------------------------
# File-backed tasks


def _file_tasks(config: MathConfig, env: str) -> dict[str, list[Task]]:
    """Both splits from config.path (and config.test_path), deduplicated, test kept disjoint."""
    mapping = config.column_mapping()

    def load(path: str) -> list[Example]:
        return load_examples(path, mapping, on_bad_line=config.on_bad_line).examples

    def task_of(example: Example, split: str) -> Task:
        suffix = example.id if example.id is not None else _digest(example.problem)
        payload = {
            "problem": example.problem,
            "answer": example.answer,
            "origin": example.origin,
            **example.meta,
        }
        return Task(id=f"{env}-{suffix}", env=env, payload=payload, split=split)

    assert config.path is not None  # checked by MathConfig
    if config.test_path is not None:
        by_split = {"train": load(config.path), "test": load(config.test_path)}
    else:
        by_split = {"train": [], "test": []}
        for example in load(config.path):
            by_split[hash_split(example.problem, config.test_fraction)].append(example)
    test_problems = {e.problem for e in by_split["test"]}
    tasks: dict[str, list[Task]] = {}
    for split, examples in by_split.items():
        seen_ids: set[str] = set()
        kept: list[Task] = []
        dropped = 0
        for example in examples:
            task = task_of(example, split)
            if task.id in seen_ids or (split == "train" and example.problem in test_problems):
                dropped += 1
                continue
            seen_ids.add(task.id)
            kept.append(task)
        if dropped:
            logger.warning("math env: dropped %d duplicate or held-out %s problems", dropped, split)
        cap = config.n_train if split == "train" else config.n_test
        tasks[split] = kept if cap is None else kept[:cap]
    return tasks


# ---------------------------------------------------------------------------------------------
# The environment


class MathEnv(Environment):
    """Single-turn math (multi-turn when max_attempts > 1): reward 1.0 for an equivalent final
    answer, else 0.0."""

    name = "math"
    config_cls = MathConfig

    def __init__(self, config: MathConfig | None = None) -> None:
        super().__init__(config)
        self.config: MathConfig
        self._tasks: dict[str, list[Task]] | None = None
        self._task: Task | None = None
        self._attempts = 0
        self._done = False

    def load_tasks(self, split: str) -> list[Task]:
        """The tasks of `split` ("train" or "test"), built once and cached."""
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        if self._tasks is None:
            config = self.config
            if config.source == "arithmetic":
                self._tasks = {
                    split: generate_tasks(
                        split,
                        config.n_train if split == "train" else config.n_test,
                        levels=config.levels,
                        seed=config.seed,
                        test_fraction=config.test_fraction,
                        env=self.name,
                    )
                    for split in ("train", "test")
                }
            else:
                self._tasks = _file_tasks(config, self.name)
        return list(self._tasks[split])

    def prompt_messages(self, task: Task) -> list[Message]:
        """The first messages of an episode: an optional system prompt, then the problem."""
        messages: list[Message] = []
        system = self.config.system_prompt
        if system is None and self.config.reasoning:
            system = THINK_SYSTEM_PROMPT
        if system:
            messages.append({"role": "system", "content": system})
        template = self.config.prompt_template or PROMPT_TEMPLATES[self.config.prompt]
        user = template.replace("{problem}", task.payload["problem"])
        messages.append({"role": "user", "content": user})
        return messages

    async def reset(self, task: Task) -> list[Message]:
        for key in ("problem", "answer"):
            if key not in task.payload:
                raise ValueError(f"math task {task.id!r} has no '{key}' in its payload")
        self._task, self._attempts, self._done = task, 0, False
        return self.prompt_messages(task)

    async def step(self, assistant_text: str) -> StepResult:
        if self._task is None:
            raise RuntimeError("MathEnv.step() called before reset()")
        if self._done:
            raise RuntimeError("MathEnv.step() called after the episode ended; call reset()")
        self._attempts += 1
        config = self.config
        # Off the event loop: a symbolic check can take a while (bounded by timeout_s).
        verdict: Verdict = await asyncio.to_thread(
            judge,
            assistant_text,
            str(self._task.payload["answer"]),
            reasoning=config.reasoning,
            require_think=config.require_think,
            timeout_s=config.timeout_s,
            lenient=config.lenient,
        )
        info = {
            "verdict": verdict.reason,
            "extracted": verdict.extracted,
            "answer": str(self._task.payload["answer"]),
            "attempts": self._attempts,
        }
        if verdict.reward < 1.0 and self._attempts < config.max_attempts:
            feedback: Message = {"role": "user", "content": RETRY_FEEDBACK}
            return StepResult(messages=[feedback], done=False, info=info)
        self._done = True
        return StepResult(messages=[], done=True, reward=verdict.reward, info=info)

    async def close(self) -> None:
        self._task = None
