"""Weights & Biases: one config section and one way to start a run, for every app.

One behaviour for every app: the `WANDB_MODE` environment variable overrides the configured mode
(as wandb's own tools do) and the run config records the mode in effect; every file of the run goes
under `<output_dir>/wandb` (never the current directory); a resumed training run logs into the run
it started (its id is kept in `<output_dir>/wandb/run.json`); a tracker that cannot start is a
warning, never the end of a run whose results are already on disk. wandb is imported only when a
run starts.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .files import write_text_atomic
from .schema import doc

logger = logging.getLogger(__name__)
MODES = ("online", "offline", "disabled")
WANDB_DIR = "wandb"  # under the app's output folder: wandb's own run folders, and RUN_ID
RUN_ID = "run.json"  # {"id": ..., "project": ...}: the run a `--resume` continues


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


WANDB_OFFLINE_HELP = ("log wandb offline under output_dir/wandb (sync later with `wandb sync`): wandb.mode=offline; "
                      "a WANDB_MODE environment variable still wins")


def wandb_offline(flag: bool) -> list[str]:
    """The config override of every app's `--wandb-offline` flag."""
    return ["wandb.mode=offline"] if flag else []


@dataclass
class Tracker:
    """A started wandb run (`run`), and whether this code started it (only then does `finish` end it:
    a run the caller had open, e.g. evaluation from inside a training run, stays open)."""

    run: Any
    owned: bool

    def finish(self) -> None:
        if self.owned:
            self.run.finish()


def start_wandb(settings: WandbConfig, run_config: dict[str, Any], output_dir: Path, job_type: str,
                resume: bool = False) -> Tracker | None:
    """A wandb run logging into `<output_dir>/wandb`: the caller's active run when there is one, else a
    new one (with `resume`, the run this folder started, when it recorded one); None when disabled or
    when wandb cannot start (warned)."""
    mode = settings.resolved_mode()
    if mode == "disabled":
        return None
    try:
        import wandb

        if wandb.run is not None:
            return Tracker(wandb.run, owned=False)
        folder = Path(output_dir) / WANDB_DIR
        folder.mkdir(parents=True, exist_ok=True)
        previous = _recorded_run(folder, settings.project) if resume else None
        if isinstance(run_config.get("wandb"), dict):  # what was in effect, not what the file said
            run_config = {**run_config, "wandb": {**run_config["wandb"], "mode": mode}}
        run = wandb.init(project=settings.project, entity=settings.entity, name=settings.run_name or Path(output_dir).name,
                         mode=mode, job_type=job_type, dir=str(output_dir),  # wandb adds the wandb/ folder
                         config=run_config, reinit="finish_previous", id=previous,
                         resume="allow" if previous else None)
        write_text_atomic(folder / RUN_ID, json.dumps({"id": run.id, "project": settings.project}) + "\n")
        return Tracker(run, owned=True)
    except Exception as e:  # noqa: BLE001 - a tracker failure must not lose a finished run's results
        logger.warning("wandb unavailable (%s); continuing without it", str(e).splitlines()[0] if str(e) else e)
        return None


def _recorded_run(folder: Path, project: str) -> str | None:
    """The run id a previous start recorded in `folder` for `project` (None: none, another project, or
    unreadable: a new run)."""
    try:
        recorded = json.loads((folder / RUN_ID).read_text())
        return recorded["id"] if recorded.get("project") == project else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
