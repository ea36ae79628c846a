"""The last stage of an evaluation: one writer per output kind (the JSON report, the Markdown report,
the PNG figures, per-position tensors, wandb, the terminal summary), each rendering any probe's
result through the `Result` interface. A new probe brings a result class with these renderers and
its `OutputFiles`; nothing here changes.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from torch import Tensor

from ttt_speech.files import save_tensors_atomic, write_text_atomic

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class OutputFiles:
    """The files a probe writes into its output folder."""

    json: str
    markdown: str
    plots: dict[str, str] = field(default_factory=dict)  # figure name → PNG file name
    tensors: str | None = None  # per-position tensors (safetensors), for probes that keep them

    def names(self) -> list[str]:
        """Every file it may write: what `files.fresh_output_dir` checks before any scoring."""
        return [self.json, self.markdown, *self.plots.values(), *([self.tensors] if self.tensors else [])]


class Result(Protocol):
    """What a probe's result renders itself as, for the writers."""

    wandb_prefix: str  # its wandb keys: "<prefix>/...", figures "<prefix>/plots/<name>"

    def figures(self, output_dir: Path, files: dict[str, str]) -> dict[str, Path]:
        """Draw its figures ({name: file} of `OutputFiles.plots`, those it can draw), record them for
        the reports, return {name: path written}."""

    def document(self) -> dict[str, Any]:
        """The JSON report (JSON values only: a NaN fails the write)."""

    def markdown(self) -> str: ...

    def summary_lines(self) -> list[str]:
        """A few lines for the terminal."""

    def scalars(self) -> dict[str, float]:
        """Flat wandb summary values, keys under `wandb_prefix`; missing values left out."""

    def tables(self) -> dict[str, tuple[list[str], list[list]]]:
        """wandb tables, {name: (columns, rows)}, logged as "<prefix>/tables/<name>"."""

    def tensors(self) -> tuple[dict[str, Tensor], dict[str, str]] | None:
        """Per-position tensors and their metadata, for `OutputFiles.tensors` (None: none)."""


@dataclass
class ReportResult:
    """A result whose JSON document is one dict, `report` (what most probes return), with the
    interface's optional renderers empty: no wandb tables, no per-position tensors."""

    report: dict

    def document(self) -> dict[str, Any]:
        return self.report

    def tables(self) -> dict[str, tuple[list[str], list[list]]]:
        return {}

    def tensors(self) -> tuple[dict[str, Tensor], dict[str, str]] | None:
        return None


def write_json(path: Path, document: dict) -> Path:
    """A JSON report, atomically; NaN/inf anywhere is a bug and raises instead of being written."""
    write_text_atomic(path, json.dumps(document, indent=1, allow_nan=False) + "\n")
    return path


def write_result(result: Result, output_dir: Path, files: OutputFiles, plots: bool = True,
                 wandb_run=None) -> dict[str, Path]:
    """Every output of `result` into output_dir (each file atomic): figures first (the reports link
    them), then the JSON and Markdown reports, the tensors, and wandb. Returns {kind or figure: path}."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    images = result.figures(output_dir, files.plots) if plots else {}
    paths = {"json": write_json(output_dir / files.json, result.document()),
             "markdown": output_dir / files.markdown}
    write_text_atomic(paths["markdown"], result.markdown())
    if files.tensors and (tensors := result.tensors()) is not None:
        paths["per_position"] = output_dir / files.tensors
        save_tensors_atomic(paths["per_position"], *tensors)
    if wandb_run is not None:
        log_wandb(wandb_run, result, images, [paths["json"], paths["markdown"]])
    return {**paths, **images}


def log_wandb(run, result: Result, images: dict[str, Path], files: list[Path]) -> None:
    """The result's summary scalars, figures, tables and report files; a failure is a warning."""
    def log() -> None:
        import wandb

        prefix = result.wandb_prefix
        run.summary.update(result.scalars())
        payload: dict[str, Any] = {f"{prefix}/plots/{name}": wandb.Image(str(path)) for name, path in images.items()}
        payload.update({f"{prefix}/tables/{name}": wandb.Table(columns=columns, data=rows)
                        for name, (columns, rows) in result.tables().items() if rows})
        run.log(payload)
        for path in files:
            run.save(str(path), base_path=str(Path(path).parent), policy="now")

    warn_on_failure(log)


def warn_on_failure(log: Callable[[], None]) -> None:
    """`log()`; a failure is a warning: a tracker must not fail an evaluation whose reports are on disk."""
    try:
        log()
    except Exception as e:  # noqa: BLE001 - see the docstring
        logger.warning("wandb failed to log the results (%s); they are in the output folder",
                       str(e).splitlines()[0] if str(e) else e)
