"""Weights & Biases, an optional mirror of the run log (rl/runlog.py); `pip install '.[wandb]'`.

`logging.wandb: {project, entity, mode}` in the run config starts one W&B run when the training run
starts (a resumed run starts a new one): the resolved config, with the run's provenance under the
key `provenance`; every metrics row TensorBoard gets, at its step; the reward curve image. Its
files go under the run directory (RUN_DIR/wandb/): mode `offline` writes them with no network,
and `wandb sync RUN_DIR/wandb/offline-run-*` uploads them later.

wandb's service process (wandb-core) talks to the driver over a Unix socket and listens on no
network address; console capture is off (Ray forwards the actors' output through stdout).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

INSTALL_HINT = "pip install '.[wandb]' (or pip install wandb)"


@dataclass
class WandbConfig:
    project: str = "cwm-rl"
    entity: str | None = None  # user or team (None: the logged-in user's default entity)
    mode: str = "online"  # online | offline (no network; `wandb sync` later) | disabled


def installed() -> bool:
    """Whether the wandb package can be imported (checked when the config is loaded)."""
    return importlib.util.find_spec("wandb") is not None


class WandbLog:
    """One W&B run mirroring a training run's log; `close` ends it and wandb's service."""

    def __init__(
        self,
        cfg: WandbConfig,
        run_dir: Path,
        config: dict[str, Any],
        provenance: dict[str, Any],
    ):
        try:
            import wandb
        except ImportError:
            raise RuntimeError(
                f"logging.wandb is set but the wandb package is not installed: {INSTALL_HINT}"
            ) from None
        self._wandb = wandb
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)  # wandb falls back to /tmp without it
        # wandb-core writes its debug logs to WANDB_CACHE_DIR (default ~/.cache/wandb): into the
        # run dir unless the user chose a place. Read when the service starts, in init
        cache = str(run_dir / "wandb" / "cache")
        preset = os.environ.get("WANDB_CACHE_DIR")
        os.environ.setdefault("WANDB_CACHE_DIR", cache)
        try:
            self.run = wandb.init(
                project=cfg.project,
                entity=cfg.entity,
                mode=cfg.mode,
                dir=str(run_dir),
                name=run_dir.name,
                config={**config, "provenance": provenance},
                settings=wandb.Settings(console="off", silent=True),
                reinit="create_new",
            )
        finally:
            if preset is None:
                os.environ.pop("WANDB_CACHE_DIR", None)

    def metrics(self, step: int, scalars: dict[str, float]) -> None:
        """The row's finite numbers (those TensorBoard gets) at `step`; rows of one step merge."""
        if scalars:
            self.run.log(scalars, step=step)

    def image(self, step: int, key: str, path: Path) -> None:
        self.run.log({key: self._wandb.Image(str(path))}, step=step)

    def close(self, failed: bool = False) -> None:
        """Finish the run (marked failed when the training run raised) and stop wandb's service,
        so no wandb process outlives the run."""
        self.run.finish(exit_code=1 if failed else 0)
        self._wandb.teardown()
