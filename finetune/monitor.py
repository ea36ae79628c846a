"""What training reports: tqdm line, wandb, metrics JSONL and a per-layer TTT-statistics CSV."""
from __future__ import annotations

import csv
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ttt_speech.moshi.e2e import MoshiE2E
from ttt_speech.moshi.streaming import MoshiTTT
from ttt_speech.ops.inner_lr import token_lr

logger = logging.getLogger(__name__)


class InnerLrProbe:
    """Mean inner learning rate η of each TTT module over the last forward (when `armed`)."""

    def __init__(self, lm: nn.Module) -> None:
        self.armed = False
        self.values: dict[str, float] = {}
        self._handles = [m.register_forward_pre_hook(self._hook(name))
                         for name, m in lm.named_modules() if isinstance(m, MoshiTTT)]

    def _hook(self, name: str):
        def hook(module: MoshiTTT, args: tuple) -> None:
            if not self.armed:
                return
            layer = module.layer
            if isinstance(module, MoshiE2E):  # one learned scalar η per layer
                self.values[name] = layer.inner_lr().item()
                return
            with torch.no_grad():
                x = args[0].float()
                lr = token_lr(x, layer.lr_gate_weight.float(), layer.lr_gate_bias.float(), layer.config.base_lr,
                              layer.head_dim)
                self.values[name] = lr.mean().item()
        return hook


class Monitor:
    """Rank-0 sink of metrics: wandb (optional), `metrics.jsonl`, `ttt_stats.csv`."""

    CSV_FIELDS = ("step", "layer", "w_norm", "w_delta", "eta_mean")

    def __init__(self, output_dir: Path, wandb_config, run_config: dict[str, Any], enabled: bool) -> None:
        self.enabled = enabled
        self.dir = output_dir
        self.wandb = None
        if not enabled:
            return
        mode = os.environ.get("WANDB_MODE") or wandb_config.mode
        if mode != "disabled":
            try:
                import wandb

                self.wandb = wandb.init(project=wandb_config.project, entity=wandb_config.entity,
                                        name=wandb_config.run_name or output_dir.name, mode=mode,
                                        dir=str(output_dir), config=run_config)
            except Exception as e:  # noqa: BLE001 - a tracker failure must not stop training
                logger.warning("wandb unavailable (%s); continuing without it", str(e).splitlines()[0])

    def log(self, step: int, metrics: dict[str, float], layer_stats: dict[str, dict[str, float]] | None = None) -> None:
        if not self.enabled:
            return
        with open(self.dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        flat = dict(metrics)
        if layer_stats:
            new = not (self.dir / "ttt_stats.csv").exists()
            with open(self.dir / "ttt_stats.csv", "a", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=self.CSV_FIELDS)
                if new:
                    writer.writeheader()
                for layer, stats in layer_stats.items():
                    writer.writerow({"step": step, "layer": layer, **{k: f"{v:.6g}" for k, v in stats.items()}})
                    flat.update({f"ttt/{layer}/{k}": v for k, v in stats.items()})
        if self.wandb is not None:
            self.wandb.log(flat, step=step)

    def finish(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
