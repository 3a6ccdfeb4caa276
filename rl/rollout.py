"""Rollout workers: an engine plus environment episodes, token-in/token-out.

An episode: env.reset(task) -> messages -> chat format -> token ids; then engine samples a turn
(ids kept exactly as sampled), env.step(text) answers, its messages are appended as token ids, until
the env says done. Many episodes run concurrently on one asyncio loop; their generation requests
are batched into one engine call. Every sampled token carries the policy version that sampled it.

`RolloutWorker` is a plain class; `RolloutActor` is the same class as a Ray actor."""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import inspect
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from envs import registry
from envs.base import Task
from model.chat import ChatFormat
from model.loader import ModelSpec, build_model, load_tokenizer
from rl.engines.base import Completion, Engine, SamplingParams
from rl.engines.native import NativeEngine
from rl.tasks import derive_seed
from rl.types import Job, Trajectory
from rl.weights import (
    WeightGroup,
    from_arrays,
    merge_buckets,
    plan_tensors,
    recv_weights_streaming,
)

DEFAULT_EPISODE_TIMEOUT_S = 600.0  # rollout.episode_timeout_s where no env asks for longer


@dataclass
class RolloutConfig:
    num_workers: int = 1
    engine: str = "native"  # native | vllm
    max_new_tokens: int = 256  # per assistant turn
    max_turns: int = 1  # assistant turns per episode (multi-turn envs)
    max_context: int = 2048  # tokens of the whole episode
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    # wall clock per episode; past it: status timeout (excluded). None: resolved by rl/config.py
    # to the longest any of the run's environments may take by its own limits, at least 600
    episode_timeout_s: float | None = None
    max_batch: int = 64  # requests per engine call (continuous batching: rows decoding together)
    # async mode, native engine: requests join the running batch between decode steps (False:
    # a batch runs until its longest row finishes before the next one starts)
    continuous_batching: bool = True
    reasoning: bool = False  # CWM's <think> format
    threads: int = 1  # torch threads of each worker process
    gpus: float = 0.0  # GPUs per worker (Ray resource); vllm needs >= tensor_parallel_size
    tensor_parallel_size: int = 1  # vllm: GPUs one engine shards the model over
    # custom Ray resources each worker needs, e.g. {rollout_node: 1}: which nodes of a multi-node
    # cluster run the workers (the nodes offer them: `ray start --resources`); {}: any node
    resources: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.engine not in ("native", "vllm"):
            raise ValueError(f"rollout.engine must be native or vllm, got {self.engine!r}")
        for key in (
            "num_workers",
            "max_new_tokens",
            "max_turns",
            "max_context",
            "max_batch",
            "tensor_parallel_size",
        ):
            if getattr(self, key) < 1:
                raise ValueError(f"rollout.{key} must be >= 1, got {getattr(self, key)}")
        if self.gpus < 0:
            raise ValueError(f"rollout.gpus must be >= 0, got {self.gpus}")
        if self.tensor_parallel_size > 1:
            if self.engine != "vllm":
                raise ValueError(
                    f"rollout.tensor_parallel_size={self.tensor_parallel_size} needs "
                    f"rollout.engine=vllm (the native engine runs on one device)"
                )
            if self.gpus < self.tensor_parallel_size:
                raise ValueError(
                    f"rollout.tensor_parallel_size={self.tensor_parallel_size} needs as many "
                    f"GPUs per worker: set rollout.gpus >= {self.tensor_parallel_size} "
                    f"(got {self.gpus})"
                )


