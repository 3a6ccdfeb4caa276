"""The orchestrator: the driver of one RL run.

    TaskSource -> RolloutWorker actors -> Buffer -> Learner actors -> weight sync -> workers

Sync mode: every step generates its groups with the current policy, trains, then syncs: exactly
on-policy and reproducible from the seed. Async mode: workers keep generating while the learner
trains; a new policy reaches the workers between decode steps (in flight), and the buffer admits a
group only if its oldest token is at most `max_lag` versions behind the learner. Both modes share
this code; sync is async with nothing generated ahead.

One step, through the files it passes: rl/tasks.py (the next task and its seed) -> rl/workers.py
(a Job on a worker) -> rl/rollout.py (the episodes: env + engine, token-in/token-out) ->
rl/buffer.py (admission by staleness) -> rl/learner.py (Learner.train_on: rl/grpo.py's advantages
and loss, one optimizer step) -> rl/weight_sync.py (the new weights to every worker).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import ray
from tqdm import tqdm

from envs import registry
from envs.base import Task
from model.loader import load_tokenizer
from rl import checkpoint as ckpt
from rl import net
from rl.buffer import Buffer, Group
from rl.config import RAY_BUILTIN_RESOURCES, RunConfig, to_dict, to_yaml
from rl.health import CircuitBreaker, InfrastructureFailure, outcomes
from rl.learner import start_learners
from rl.rollout import DEFAULT_EPISODE_TIMEOUT_S
from rl.runlog import RunLog, eval_table, provenance
from rl.schema import ConfigError
from rl.tasks import TaskSource, derive_seed
from rl.types import Job, Trajectory
from rl.wandb_log import WandbLog
from rl.weight_sync import WeightSync
from rl.workers import WorkerPool

REPO = Path(__file__).resolve().parents[1]
# Ray's environment for every run. RAY_AUTH_MODE is the user's: unset, a new local instance
# uses token authentication (Ray's default), and a cluster asks for the token it was started
# with. RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 makes a node's address loopback (Ray reads it when
# `ray` is imported: init_ray also sets what it governs).
RAY_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
}


def local_ray_options() -> dict:
    """ray.init arguments (and process environment) for a Ray instance of this machine alone:
    every Ray server (GCS, raylet, workers, agents) listens on 127.0.0.1, and so do the
    torch.distributed groups the run forms (rl/net.py). Ray turns a node address of 127.0.0.1
    into the machine's routable one unless clusters are off, which it reads at import: so the
    flag is set on the imported constant too."""
    for key, value in RAY_ENV.items():
        os.environ.setdefault(key, value)
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False
    net.use_loopback_gloo()
    return {"address": "local", "_node_ip_address": net.LOOPBACK, "include_dashboard": False}


def init_ray(num_cpus: int | None = None) -> None:
    """Join the cluster of a `ray job submit` (RAY_ADDRESS), or start a local one that listens
    on loopback only."""
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
    else:  # a new instance of our own, never a `ray start` cluster found on this machine
        ray.init(num_cpus=num_cpus, log_to_driver=True, **local_ray_options())


def placement_problem(cfg: RunConfig, nodes: list[dict[str, float]]) -> str | None:
    """Why a cluster whose live nodes hold `nodes` (each node's total resources) cannot place the
    run's actors by their custom resources (learner_resources, rollout.resources), or None.
    Checked before any actor starts: Ray leaves an actor that no node can hold pending forever,
    and the run would hang without a word."""
    asks = [
        ("learner_resources", cfg.learner_resources, cfg.num_learners, "learner rank"),
        ("rollout.resources", cfg.rollout.resources, cfg.rollout.num_workers, "rollout worker"),
    ]
    offered = [
        {k: v for k, v in node.items() if k not in RAY_BUILTIN_RESOURCES and ":" not in k}
        for node in nodes
    ]
    for key, need, count, what in asks:
        if need and not any(all(n.get(r, 0) >= a for r, a in need.items()) for n in nodes):
            return (
                f"key '{key}' asks for {dict(need)} per {what}, but no node of the cluster "
                f"offers that; the nodes' custom resources: {offered}"
            )
        for r in need:
            wanted = sum(c * want.get(r, 0) for _, want, c, _ in asks)
            have = sum(n.get(r, 0) for n in nodes)
            if wanted > have:
                return (
                    f"key '{key}' asks for {r}: {need[r]:g} per {what} (x{count}; "
                    f"{wanted:g} with the other actors asking for it), but the cluster offers "
                    f"{have:g} in all; the nodes' custom resources: {offered}"
                )
    return None


class LearnerFailure(RuntimeError):
    """A learner rank failed; the run stops with its last checkpoint intact."""


class NothingToTrain(RuntimeError):
    """A step's batch holds no sampled token: the run cannot learn (prompts fill the context)."""


class SamplerMismatch(RuntimeError):
    """Sync mode: the sampler's log-probs of the trained tokens are not the learner's."""


@dataclass
class InFlight:
    worker: int
    group: Group
    handle: object  # the actor it was sent to (a replaced worker's groups are resubmitted)


@dataclass
class Training:
    """A learner step under way: one ref per learner rank (rank 0's carries the metrics) and the
    groups it trains on."""

    refs: list
    groups: list[Group]


class Orchestrator:
    def __init__(self, cfg: RunConfig, run_dir: str | Path | None = None):
        self.cfg = cfg
        self.dir = Path(run_dir or Path(cfg.output_dir) / cfg.name)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log = RunLog(self.dir)
        self.step = 0  # learner steps done, skipped ones included (the run's step counter)
        self.version = 0  # optimizer steps done = the policy version the workers should have
        self.draws = 0  # groups drawn so far (their seeds)
        envs = {
            name: registry.get(name)(registry.get(name).validate_config(sec.config))
            for name, sec in cfg.envs.items()
        }
        self.train_tasks = {name: env.load_tasks("train") for name, env in envs.items()}
        self.test_tasks = {name: env.load_tasks("test") for name, env in envs.items()}
        self.source = TaskSource(
            self.train_tasks, {n: s.weight for n, s in cfg.envs.items()}, seed=cfg.seed
        )
        self.buffer = Buffer(cfg.max_lag if cfg.mode == "async" else 0, cfg.on_stale)
        self.requeued_tasks: list[Task] = []  # of stale groups, to generate again (requeue)
        self.tokenizer = load_tokenizer(cfg.model)
        self.evals: dict[str, dict] = {}  # env -> {"points": [...]}
        self.inflight: dict = {}  # ObjectRef -> InFlight (async mode)
        self.inflight_at_checkpoint: list[Group] = []  # resumed: generated again, same seeds
        self.faults = {"worker_restarts": 0, "weight_sync_failures": 0}
        # the rollout workers (rl/workers.py) and the learner -> workers updates (weight_sync.py)
        self.pool = WorkerPool(cfg, self.faults)
        self.weights = WeightSync(cfg, self.pool, self.faults, self.learner_get)
        self.checkpoint_s: float | None = None  # seconds the last save took (next row logs it)
        self.health = CircuitBreaker(cfg.failures)  # infrastructure failure stops the run

    # -- actors -----------------------------------------------------------------------------------

    def start(self, learners: bool = True) -> None:
        cfg = self.cfg
        run_provenance = provenance(REPO)
        (self.dir / "config.yaml").write_text(to_yaml(cfg))
        (self.dir / "provenance.json").write_text(json.dumps(run_provenance, indent=2))
        problem = placement_problem(cfg, [n["Resources"] for n in ray.nodes() if n["Alive"]])
        if problem:
            raise ConfigError(problem)
        wandb_cfg = cfg.logging.wandb
        if wandb_cfg is not None and wandb_cfg.mode != "disabled":  # the run log's mirror on W&B
            self.log.wandb = WandbLog(wandb_cfg, self.dir, to_dict(cfg), run_provenance)
        if learners:
            self.start_learners()
        self.pool.start()

    def start_learners(self) -> None:
        cfg = self.cfg
        self.learners = start_learners(
            cfg.learner,
            cfg.model,
            cfg.num_learners,
            num_cpus=1,
            num_gpus=cfg.learner_gpus,
            num_threads=cfg.learner_threads,
            resources=dict(cfg.learner_resources),
        )

    def stop(self, failed: bool = False) -> None:
        self.pool.stop()
        for a in self.learners:
            ray.kill(a)
        self.learners = []
        self.log.close(failed)

    # the actors, where the pool and the weight sync keep them
    @property
    def workers(self) -> list:
        return self.pool.workers

    @workers.setter
    def workers(self, actors: list) -> None:
        self.pool.workers = actors

    @property
    def learners(self) -> list:
        return self.weights.learners

    @learners.setter
    def learners(self, actors: list) -> None:
        self.weights.learners = actors

    def sync_weights(self, version: int, wait: bool = True) -> float:
        """The learner's weights (policy `version`) to every worker: rl/weight_sync.py."""
        return self.weights.sync(version, wait)

    def learner_get(self, refs, what: str):
        """ray.get on learner work; a failure becomes LearnerFailure naming what failed."""
        try:
            return ray.get(refs)
        except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as e:
            last = ckpt.latest(self.dir / "checkpoints")
            where = (
                f"the last checkpoint, {last}, is intact: continue with "
                f"`python -m launch.train --resume {self.dir}`"
                if last
                else "no checkpoint was written yet"
            )
            cause = str(e).strip().splitlines()[-1][:500] if str(e).strip() else type(e).__name__
            raise LearnerFailure(
                f"the learner failed during {what} at step {self.step}: {cause}; {where}"
            ) from e

    # -- generation -------------------------------------------------------------------------------

    def _next_group(self) -> Group:
        if self.inflight_at_checkpoint:  # with their ids and seeds
            return self.inflight_at_checkpoint.pop(0)
        task = self.requeued_tasks.pop(0) if self.requeued_tasks else self.source.next()
        seed = derive_seed(self.cfg.seed, "group", self.draws)
        group = Group(task, f"g{self.draws}-{task.id}", [], seed)
        self.draws += 1
        return group

    def _submit(self, worker: int, groups: list[Group]):
        return self.pool.submit(worker, [self._job(g) for g in groups])

    def _job(self, group: Group) -> Job:
        return Job(group.task, self.cfg.group_size, group.group_id, group.seed)

    def generate_sync(self, n: int) -> list[Group]:
        """n groups with the current policy, spread over the workers."""
        groups = [self._next_group() for _ in range(n)]
        for group, trajs in zip(groups, self.pool.run_jobs([self._job(g) for g in groups])):
            group.trajectories = [Trajectory.from_dict(t) for t in trajs]
        return groups

    # -- training loop ----------------------------------------------------------------------------

    def run(self, resume: bool = False) -> dict:
        """Train for cfg.steps (continuing from the newest checkpoint when `resume`), evaluate
        before and after, export the policy, write the run's outputs; returns the summary."""
        cfg = self.cfg
        failed = True  # until the summary is written: the W&B run is marked failed otherwise
        try:
            self.start()
            if resume and self.restore():
                before = json.loads((self.dir / "eval_before.json").read_text())
            else:
                before = self.evaluate(tag="before")
                (self.dir / "eval_before.json").write_text(json.dumps(before))
            t_start = time.monotonic()
            bar = tqdm(
                total=cfg.steps, initial=self.step, desc=cfg.name, disable=not cfg.progress,
                dynamic_ncols=True,
            )  # fmt: skip
            if cfg.mode == "sync":
                self._run_sync(bar)
            else:
                self._run_async(bar)
            bar.close()
            self.weights.collect_acks()  # evaluate the final policy, not the one before it
            train_s = time.monotonic() - t_start
            if cfg.checkpoint.export_hf:
                ray.get([a.export_hf.remote(str(self.dir / "hf")) for a in self.learners])
            after = self.evaluate(tag="after")
            summary = self.finish(before, after, train_s)
            failed = False
            return summary
        finally:
            self.stop(failed)

    # -- checkpoints ------------------------------------------------------------------------------

    def save_checkpoint(self) -> None:
        """Weights, optimizer, RNG and everything the driver needs to continue exactly: the
        task cursor, the buffer and the groups in flight (generated again on resume)."""
        self.weights.collect_acks()
        extra = {
            "step": self.step,
            "version": self.version,
            "draws": self.draws,
            "source": self.source.state_dict(),
            "buffer": self.buffer.state_dict(),
            "retry": [vars(t) for t in self.requeued_tasks],
            "inflight": [
                {"task": vars(i.group.task), "group_id": i.group.group_id, "seed": i.group.seed}
                for i in self.inflight.values()
            ],
            "evals": self.evals,
        }
        root = str(self.dir / "checkpoints")
        self.learner_get([a.save.remote(root, extra) for a in self.learners], "a checkpoint save")
        keep = max(1, self.cfg.checkpoint.keep)
        for old in sorted(Path(root).glob("step_*"))[:-keep]:
            if not old.name.endswith(".tmp"):
                shutil.rmtree(old, ignore_errors=True)

    def restore(self) -> bool:
        """Load the newest checkpoint of this run dir, if any; True if one was loaded."""
        path = ckpt.latest(self.dir / "checkpoints")
        if path is None:
            return False
        extra = ray.get([a.load.remote(str(path)) for a in self.learners])[0]
        self.step, self.draws = extra["step"], extra["draws"]
        self.version = extra.get("version", self.step)
        self.source.load_state_dict(extra["source"])
        self.buffer.load_state_dict(extra["buffer"])
        self.requeued_tasks = [Task(**t) for t in extra["retry"]]
        self.inflight_at_checkpoint = [
            Group(Task(**g["task"]), g["group_id"], [], g["seed"]) for g in extra["inflight"]
        ]
        self.evals = extra["evals"]
        self.log.truncate_after(self.step)
        self.sync_weights(self.version)
        print(f"resumed {self.dir} at step {self.step} from {path.name}", flush=True)
        return True

    def _log_step(self, metrics: dict, bar, t0: float, sync_s: float, groups: list[Group]) -> None:
        step_s = time.monotonic() - t0
        tokens = sum(t.num_sampled_tokens for g in groups for t in g.trajectories)
        metrics.update(
            {
                "time/step_s": step_s,
                "time/weight_sync_s": sync_s,
                "time/weight_sync_share": sync_s / max(step_s, 1e-9),
                "throughput/sampled_tokens_per_s": tokens / max(step_s, 1e-9),
                "policy_version": self.version,
            }
        )
        metrics.update(self.buffer.metrics())
        metrics.update({f"faults/{k}": v for k, v in self.faults.items()})
        verdict = self.health.observe(outcomes(t for g in groups for t in g.trajectories))
        metrics.update(verdict.metrics)
        if self.checkpoint_s is not None:  # the previous step's save (after its row was written)
            metrics["time/checkpoint_s"], self.checkpoint_s = self.checkpoint_s, None
        # the step's rows first, then its checkpoint: a run killed in between resumes from the
        # previous checkpoint and drops these rows (RunLog.truncate_after); the other order
        # would resume past a step whose rows were never written
        self.log.metrics(self.step, metrics)
        self.log.samples(self.step, self._samples(groups))
        self.log.trained(self.step, [(g.group_id, g.task.id) for g in groups])
        if self.cfg.save_trajectories:
            self.log.trajectories(
                self.step, [(g.group_id, [t.to_dict() for t in g.trajectories]) for g in groups]
            )
        every = self.cfg.checkpoint.every
        if (every and self.step % every == 0) or self.step == self.cfg.steps:
            t_ckpt = time.monotonic()
            self.save_checkpoint()
            self.checkpoint_s = time.monotonic() - t_ckpt
        if verdict.tripped:
            self.stop_unhealthy(verdict.message)
        bar.update(1)
        bar.set_postfix(
            reward=f"{metrics.get('reward/mean', float('nan')):.3f}",
            tok_s=f"{metrics['throughput/sampled_tokens_per_s']:.0f}",
        )
        if (
            self.cfg.eval.every
            and self.step % self.cfg.eval.every == 0
            and self.step < self.cfg.steps
        ):
            self.evaluate(tag=f"step{self.step}")

    def _run_sync(self, bar) -> None:
        cfg = self.cfg
        while self.step < cfg.steps:
            t0 = time.monotonic()
            groups = self.generate_sync(cfg.groups_per_step)
            for g in groups:
                self.buffer.add(g)
            taken, _ = self.buffer.take(cfg.groups_per_step, self.version)
            t_learn = time.monotonic()
            metrics = self._trained(self._train(taken))
            metrics["time/rollout_s"] = t_learn - t0
            metrics["time/learner_s"] = time.monotonic() - t_learn
            sync_s = self._advance(metrics)
            self._log_step(metrics, bar, t0, sync_s, taken)

    def _advance(self, metrics: dict) -> float:
        """After a learner step: the run's step moves on; the policy version, and the workers'
        weights with it, only when the step changed the weights (a skipped step changes none).
        Returns the seconds the loop waited for the weight sync (async mode: the learner's part).
        A step with no sampled token at all stops the run: nothing could ever be learned."""
        self.step += 1
        if metrics.get("batch/no_sampled_tokens"):
            message = (
                f"step {self.step}: none of the {metrics['batch/trajectories']} trajectories "
                f"trained on holds a sampled token: every prompt filled "
                f"rollout.max_context={self.cfg.rollout.max_context} before the first turn (or "
                f"the engine returned nothing); raise max_context or shorten the prompts"
            )
            self.log.metrics(self.step, {**metrics, "health/error": message})
            raise NothingToTrain(message)
        if metrics.get("train/skipped"):
            return 0.0
        self.version += 1
        sync = self.cfg.mode == "sync"
        if sync:  # exactly on-policy: sampler and learner must agree
            self.check_sampler_agreement(metrics)
        return self.sync_weights(self.version, wait=sync)

    def check_sampler_agreement(self, metrics: dict) -> None:
        """Sync mode: stop the run (the step's metrics logged first) when the sampler and the
        learner disagreed on the trained tokens' log-probs beyond `max_logprob_diff`."""
        message = sampler_disagreement(self.step, metrics, logprob_diff_bound(self.cfg))
        if message:
            self.log.metrics(self.step, {**metrics, "health/error": message})
            raise SamplerMismatch(message)

    def _run_async(self, bar) -> None:
        """Workers generate ahead; the learner trains on admitted groups as they arrive."""
        cfg = self.cfg
        capacity = cfg.groups_per_step * (cfg.max_lag + 1)
        inflight = self.inflight
        load = [0] * len(self.workers)
        training = None  # (ref, groups, t0)
        t_step = time.monotonic()
        while self.step < cfg.steps:
            while len(inflight) + len(self.buffer) < capacity:
                w = load.index(min(load))
                group = self._next_group()
                inflight[self._submit(w, [group])] = InFlight(w, group, self.workers[w])
                load[w] += 1
            if training is None and len(self.buffer) >= cfg.groups_per_step:
                taken, stale = self.buffer.take(cfg.groups_per_step, self.version)
                self.requeued_tasks += [g.task for g in stale]
                if not taken:  # not enough fresh groups (they stay buffered): generate more
                    continue
                training = self._train(taken)
            waiting = list(inflight) + ([training.refs[0]] if training else [])
            ready, _ = ray.wait(waiting, num_returns=1)
            ref = ready[0]
            if training and ref == training.refs[0]:
                metrics = self._trained(training)
                sync_s = self._advance(metrics)
                self._log_step(metrics, bar, t_step, sync_s, training.groups)
                t_step, training = time.monotonic(), None
            else:
                item = inflight.pop(ref)
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayActorError as e:  # generate it again on a new worker
                    if self.workers[item.worker] is item.handle:
                        self.pool.replace(item.worker, e)
                    inflight[self._submit(item.worker, [item.group])] = InFlight(
                        item.worker, item.group, self.workers[item.worker]
                    )
                    continue
                load[item.worker] -= 1
                item.group.trajectories = [Trajectory.from_dict(t) for t in result[0]]
                self.buffer.add(item.group)
        if inflight:  # let in-flight episodes finish so no actor is killed mid-call
            timeout = cfg.rollout.episode_timeout_s or DEFAULT_EPISODE_TIMEOUT_S
            ray.wait(list(inflight), num_returns=len(inflight), timeout=timeout)

    def _train(self, groups: list[Group]) -> Training:
        """Start a learner step on `groups` at policy version self.version on every rank (each
        builds the advantages and the loss: rl.learner.Learner.train_on); returns at once, so the
        async loop keeps receiving rollouts meanwhile."""
        # serialised and put in the object store once; every rank reads the same object
        trajs = ray.put([t for g in groups for t in g.trajectories])
        refs = [a.train_on.remote(trajs, self.version) for a in self.learners]
        return Training(refs, groups)

    def _trained(self, training: Training) -> dict:
        """The finished step's metrics (rank 0's: reduced over ranks) and the rollouts'."""
        results = self.learner_get(training.refs, "a training step")
        metrics = rollout_metrics([t for g in training.groups for t in g.trajectories])
        metrics.update(results[0])
        return metrics

    # -- evaluation -------------------------------------------------------------------------------

    def evaluate(self, tag: str) -> dict[str, dict]:
        """Held-out pass@1 (and pass@k with k = eval.samples) per environment."""
        cfg, ev = self.cfg, self.cfg.eval
        overrides = {"temperature": ev.temperature}
        if ev.max_new_tokens:
            overrides["max_new_tokens"] = ev.max_new_tokens
        results, trajs = {}, []
        for env, tasks in self.test_tasks.items():
            tasks = tasks[: ev.num_tasks] if ev.num_tasks else tasks
            if not tasks:
                continue
            jobs = [
                Job(t, ev.samples, f"eval-{tag}-{i}", derive_seed(cfg.seed, "eval", i))
                for i, t in enumerate(tasks)
            ]
            groups = self.pool.run_jobs(jobs, overrides)
            trajs += [t for g in groups for t in g]
            results[env] = pass_at_k(groups, ev.samples)
            points = self.evals.setdefault(env, {"env": env, "points": []})["points"]
            points.append({"step": self.step, "tag": tag, **results[env]})
        breaker = CircuitBreaker(
            cfg.failures, patience=1, what=f"evaluation round '{tag}'", prefix="health/eval/"
        )  # one round covers the held-out set: judged alone
        verdict = breaker.observe(outcomes(trajs))
        self.log.metrics(
            self.step,
            {f"eval/{e}/{k}": v for e, r in results.items() for k, v in r.items()}
            | verdict.metrics,
        )
        if verdict.tripped:
            self.stop_unhealthy(verdict.message)
        return results

    def stop_unhealthy(self, message: str) -> None:
        """The circuit breaker tripped: checkpoint what was trained, log why, raise."""
        where = f"the run stopped at step {self.step}"
        if self.learners and self.step > 0:
            last = ckpt.latest(self.dir / "checkpoints")
            saved = json.loads((last / "trainer.json").read_text())["extra"] if last else {}
            if saved.get("step") != self.step:  # not saved at this step yet (_log_step)
                try:
                    self.save_checkpoint()
                except Exception as e:  # noqa: BLE001 - the breaker's message matters more
                    where += f" (saving a checkpoint failed: {type(e).__name__}: {e})"
            last = ckpt.latest(self.dir / "checkpoints")
            if last is not None:
                where += (
                    f"; checkpoint {last} is intact: fix the cause, then continue with "
                    f"`python -m launch.train --resume {self.dir}`"
                )
        text = f"infrastructure failure: {message}\n{where}"
        self.log.metrics(self.step, {"health/tripped": 1, "health/error": text})
        raise InfrastructureFailure(text)

    def finish(self, before: dict, after: dict, train_s: float) -> dict:
        table = eval_table(before, after)
        (self.dir / "eval.md").write_text(table + "\n")
        summary = {
            "before": before,
            "after": after,
            "train_seconds": round(train_s, 1),
            "steps": self.step,
        }
        (self.dir / "eval.json").write_text(json.dumps(summary, indent=2))
        self.log.plot_rewards(list(self.evals.values()))
        print(f"\nheld-out evaluation ({self.dir}):\n{table}", flush=True)
        return summary

    def _samples(self, groups: list[Group]) -> list[dict]:
        rows = []
        for g in groups[: self.cfg.samples_per_step]:
            t = g.trajectories[0]
            rows.append(
                {
                    "task_id": t.task_id,
                    "env": t.env,
                    "reward": t.reward,
                    "status": t.status,
                    "prompt": self.tokenizer.decode(t.tokens[: t.prompt_len]),
                    "completion": self.tokenizer.decode(t.tokens[t.prompt_len :]),
                }
            )
        return rows


def logprob_diff_bound(cfg: RunConfig) -> float | None:
    """The largest train/logprob_diff_max a sync-mode step may show (None: no check).
    `max_logprob_diff` when set (0: off). Otherwise: with both sides in fp32 (the native engine
    always; the learner unless param_dtype is bf16, or auto with GPUs) the same weights agree to
    ~1e-5 (the demo: < 1e-4 on every step), so 1e-2 leaves a wide margin; bf16 on either side
    moves rare tokens' log-probs by tenths, so 1.0 (a factor e in probability); a sampler that
    truncates (top-k, top-p) differs from the learner's full distribution by design: no check."""
    if cfg.max_logprob_diff is not None:
        return cfg.max_logprob_diff or None
    r = cfg.rollout
    if r.top_k > 0 or r.top_p < 1:
        return None
    learner = cfg.learner.param_dtype
    if learner == "auto":
        learner = "bfloat16" if cfg.learner_gpus > 0 else "float32"
    sampler = "bfloat16" if r.engine == "vllm" and r.gpus > 0 else "float32"
    return 1e-2 if learner == sampler == "float32" else 1.0


def sampler_disagreement(step: int, metrics: dict, bound: float | None) -> str | None:
    """Why a sync-mode step's rollouts do not match the learner (None when they do): in sync
    mode the sampler and the learner hold the same policy version, so their log-probs of every
    trained token agree to rounding. A larger difference means the tokens were not sampled by
    the weights their version stamp names."""
    diff = metrics.get("train/logprob_diff_max")
    if bound is None or diff is None or diff <= bound:
        return None
    mean = metrics.get("train/logprob_diff_mean", math.nan)
    lag = metrics.get("staleness/max_token_lag", "?")
    return (
        f"step {step}: sampler and learner disagree on the log-probs of the tokens trained on: "
        f"train/logprob_diff_max {diff:.3g} (mean {mean:.3g}) > max_logprob_diff {bound:g} in "
        f"sync mode, where both should hold the same policy version (staleness/max_token_lag "
        f"{lag}). The rollouts were not sampled by the weights their version names, or not from "
        f"the distribution the learner scores. Likely causes: a weight update applied partly, "
        f"late or out of order (rl/weights.py, RolloutWorker.receive_weights); an engine "
        f"computing with stale weights (packed or converted copies not refreshed on update, a "
        f"KV or prefix cache reused across an update); sampling the learner does not mirror "
        f"(temperature, top-k, top-p); or numerics (bf16: raise max_logprob_diff; 0 turns the "
        f"check off)"
    )


def rollout_metrics(trajs: list[Trajectory]) -> dict[str, float]:
    """Reward and status statistics, overall and per environment."""
    scored = [t for t in trajs if not t.excluded]
    out: dict[str, float] = {
        "rollout/trajectories": len(trajs),
        "rollout/env_error": sum(t.status == "env_error" for t in trajs),
        "rollout/timeout": sum(t.status == "timeout" for t in trajs),
        "rollout/truncated": sum(t.status == "truncated" for t in trajs),
        "rollout/response_tokens_mean": sum(t.num_sampled_tokens for t in trajs)
        / max(1, len(trajs)),
    }
    # where the episodes' seconds went (means over episodes): waiting for an engine call behind
    # other requests (head-of-line), generating, in the environment (tools, sandboxes, scoring)
    for key in ("queue_s", "generate_s", "env_s"):
        values = [t.metrics[key] for t in trajs if key in t.metrics]
        if values:
            out[f"time/episode_{key}"] = sum(values) / len(values)
    if scored:
        out["reward/mean"] = sum(t.reward for t in scored) / len(scored)
    for env in sorted({t.env for t in scored}):
        rs = [t.reward for t in scored if t.env == env]
        out[f"reward/env/{env}"] = sum(rs) / len(rs)
    return out


def standard_error(values: list[float]) -> float:
    """Standard error of the mean over tasks (sample std / sqrt(n)); samples of one task are
    averaged first, since they are not independent. NaN below two tasks."""
    n = len(values)
    if n < 2:
        return math.nan
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def pass_at_k(groups: list[list[dict]], k: int) -> dict[str, float]:
    """pass@1: mean success over the samples that got a reward; pass@k: share of tasks with a
    success among their k samples. A sample succeeds when its reward is >= 1 (math, code, SWE
    tests passing). A sample whose reward is unavailable (env_error) is no miss: it is left out
    and counted in `errors`; a task none of whose samples got a reward is left out too."""
    scored = [[t for t in g if t["status"] != "env_error"] for g in groups]
    per_task = [[t["reward"] is not None and t["reward"] >= 1.0 for t in g] for g in scored if g]
    samples = [s for task in per_task for s in task]
    out = {
        "tasks": len(per_task),
        "pass@1": sum(samples) / len(samples) if samples else math.nan,
        "pass@1_se": standard_error([sum(task) / len(task) for task in per_task]),
        "errors": sum(t["status"] in ("env_error", "timeout") for g in groups for t in g),
    }
    if k > 1:
        solved = [float(any(task)) for task in per_task]
        out[f"pass@{k}"] = sum(solved) / len(solved) if solved else math.nan
        out[f"pass@{k}_se"] = standard_error(solved)
    mean_reward = [t["reward"] for g in scored for t in g if t["reward"] is not None]
    out["reward_mean"] = sum(mean_reward) / len(mean_reward) if mean_reward else math.nan
    return out
