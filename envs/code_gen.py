"""The code environment's offline task family: small function-writing problems with hidden tests.

Each template is a function to write (a signature and a HumanEval-style docstring with one or
two worked examples) and a reference solution, both filled in with random constants. The hidden
tests call the function on other inputs; their expected values come from running the reference,
and a test of this module runs every template's reference through the sandbox to check that it
passes its own tests. Three difficulty levels:

1: one expression of the arguments (x plus 7, a * 5 + b, s repeated 3 times, x % 6, x > 12);
2: one loop over a list or a string (sum of the numbers above k, count a character, keep the
   multiples of k, largest element plus k, sum of the multiples of k up to n);
3: small algorithms (reverse the words, FizzBuzz with other words and divisors, running sums,
   Caesar shift, digit sum in base k, longest run above k).

A problem is its template and constants (`key`): the key decides the split (envs.base.hash_split)
and the task id, so a held-out problem never appears in training; its hidden inputs are drawn
from the key alone. The hidden inputs differ from the examples in the docstring, and no one
expected value holds more than half of them (a program returning a constant fails, and earns at
most half the tests with reward "fraction").
"""

from __future__ import annotations

import hashlib
import math
import random
import string
import textwrap
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from envs.base import Task, generated_split

LEVELS = (1, 2, 3)
N_EXAMPLES = 2  # worked examples in the docstring (shown on purpose)
N_HIDDEN = 4  # hidden test cases, each its own sandbox run (so reward "fraction" is graded)
MAX_CASE_DRAWS = 500

Args = tuple


@dataclass(frozen=True)
class Template:
    """One kind of problem, its constants drawn by `params`: `doc` (the docstring's first
    paragraph), `body` (the reference solution's body) and `signature` are str.format patterns
    over the constants; `inputs(rng, **constants)` draws one argument tuple."""

    name: str
    level: int
    signature: str  # "def add_constant(x: int) -> int:"
    doc: str
    body: str
    params: Callable[[random.Random], dict]
    inputs: Callable[..., Args]


@dataclass(frozen=True)
class CodeProblem:
    """A generated problem: the stub the model completes, the reference solution, the examples
    shown in the docstring and the hidden test cases (arguments, expected value)."""

    key: str
    level: int
    entry_point: str
    stub: str
    reference: str
    examples: list[tuple[Args, object]]
    hidden: list[tuple[Args, object]]

    def tests(self) -> list[dict]:
        """The hidden cases as rewards.tests function-call test cases, one call each."""
        return [
            {
                "check": f"def check(candidate):\n    assert candidate({_call_args(args)}) == "
                f"{expected!r}\n",
                "entry_point": self.entry_point,
            }
            for args, expected in self.hidden
        ]


def _call_args(args: Args) -> str:
    return ", ".join(repr(a) for a in args)


# ---------------------------------------------------------------------------------------------
# Input samplers


def _ints(rng: random.Random, lo: int = -10, hi: int = 30, max_len: int = 7) -> list[int]:
    return [rng.randint(lo, hi) for _ in range(rng.randint(0, max_len))]


def _word(rng: random.Random, lo: int = 1, hi: int = 5, alphabet: str = "abcdefghij") -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(lo, hi)))


def _sentence(rng: random.Random) -> str:
    return " ".join(_word(rng, 1, 5, string.ascii_lowercase) for _ in range(rng.randint(1, 5)))


SEPARATORS = ("-", ",", ";", ":", "+", "*", "/", "_", "|", ".", " ")
WORDS = ("Fizz", "Buzz", "Bing", "Bong", "Zap", "Pop", "Ping", "Pong", "Tick", "Tock")
COPRIME_PAIRS = [(a, b) for a in range(2, 10) for b in range(2, 10) if math.gcd(a, b) == 1]


def _fizz_params(rng: random.Random) -> dict:
    a, b = rng.choice(COPRIME_PAIRS)
    wa, wb = rng.sample(WORDS, 2)
    return {"a": a, "b": b, "wa": wa, "wb": wb}