class Batcher:
    """Collects generate requests of concurrent episodes into engine batches.

    deterministic=True (sync mode) waits until every live episode has a request pending (or has
    finished) and orders the batch by request key, so batch composition - and with per-request
    seeds, every sampled token - does not depend on timing. Otherwise, with an engine that batches
    continuously (`submit`: the native engine) and `continuous=True`, the requests that arrived
    go to the engine at once and join its running batch between two decode steps: the next turn
    of a short episode does not wait for the longest row of the batch before it. Otherwise a batch
    leaves as soon as the engine is free (batch at a time)."""

    def __init__(
        self, engine: Engine, max_batch: int, deterministic: bool, continuous: bool = True
    ):
        self.engine, self.max_batch, self.deterministic = engine, max_batch, deterministic
        self.continuous = continuous and not deterministic and hasattr(engine, "submit")
        if self.continuous:
            engine.max_batch = max_batch  # rows in the engine's running batch
        self.live = 0  # episodes that may still submit a request
        self.pending: list[tuple[tuple, list[int], SamplingParams, asyncio.Future]] = []
        self.executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="engine")
        self.wake = asyncio.Event()
        self.task: asyncio.Task | None = None
        self.generated_tokens = 0

    def start(self) -> None:
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._loop())

    async def generate(
        self, key: tuple, ids: list[int], params: SamplingParams
    ) -> tuple[Completion, float]:
        """The completion, and the seconds the request waited before its engine call began
        (behind other requests, or for the batch to fill)."""
        fut = asyncio.get_running_loop().create_future()
        submitted = time.monotonic()
        self.pending.append((key, ids, params, fut))
        self.wake.set()
        out, started = await fut  # started: when its engine call began
        return out, max(0.0, started - submitted)

    def episode_started(self) -> None:
        self.live += 1

    def episode_finished(self) -> None:
        self.live -= 1
        self.wake.set()

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self.wake.wait()
            self.wake.clear()
            if not self.pending:
                continue
            if self.deterministic and len(self.pending) < self.live:
                continue
            self.pending.sort(key=lambda r: r[0])
            if self.continuous:
                self._submit_all()
                continue
            batch, self.pending = self.pending[: self.max_batch], self.pending[self.max_batch :]
            prompts, params = [r[1] for r in batch], [r[2] for r in batch]
            started = time.monotonic()
            try:
                outs = await loop.run_in_executor(
                    self.executor, self.engine.generate, prompts, params
                )
            except Exception as e:  # noqa: BLE001 - delivered to each waiting episode
                for r in batch:
                    if not r[3].done():
                        r[3].set_exception(e)
            else:
                for r, out in zip(batch, outs):
                    self.generated_tokens += len(out.token_ids)
                    if not r[3].done():
                        r[3].set_result((out, started))
            if self.pending:
                self.wake.set()

    def _submit_all(self) -> None:
        """Continuous mode: every pending request to the engine now; each episode's future is
        completed from the engine's thread when its request finishes."""
        batch, self.pending = self.pending, []
        loop = asyncio.get_running_loop()
        try:
            futures = self.engine.submit([r[1] for r in batch], [r[2] for r in batch])
        except Exception as e:  # noqa: BLE001 - delivered to each waiting episode
            for r in batch:
                if not r[3].done():
                    r[3].set_exception(e)
            return

        def deliver(fut: asyncio.Future, done: concurrent.futures.Future) -> None:
            if fut.done():
                return
            if done.exception() is not None:
                fut.set_exception(done.exception())
            else:
                out, started = done.result()
                self.generated_tokens += len(out.token_ids)
                fut.set_result((out, started))

        for r, f in zip(batch, futures):
            f.add_done_callback(
                lambda done, fut=r[3]: loop.call_soon_threadsafe(deliver, fut, done)
            )


