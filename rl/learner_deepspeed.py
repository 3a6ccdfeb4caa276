"""The GRPO learner on DeepSpeed ZeRO-3 (`learner.backend: deepspeed`), the second backend beside
FSDP2 (rl/learner.py): the same CWM module, packing, loss, metrics and HF export; only sharding,
the optimizer step and checkpoints go through DeepSpeed.

Gradient accumulation. A step runs a varying number of micro-batches, so DeepSpeed's own counting
is switched off (`managed_gradient_accumulation: false`: every `engine.step()` is a boundary) and
`backward(..., scale_wrt_gas=False)`: the loss is already divided by a whole-batch constant, and
DeepSpeed must not divide it again. ZeRO averages gradients over ranks; `Learner.train_step`
multiplies the loss by the world size to undo that, as for FSDP.

deepspeed is an optional dependency (the `deepspeed` extra; `DS_BUILD_OPS=0` installs it without
compiling kernels), imported only when a DeepSpeedLearner is built. The optimizer is torch's AdamW,
handed to DeepSpeed as a client optimizer, so both backends run the same update."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from model.hf import to_hf_state_dict
from model.loader import ModelSpec, build_model
from rl import checkpoint as ckpt
from rl import net
from rl.learner import Learner, LearnerConfig, _free_tcp_address, lr_lambda, rendezvous
from rl.parallelize import apply_activation_checkpointing


def deepspeed_config(config: LearnerConfig, bf16: bool) -> dict:
    """The DeepSpeed config of a learner: ZeRO-3, one micro-batch per engine.backward, steps and
    accumulation owned by the caller, clipping at optim.grad_clip, fp32 gradient reduction."""
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "managed_gradient_accumulation": False,
        "gradient_clipping": config.optim.grad_clip,
        "zero_optimization": {"stage": 3, "overlap_comm": False},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": bf16},
        "communication_data_type": "fp32",
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def _import_deepspeed():
    try:
        import deepspeed
    except ImportError as e:
        raise ImportError(
            "learner.backend=deepspeed needs the optional deepspeed package: "
            "DS_BUILD_OPS=0 pip install 'cwm-rl[deepspeed]'"
        ) from e
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce (1-2 min, needs a C++
    # compiler) used only by its inference all-reduce, which falls back to torch.distributed.
    # The op table is probed once per process and DeepSpeed keeps edits to it.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


class DeepSpeedLearner(Learner):
    """One rank of the learner on a DeepSpeed ZeRO-3 engine; the step itself is Learner's."""

    def __init__(
        self,
        config: LearnerConfig,
        model: ModelSpec,
        rank: int = 0,
        world_size: int = 1,
        init_method: str | None = None,
        num_threads: int | None = None,
    ):
        if config.backend != "deepspeed":
            raise ValueError(
                f"DeepSpeedLearner needs learner.backend=deepspeed, got {config.backend!r}"
            )
        if config.context_parallel_size > 1:
            raise ValueError("learner.context_parallel_size > 1 needs learner.backend=fsdp2")
        deepspeed = _import_deepspeed()
        self.config, self.model_spec = config, model
        self.rank, self.world_size = rank, world_size
        if num_threads:
            torch.set_num_threads(num_threads)
        cuda = torch.cuda.is_available()
        if cuda:
            local_rank = int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count()))
            torch.cuda.set_device(local_rank)
        else:
            local_rank = 0
        os.environ.setdefault("LOCAL_RANK", str(local_rank))  # DeepSpeed's engine reads it
        if not dist.is_initialized():  # ZeRO needs a process group, even of one
            # our rendezvous first (its store listens only on the address asked for); DeepSpeed
            # then adopts the initialised group
            init_method = rendezvous(init_method, rank) or (
                "env://" if world_size > 1 else _free_tcp_address()
            )
            net.init_process_group("nccl" if cuda else "gloo", init_method, rank, world_size)
            deepspeed.init_distributed(
                "nccl" if cuda else "gloo",
                auto_mpi_discovery=False,
                init_method=init_method,
                rank=rank,
                world_size=world_size,
            )
        self.device = torch.device("cuda" if cuda else "cpu")
        module = build_model(model, device=self.device)
        self.model_config = module.config
        if config.activation_checkpointing:
            apply_activation_checkpointing(module)
        bf16 = config.param_dtype == "bfloat16" or (config.param_dtype == "auto" and cuda)
        o = config.optim
        client_optimizer = torch.optim.AdamW(
            module.parameters(), lr=o.lr, betas=tuple(o.betas), eps=o.eps,
            weight_decay=o.weight_decay, foreach=False,
        )  # fmt: skip
        # our own schedule, stepped by Learner.train_step; DeepSpeed is not told about it
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(client_optimizer, lr_lambda(o))
        self.model, self.optimizer, _, _ = deepspeed.initialize(
            model=module,
            optimizer=client_optimizer,
            config=deepspeed_config(config, bf16),
            dist_init_required=False,
        )
        self.ref_model = None
        if config.loss.kl_estimator != "off":  # a frozen copy of the initial policy, unsharded
            ref = build_model(model, device=self.device).eval().requires_grad_(False)
            self.ref_model = ref.to(torch.bfloat16) if bf16 else ref
        self.step = 0

    # -- the step's backend hooks ----------------------------------------------------------------

    def _backward(self, loss: torch.Tensor) -> None:
        # the loss carries the whole batch's normaliser: no division by accumulation steps
        self.model.backward(loss, scale_wrt_gas=False)

    def _optimizer_step(self) -> torch.Tensor:
        self.model.step()  # clips at optim.grad_clip, steps AdamW, zeroes the gradients
        return torch.as_tensor(float(self.model.get_global_grad_norm()))

    # -- weights out -----------------------------------------------------------------------------

    streams_weights = False  # ZeRO-3 gathers the whole model (hf_state_dict)

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """Full, HF-named fp32 CPU weights gathered from the ZeRO-3 master copy (rank 0; other
        ranks get {}). Every rank must call it: each parameter is one all-gather."""
        from deepspeed.utils import safe_get_full_fp32_param

        sd = {}
        for name, param in self.model.module.named_parameters(remove_duplicate=False):
            full = safe_get_full_fp32_param(param)
            if self.rank == 0:
                sd[name.replace("_checkpoint_wrapped_module.", "")] = (
                    full.detach().to("cpu", torch.float32).clone()
                )
        return to_hf_state_dict(sd, self.model_config) if sd else {}

    def shutdown(self) -> None:
        """Leave the process group through DeepSpeed, which also drops its cached groups (so a
        later learner in this process starts afresh)."""
        if dist.is_initialized():
            import deepspeed.comm

            deepspeed.comm.destroy_process_group()

    # -- checkpoints: DeepSpeed's own files, in rl/checkpoint.py's layout --------------------------

    def save(self, root: str, extra: dict | None = None) -> str:
        """Save `root/step_{step:08d}` from every rank (ZeRO shards + trainer.json + RNG states),
        written into NAME.tmp and renamed, with `latest` naming it (rl.checkpoint.latest reads it).
        Loadable at the same world size only (DeepSpeed's ZeRO-3 shard layout)."""
        root = Path(root)
        final = root / f"step_{(extra or {}).get('step', self.step):08d}"  # the run's step
        tmp = root / f"{final.name}.tmp"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            root.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        self.model.save_checkpoint(str(root), tag=tmp.name, save_latest=False)
        torch.save(ckpt.rng_state(), tmp / f"rank{self.rank}_rng.pt")
        dist.barrier()
        if self.rank == 0:
            meta = {
                "step": self.step,
                "scheduler": self.scheduler.state_dict(),
                "extra": extra or {},
                "backend": "deepspeed",
                "world_size": self.world_size,
            }
            ckpt.commit(tmp, final, meta)
        dist.barrier()
        return str(final)

    def load(self, path: str) -> dict:
        """Restore weights, optimizer, LR schedule, step and this rank's RNG; returns `extra`."""
        path = Path(path)
        meta_file = path / "trainer.json"
        if not meta_file.exists():
            raise FileNotFoundError(f"{path}: not a complete checkpoint (no trainer.json)")
        meta = json.loads(meta_file.read_text())
        if meta.get("backend") != "deepspeed" or meta.get("world_size") != self.world_size:
            raise ValueError(
                f"{path}: written by backend {meta.get('backend', 'fsdp2')!r} at world size "
                f"{meta.get('world_size')}; this DeepSpeed learner has world size {self.world_size}"
            )
        self.model.load_checkpoint(
            str(path.parent), tag=path.name, load_optimizer_states=True,
            load_lr_scheduler_states=False,
        )  # fmt: skip
        self.scheduler.load_state_dict(meta["scheduler"])
        for group, lr in zip(self.scheduler.optimizer.param_groups, self.scheduler.get_last_lr()):
            group["lr"] = lr
        rng_file = path / f"rank{self.rank}_rng.pt"
        if rng_file.exists():
            ckpt.set_rng_state(torch.load(rng_file, weights_only=False))
        self.step = meta["step"]
        return meta["extra"]
