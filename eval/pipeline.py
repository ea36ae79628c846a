"""The lifecycle of every evaluation: plan → build → load streams → run the probe → report → write.

A *probe* (`eval librilight`'s NLL curves, `length-gen`, `memory`, `zero-shot`; docs/architecture.md §12) says
what it plans, how it loads its streams and how it scores and summarises them into a `Result`;
`evaluate` runs the stages in that order, so that everything that can be refused is refused before
any model is loaded, and the output folder is claimed before hours of scoring.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Protocol

import torch

from ttt_speech import schema
from ttt_speech.files import fresh_output_dir
from ttt_speech.tracking import start_wandb

from .plan import EvalModel, EvalPlan, build_models, check_streams
from .writers import OutputFiles, Result, write_result


class Probe(Protocol):
    """One kind of evaluation, driven by `evaluate`."""

    kind: str  # the report's kind, and the wandb job "eval-<kind>"
    files: OutputFiles
    config: Any  # its config dataclass: output_dir and wandb are read from it

    def plan(self) -> EvalPlan:
        """What is scored; refuses what cannot be (reads export metadata, loads no weights)."""

    def load(self, plan: EvalPlan, lm: torch.nn.Module, progress: bool) -> Any:
        """Its streams, laid out for `lm` (the plan's first model)."""

    def run(self, plan: EvalPlan, models: Iterator[EvalModel], data: Any, progress: bool) -> Result:
        """Score `data` with each model (built as the iterator advances) and summarise."""


def evaluate(probe: Probe, progress: bool = True, plots: bool = True,
             overwrite: bool = False) -> tuple[Result, dict[str, Path]]:
    """Run `probe` through the lifecycle; returns (its result, {output kind or figure: path written}).
    `overwrite`: write into a training run's folder, or over this command's earlier outputs (refused
    otherwise: `fresh_output_dir`)."""
    plan = probe.plan()
    output_dir = Path(probe.config.output_dir)
    fresh_output_dir(output_dir, probe.files.names(), overwrite)
    check_streams(plan)
    models = build_models(plan)
    first = [next(models)]
    data = probe.load(plan, first[0].lm, progress)  # the streams are laid out for the first model
    result = probe.run(plan, _prepend(first, models), data, progress)
    tracker = start_wandb(probe.config.wandb, schema.to_dict(probe.config), output_dir, f"eval-{probe.kind}")
    try:
        return result, write_result(result, output_dir, probe.files, plots, tracker.run if tracker else None)
    finally:
        if tracker is not None:
            tracker.finish()


def _prepend(first: list[EvalModel], rest: Iterator[EvalModel]) -> Iterator[EvalModel]:
    """first's one model, then the rest, holding no reference to a model once it is handed out (a
    probe that drops each model before asking for the next holds one in memory; itertools.chain
    would keep the first alive to the end)."""
    yield first.pop()
    yield from rest
