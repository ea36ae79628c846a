"""Weights & Biases: one config section and one way to start a run, for every app.

The `WANDB_MODE` environment variable overrides the configured mode (as wandb's own tools do);
the run's files go under the app's output folder; a tracker that cannot start is a warning, never
the end of a run whose results are already on disk. wandb is imported only when a run starts.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .schema import doc

logger = logging.getLogger(__name__)
MODES = ("online", "offline", "disabled")


@dataclass
class WandbConfig:
    """Optional Weights & Biases logging."""

    mode: Literal["online", "offline", "disabled"] = doc(
        "disabled", "online, offline (sync later with `wandb sync`) or disabled; the WANDB_MODE environment "
                    "variable overrides it")
    project: str = doc("ttt-speech", "wandb project")
    entity: str | None = doc(None, "wandb entity (team); null: your default")
    run_name: str | None = doc(None, "wandb run name; null: the output folder's name")

    def resolved_mode(self) -> str:
        """The mode in effect: WANDB_MODE when set (and valid), else `mode`."""
        env = os.environ.get("WANDB_MODE")
        return env if env in MODES else self.mode


@dataclass
class Tracker:
    """A started wandb run (`run`), and whether this code started it (only then does `finish` end it:
    a run the caller had open, e.g. evaluation from inside a training run, stays open)."""

    run: Any
    owned: bool

    def finish(self) -> None:
        if self.owned:
            self.run.finish()


def start_wandb(settings: WandbConfig, run_config: dict[str, Any], output_dir: Path, job_type: str) -> Tracker | None:
    """A wandb run logging into `output_dir`: the caller's active run when there is one, else a new
    one; None when disabled or when wandb cannot start (warned)."""
    mode = settings.resolved_mode()
    if mode == "disabled":
        return None
    try:
        import wandb

        if wandb.run is not None:
            return Tracker(wandb.run, owned=False)
        output_dir.mkdir(parents=True, exist_ok=True)
        run = wandb.init(project=settings.project, entity=settings.entity, name=settings.run_name or output_dir.name,
                         mode=mode, job_type=job_type, dir=str(output_dir), config=run_config,
                         reinit="finish_previous")
        return Tracker(run, owned=True)
    except Exception as e:  # noqa: BLE001 - a tracker failure must not lose a finished run's results
        logger.warning("wandb unavailable (%s); continuing without it", str(e).splitlines()[0] if str(e) else e)
        return None
