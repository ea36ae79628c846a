"""`ttt-speech eval length-gen`: perplexity at 0.5x … 10x the training window, one stateful pass per stream.

`length_generalisation(lm, streams, train_window)` scores one model; the `LengthGen` probe runs it
for every model of the plan; `after_training` is the fine-tuning recipe's one entry point. Each
stream is scored once in chunked mode up to the longest evaluation length; the perplexity at length
L is the mean NLL over its first L frames (exactly what evaluating a stream of length L would give:
the model is causal), over the streams that are at least L frames long. Lengths no stream reaches
are skipped entries of the result, which the reports list once.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from ttt_speech.config import resolve_chunk_size
from ttt_speech.handle import TTTModel

from . import metrics, report
from .config import EvalConfig, LengthGenConfig
from .nll import chunked_nll
from .plan import EvalModel, EvalPlan, plan_eval
from .plots import plot_length_gen
from .streams import LoadedData, load_data
from .writers import OutputFiles, ReportResult, write_result

FILES = OutputFiles("length_gen.json", "length_gen.md", {"length_gen": "length_gen.png"})


def length_generalisation(lm, streams: Sequence[Tensor] | Mapping[str, Tensor], train_window: int, *,
                          chunk_size: int | None = None, lengths: LengthGenConfig | None = None,
                          max_frames: int | None = None, window: int | None = None,
                          progress: bool = False, model_name: str | None = None) -> dict:
    """Perplexity of `lm` at the `lengths` grid (num_lengths from min_factor to max_factor × `train_window`;
    default: `LengthGenConfig()`'s).

    streams: codes [K, T] in Moshi's layout (`ttt_speech.data.layout.moshi_streams`), a list or a
    {name: codes} mapping. max_frames caps the evaluated length (default: the longest length).
    window: frames of the "local" NLL before each length (default: half the shortest length).
    model_name: named with the stream in error messages (a NaN names the model and the stream).
    Returns a JSON-ready dict: {"train_window", "chunk_size", "lengths", "streams": [{id, frames}],
    "groups": {group: {"label", "points": [{"length", "factor", "local", "cumulative"} or
    {"length", "factor", "skipped"}], "figures": `metrics.length_figures`}}, "uninformative":
    {group: why} (`metrics.uninformative_groups`), "speed"}.
    """
    if train_window < 1:
        raise ValueError(f"train_window: expected a positive number of frames, got {train_window}")
    items = list(streams.items()) if isinstance(streams, Mapping) else [(f"stream {i}", s) for i, s in enumerate(streams)]
    if not items:
        raise ValueError("length_generalisation: no streams")
    lengths = lengths or LengthGenConfig()
    grid = metrics.evaluation_lengths(train_window, lengths.num_lengths, lengths.min_factor, lengths.max_factor)
    cap = min(max_frames or grid[-1], grid[-1])
    handle = TTTModel.find(lm)
    chunk = resolve_chunk_size(chunk_size, handle.config if handle else None, "chunk_size")
    window = window or max(1, grid[0] // 2)
    prefix = f"{model_name}: " if model_name else ""
    results = [chunked_nll(lm, codes[:, :cap], chunk, where=prefix + name, progress=progress) for name, codes in items]
    return length_document([name for name, _ in items], [metrics.group_series(r) for r in results], grid,
                           train_window, window, chunk, sum(r.seconds for r in results),
                           metrics.uninformative_groups([c for _, c in items], results[0].nll.shape[0]))


def length_document(names: Sequence[str], series: Sequence[dict[str, np.ndarray]], grid: Sequence[int],
                    train_window: int, window: int, chunk: int, seconds: float,
                    uninformative: dict[str, str] | None = None, unit: str = "frames") -> dict:
    """`length_generalisation`'s document from each stream's per-position NLL series ({group: [T]}):
    the perplexity points and figures at the `grid` lengths per group, the streams, the speed. unit:
    what a position is ("frames"; "tokens" for a text LM's streams)."""
    groups = {}
    for group in series[0]:
        points = metrics.length_points([x[group] for x in series], grid, train_window, window)
        groups[group] = {"label": metrics.group_label(group), "points": points,
                         "figures": metrics.length_figures(points)}
    lengths = [len(next(iter(x.values()))) for x in series]
    return {"train_window": train_window, "chunk_size": chunk, "window": window, "lengths": list(grid), "unit": unit,
            "streams": [{"id": name, "frames": n} for name, n in zip(names, lengths)],
            "groups": groups, "uninformative": uninformative or {},
            "speed": {"frames": sum(lengths), "seconds": seconds,
                      "frames_per_s": sum(lengths) / seconds if seconds else None}}


class LengthGen:
    """The probe: `length_generalisation` for every planned model (chunked mode only)."""

    kind = "length-gen"
    files = FILES

    def __init__(self, config: EvalConfig):
        if config.eval.train_window is None:
            raise ValueError("eval.train_window: length generalisation needs the training window (frames)")
        self.config = config

    def plan(self) -> EvalPlan:
        return plan_eval(self.config, modes=("chunked",))

    def load(self, plan: EvalPlan, lm: torch.nn.Module, progress: bool) -> LoadedData:
        return load_data(plan.data, lm, plan.base, progress)

    def run(self, plan: EvalPlan, models: Iterator[EvalModel], data: LoadedData, progress: bool) -> "LengthGenResult":
        settings = self.config.eval
        streams = {s.book.id: s.codes for s in data.streams}
        left_out = {"skipped_files": [s.to_dict() for s in data.skipped_files],
                    "left_out_books": [s.to_dict() for s in data.left_out_books]}
        results = {}
        for model in models:
            with model.scoring():  # an inner-loop variant runs its own inner loop here too
                results[model.name] = {**length_generalisation(
                    model.lm, streams, settings.train_window, chunk_size=model.plan.chunk_size,
                    lengths=settings.length_gen, max_frames=self.config.data.max_frames,
                    window=settings.position_window, progress=progress, model_name=model.name), **left_out}
            del model  # one model at a time (`build_models` drops its own reference too)
        return LengthGenResult(results)


def after_training(lm, streams: Mapping[str, Tensor], train_window: int, lengths: LengthGenConfig,
                   output_dir: Path, wandb_run=None, measure=None) -> tuple[LengthGenResult, dict[str, Path]]:
    """The fine-tuning recipe's length generalisation: the trained `lm` on its held-out streams, written
    into output_dir as `eval length-gen` writes (run "trained"; wandb keys under `length_gen/`).
    measure(lm, streams, train_window, lengths) → the document: `length_generalisation` (Moshi streams)
    by default. Returns the result (its `summary_lines` for the log) and {output kind: path written}."""
    measure = measure or (lambda *args: length_generalisation(*args[:3], lengths=args[3]))
    was_training = lm.training
    lm.eval()
    try:
        with torch.no_grad():
            result = LengthGenResult({"trained": measure(lm, streams, train_window, lengths)})
    finally:
        lm.train(was_training)
    return result, write_result(result, output_dir, FILES, wandb_run=wandb_run)


@dataclass
class LengthGenResult:
    """{run name: `length_generalisation` result}: length_gen.json's document."""

    results: dict[str, dict]
    wandb_prefix: str = field(default="length_gen", init=False)

    @property
    def _first(self) -> dict:
        return next(iter(self.results.values()))

    def _shown(self) -> dict[str, str]:
        """{group: label} of the groups that carry information (`metrics.shown_groups`)."""
        return metrics.shown_groups(self._first["groups"], self._first.get("uninformative", {}))

    def _points(self) -> dict[str, dict[str, list[dict]]]:
        return {n: {g: r["groups"][g]["points"] for g in self._shown()} for n, r in self.results.items()}

    def document(self) -> dict:
        return self.results

    def markdown(self) -> str:
        first = self._first
        longest = max(s["frames"] for r in self.results.values() for s in r["streams"])
        unit = first.get("unit", "frames")
        out = ["# Length generalisation", "",
               f"Perplexity (cumulative NLL, streams averaged) of the first L {unit}, one stateful chunked pass per "
               f"stream; training window {first['train_window']} {unit}. Cells: NLL (perplexity).", ""]
        for group, why in first.get("uninformative", {}).items():
            out += [f"{first['groups'][group]['label']}: left out ({why}).", ""]
        entries = {n: {g: r["groups"][g] for g in self._shown()} for n, r in self.results.items()}
        out += report.length_tables(entries, self._shown(), longest, unit)
        out += [f"- {n}: streams " + ", ".join(f"{s['id']} ({s['frames']:,} {unit})" for s in r["streams"])
                for n, r in self.results.items()]
        return "\n".join(out) + "\n"

    def summary_lines(self) -> list[str]:
        """Per run: the perplexity at the training window (or the nearest reached length) and at the
        longest reached length per shown group, then the length figures (1x / 5x / 10x, ratio, best)."""
        lines = []
        for name, r in self.results.items():
            unit = r.get("unit", "frames")
            some = next(iter(r["groups"].values()))["points"]
            reached = [p for p in some if "skipped" not in p]
            if not reached:
                lines.append(f"{name}: no stream reaches {r['lengths'][0]:,} {unit}")
                continue
            near = min(reached, key=lambda p: abs(math.log(p["factor"])))
            far = reached[-1]
            cells = []
            for group in self._shown():
                points = {p["length"]: p for p in r["groups"][group]["points"]}
                cells.append(f"{group} {points[near['length']]['cumulative']['ppl']:.2f} -> "
                             f"{points[far['length']]['cumulative']['ppl']:.2f}")
            lines.append(f"{name}: perplexity at L = {near['factor']:.2f}x -> {far['factor']:.2f}x the window "
                         f"({near['length']:,} -> {far['length']:,} {unit}): " + ", ".join(cells))
            lines += [f"  {group}: {report.length_figures_line(r['groups'][group]['figures'])}"
                      for group in self._shown()]
            if len(reached) < len(r["lengths"]):
                lines.append(f"  {len(r['lengths']) - len(reached)} longer length(s) left out: no stream reaches them")
        return lines

    def scalars(self) -> dict[str, float]:
        return {k: v for n, r in self.results.items() for g in self._shown()
                for k, v in report.length_scalars(r["groups"][g], f"length_gen/{n}/{g}").items()}

    def tables(self) -> dict[str, tuple[list[str], list[list]]]:
        runs = {n: {"groups": {g: {"length_gen": v} for g, v in r["groups"].items()}} for n, r in self.results.items()}
        return {"length_gen": report.length_gen_table(runs, list(self._first.get("uninformative", {})))}

    def tensors(self) -> None:
        return None

    def figures(self, output_dir: Path, files: dict[str, str]) -> dict[str, Path]:
        shown = self._shown()
        if not shown:
            return {}
        notes = [f"{self._first['groups'][g]['label']} left out: {why}"
                 for g, why in self._first.get("uninformative", {}).items()]
        return {"length_gen": plot_length_gen(self._points(), shown, self._first["train_window"],
                                              output_dir / files["length_gen"], notes=notes,
                                              unit=self._first.get("unit", "frames"))}


STAGES_FILES = OutputFiles("stages.json", "stages.md", {"stages": "stages.png"})


def stages_report(results: Mapping[str, dict], output_dir: Path, wandb_run=None) -> tuple["StagesResult", dict]:
    """The training recipe's view of a staged run: each stage's `length_generalisation` result ({stage:
    result}, in order) beside the others' in output_dir (stages.json / .md / .png): the context extending."""
    result = StagesResult(dict(results))
    return result, write_result(result, output_dir, STAGES_FILES, wandb_run=wandb_run)


@dataclass
class StagesResult(ReportResult):
    """{stage: `length_generalisation` result}: per stage its window and per group the length figures."""

    wandb_prefix: str = field(default="length_gen_stages", init=False)

    def _groups(self) -> dict[str, str]:
        first = next(iter(self.report.values()))
        return metrics.shown_groups(first["groups"], first.get("uninformative", {}))

    def _rows(self, group: str) -> list[list[str]]:
        rows = []
        for stage, r in self.report.items():
            f = r["groups"][group]["figures"]
            rows.append([stage, f"{r['train_window']:,}", *(report.ppl_at(f["ppl_at"][k]) for k in f["ppl_at"]),
                         report.ratio(f["degradation_ratio"]), report.best(f["best"])])
        return rows

    def markdown(self) -> str:
        out = ["# Length generalisation, stage by stage", "",
               "Each stage measured at its end against its own training window (perplexity of the first L "
               "frames: length_gen/<stage>/length_gen.md has every length).", ""]
        for group, label in self._groups().items():
            factors = list(next(iter(self.report.values()))["groups"][group]["figures"]["ppl_at"])
            out += [f"### {label}", ""] + report.table(
                ["stage", "window (frames)", *(f"ppl @{k}" for k in factors), "max / min ppl", "best L"],
                self._rows(group)) + [""]
        return "\n".join(out)

    def summary_lines(self) -> list[str]:
        return [f"{stage} (window {r['train_window']:,}): " + "; ".join(
            f"{g} {report.length_figures_line(r['groups'][g]['figures'])}" for g in self._groups())
            for stage, r in self.report.items()]

    def scalars(self) -> dict[str, float]:
        return {k: v for stage, r in self.report.items() for g in self._groups()
                for k, v in report.length_scalars(r["groups"][g], f"length_gen/{stage}/{g}").items()}

    def figures(self, output_dir: Path, files: dict[str, str]) -> dict[str, Path]:
        """Perplexity against L in frames, one curve per stage, each stage's window dotted in its colour."""
        from matplotlib import ticker

        from ttt_speech.figures import pyplot, run_colours, save_figure

        groups = self._groups()
        if not groups:
            return {}
        plt = pyplot()
        colours = run_colours(list(self.report))
        fig, axes = plt.subplots(1, len(groups), figsize=(4.4 * len(groups) + 0.6, 3.9), squeeze=False,
                                 layout="constrained")
        for ax, (group, label) in zip(axes[0], groups.items()):
            for stage, r in self.report.items():
                ok = [p for p in r["groups"][group]["points"] if "ppl" in p.get("cumulative", {})]
                ax.plot([p["length"] for p in ok], [p["cumulative"]["ppl"] for p in ok], marker="o", ms=3,
                        color=colours[stage], label=stage)
                ax.axvline(r["train_window"], color=colours[stage], ls=":", lw=1)
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda x, _: f"{x:,.0f}"))
            ax.xaxis.set_minor_formatter(ticker.NullFormatter())  # log minor labels would overlap
            ax.set_xlabel("evaluation length L (frames); dotted: each stage's window")
            ax.set_title(label, fontsize=10)
            ax.grid(alpha=0.3, which="both")
        axes[0, 0].set_ylabel("perplexity of the first L frames")
        axes[0, 0].legend(fontsize=8)
        return {"stages": save_figure(fig, output_dir / files["stages"])}

