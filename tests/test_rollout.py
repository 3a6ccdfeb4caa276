"""A rollout worker without Ray, on a fake engine: one episode token-in/token-out, seeds derived
per sample and turn, episodes of concurrent groups batched into engine calls, truncation."""

from __future__ import annotations

import asyncio
import re

import pytest

from model.loader import ModelSpec
from rl.engines.base import Completion, Engine
from rl.rollout import RolloutConfig, RolloutWorker
from rl.tasks import derive_seed
from rl.types import Job, Trajectory


class Arithmetic(Engine):
    """Answers the math env's "What is A + B?" (or A - B) exactly, \\boxed{}, from the decoded prompt;
    or, with `ramble`, never stops. Records every call's prompts and sampling params."""

    def __init__(self, tokenizer, chat, ramble: bool = False):
        self.tokenizer, self.chat, self.ramble = tokenizer, chat, ramble
        self.calls: list[list] = []
        self.version = 3

    def generate(self, prompts, params):
        self.calls.append(list(zip(prompts, params)))
        outs = []
        for prompt, p in zip(prompts, params):
            text = self.tokenizer.decode(prompt)
            a, op, b = re.findall(r"What is (\d+) ([-+]) (\d+)", text)[-1]
            value = int(a) + int(b) if op == "+" else int(a) - int(b)
            answer = "9" * 200 if self.ramble else f"\\boxed{{{value}}}"
            ids = self.tokenizer.encode(answer, add_special_tokens=False)
            ids = (ids + [self.chat.stop_token_ids[0]])[: p.max_new_tokens]
            done = ids[-1] in p.stop_token_ids
            outs.append(
                Completion(
                    token_ids=ids,
                    logprobs=[-0.5] * len(ids),
                    versions=[self.version] * len(ids),
                    finish_reason="stop" if done else "length",
                    prompt_len=len(prompt),
                )  # fmt: skip
            )
        return outs

    def update_weights(self, weights, version):
        raise AssertionError("not in these tests")

    def load_streaming(self, names_shapes, buckets, version):
        raise AssertionError("not in these tests")


def worker(max_batch: int = 64, max_new_tokens: int = 16, max_turns: int = 1):
    w = RolloutWorker(
        ModelSpec(path="preset:tiny", tokenizer="default"),
        {"math": {"source": "arithmetic", "difficulty": 1, "n_train": 8, "n_test": 1}},
        RolloutConfig(max_new_tokens=max_new_tokens, max_context=256, max_batch=max_batch,
                      max_turns=max_turns),
    )  # fmt: skip
    w.engine = Arithmetic(w.tokenizer, w.chat)
    return w


def run(w: RolloutWorker, jobs: list[Job]) -> list[list[Trajectory]]:
    groups = asyncio.run(w.run_groups(jobs))
    return [[Trajectory.from_dict(t) for t in g] for g in groups]


def tasks(w: RolloutWorker):
    return w.env_classes["math"](w.env_configs["math"]).load_tasks("train")


def test_one_episode_is_token_in_token_out():
    w = worker()
    task = tasks(w)[0]
    (group,) = run(w, [Job(task, 2, "g0", seed=5)])
    env = w.env_classes["math"](w.env_configs["math"])
    prompt = w.chat.encode_messages(asyncio.run(env.reset(task)))
    (call,) = w.engine.calls
    for i, t in enumerate(group):
        sampled = t.tokens[t.prompt_len :]
        assert t.tokens[: t.prompt_len] == prompt and t.group_id == "g0"
        assert sampled[-1] == w.chat.stop_token_ids[0]  # the stop token is trained on too
        assert t.loss_mask == [0] * len(prompt) + [1] * len(sampled)
        assert t.logprobs[t.prompt_len :] == [-0.5] * len(sampled)
        assert t.versions == [-1] * len(prompt) + [3] * len(sampled)
        assert (t.status, t.reward) == ("ok", 1.0)  # the exact sum, scored by the math env
        # episode i of the job draws from derive_seed(job seed, i), turn 0 from that
        assert call[i][1].seed == derive_seed(derive_seed(5, i), 0)
    assert call[0][1].seed != call[1][1].seed


@pytest.mark.parametrize(("max_batch", "sizes"), [(64, [12]), (5, [5, 5, 2])])
def test_episodes_of_concurrent_groups_share_engine_calls(max_batch, sizes):
    """Deterministic mode: the batcher waits for every live episode's request, then sends them
    in order, at most max_batch per call."""
    w = worker(max_batch=max_batch)
    jobs = [Job(t, 4, f"g{k}", seed=k) for k, t in enumerate(tasks(w)[:3])]
    groups = run(w, jobs)
    assert [len(c) for c in w.engine.calls] == sizes
    assert [[t.group_id for t in g] for g in groups] == [[f"g{k}"] * 4 for k in range(3)]
    assert all(t.reward == 1.0 for g in groups for t in g)


def test_an_episode_cut_at_its_limits_gets_the_env_s_truncation_reward():
    """An env that never finishes: the episode ends at max_turns, or when the context is full,
    with status truncated and the env's declared truncation_reward; the env saw the exact token
    count before each step (observe_tokens)."""
    from envs.base import StepResult
    from envs.math import MathEnv

    seen: list[int] = []

    class Patient(MathEnv):
        truncation_reward = -0.5

        def observe_tokens(self, used: int) -> None:
            seen.append(used)

        async def step(self, assistant_text: str) -> StepResult:
            return StepResult([{"role": "user", "content": "Again?"}], done=False)

    for limit in ("turns", "context"):
        w = worker(max_turns=3 if limit == "turns" else 50)
        w.env_classes["math"] = Patient
        if limit == "context":
            w.config.max_context = 120
        seen.clear()
        (group,) = run(w, [Job(tasks(w)[0], 1, "g", seed=1)])
        (t,) = group
        assert (t.status, t.reward) == ("truncated", -0.5), limit
        assert len(t.tokens) <= w.config.max_context
        turns = t.metrics["turns"]
        assert (turns == 3) if limit == "turns" else (1 < turns < 50)
        # before each step: every token so far (prompt, earlier turns, the env's replies)
        sampled = t.loss_mask[t.prompt_len :]
        first_turn = sampled.index(0) if 0 in sampled else len(sampled)
        assert len(seen) == turns and seen[0] == t.prompt_len + first_turn
        assert seen == sorted(seen) and seen[-1] <= len(t.tokens)


def test_an_episode_reports_where_its_seconds_went():
    """queue_s: waiting behind other requests for an engine call (max_batch 1: the third of
    three episodes waits for two calls); generate_s: in the engine; env_s: in reset and step."""
    import time

    from envs.math import MathEnv

    class SlowEnv(MathEnv):
        async def step(self, assistant_text):
            await asyncio.sleep(0.05)
            return await super().step(assistant_text)

    w = worker(max_batch=1)
    w.env_classes["math"] = SlowEnv
    engine_generate = w.engine.generate

    def slow_generate(prompts, params):
        time.sleep(0.1)
        return engine_generate(prompts, params)

    w.engine.generate = slow_generate
    (group,) = run(w, [Job(tasks(w)[0], 3, "g", seed=1)])
    m = [t.metrics for t in group]
    assert all(x["generate_s"] >= 0.1 and x["env_s"] >= 0.05 for x in m)
    queued = sorted(x["queue_s"] for x in m)
    assert queued[0] < 0.05 and queued[2] >= 0.2  # behind two calls of 0.1 s
    assert all(x["seconds"] >= x["queue_s"] + x["generate_s"] + x["env_s"] - 1e-3 for x in m)
