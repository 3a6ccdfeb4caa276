"""The rollout worker pool: the RolloutWorker actors of a run, started, pinged, replaced when they
die (with the current weights, through a hook the weight sync sets), and the jobs run on them.

A replaced worker's jobs run again with the same seeds on the same weights, so they yield the same
trajectories; deaths are counted in `faults["worker_restarts"]` and, past
`max_worker_restarts`, stop the run."""

from __future__ import annotations

from collections.abc import Callable

import ray

from rl.config import RunConfig
from rl.rollout import RolloutWorker
from rl.types import Job


class WorkerPool:
    def __init__(self, cfg: RunConfig, faults: dict[str, int]):
        self.cfg, self.faults = cfg, faults
        self.workers: list = []
        # called with a new worker's index once it is up: give it the current weights
        self.on_replace: Callable[[int], None] | None = None

    def __len__(self) -> int:
        return len(self.workers)

    def start(self) -> None:
        self.workers = [self._new(i) for i in range(self.cfg.rollout.num_workers)]
        ray.get([w.version.remote() for w in self.workers])

    def stop(self) -> None:
        for w in self.workers:
            ray.kill(w)
        self.workers = []

    def _new(self, index: int):
        cfg = self.cfg
        env_cfgs = {name: dict(sec.config) for name, sec in cfg.envs.items()}
        actor = ray.remote(
            num_cpus=1, num_gpus=cfg.rollout.gpus, resources=dict(cfg.rollout.resources) or None
        )(RolloutWorker)
        return actor.remote(
            cfg.model, env_cfgs, cfg.rollout, index, deterministic=cfg.mode == "sync"
        )

    def replace(self, index: int, error: Exception) -> None:
        """Worker `index` died: start a new one and hand it the current weights."""
        self.faults["worker_restarts"] += 1
        if self.faults["worker_restarts"] > self.cfg.max_worker_restarts:
            raise RuntimeError(
                f"rollout workers died {self.faults['worker_restarts']} times "
                f"(max_worker_restarts={self.cfg.max_worker_restarts}); last: {error}"
            ) from error
        print(f"rollout worker {index} died ({type(error).__name__}); restarting it", flush=True)
        try:
            ray.kill(self.workers[index], no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass
        self.workers[index] = self._new(index)
        if self.on_replace is not None:
            self.on_replace(index)

    def check(self) -> int:
        """Ping every worker; replace those that died. Returns how many were replaced."""
        replaced = 0
        pings = [worker.version.remote() for worker in self.workers]  # all at once
        for w, ping in enumerate(pings):
            try:
                ray.get(ping, timeout=self.cfg.weight_sync.timeout_s)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as e:
                self.replace(w, e)
                replaced += 1
        return replaced

    def submit(self, index: int, jobs: list[Job]):
        """Start `jobs` on worker `index`; returns the ObjectRef of their trajectories."""
        return self.workers[index].run_groups.remote(jobs)

    def run_jobs(self, jobs: list[Job], overrides: dict | None = None) -> list[list[dict]]:
        """Run jobs spread over the workers, results in job order; a worker that dies is
        replaced and its share run again (same seeds, same weights: the same trajectories)."""
        n = len(self.workers)
        shares = {i: jobs[i::n] for i in range(n) if jobs[i::n]}
        refs = {
            i: self.workers[i].run_groups.remote(share, overrides) for i, share in shares.items()
        }
        results: dict[int, list] = {}
        while refs:
            i, ref = next(iter(refs.items()))
            try:
                results[i] = ray.get(ref)
            except ray.exceptions.RayActorError as e:
                self.replace(i, e)
                refs[i] = self.workers[i].run_groups.remote(shares[i], overrides)
                continue
            del refs[i]
        out: list = [None] * len(jobs)
        for i, result in results.items():
            out[i::n] = result
        return out
