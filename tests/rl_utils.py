"""Helpers shared by learner tests: real rollouts of a tiny random CWM through the native engine."""

from __future__ import annotations

import threading

import torch

from rl.engines.base import SamplingParams
from rl.engines.native import NativeEngine
from rl.types import Trajectory


def synthetic_reward(completion: list[int]) -> float:
    """The synthetic task: the fraction of even token ids in the completion (~0.5 at random)."""
    return sum(t % 2 == 0 for t in completion) / max(1, len(completion))


def rollout(
    engine: NativeEngine,
    prompts: list[list[int]],
    group_size: int,
    max_new_tokens: int,
    seed: int,
    step: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> list[Trajectory]:
    """G samples per prompt, scored by synthetic_reward."""
    reqs, params = [], []
    for p_i, prompt in enumerate(prompts):
        for g in range(group_size):
            reqs.append(prompt)
            params.append(
                SamplingParams(
                    max_new_tokens=max_new_tokens,
                    temperature=temperature,
                    top_k=top_k,
                    top_p=top_p,
                    seed=seed * 100003 + step * 1009 + p_i * 31 + g,
                )
            )
    outs = engine.generate(reqs, params)
    trajs = []
    for k, (prompt, c) in enumerate(zip(reqs, outs)):
        n = len(c.token_ids)
        trajs.append(
            Trajectory(
                task_id=f"p{k // group_size}",
                env="synthetic",
                group_id=f"s{step}-p{k // group_size}",
                tokens=list(prompt) + c.token_ids,
                loss_mask=[0] * len(prompt) + [1] * n,
                logprobs=[0.0] * len(prompt) + c.logprobs,
                versions=[-1] * len(prompt) + c.versions,
                prompt_len=len(prompt),
                reward=synthetic_reward(c.token_ids),
            )
        )
    return trajs


def make_prompts(n: int, seed: int = 0, vocab: int = 256) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randint(
            3, vocab, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g
        ).tolist()
        for _ in range(n)
    ]


# overrides for a whole RL run in seconds: a tiny random CWM (SmolLM2's tokenizer), reverse env
TINY_RUN = [
    "model.path=preset:tiny",
    "model.tokenizer=default",
    "envs.reverse.config.n_train=64",
    "envs.reverse.config.n_test=4",
    "steps=3",
    "groups_per_step=2",
    "group_size=3",
    "rollout.max_new_tokens=6",
    "rollout.max_context=128",
    "learner.optim.lr=1e-3",
    "learner.micro_batch_tokens=256",
    "eval.num_tasks=4",
    "progress=false",
]


def run_in_thread(orch) -> tuple[threading.Thread, dict]:
    """Start `orch.run()` (an Orchestrator) on a thread; the box gets its summary or its error."""
    box: dict = {}

    def target() -> None:
        try:
            box["summary"] = orch.run()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            box["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, box
