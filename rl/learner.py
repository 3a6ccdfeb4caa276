"""The GRPO learner: one process of an FSDP2-sharded CWM policy (gloo on CPU, NCCL on GPU).

A step: every rank gets the whole batch, packs it into token-budget micro-batches (no padding, no
attention across trajectories), takes micro-batches round-robin, and accumulates gradients of a loss
whose normaliser is fixed for the whole batch, so the update does not depend on how the batch is
split over micro-batches or ranks. Then gradient clipping, AdamW and the LR schedule.

With `context_parallel_size` n > 1, ranks r*n .. r*n + n-1 form a context-parallel group: they take
the same micro-batches (data parallelism is over world_size / n groups), each runs one chunk of the
row, and all compute the row's loss from the gathered log-probs (rl/context_parallel.py).

`start_learners` runs N of these as Ray actors; one process (world_size 1, no FSDP) works too."""

from __future__ import annotations

import math
import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint

from model.cwm import CWMConfig
from model.hf import (
    from_hf_state_dict,
    hf_name,
    save_pretrained,
    split_state_dict,
    to_hf_state_dict,
)
from model.loader import ModelSpec, build_model, load_tokenizer
from rl import checkpoint as ckpt
from rl import grpo, net
from rl.context_parallel import ContextParallelAttention, gather_chunks, split_micro_batch
from rl.engines.native import truncation_mask
from rl.packing import MicroBatch, build_micro_batch, pack
from rl.parallelize import parallelize
from rl.types import TrainBatch, Trajectory
from rl.weights import (
    WeightGroup,
    bucket_plan,
    host_address,
    send_weights_streaming,
    to_arrays,
)


@dataclass
class OptimConfig:
    lr: float = 1e-6
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])  # beta1, beta2
    weight_decay: float = 0.1
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: str = "constant"  # constant | cosine
    total_steps: int = 1000  # for cosine
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0


@dataclass
class LearnerConfig:
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: grpo.LossConfig = field(default_factory=grpo.LossConfig)
    micro_batch_tokens: int = 4096
    # the sampler's: log-probs are of logits / temperature, truncated to top_k / top_p. None:
    # rollout's (a run's config sets them so; an explicit value that differs is a config error)
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    activation_checkpointing: bool = False
    param_dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16
    logprob_chunk: int = 1024  # positions per lm_head chunk
    backend: str = "fsdp2"  # fsdp2 | deepspeed
    # ranks that split one packed row between them (fsdp2; divides num_learners): each holds
    # 1/n of a micro_batch_tokens row (rl/context_parallel.py); data parallelism is over the rest
    context_parallel_size: int = 1

    @property
    def logprob_temperature(self) -> float:
        return 1.0 if self.temperature is None else self.temperature

    @property
    def truncation(self) -> dict[str, Any]:
        """top_k / top_p of the sampling distribution, as token_logprobs takes them."""
        return {"top_k": self.top_k or 0, "top_p": 1.0 if self.top_p is None else self.top_p}


def lr_lambda(optim: OptimConfig):
    """Linear warm-up to the peak LR, then constant or cosine down to min_lr_ratio."""

    def fn(step: int) -> float:
        if optim.warmup_steps and step < optim.warmup_steps:
            return (step + 1) / optim.warmup_steps
        if optim.schedule == "constant":
            return 1.0
        span = max(1, optim.total_steps - optim.warmup_steps)
        progress = min(1.0, (step - optim.warmup_steps) / span)
        cosine = 0.5 * (1 + math.cos(math.pi * progress))
        return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * cosine

    if optim.schedule not in ("constant", "cosine"):
        raise ValueError(f"optim.schedule must be constant or cosine, got {optim.schedule!r}")
    return fn


