"""Learner -> rollout workers: the choreography of a weight update (rl/weights.py holds the
transports' parts).

Two transports (`weight_sync.method`): `object_store` (learner rank 0 puts the weights in Ray's
object store in buckets; each worker fetches the whole update in one call) and `collective`
(learner rank 0 broadcasts in a process group of its own with the workers, formed again after a
worker is replaced). Every update carries the learner's own policy version, so a label is never
wrong whatever ran on the learner before; the loop's expected version is checked against it. At
most one update is outstanding: its acknowledgements (each matched to the actor that sent it) are
collected before the next, and a worker that died meanwhile is replaced with the current
weights."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import ray

from rl.config import RunConfig
from rl.weights import resolve_backend
from rl.workers import WorkerPool


class WeightSync:
    def __init__(
        self,
        cfg: RunConfig,
        pool: WorkerPool,
        faults: dict[str, int],
        learner_get: Callable[[Any, str], Any],
    ):
        self.cfg, self.pool, self.faults, self.learner_get = cfg, pool, faults, learner_get
        self.learners: list = []
        self.pending_acks: list = []  # (worker, actor, refs) of the update not yet acknowledged
        self.group_ready = False  # collective: the group is formed
        self._dtype: str | None = None  # resolved weight_sync.dtype ("" = as trained)
        pool.on_replace = self.give_current_weights

    def sync(self, version: int, wait: bool = True) -> float:
        """Learner -> every worker; returns the seconds the training loop was blocked. With
        wait=False (async mode) the loop waits only for the learner's part; the workers apply the
        update between two decode steps while the loop goes on. The previous update's
        acknowledgements are collected first, so at most one update is ever outstanding."""
        t0 = time.monotonic()
        self.collect_acks()
        if self.cfg.weight_sync.method == "collective":
            self._broadcast(version)
        else:
            self.pending_acks = self._object_store_update(version, range(len(self.pool)))
        if wait and self.collect_acks():  # on-policy: every worker must have this version
            if self.faults["weight_sync_failures"] > self.cfg.max_worker_restarts:
                raise RuntimeError(
                    f"weight sync failed {self.faults['weight_sync_failures']} times "
                    f"(max_worker_restarts={self.cfg.max_worker_restarts})"
                )
            return time.monotonic() - t0 + self.sync(version, wait)
        return time.monotonic() - t0

    def dtype(self) -> str | None:
        """What the learner casts the weights to before they leave (weight_sync.dtype; auto:
        the dtype the workers' engine holds, asked of worker 0 once)."""
        if self._dtype is None:
            wanted = self.cfg.weight_sync.dtype
            if wanted == "auto":
                wanted = ray.get(self.pool.workers[0].weight_dtype.remote()) or ""
            self._dtype = wanted
        return self._dtype or None

    def give_current_weights(self, index: int) -> None:
        """A new (replacement) worker gets the learner's current weights through the object
        store, whatever the method, labelled with the learner's own version (in async mode a
        step may be finishing); a collective group forms again with it before the next
        broadcast."""
        self.group_ready = False
        if self.learners:
            for _, _, acks in self._object_store_update(None, [index]):
                ray.get(acks)

    def _object_store_update(self, version: int | None, workers) -> list[tuple[int, Any, list]]:
        """The learner publishes its weights to the object store; each of `workers` (indices)
        fetches them. Returns (worker, its actor, acknowledgement refs). Each worker gets the
        whole update (the list of bucket refs) in one call: Ray runs the calls of an async actor
        out of order, so one call per bucket could apply an update before all its buckets
        arrived. The weights carry the learner's version; `version` (None: any) is what the loop
        expects, and a learner that published another stops the run."""
        published, refs = self.learner_get(
            [
                a.publish_weights.remote(self.cfg.weight_sync.bucket_bytes, self.dtype())
                for a in self.learners
            ],
            "weight publishing",
        )[0]
        if version is not None and published != version:
            raise RuntimeError(
                f"the learner published policy version {published} where the loop expects "
                f"{version}: learner and loop disagree on the optimizer steps"
            )
        workers_ = self.pool.workers
        return [
            (w, workers_[w], [workers_[w].receive_weights.remote(refs, published)]) for w in workers
        ]

    def _broadcast(self, version: int) -> None:
        """weight_sync.method=collective: learner rank 0 broadcasts to the workers' group. Dead
        workers are found (and replaced) before the broadcast; a broadcast that fails because a
        worker died meanwhile is repeated in a group formed again."""
        for _attempt in range(self.cfg.max_worker_restarts + 1):
            self.pool.check()
            if not self.group_ready:
                self._form_group()
            sending = [
                a.broadcast_weights.remote(self.cfg.weight_sync.bucket_bytes, self.dtype())
                for a in self.learners
            ]
            receiving = [
                (w, wk, [wk.receive_broadcast.remote(version)])
                for w, wk in enumerate(self.pool.workers)
            ]
            try:
                ray.get(sending)
            except ray.exceptions.RayTaskError:  # a receiver gone, or the learner failing
                dead = self.pool.check()
                if not dead:
                    self.learner_get(sending, "the weight broadcast")
                    raise
                self.group_ready = False  # the survivors' receives end with the old group
                print(f"weight broadcast failed ({dead} worker(s) died): again", flush=True)
                continue
            except ray.exceptions.RayActorError:
                self.learner_get(sending, "the weight broadcast")
                raise
            self.pending_acks = receiving
            return
        raise RuntimeError("the weight broadcast failed on every attempt")

    def _form_group(self) -> None:
        """Learner rank 0 (source, rank 0) and every worker (ranks 1..N) join a new group."""
        ws = self.cfg.weight_sync
        backend = resolve_backend(ws.backend, self.cfg.learner_gpus, self.cfg.rollout.gpus)
        workers = self.pool.workers
        address = self.learner_get(
            [self.learners[0].open_weight_group.remote(len(workers), backend, ws.timeout_s)],
            "forming the weight-sync group",
        )[0]
        joins = [self.learners[0].join_weight_group.remote(address)]
        joins += [wk.join_weight_group.remote(address, w + 1) for w, wk in enumerate(workers)]
        ray.get(joins)
        self.group_ready = True

    def collect_acks(self) -> list[int]:
        """Wait for every worker to apply the last update; replace any that died meanwhile.
        Returns the workers whose receive failed while they lived (a broken weight-sync group:
        it forms again before the next broadcast)."""
        pending, self.pending_acks = self.pending_acks, []
        failed = []
        for index, actor, acks in pending:
            try:
                ray.get(acks)
            except ray.exceptions.RayActorError as e:
                # the actor that sent it: a late failure of a worker already replaced must not
                # take down its replacement
                if self.pool.workers[index] is actor:
                    self.pool.replace(index, e)
            except ray.exceptions.RayTaskError as e:
                print(f"worker {index} did not receive the weights: {e}", flush=True)
                self.faults["weight_sync_failures"] += 1
                self.group_ready = False
                failed.append(index)
        return failed
