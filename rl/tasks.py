"""TaskSource: the stream of training prompts, mixed over environments by weight, with a cursor
that checkpoints exactly (resume continues the same stream: no prompt lost, none twice).

Every draw is a pure function of (seed, draw index): the environment by weight, then the next task
of that environment's current epoch, an epoch being a seeded permutation of its tasks."""

from __future__ import annotations

import hashlib
import zlib

import numpy as np

from envs.base import Task


def derive_seed(*parts: int | str) -> int:
    """A seed in [0, 2**63) from any integers and names (a run's seed, a draw index, a sample
    index, a turn...): a hash, so any run seed works, however large or negative, and nearby inputs
    give unrelated seeds. Every per-request seed of a run comes from here."""
    text = "/".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "big") >> 1


class TaskSource:
    def __init__(self, tasks: dict[str, list[Task]], weights: dict[str, float], seed: int = 0):
        if not tasks:
            raise ValueError("TaskSource needs at least one environment")
        for env, ts in tasks.items():
            if not ts:
                raise ValueError(f"environment {env!r} has no training tasks")
        unknown = set(weights) - set(tasks)
        if unknown:
            raise ValueError(f"mixing weights for unknown environments {sorted(unknown)}")
        self.envs = sorted(tasks)
        self.tasks = {env: list(tasks[env]) for env in self.envs}
        w = np.array([float(weights.get(env, 1.0)) for env in self.envs])
        if (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"mixing weights must be >= 0 with a positive sum, got {weights}")
        self.probs = w / w.sum()
        self.seed = seed
        # numpy's seed words are non-negative: a negative run seed gets a word of its own
        self._entropy = [abs(seed), 1] if seed < 0 else [seed]
        self.draws = 0
        self.cursor = {env: [0, 0] for env in self.envs}  # env -> [epoch, index in epoch]
        self._orders: dict[tuple[str, int], np.ndarray] = {}

    def _order(self, env: str, epoch: int) -> np.ndarray:
        key = (env, epoch)
        if key not in self._orders:
            rng = np.random.default_rng([*self._entropy, zlib.crc32(env.encode()), epoch])
            self._orders = {k: v for k, v in self._orders.items() if k[0] != env}
            self._orders[key] = rng.permutation(len(self.tasks[env]))
        return self._orders[key]

    def next(self) -> Task:
        rng = np.random.default_rng([*self._entropy, 0x7A5C, self.draws])
        env = self.envs[int(rng.choice(len(self.envs), p=self.probs))]
        epoch, i = self.cursor[env]
        task = self.tasks[env][int(self._order(env, epoch)[i])]
        i += 1
        if i == len(self.tasks[env]):
            epoch, i = epoch + 1, 0
        self.cursor[env] = [epoch, i]
        self.draws += 1
        return task

    def take(self, n: int) -> list[Task]:
        return [self.next() for _ in range(n)]

    def state_dict(self) -> dict:
        return {
            "seed": self.seed,
            "draws": self.draws,
            "cursor": {k: list(v) for k, v in self.cursor.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed:
            raise ValueError(
                f"task cursor was saved with seed {state['seed']}, this run uses {self.seed}"
            )
        if set(state["cursor"]) != set(self.envs):
            raise ValueError(
                f"task cursor covers environments {sorted(state['cursor'])}, this run has {self.envs}"
            )
        self.draws = int(state["draws"])
        self.cursor = {k: list(v) for k, v in state["cursor"].items()}
