"""What training reports: tqdm line, wandb, metrics JSONL and a per-layer TTT-statistics CSV."""
from __future__ import annotations

import csv
import io
import json
import logging
import re
from pathlib import Path
from typing import Any, Callable

from torch import nn

from ttt_speech.handle import TTTModel
from ttt_speech.stats import FastWeightStats
from ttt_speech.files import write_text_atomic
from ttt_speech.tracking import WandbConfig, start_wandb

logger = logging.getLogger("finetune")
METRICS = "metrics.jsonl"  # one JSON object per log step
TTT_STATS = "ttt_stats.csv"  # one row per log step and TTT layer, `step` first
MEMORY = "memory.json"  # bytes per rank after the first step (train.py)
STEP = "train/step"  # the x axis of every wandb series of training


class InnerLrProbe:
    """Mean inner learning rate η of each TTT layer over the last forward (when `armed`), {layer index: η}
    (the cores' `mean_inner_lr`: per-token λ for TTT layers, the learned scalar for E2E layers)."""

    def __init__(self, lm: nn.Module) -> None:
        self.armed = False
        self.values: dict[int, float] = {}
        self._handles = [site.ttt.register_forward_pre_hook(self._hook(site.layer_index))
                         for site in TTTModel.of(lm).sites]

    def _hook(self, layer_index: int):
        def hook(module: nn.Module, args: tuple) -> None:
            if self.armed:
                self.values[layer_index] = module.layer.mean_inner_lr(args[0].detach())
        return hook


class Monitor:
    """Rank-0 sink of metrics: wandb (optional), `metrics.jsonl`, `ttt_stats.csv`."""

    CSV_FIELDS = ("step", "layer", "w_norm", "w_delta", "eta_mean")

    def __init__(self, output_dir: Path, wandb_config: WandbConfig, run_config: dict[str, Any], enabled: bool,
                 resume: bool = False) -> None:
        self.enabled = enabled
        self.dir = output_dir
        self.tracker = start_wandb(wandb_config, run_config, output_dir, "train", resume) if enabled else None
        self._to_wandb("define the step metric", _define_step)

    @property
    def wandb(self):
        """The wandb run, or None (disabled, or not rank 0)."""
        return self.tracker.run if self.tracker is not None else None

    def log(self, step: int, metrics: dict[str, float], layer_stats: dict[int, FastWeightStats] | None = None,
            stage: tuple[int, str] | None = None) -> None:
        """One log step; `stage` (index, name) of a staged run: metrics.jsonl's `stage` (name), wandb's
        `train/stage` (index, a number wandb can plot)."""
        if not self.enabled:
            return
        with open(self.dir / METRICS, "a") as f:
            f.write(json.dumps({"step": step, **({"stage": stage[1]} if stage else {}), **metrics}) + "\n")
        flat = {STEP: step, **{wandb_key(k): v for k, v in metrics.items()}}
        if stage is not None:
            flat["train/stage"] = stage[0]
        if layer_stats:
            new = not (self.dir / TTT_STATS).exists()
            with open(self.dir / TTT_STATS, "a", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=self.CSV_FIELDS)
                if new:
                    writer.writeheader()
                for layer, stats in layer_stats.items():
                    values = stats.to_dict()
                    writer.writerow({"step": step, "layer": layer, **{k: f"{v:.6g}" for k, v in values.items()}})
                    flat.update({f"ttt/layer{layer}/{k}": v for k, v in values.items()})
        self._to_wandb("log", lambda run: run.log(flat))

    def log_export(self, export: Path, metadata: dict[str, Any]) -> None:
        """The export folder as a wandb model artifact (offline runs keep it for `wandb sync`)."""
        def log(run) -> None:
            import wandb

            # artifact names allow letters, digits, "-", "_" and "." only; run names may hold anything
            name = re.sub(r"[^\w.-]+", "-", f"{run.name or self.dir.name}-export")
            artifact = wandb.Artifact(name, type="model", metadata=metadata)
            artifact.add_dir(str(export))
            run.log_artifact(artifact)

        self._to_wandb("log the export", log)

    def _to_wandb(self, what: str, call: Callable[[Any], None]) -> None:
        """`call(run)` when wandb is on; a failure turns wandb off with a warning (metrics.jsonl and the
        run go on: a tracker never ends a training run)."""
        if self.wandb is None:
            return
        try:
            call(self.wandb)
        except Exception as e:  # noqa: BLE001 - see the docstring
            logger.warning("wandb failed to %s (%s); continuing without it", what,
                           str(e).splitlines()[0] if str(e) else e)
            self.tracker = None

    def finish(self) -> None:
        if self.tracker is not None:
            self.tracker.finish()


def _define_step(run) -> None:
    """Every training series against STEP, a logged value rather than wandb's own `step=`, which must
    only grow: a resumed run re-does the steps past its checkpoint, which wandb would drop."""
    run.define_metric(STEP)
    for prefix in ("train", "eval", "ttt"):
        run.define_metric(f"{prefix}/*", step_metric=STEP)


def wandb_key(name: str) -> str:
    """metrics.jsonl's names as wandb keys: `eval_loss` → `eval/loss`, `loss` → `train/loss`."""
    return f"eval/{name.removeprefix('eval_')}" if name.startswith("eval_") else f"train/{name}"


def truncate_step_logs(output_dir: Path, step: int) -> None:
    """Drop the rows of `metrics.jsonl` and `ttt_stats.csv` past `step`, which a resume does again,
    and any row a killed run left half-written (a partial last line)."""
    for name, step_of in ((METRICS, _jsonl_step), (TTT_STATS, _csv_step)):
        path = output_dir / name
        if not path.is_file():
            continue
        lines = path.read_text().splitlines()
        header = lines[:1] if name == TTT_STATS else []
        kept = header + [line for line in lines[len(header):] if (s := step_of(line)) is not None and s <= step]
        if len(kept) != len(lines):
            write_text_atomic(path, "".join(line + "\n" for line in kept))
            logger.info("%s: dropped %d row(s) past the resumed step %d", path, len(lines) - len(kept), step)


def _jsonl_step(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):  # a partial or foreign line
        return None


def _csv_step(line: str) -> int | None:
    try:
        return int(next(csv.reader(io.StringIO(line)))[0])
    except (ValueError, IndexError, StopIteration):
        return None