def token_logprobs(
    model: torch.nn.Module,
    mb: MicroBatch,
    temperature: float,
    chunk: int,
    positions: torch.Tensor | None = None,
    top_k: int = 0,
    top_p: float = 1.0,
    attention: Any = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of each position's target token and the entropy of its distribution, both [T].
    The distribution is the sampler's: logits / `temperature`, truncated to the `top_k` most
    likely tokens (0: off) and to the top-`top_p` mass of those, renormalised (as
    rl.engines.native.process_logits; vLLM reports the same "processed" log-probs).

    `positions` (a 1-D index into the row): run lm_head and the softmax only there, the rest of
    both outputs is 0. The loss reads only the positions whose token the policy sampled, so the
    learner passes those: the output layer (a fifth of a small model's work per position) skips
    the prompt and tool-result tokens, which are most of a row. The body still runs on every
    position (later tokens attend to them).

    lm_head and the softmax run over chunks of `chunk` positions; with more than one chunk and
    gradients on, each chunk is recomputed in the backward pass (checkpointing), so the [T, V]
    logits are never held whole. One chunk is not recomputed: its recompute would hold as much.

    `attention` replaces the model's packed-row attention (context parallelism)."""
    targets = mb.target_ids[0]

    def head_chunk(h: torch.Tensor, t: torch.Tensor, lm_head: torch.nn.Linear):
        scaled = lm_head(h).float() / temperature
        drop = None
        if top_k > 0 or top_p < 1:  # the engine's truncated distribution (a fixed set here)
            n = scaled.shape[0]
            drop = truncation_mask(
                scaled.detach(),
                torch.full((n,), top_k, dtype=torch.long, device=scaled.device),
                torch.full((n,), top_p, dtype=torch.float32, device=scaled.device),
            )
            scaled = scaled.masked_fill(drop, float("-inf"))
        logp = scaled.log_softmax(-1)
        with torch.no_grad():  # reported, never differentiated
            plogp = logp.exp() * logp
            entropy = -(plogp if drop is None else plogp.masked_fill(drop, 0.0)).sum(-1)
        return logp.gather(-1, t[:, None])[:, 0], entropy

    def head(hidden: torch.Tensor, lm_head: torch.nn.Linear):
        hidden, tgt = hidden[0], targets
        if positions is not None:
            hidden, tgt = hidden.index_select(0, positions), tgt.index_select(0, positions)
        n = hidden.shape[0]
        recompute = torch.is_grad_enabled() and n > chunk
        lps, ents = [], []
        for s in range(0, n, chunk):
            args = (hidden[s : s + chunk], tgt[s : s + chunk], lm_head)
            if recompute:
                lp, ent = checkpoint(head_chunk, *args, use_reentrant=False)
            else:
                lp, ent = head_chunk(*args)
            lps.append(lp)
            ents.append(ent)
        lp = torch.cat(lps) if lps else hidden.new_zeros(0, dtype=torch.float32)
        ent = torch.cat(ents) if ents else hidden.new_zeros(0, dtype=torch.float32)
        if positions is None:
            return lp, ent
        T = targets.shape[0]
        scatter = lambda x: x.new_zeros(T).index_copy(0, positions, x)  # noqa: E731
        return scatter(lp), scatter(ent)

    extra = {} if attention is None else {"attention": attention}
    return model(mb.input_ids, mb.position_ids, head=head, **extra)


def trained_positions(mb: MicroBatch) -> torch.Tensor:
    """The positions whose token the policy sampled (the loss reads only those), or position 0
    (masked out) when there are none, so the backward reaches every parameter on every rank."""
    trained = mb.loss_mask[0].nonzero()[:, 0]
    return trained if trained.numel() else trained.new_zeros(1)


def context_parallel_logprobs(
    model: torch.nn.Module,
    mb: MicroBatch,
    group: Any,
    window: int | None,
    temperature: float,
    chunk: int,
    trained_only: bool = False,
    top_k: int = 0,
    top_p: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`token_logprobs` of a whole packed row on every rank of the context-parallel `group`:
    each rank runs its chunk of the row (`trained_only`: the output layer only at its sampled
    positions), then the chunks' results are gathered, [T] each. Every rank of the group must
    compute the same loss from them (see rl.context_parallel.gather_chunks)."""
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    part, positions = split_micro_batch(mb, rank, size)
    attention = ContextParallelAttention(positions, window, group)
    lp, entropy = token_logprobs(
        model, part, temperature, chunk, trained_positions(part) if trained_only else None,
        top_k=top_k, top_p=top_p, attention=attention,
    )  # fmt: skip
    T = mb.num_tokens
    return gather_chunks(lp, group)[:T], gather_chunks(entropy.detach(), group)[:T]


class Learner:
    """One rank of the learner. All ranks must call the same methods in the same order."""

    weight_group: WeightGroup | None = None  # weight_sync.method=collective, rank 0
    _weight_store: Any = None
    cp_size: int = 1  # context parallelism: ranks per group that split one row
    cp_group: Any = None  # this rank's group (None without context parallelism)

    def __init__(
        self,
        config: LearnerConfig,
        model: ModelSpec,
        rank: int = 0,
        world_size: int = 1,
        init_method: str | None = None,
        num_threads: int | None = None,
    ):
        if config.backend != "fsdp2":
            raise ValueError(
                f"learner.backend is {config.backend!r}: build it with learner_class(backend)"
            )
        self.config, self.model_spec = config, model
        self.rank, self.world_size = rank, world_size
        if num_threads:
            torch.set_num_threads(num_threads)
        cuda = torch.cuda.is_available()
        pdtype = {"auto": torch.bfloat16 if cuda else None, "float32": None}.get(
            config.param_dtype, getattr(torch, config.param_dtype, None)
        )
        # FSDP2 also on one rank when parameters compute in bf16 (its mixed-precision policy
        # keeps fp32 master weights); plain fp32 on one rank needs no process group
        self.use_fsdp = world_size > 1 or pdtype is not None
        if self.use_fsdp and not dist.is_initialized():
            net.init_process_group(
                "nccl" if cuda else "gloo",
                rendezvous(init_method, rank)
                or (_free_tcp_address() if world_size == 1 else "env://"),
                rank,
                world_size,
            )
        if cuda:
            torch.cuda.set_device(
                int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count()))
            )
        self.device = torch.device("cuda" if cuda else "cpu")
        if config.context_parallel_size > 1:
            self._init_context_parallel(config.context_parallel_size)
        model = build_model(self.model_spec, device=self.device)
        self.model_config: CWMConfig = model.config
        self.model = parallelize(
            model,
            fsdp=self.use_fsdp,
            activation_checkpointing=config.activation_checkpointing,
            param_dtype=pdtype,
        )
        o = config.optim
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=o.lr, betas=tuple(o.betas), eps=o.eps,
            weight_decay=o.weight_decay, foreach=False,
        )  # fmt: skip
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(o))
        self.ref_model = None
        if config.loss.kl_estimator != "off":  # a frozen copy of the initial policy
            ref = build_model(self.model_spec, device=self.device).eval().requires_grad_(False)
            self.ref_model = parallelize(ref, fsdp=self.use_fsdp, param_dtype=pdtype)
        self.step = 0

    def _init_context_parallel(self, size: int) -> None:
        """Groups of `size` consecutive ranks (every rank creates every group, as new_group asks)."""
        if self.world_size % size:
            raise ValueError(
                f"learner.context_parallel_size {size} does not divide the {self.world_size} ranks"
            )
        groups = [
            dist.new_group(list(range(g * size, (g + 1) * size)))
            for g in range(self.world_size // size)
        ]
        self.cp_size, self.cp_group = size, groups[self.rank // size]

    @property
    def cp_rank(self) -> int:
        return self.rank % self.cp_size

    @property
    def dp_rank(self) -> int:
        """Which data-parallel group this rank belongs to (its context-parallel group's index)."""
        return self.rank // self.cp_size

    @property
    def dp_size(self) -> int:
        return self.world_size // self.cp_size

    # -- forward helpers -------------------------------------------------------------------------

    def _logprobs(self, model, mb: MicroBatch, trained_only: bool = False):
        """Log-probs and entropies [T] of a micro-batch's row (`trained_only`: the output layer
        runs only at the sampled positions, the rest are 0), split over the CP group if any."""
        cfg = self.config
        args = (cfg.logprob_temperature, cfg.logprob_chunk)
        if self.cp_group is not None:
            window = self.model_config.sliding_window
            return context_parallel_logprobs(
                model, mb, self.cp_group, window, *args, trained_only, **cfg.truncation
            )
        trained = trained_positions(mb) if trained_only else None
        return token_logprobs(model, mb, *args, trained, **cfg.truncation)

    def _micro_batches(self, trajectories, advantages=None) -> list[MicroBatch]:
        tokens = [t.tokens for t in trajectories]
        if advantages is None:
            advantages = [[0.0] * len(x) for x in tokens]
        bins = pack([len(x) for x in tokens], self.config.micro_batch_tokens)
        masks, lps = [t.loss_mask for t in trajectories], [t.logprobs for t in trajectories]
        return [build_micro_batch(idx, tokens, masks, lps, advantages) for idx in bins]

    @torch.no_grad()
    def compute_logprobs(self, trajectories) -> list[list[float]]:
        """Per-token log-probs of each trajectory's tokens under the current weights (0.0 for the
        first token, which nothing predicts)."""
        out: list[list[float]] = [[0.0] * len(t.tokens) for t in trajectories]
        for mb in self._micro_batches(trajectories):
            lp, _ = self._logprobs(self.model, mb.to(self.device))
            lp, seq = lp.cpu().tolist(), mb.seq_index[0].tolist()
            offsets = {}
            for t, i in enumerate(seq):
                k = offsets.setdefault(i, t)
                if t - k + 1 < len(out[i]):
                    out[i][t - k + 1] = lp[t]
        return out

    # -- the step --------------------------------------------------------------------------------

    def train_on(self, trajectories: list[Trajectory], version: int) -> dict[str, float]:
        """GRPO on one side: a step's trajectories (sampled up to policy `version`) -> group
        advantages (rl.grpo.build_train_batch) -> one optimizer step. Returns the batch's
        metrics (batch/*, staleness/*) and the step's (train/*); a batch left empty (every
        trajectory excluded or filtered) skips the step (train/skipped = 1). Every rank builds
        the same batch from the same trajectories."""
        batch = grpo.build_train_batch(trajectories, self.config.loss)
        metrics: dict[str, float] = {
            "batch/excluded": batch.num_excluded,
            "batch/filtered_groups": batch.num_filtered_groups,
            "batch/trajectories": len(batch.trajectories),
        }
        if not batch.trajectories or batch.num_sampled_tokens == 0:
            metrics["train/skipped"] = 1  # nothing to learn from: the weights stay
            if batch.trajectories:
                metrics["batch/no_sampled_tokens"] = 1
            return metrics
        for key, value in self.train_step(batch).items():  # timings (*_s) go with the others
            metrics[f"time/{key}" if key.endswith("_s") else f"train/{key}"] = value
        lags = [
            version - v for t in batch.trajectories for v, m in zip(t.versions, t.loss_mask) if m
        ]
        metrics["staleness/max_token_lag"] = max(lags)
        metrics["staleness/mean_token_lag"] = sum(lags) / len(lags)
        return metrics

    def train_step(self, batch: TrainBatch) -> dict[str, float]:
        """One optimizer step on a TrainBatch (trajectories + per-token advantages)."""
        cfg = self.config
        trajs = batch.trajectories
        mbs = self._micro_batches(trajs, batch.advantages)
        # fixed for the whole batch, so the update does not depend on the micro-batch split
        normaliser = grpo.loss_normaliser([t.loss_mask for t in trajs], cfg.loss)
        # the ranks of a context-parallel group share their micro-batches
        mine = mbs[self.dp_rank :: self.dp_size]
        # every rank runs the same number of forward/backward passes (FSDP collectives); a rank
        # short of work repeats a micro-batch with weight 0
        rounds = max(1, math.ceil(len(mbs) / self.dp_size))
        self.model.train()
        stats = grpo.MetricSums()
        t0 = time.perf_counter()
        for r in range(rounds):
            weight = 1.0 if r < len(mine) else 0.0
            mb = (mine[r] if r < len(mine) else mbs[0]).to(self.device)
            if hasattr(self.model, "set_requires_gradient_sync"):
                self.model.set_requires_gradient_sync(r == rounds - 1)
            # the loss reads only the sampled positions: the output layer runs only there
            if self.ref_model is not None:
                with torch.no_grad():
                    mb.ref_logprobs = self._logprobs(self.ref_model, mb, trained_only=True)[0][None]
            lp, entropy = self._logprobs(self.model, mb, trained_only=True)
            # one optimizer step per batch: the learner's pre-step log-probs are these (for TIS)
            mb.old_logprobs = lp.detach()[None]
            loss, parts = grpo.packed_policy_loss(
                lp, mb, cfg.loss, normaliser, entropy=entropy.detach()
            )
            # FSDP averages gradients over ranks; the loss is a sum over the batch, so undo it
            # (a context-parallel group's ranks hold parts of one gradient: the sum is the whole)
            self._backward(loss * weight * self.world_size)
            if weight and self.cp_rank == 0:  # the group's ranks compute the same loss
                stats.add(parts)
        t1 = time.perf_counter()
        grad_norm = self._optimizer_step()
        t2 = time.perf_counter()
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        self.step += 1
        metrics = stats.reduce(self.world_size)
        metrics.update(
            grad_norm=float(grad_norm), lr=lr, learner_step=self.step, micro_batches=len(mbs),
            packed_tokens=sum(mb.num_tokens for mb in mbs),
            forward_backward_s=t1 - t0, optimizer_s=t2 - t1,
        )  # fmt: skip
        return metrics

    def _backward(self, loss: torch.Tensor) -> None:
        """Accumulate the gradients of one micro-batch's loss (a hook for other backends)."""
        loss.backward()

    def _optimizer_step(self) -> torch.Tensor:
        """Clip, step and zero the gradients; returns the gradient norm before clipping."""
        grad_norm = torch.nn.utils.clip_grad_norm_(
            self.model.parameters(), self.config.optim.grad_clip
        )
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    # -- weights out -----------------------------------------------------------------------------

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """Full, HF-named CPU weights (rank 0; other ranks get {}). Every rank must call it."""
        if self.use_fsdp:
            sd = ckpt.full_model_state_dict(self.model)
        else:
            sd = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        sd = {k.replace("_checkpoint_wrapped_module.", ""): v for k, v in sd.items()}
        return to_hf_state_dict(sd, self.model_config) if sd else {}

    streams_weights = True  # iter_hf_weights gathers one parameter at a time

    def iter_hf_weights(self):
        """(HF name, full tensor) one parameter at a time, as trained: a FSDP2 parameter is
        gathered from its shards (a collective: every rank iterates, in the same order; ranks
        other than 0 drop what they get), so one full parameter exists at a time; the sender
        casts piece by piece as it fills its buckets (rl/weights.send_weights_streaming)."""
        tied = self.model_config.tie_word_embeddings
        for name, p in self.model.named_parameters():
            hf = hf_name(name.replace("_checkpoint_wrapped_module.", ""))
            if tied and hf == "lm_head.weight":
                continue
            yield hf, (p.full_tensor() if hasattr(p, "full_tensor") else p).detach()

    def weight_metas(self, dtype: torch.dtype | None = None) -> list[tuple]:
        """(HF name, shape, dtype) of what iter_hf_weights yields, from metadata alone."""
        tied = self.model_config.tie_word_embeddings
        out = []
        for name, p in self.model.named_parameters():
            hf = hf_name(name.replace("_checkpoint_wrapped_module.", ""))
            if not (tied and hf == "lm_head.weight"):
                out.append((hf, tuple(p.shape), dtype or p.dtype))
        return out

    def publish_weights(self, bucket_bytes: int, dtype: str | None = None) -> tuple[int, list]:
        """HF-named weights cast to `dtype` (the rollout engine's; None: as trained) in buckets of
        about `bucket_bytes`, each put in Ray's object store as numpy arrays as soon as it is
        full (rl/weights.to_arrays; rank 0, other ranks take part and return []): this process
        holds one bucket at a time, the object store the whole update (every worker fetches it
        from there). Returns (the policy version these weights are: optimizer steps done, the
        ObjectRefs): the label comes with the weights, whatever ran on this actor before."""
        import ray

        dt = getattr(torch, dtype) if dtype else None
        if not self.streams_weights:
            sd = {k: v.to(dt or v.dtype) for k, v in self.hf_state_dict().items()}
            buckets = split_state_dict(sd, bucket_bytes) if sd else []
            return self.step, [ray.put(to_arrays(bucket)) for bucket in buckets]
        refs, bucket, size = [], {}, 0
        for name, t in self.iter_hf_weights():
            if self.rank != 0:
                continue
            t = t.to("cpu", dt or t.dtype)
            n = t.numel() * t.element_size()
            if bucket and size + n > bucket_bytes:
                refs.append(ray.put(to_arrays(bucket)))
                bucket, size = {}, 0
            bucket[name] = t
            size += n
        if bucket:
            refs.append(ray.put(to_arrays(bucket)))
        return self.step, refs

    # weight_sync.method=collective: rank 0 is the source of a process group with the workers

    def open_weight_group(self, num_receivers: int, backend: str, timeout_s: float) -> dict | None:
        """Rank 0: serve the store of a new weight-sync group (the previous one is closed);
        returns the address the receivers join (ranks 1..num_receivers). Other ranks: None."""
        if self.rank != 0:
            return None
        self.close_weight_group()
        self._weight_store, address = WeightGroup.serve(num_receivers + 1, timeout_s)
        return {**address, "backend": backend, "timeout_s": timeout_s}

    def join_weight_group(self, address: dict) -> None:
        """Rank 0 joins as the source; returns once every receiver has joined."""
        if self.rank == 0:
            store, self._weight_store = self._weight_store, None
            device = self.device if address["backend"] == "nccl" else "cpu"  # gloo: host memory
            self.weight_group = WeightGroup.join(
                address, 0, address["backend"], address["timeout_s"], device, store=store
            )

    def close_weight_group(self) -> None:
        group, self.weight_group = self.weight_group, None
        if group is not None:
            group.close()

    def broadcast_weights(self, bucket_bytes: int, dtype: str | None = None) -> float:
        """HF-named weights cast to `dtype` (None: as trained), broadcast by rank 0 to the weight
        group bucket by bucket as they are gathered (every rank takes part in the gathers): at
        most two buckets and one full parameter exist at once on the sender
        (rl/weights.send_weights_streaming). Returns the seconds it took. A failed broadcast (a
        receiver died) closes the group: a new one must be formed."""
        t0 = time.monotonic()
        dt = getattr(torch, dtype) if dtype else None
        if self.rank == 0 and self.weight_group is None:
            raise RuntimeError("no weight-sync group: open_weight_group/join_weight_group first")
        if not self.streams_weights:
            sd = {k: v.to(dt or v.dtype) for k, v in self.hf_state_dict().items()}
            metas = [(k, tuple(v.shape), v.dtype) for k, v in sd.items()]
            tensors = iter(sd.items())
        else:
            metas, tensors = self.weight_metas(dt), self.iter_hf_weights()
        if self.rank != 0:
            for _ in tensors:  # the gathers
                pass
            return time.monotonic() - t0
        try:
            send_weights_streaming(
                self.weight_group, bucket_plan(metas, bucket_bytes), iter(tensors)
            )
        except Exception:
            self.close_weight_group()
            raise
        return time.monotonic() - t0

    def export_hf(self, path: str) -> str | None:
        """Write an HF checkpoint of the current policy, with its tokenizer (rank 0 writes)."""
        sd = self.hf_state_dict()
        if self.rank != 0:
            return None
        spec = self.model_spec
        has_tokenizer = spec.tokenizer or not spec.path.startswith("preset:")
        save_pretrained(
            _Shell(self.model_config),
            path,
            tokenizer=load_tokenizer(spec) if has_tokenizer else None,
            state_dict=from_hf_state_dict(sd),
        )
        return str(path)

    def save(self, root: str, extra: dict | None = None) -> str:
        """Checkpoint `root/step_N`: N is the run's step (extra["step"]; a skipped step makes it
        run ahead of the optimizer's), else the optimizer's."""
        name = (extra or {}).get("step", self.step)
        return str(
            ckpt.save(root, self.model, self.optimizer, self.scheduler, self.step, extra, name)
        )

    def load(self, path: str) -> dict:
        self.step, extra = ckpt.load(path, self.model, self.optimizer, self.scheduler)
        return extra

    def ping(self) -> int:
        return self.rank

    def shutdown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def learner_class(backend: str) -> type[Learner]:
    """The Learner of `learner.backend`: fsdp2 (this file) or deepspeed (ZeRO-3, imported only
    when asked, so the package works without the optional dependency)."""
    if backend == "fsdp2":
        return Learner
    if backend == "deepspeed":
        from rl.learner_deepspeed import DeepSpeedLearner

        return DeepSpeedLearner
    raise ValueError(f"learner.backend must be fsdp2 or deepspeed, got {backend!r}")


class _Shell:
    """What save_pretrained needs of a model when the weights come as a state dict."""

    def __init__(self, config: CWMConfig):
        self.config = config


def _free_tcp_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def rendezvous(init_method: str | None, rank: int, timeout_s: float = 600.0) -> str | None:
    """Where the learner ranks meet. `kv:KEY` (start_learners): rank 0 takes a free port on its
    own node's address and publishes tcp://ADDRESS:PORT under KEY in Ray's key-value store; the
    other ranks wait for it, so the ranks may run on any nodes. Anything else is returned as is."""
    if not init_method or not init_method.startswith("kv:"):
        return init_method
    from ray.experimental import internal_kv

    key = init_method.removeprefix("kv:")
    if rank == 0:
        host = host_address()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family) as s:
            s.bind((host, 0))
            address = f"tcp://{f'[{host}]' if ':' in host else host}:{s.getsockname()[1]}"
        internal_kv._internal_kv_put(key, address.encode())
        return address
    deadline = time.monotonic() + timeout_s
    while (address := internal_kv._internal_kv_get(key)) is None:
        if time.monotonic() > deadline:
            raise RuntimeError(f"learner rank {rank}: rank 0 published no address in {timeout_s} s")
        time.sleep(0.1)
    return address.decode()


def start_learners(
    config: LearnerConfig,
    model: ModelSpec,
    world_size: int,
    num_cpus: float = 1,
    num_gpus: float = 0,
    num_threads: int | None = None,
    resources: dict[str, float] | None = None,
) -> list[Any]:
    """Start `world_size` Learner ranks as Ray actors joined in one process group; `resources`
    (custom Ray resources per rank) picks their nodes. The ranks meet at an address rank 0 picks
    on its node (`rendezvous`)."""
    import ray

    actor = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, resources=resources or None)(
        learner_class(config.backend)
    )
    init = f"kv:cwm_rl/learner_rendezvous/{uuid.uuid4().hex}" if world_size > 1 else None
    threads = num_threads or max(1, int(num_cpus))
    learners = [
        actor.remote(
            config, model, rank=r, world_size=world_size, init_method=init, num_threads=threads
        )
        for r in range(world_size)
    ]
    ray.get([learner.ping.remote() for learner in learners])
    return learners