# ---------------------------------------------------------------------------------------------
# The templates, by level


TEMPLATES: tuple[Template, ...] = (
    # level 1: one expression of the arguments
    Template(
        "add_constant", 1, "def add_constant(x: int) -> int:",
        "Return x plus {k}.", "return x + {k}",
        lambda rng: {"k": rng.randint(1, 99)},
        lambda rng, k: (rng.randint(-50, 100),),
    ),
    Template(
        "subtract_from", 1, "def subtract_from(x: int) -> int:",
        "Return {k} minus x.", "return {k} - x",
        lambda rng: {"k": rng.randint(1, 99)},
        lambda rng, k: (rng.randint(-50, 100),),
    ),
    Template(
        "linear", 1, "def linear(a: int, b: int) -> int:",
        "Return a times {k} plus b.", "return a * {k} + b",
        lambda rng: {"k": rng.randint(2, 30)},
        lambda rng, k: (rng.randint(-20, 20), rng.randint(-20, 20)),
    ),
    Template(
        "remainder", 1, "def remainder(x: int) -> int:",
        "Return the remainder of x divided by {k}.", "return x % {k}",
        lambda rng: {"k": rng.randint(2, 40)},
        lambda rng, k: (rng.randint(0, 300),),
    ),
    Template(
        "greater_than", 1, "def greater_than(x: int) -> bool:",
        "Return True if x is greater than {k}, otherwise False.", "return x > {k}",
        lambda rng: {"k": rng.randint(-50, 100)},
        lambda rng, k: (k + rng.randint(-10, 10),),
    ),
    Template(
        "repeat_text", 1, "def repeat_text(s: str) -> str:",
        "Return s repeated {k} times, joined by {sep!r}.", "return {sep!r}.join([s] * {k})",
        lambda rng: {"k": rng.randint(2, 9), "sep": rng.choice(SEPARATORS)},
        lambda rng, k, sep: (_word(rng),),
    ),
    # level 2: one loop over a list or a string
    Template(
        "sum_above", 2, "def sum_above(nums: list[int]) -> int:",
        "Return the sum of the numbers in nums that are greater than {k}.",
        "total = 0\nfor n in nums:\n    if n > {k}:\n        total += n\nreturn total",
        lambda rng: {"k": rng.randint(-20, 40)},
        lambda rng, k: (_ints(rng, k - 15, k + 20),),
    ),
    Template(
        "count_below", 2, "def count_below(nums: list[int]) -> int:",
        "Return how many numbers in nums are less than {k}.",
        "count = 0\nfor n in nums:\n    if n < {k}:\n        count += 1\nreturn count",
        lambda rng: {"k": rng.randint(-20, 40)},
        lambda rng, k: (_ints(rng, k - 15, k + 15),),
    ),
    Template(
        "count_chars", 2, "def count_chars(s: str) -> int:",
        "Return how many characters of s are {c!r} or {d!r}.",
        "count = 0\nfor ch in s:\n    if ch == {c!r} or ch == {d!r}:\n        count += 1\n"
        "return count",
        lambda rng: dict(zip("cd", rng.sample("abcdefghij", 2), strict=True)),
        lambda rng, c, d: (_word(rng, 0, 12),),
    ),
    Template(
        "keep_multiples", 2, "def keep_multiples(nums: list[int]) -> list[int]:",
        "Return the numbers in nums that are divisible by {k}, in their original order.",
        "kept = []\nfor n in nums:\n    if n % {k} == 0:\n        kept.append(n)\nreturn kept",
        lambda rng: {"k": rng.randint(2, 12)},
        lambda rng, k: (_ints(rng, -20, 40, 8),),
    ),
    Template(
        "max_plus", 2, "def max_plus(nums: list[int]) -> int:",
        "Return the largest number in nums plus {k}. nums is never empty.",
        "best = nums[0]\nfor n in nums:\n    if n > best:\n        best = n\nreturn best + {k}",
        lambda rng: {"k": rng.randint(1, 99)},
        lambda rng, k: ([rng.randint(-30, 30) for _ in range(rng.randint(1, 7))],),
    ),
    Template(
        "sum_multiples", 2, "def sum_multiples(n: int) -> int:",
        "Return the sum of the integers from 1 to n (inclusive) that are multiples of {k}.",
        "total = 0\nfor i in range(1, n + 1):\n    if i % {k} == 0:\n        total += i\n"
        "return total",
        lambda rng: {"k": rng.randint(2, 15)},
        lambda rng, k: (rng.randint(0, 60),),
    ),
    # level 3: small algorithms
    Template(
        "reverse_words", 3, "def reverse_words(s: str) -> str:",
        "Split s into words at the spaces and return the words in reverse order, joined by "
        "{sep!r}.",
        "words = s.split()\nwords.reverse()\nreturn {sep!r}.join(words)",
        lambda rng: {"sep": rng.choice(SEPARATORS[:-1]) * rng.randint(1, 2)},
        lambda rng, sep: (_sentence(rng),),
    ),
    Template(
        "fizzbuzz", 3, "def fizzbuzz(n: int) -> list[str]:",
        "Return a list of strings for the numbers 1 to n: {wa!r} for multiples of {a}, {wb!r} "
        "for multiples of {b}, {wa!r} followed by {wb!r} for multiples of both, and the number "
        "itself otherwise.",
        "out = []\nfor i in range(1, n + 1):\n    word = ''\n    if i % {a} == 0:\n"
        "        word += {wa!r}\n    if i % {b} == 0:\n        word += {wb!r}\n"
        "    out.append(word or str(i))\nreturn out",
        _fizz_params,
        lambda rng, a, b, wa, wb: (rng.randint(1, 20),),
    ),
    Template(
        "running_sums", 3, "def running_sums(nums: list[int]) -> list[int]:",
        "Return the running sums of nums, starting from {k}: element i of the result is {k} "
        "plus the sum of nums[0] to nums[i].",
        "out = []\ntotal = {k}\nfor n in nums:\n    total += n\n    out.append(total)\nreturn out",
        lambda rng: {"k": rng.randint(-20, 50)},
        lambda rng, k: (_ints(rng, -10, 10, 6),),
    ),
    Template(
        "caesar", 3, "def caesar(s: str) -> str:",
        "Shift every lowercase letter of s forward by {k} places in the alphabet, wrapping "
        "around from 'z' to 'a'; leave every other character as it is.",
        "out = ''\nfor ch in s:\n    if 'a' <= ch <= 'z':\n"
        "        ch = chr((ord(ch) - ord('a') + {k}) % 26 + ord('a'))\n    out += ch\nreturn out",
        lambda rng: {"k": rng.randint(1, 25)},
        lambda rng, k: (_sentence(rng),),
    ),
    Template(
        "digit_sum", 3, "def digit_sum(n: int) -> int:",
        "Return the sum of the digits of n written in base {k}. n is never negative.",
        "total = 0\nwhile n > 0:\n    total += n % {k}\n    n //= {k}\nreturn total",
        lambda rng: {"k": rng.randint(2, 16)},
        lambda rng, k: (rng.randint(0, 5000),),
    ),
    Template(
        "longest_run", 3, "def longest_run(nums: list[int]) -> int:",
        "Return the length of the longest run of consecutive numbers in nums that are all "
        "greater than {k}.",
        "best = run = 0\nfor n in nums:\n    run = run + 1 if n > {k} else 0\n"
        "    best = max(best, run)\nreturn best",
        lambda rng: {"k": rng.randint(-5, 15)},
        lambda rng, k: (_ints(rng, -10, 30, 9),),
    ),
)  # fmt: skip