class RolloutWorker:
    def __init__(
        self,
        model: ModelSpec,
        envs: dict[str, dict],
        config: RolloutConfig,
        worker_id: int = 0,
        deterministic: bool = True,
    ):
        torch.set_num_threads(config.threads)
        self.config, self.worker_id = config, worker_id
        self.env_classes = {name: registry.get(name) for name in envs}
        self.env_configs = {
            name: cls.validate_config(envs[name]) for name, cls in self.env_classes.items()
        }
        self.tokenizer = load_tokenizer(model)
        self.chat = ChatFormat.from_tokenizer(self.tokenizer, reasoning=config.reasoning)
        if config.engine == "native":
            self.engine: Engine = NativeEngine(build_model(model))
        else:
            try:
                from rl.engines.vllm import VLLMEngine
            except ImportError as e:
                raise RuntimeError(
                    f"rollout.engine=vllm is not available here ({e}); use rollout.engine=native"
                ) from e
            self.engine = VLLMEngine.from_spec(model, config)
        vocab = getattr(getattr(self.engine, "model", None), "config", None)
        if vocab is not None and len(self.tokenizer) > vocab.vocab_size:
            raise ValueError(
                f"tokenizer has {len(self.tokenizer)} tokens but the model's vocab_size is "
                f"{vocab.vocab_size}"
            )
        self.deterministic = deterministic
        self.batcher: Batcher | None = None
        self._apply_lock = asyncio.Lock()  # one weight update at a time
        self.weight_group: WeightGroup | None = None
        self.weight_update_s = 0.0

    def _batcher(self) -> Batcher:
        if self.batcher is None:
            self.batcher = Batcher(
                self.engine,
                self.config.max_batch,
                self.deterministic,
                self.config.continuous_batching,
            )
            self.batcher.start()
        return self.batcher

    # -- episodes ---------------------------------------------------------------------------------

    async def run_groups(self, jobs: list[Job], overrides: dict | None = None) -> list[list[dict]]:
        """A group of episodes per job; trajectories come back as dicts (Trajectory.to_dict),
        grouped as the jobs were. `overrides` replaces sampling settings of RolloutConfig for
        these episodes (evaluation: temperature...)."""
        cfg = dataclasses.replace(self.config, **(overrides or {}))
        batcher = self._batcher()
        for job in jobs:
            for _ in range(job.samples):
                batcher.episode_started()
        groups = await asyncio.gather(
            *(
                asyncio.gather(
                    *(
                        self._episode(job.task, job.group_id, i, derive_seed(job.seed, i), cfg)
                        for i in range(job.samples)
                    )
                )
                for job in jobs
            )
        )
        return [[t.to_dict() for t in group] for group in groups]

    async def _episode(
        self, task: Task, group_id: str, index: int, seed: int, cfg: RolloutConfig
    ) -> Trajectory:
        chat = self.chat
        env = self.env_classes[task.env](self.env_configs[task.env])
        tokens: list[int] = []
        mask: list[int] = []
        logprobs: list[float] = []
        versions: list[int] = []
        prompt_len, turns, status, reward, metrics = 0, 0, "ok", None, {}
        started = time.monotonic()
        # where the episode's seconds went: waiting for an engine call (behind other requests),
        # generating, and in the environment (reset, steps: tools, sandboxes, scoring)
        timing = {"queue_s": 0.0, "generate_s": 0.0, "env_s": 0.0}

        def append(ids: list[int], sampled: Completion | None = None) -> None:
            tokens.extend(ids)
            if sampled is None:
                mask.extend([0] * len(ids))
                logprobs.extend([0.0] * len(ids))
                versions.extend([-1] * len(ids))
            else:
                mask.extend([1] * len(ids))
                logprobs.extend(sampled.logprobs)
                versions.extend(sampled.versions)

        batcher = self.batcher
        try:
            async with asyncio.timeout(cfg.episode_timeout_s or DEFAULT_EPISODE_TIMEOUT_S):
                t = time.monotonic()
                first = await env.reset(task)
                timing["env_s"] += time.monotonic() - t
                append(chat.encode_messages(first))
                prompt_len = len(tokens)
                while True:
                    room = cfg.max_context - len(tokens)
                    if turns >= cfg.max_turns or room <= 0:
                        status = "truncated"
                        reward = float(env.truncation_reward)
                        break
                    params = SamplingParams(
                        max_new_tokens=min(cfg.max_new_tokens, room),
                        temperature=cfg.temperature,
                        top_p=cfg.top_p,
                        top_k=cfg.top_k,
                        stop_token_ids=tuple(chat.stop_token_ids),
                        seed=derive_seed(seed, turns),
                    )
                    t = time.monotonic()
                    out, queued = await batcher.generate(
                        (group_id, index, turns), list(tokens), params
                    )
                    timing["queue_s"] += queued
                    timing["generate_s"] += time.monotonic() - t - queued
                    append(out.token_ids, out)
                    turns += 1
                    env.observe_tokens(len(tokens))  # exact, for envs with a token budget
                    t = time.monotonic()
                    result = await env.step(chat.response_text(out.token_ids))
                    timing["env_s"] += time.monotonic() - t
                    metrics.update(result.info)
                    if result.done:
                        status, reward = result.status, result.reward
                        break
                    reply: list[int] = []
                    for k, message in enumerate(result.messages):
                        last = k == len(result.messages) - 1
                        reply += chat.encode_turn(
                            message, add_generation_prompt=last, previous_ids=tokens + reply
                        )
                    if len(tokens) + len(reply) >= cfg.max_context:  # no room left after it
                        status, reward = "truncated", float(env.truncation_reward)
                        break
                    append(reply)
        except TimeoutError:
            status, reward = "timeout", None
        except Exception as e:  # noqa: BLE001 - an env failure: reward unavailable, never 0
            status, reward = "env_error", None
            metrics["error"] = f"{type(e).__name__}: {e}"
        finally:
            batcher.episode_finished()
            try:
                await asyncio.wait_for(env.close(), 30)
            except Exception as e:  # noqa: BLE001
                metrics["close_error"] = f"{type(e).__name__}: {e}"
        if status in ("ok", "truncated") and reward is None:
            status = "env_error"
            metrics["error"] = "environment finished without a reward"
        if not prompt_len:  # reset failed: keep the contract (a prompt of one token)
            tokens, mask, logprobs, versions, prompt_len = [0], [0], [0.0], [-1], 1
        metrics.update(turns=turns, seconds=round(time.monotonic() - started, 3))
        metrics.update({k: round(v, 4) for k, v in timing.items()})
        return Trajectory(
            task_id=task.id,
            env=task.env,
            group_id=group_id,
            tokens=tokens,
            loss_mask=mask,
            logprobs=logprobs,
            versions=versions,
            prompt_len=prompt_len,
            reward=None if reward is None else float(reward),
            status=status,
            metrics=metrics,
        )

    # -- weights ----------------------------------------------------------------------------------

    async def receive_weights(self, buckets: list[Any], version: int) -> int:
        """One whole update: `buckets` are all its buckets of HF-named weights (rl/weights
        to_arrays), as ObjectRefs inside the list (Ray passes nested refs unresolved) or as the
        arrays themselves. Every bucket is fetched (zero-copy from the object store), then the
        update is applied at once between two decode steps (requests in flight continue with the
        new weights). One call per update, never one per bucket: Ray runs an async actor's calls
        out of order, so a per-bucket protocol could apply an update before all of it arrived."""
        arrays = await asyncio.gather(*(_fetch(b) for b in buckets))
        return await self._apply_weights(merge_buckets([from_arrays(a) for a in arrays]), version)

    async def _apply_weights(self, weights: dict[str, torch.Tensor], version: int) -> int:
        """Updates apply one at a time and never go back: an update older than the engine's
        version (updates reordered on their way) is an error, not a silent rollback."""
        async with self._apply_lock:
            if version < self.engine.version:
                raise RuntimeError(
                    f"worker {self.worker_id}: the update to policy version {version} arrived "
                    f"after version {self.engine.version} (weight updates out of order)"
                )
            t0 = time.monotonic()
            await asyncio.get_running_loop().run_in_executor(
                None, self.engine.update_weights, weights, version
            )
            self.weight_update_s = time.monotonic() - t0
            return self.engine.version

    # weight_sync.method=collective: this worker is one receiver of the learner's broadcast

    async def join_weight_group(self, address: dict, rank: int) -> None:
        """Join a new weight-sync group as `rank` (blocks, off the event loop, until all have
        joined); a previous group is aborted, which also frees a receive stuck on it."""
        device = "cuda" if address["backend"] == "nccl" else "cpu"
        group = await asyncio.get_running_loop().run_in_executor(
            None,
            lambda: WeightGroup.join(
                address, rank, address["backend"], address["timeout_s"], device
            ),
        )
        old, self.weight_group = self.weight_group, group
        if old is not None:
            old.close()

    async def receive_broadcast(self, version: int) -> int:
        """Receive one update from the weight group and load it as it arrives, bucket by bucket
        (rl/weights.recv_weights_streaming: at most two buckets held), through the engine's
        load_streaming: the native engine copies each piece into its parameters, vLLM reloads
        the layers each bucket completes; decoding waits meanwhile, so no token sees part of an
        update, and no whole copy of the model is ever assembled."""
        group = self.weight_group
        if group is None:
            raise RuntimeError(f"worker {self.worker_id} has not joined a weight-sync group")

        def receive() -> None:
            plan, buckets = recv_weights_streaming(group)
            try:
                if version < self.engine.version:
                    raise RuntimeError(
                        f"worker {self.worker_id}: the update to policy version {version} "
                        f"arrived after version {self.engine.version} (weight updates out of order)"
                    )
                self.engine.load_streaming(plan_tensors(plan), buckets, version)
            except (KeyError, ValueError, RuntimeError):
                for _ in buckets:  # refused before loading: the group stays in step
                    pass
                raise

        async with self._apply_lock:
            t0 = time.monotonic()
            await asyncio.get_running_loop().run_in_executor(None, receive)
            self.weight_update_s = time.monotonic() - t0
            return self.engine.version

    def version(self) -> int:
        return self.engine.version

    def weight_dtype(self) -> str | None:
        """The dtype this engine's weights are held in (the learner casts to it at the source),
        or None when unknown (sent as trained)."""
        model = getattr(self.engine, "model", None)
        if isinstance(model, torch.nn.Module):
            return str(next(model.parameters()).dtype).removeprefix("torch.")
        return getattr(self.engine, "dtype", None)

    def stats(self) -> dict[str, Any]:
        return {
            "generated_tokens": self.batcher.generated_tokens if self.batcher else 0,
            "weight_update_s": self.weight_update_s,
        }


async def _fetch(bucket: Any) -> Any:
    """A bucket's arrays: awaited when it is an ObjectRef (in an async actor), else as given."""
    return await bucket if inspect.isawaitable(bucket) else bucket
