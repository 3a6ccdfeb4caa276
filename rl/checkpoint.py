"""Sharded, resumable checkpoints with torch.distributed.checkpoint (DCP), and HF export.

Layout of one checkpoint directory (written atomically: into `NAME.tmp`, then renamed):
    dcp/              model and optimizer shards (DCP), loadable at another world size
    rank{r}_rng.pt    RNG states of each rank (python, numpy, torch CPU, CUDA)
    trainer.json      step, LR-scheduler state, and any extra state the caller passes (data
                      cursor, buffer, tasks in flight)
A `latest` file beside the checkpoints names the newest complete one."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(
    root: str | os.PathLike,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    step: int,
    extra: dict | None = None,
    name: int | None = None,
) -> Path:
    """Save checkpoint `root/step_{name:08d}` (name: `step` unless given) from every rank;
    returns its path. `step` (the optimizer's) is what `load` restores."""
    root = Path(root)
    final = root / f"step_{step if name is None else name:08d}"
    tmp = root / f"{final.name}.tmp"
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / "dcp"))
    torch.save(rng_state(), tmp / f"rank{_rank()}_rng.pt")
    _barrier()
    if _rank() == 0:
        commit(
            tmp, final, {"step": step, "scheduler": scheduler.state_dict(), "extra": extra or {}}
        )
    _barrier()
    return final


def commit(tmp: Path, final: Path, meta: dict) -> None:
    """Rank 0, after every rank wrote its part into `tmp`: trainer.json (whose presence marks a
    complete checkpoint), then the atomic rename to `final`, then the `latest` pointer (itself
    written and renamed). A crash at any point leaves the previous checkpoint as `latest`."""
    (tmp / "trainer.json").write_text(json.dumps(meta))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    root = final.parent
    (root / "latest.tmp").write_text(final.name)
    (root / "latest.tmp").rename(root / "latest")


def latest(root: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under `root`, or None."""
    pointer = Path(root) / "latest"
    if not pointer.exists():
        return None
    path = Path(root) / pointer.read_text().strip()
    return path if (path / "trainer.json").exists() else None


def load(
    path: str | os.PathLike,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
) -> tuple[int, dict]:
    """Restore model, optimizer, scheduler and this rank's RNG; returns (step, extra)."""
    path = Path(path)
    if not (path / "trainer.json").exists():
        raise FileNotFoundError(f"{path}: not a complete checkpoint (no trainer.json)")
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(path / "dcp"))
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
    )
    meta = json.loads((path / "trainer.json").read_text())
    scheduler.load_state_dict(meta["scheduler"])
    rng_file = path / f"rank{_rank()}_rng.pt"
    if rng_file.exists():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return meta["step"], meta["extra"]


def full_model_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded state dict on CPU: every rank takes part, rank 0 receives it (others get {})."""
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=opts)