def templates_of(level: int) -> list[Template]:
    if level not in LEVELS:
        raise ValueError(f"difficulty level must be one of {LEVELS}, got {level}")
    return [t for t in TEMPLATES if t.level == level]


# ---------------------------------------------------------------------------------------------
# Problems


def problem_key(template: Template, constants: dict) -> str:
    """What a problem is (its template and constants): decides its split and its task id."""
    return f"L{template.level}/{template.name}:" + ":".join(
        f"{k}={v!r}" for k, v in sorted(constants.items())
    )


def task_id(key: str) -> str:
    return f"gen-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def reference_function(reference: str, entry_point: str) -> Callable:
    """The reference solution as a function (trusted code: the generator's own source)."""
    namespace: dict = {}
    exec(reference, namespace)  # noqa: S102
    return namespace[entry_point]


def build_problem(template: Template, constants: dict) -> CodeProblem:
    """The problem of `template` with `constants`: its stub, reference, examples and hidden
    cases. The inputs come from a generator seeded by the key alone, so a problem is the same
    in every run; ValueError when the template's inputs cannot give enough distinct cases."""
    key = problem_key(template, constants)
    signature = template.signature
    entry_point = signature.removeprefix("def ").split("(")[0]
    body = "\n".join("    " + line for line in template.body.format(**constants).splitlines())
    reference = f"{signature}\n{body}\n"
    solve = reference_function(reference, entry_point)
    rng = random.Random(f"cwm-rl-code-cases:{key}")
    examples: list[tuple[Args, object]] = []
    hidden: list[tuple[Args, object]] = []
    values: Counter[str] = Counter()  # of the hidden cases: none may hold more than half
    seen: set[str] = set()
    for _ in range(MAX_CASE_DRAWS):
        args = template.inputs(rng, **constants)
        if repr(args) in seen:
            continue
        seen.add(repr(args))
        value = solve(*args)
        if len(examples) < N_EXAMPLES:
            examples.append((args, value))
        elif values[repr(value)] < N_HIDDEN // 2:
            values[repr(value)] += 1
            hidden.append((args, value))
            if len(hidden) == N_HIDDEN:
                break
    else:
        raise ValueError(f"{key}: could not draw {N_HIDDEN} distinct, discriminating cases")
    doc = textwrap.fill(template.doc.format(**constants), width=92, subsequent_indent="    ")
    shown = "".join(
        f"\n    >>> {entry_point}({_call_args(args)})\n    {value!r}" for args, value in examples
    )
    stub = f'{signature}\n    """{doc}\n{shown}\n    """\n'
    return CodeProblem(key, template.level, entry_point, stub, reference, examples, hidden)


def generate_tasks(
    split: str,
    n: int | None,
    *,
    levels: list[int],
    seed: int,
    test_fraction: float = 0.1,
    env: str = "code",
) -> list[Task]:
    """`n` distinct generated problems of one split, cycling through `levels`, as function-call
    code tasks; the same arguments always give the same tasks. n=None takes up to the default
    count (2000 train / 200 test), fewer if the levels hold fewer distinct problems; an explicit
    `n` that the levels cannot fill raises ValueError."""

    def draw(rng: random.Random, level: int) -> tuple[str, Callable[[], dict]]:
        template = rng.choice(templates_of(level))
        constants = template.params(rng)
        return problem_key(template, constants), lambda: payload(template, constants)

    def payload(template: Template, constants: dict) -> dict:
        problem = build_problem(template, constants)  # built only for a key that is kept
        return {
            "problem": problem.stub,
            "tests": problem.tests(),
            "public_tests": [],
            "kind": "function",
            "prefix": problem.stub,  # the answer may be the body alone, as in HumanEval
            "reference": problem.reference,
            "level": problem.level,
            "origin": problem.key,
        }

    rng = random.Random(f"cwm-rl-code:{seed}:{split}:{','.join(map(str, levels))}")
    problems = generated_split(draw, split, n, levels=levels, rng=rng, test_fraction=test_fraction)
    tasks = [Task(id=task_id(key), env=env, payload=p, split=split) for key, p in problems]
    return tasks
