"""`ttt-speech eval librilight`: teacher-forced NLL of long streams against position, per model and
mode (chunked / native), with comparisons between modes, against the baseline and across the
inner-loop grid. The probe scores the streams and summarises them into report.json's document
(`run_summary`, `mode_comparison`, `baseline_difference`, `librilight_report`); report.py renders
that document (Markdown, terminal, wandb); plots.py draws its figures.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch

from ttt_speech import schema
from ttt_speech.data import FRAME_RATE
from ttt_speech.stats import runaway_warning

from . import metrics, report
from .alignment import chunk_alignment
from .books import Stream
from .config import EvalConfig, EvalSettings
from .nll import MODES, StreamNLL
from .plan import EvalModel, EvalPlan, PlannedModel, plan_eval
from .plots import plot_curves, plot_fast_weights, plot_inner_loop, plot_length_gen
from .streams import LoadedData, load_data
from .writers import OutputFiles, ReportResult

logger = logging.getLogger(__name__)

FILES = OutputFiles("report.json", "report.md", {"nll_curves": "nll_curves.png", "ppl_vs_length": "ppl_vs_length.png",
                                                 "fast_weights": "fast_weights.png", "inner_loop": "inner_loop.png"},
                    tensors="per_position.safetensors")


class LibriLight:
    """The probe: every stream scored by every planned model in each of its modes."""

    kind = "librilight"
    files = FILES

    def __init__(self, config: EvalConfig):
        self.config = config

    def plan(self) -> EvalPlan:
        return plan_eval(self.config)

    def load(self, plan: EvalPlan, lm: torch.nn.Module, progress: bool) -> LoadedData:
        return load_data(plan.data, lm, plan.base, progress)

    def run(self, plan: EvalPlan, models: Iterator[EvalModel], data: LoadedData, progress: bool) -> "LibriLightResult":
        settings = self.config.eval
        results: dict[str, list[StreamNLL]] = {}
        described = {}
        for model in models:
            described[model.name] = model.describe()
            for mode in model.plan.modes:
                with model.scoring():
                    results[f"{model.name}/{mode}"] = score(model, mode, data.streams, settings, progress)
            del model  # one model at a time (`build_models` drops its own reference too)
        body = librilight_report(self.config, described, data, results, alignment(plan.models, data.streams),
                                 plan.base.torch_device())
        if settings.inner_loop:
            body["comparisons"]["inner_loop"] = inner_loop_grid(plan.models, body, max(s.frames for s in data.streams))
        return LibriLightResult(body, results, [s.book.id for s in data.streams])


def score(model: EvalModel, mode: str, streams: list[Stream], settings: EvalSettings,
          progress: bool) -> list[StreamNLL]:
    """Every stream scored by `model` in `mode` (inside `model.scoring()`)."""
    chunk = model.plan.chunk_size
    scored = streams[:settings.native_max_streams] if mode == "native" else streams
    kwargs = {"chunk_size": chunk} if mode == "chunked" else {}
    # an untimed warm-up on a few frames: one-time costs (allocator, kernels, thread pools)
    # would otherwise be charged to the first stream's time and peak memory
    MODES[mode](model.lm, scored[0].codes[:, :2 * chunk if mode == "chunked" else 4],
                where=f"{model.name}: {scored[0].book.id} (warm-up)", **kwargs)
    results = []
    for stream in scored:
        codes = stream.codes
        if mode == "native" and settings.native_max_frames is not None:
            codes = codes[:, :settings.native_max_frames]
        results.append(MODES[mode](model.lm, codes, where=f"{model.name}: {stream.book.id}",
                                   progress=progress, trace_every=chunk, **kwargs))
    for stream, result in zip(scored, results):  # one warning per model and mode
        grown = result.weights.runaway() if result.weights is not None else {}
        if grown:
            logger.warning(runaway_warning(grown, f"{model.name}/{mode} on {stream.book.id}", model.plan.ttt.base_lr))
            break
    return results


def alignment(models: list[PlannedModel], streams: list[Stream]) -> dict[str, dict]:
    """Per model with TTT layers: how its chunks fall on its mini-batches on the longest stream."""
    out = {}
    frames = max(s.frames for s in streams)
    for planned in models:
        if planned.ttt is None:
            continue
        b = planned.ttt.mini_batch_size
        out[planned.label] = {**chunk_alignment(frames, planned.chunk_size, b),
                              "native_efficiency": chunk_alignment(frames, 1, b)["efficiency"], "frames": frames}
    return out


def inner_loop_grid(models: list[PlannedModel], body: dict, frames: int) -> dict[str, dict]:
    """The inner-loop comparison (`eval.inner_loop`): per run of "ttt" and of its variants, the
    inner loop it ran (b, base_lr, chunk, slot efficiency on the longest stream), its speed and
    peak memory, its final ‖W − W_0‖ (mean over layers, on the longest traced stream) and, per shown
    group, the cumulative NLL at each position and the slope."""
    out = {}
    shown = report.shown_groups(body)
    for planned in models:
        if planned.name != "ttt" or planned.ttt is None:
            continue
        variant = schema.to_dict(planned.inner_loop) if planned.inner_loop else {}
        for mode in planned.modes:
            run = body["runs"][f"{planned.label}/{mode}"]
            chunk = planned.chunk_size if mode == "chunked" else 1
            traces = [t for t in run["fast_weights"] or [] if t["positions"]]
            longest = max(traces, key=lambda t: t["positions"][-1]) if traces else None
            out[f"{planned.label}/{mode}"] = {
                "model": planned.label, "mode": mode, "mini_batch_size": planned.ttt.mini_batch_size,
                "base_lr": planned.ttt.base_lr, "scale": variant.get("scale"), "offsets": variant.get("offsets"),
                "chunk_size": chunk,
                "slot_efficiency": chunk_alignment(frames, chunk, planned.ttt.mini_batch_size)["efficiency"],
                "frames_per_s": run["speed"]["frames_per_s"], "peak_bytes": run["memory"]["peak_bytes"],
                "distance_final": (sum(lay["distance"][-1] for lay in longest["layers"]) / len(longest["layers"])
                                   if longest else None),
                "distance_position": longest["positions"][-1] if longest else None,
                "groups": {g: {"positions": [{"position": p["position"], "nll": p.get("cumulative", {}).get("nll")}
                                             for p in run["groups"][g]["positions"]],
                               "slope": run["groups"][g]["slope"].get("slope")} for g in shown},
            }
    return out


# ---------------------------------------------------------------- summaries (report.json)


def run_summary(results: Sequence[StreamNLL], stream_ids: Sequence[str], settings: EvalSettings,
                available: dict[str, int] | None = None) -> dict:
    """Everything reported about one run: speed, memory, per-group curves and points, fast weights.

    available: {stream id: frames} of every stream loaded, so that a run scoring a subset (native
    mode's native_max_streams / native_max_frames) says which one ("coverage")."""
    if not results:
        raise ValueError("run_summary: no streams were evaluated")
    series = [metrics.group_series(r) for r in results]
    tw = settings.train_window
    lengths = (metrics.evaluation_lengths(tw, settings.length_gen.num_lengths, settings.length_gen.min_factor,
                                          settings.length_gen.max_factor) if tw else [])
    groups = {}
    for name in series[0]:
        s = [x[name] for x in series]
        groups[name] = {
            "label": metrics.group_label(name),
            "curve": metrics.binned_curve(s, settings.bin_frames),
            "curve_log": metrics.log_binned_curve(s),
            "positions": metrics.at_positions(s, settings.positions, settings.position_window),
            "length_gen": (_length_gen(metrics.length_points(s, lengths, tw, settings.position_window), tw)
                           if tw else {"skipped": "eval.train_window is not set"}),
            "slope": metrics.log_slope(s, settings.bin_frames),
            "slope_beyond_window": (metrics.log_slope(s, settings.bin_frames, start=tw) if tw
                                    else {"skipped": "eval.train_window is not set"}),
            "context_gain": metrics.context_gain(s, settings.gain_window),
        }
    frames = sum(r.frames for r in results)
    seconds = sum(r.seconds for r in results)
    K = results[0].nll.shape[0]
    per_codebook = []
    for k in range(K):
        values = torch.cat([r.nll[k][r.mask[k]] for r in results]).double()
        name = "text" if k == 0 else f"audio codebook {k}"
        per_codebook.append({"row": k, "name": name, "nll": float(values.mean()), "n_tokens": values.numel()}
                            if values.numel() else {"row": k, "name": name, "skipped": "no scored frames"})
    peaks = [r.peak_memory for r in results if r.peak_memory is not None]
    traces = [dict(stream=sid, **r.weights.to_dict()) for sid, r in zip(stream_ids, results) if r.weights is not None]
    available = available or {sid: r.frames for sid, r in zip(stream_ids, results)}
    scored_frames = {sid: r.frames for sid, r in zip(stream_ids, results)}
    return {
        "mode": results[0].mode,
        "streams": len(results),
        "coverage": {"streams": len(results), "of_streams": len(available), "frames": sum(scored_frames.values()),
                     "of_frames": sum(available.values()),
                     "max_frames": max(scored_frames.values()) if any(
                         scored_frames[sid] < available.get(sid, 0) for sid in scored_frames) else None},
        "speed": {"frames": frames, "seconds": seconds, "frames_per_s": frames / seconds if seconds else None,
                  "tokens_per_s": frames * K / seconds if seconds else None, "tokens_per_frame": K,
                  "realtime_factor": frames / FRAME_RATE / seconds if seconds else None},
        "memory": {"peak_bytes": max(peaks) if peaks else None, "kind": results[0].memory_kind,
                   "per_stream_bytes": [r.peak_memory for r in results]},
        "groups": groups,
        "per_codebook": per_codebook,
        "fast_weights": traces or None,
    }


def _length_gen(points: list[dict], train_window: int) -> dict:
    return {"train_window": train_window, "points": points, "figures": metrics.length_figures(points)}


def mode_comparison(chunked: Sequence[StreamNLL], native: Sequence[StreamNLL], stream_ids: Sequence[str],
                    chunked_run: dict, native_run: dict, shown: Sequence[str] | None = None) -> dict:
    """`--mode both`: per-position NLL differences between modes, speed ratio, memory of each, and both
    modes' mean NLL over the same streams and frames and the `shown` groups (default: all)."""
    per_stream = [{"stream": sid, **metrics.mode_difference(a, b)} for sid, a, b in zip(stream_ids, chunked, native)]
    c, n = chunked_run["speed"]["frames_per_s"], native_run["speed"]["frames_per_s"]
    tokens = sum(s["n_tokens"] for s in per_stream)
    groups = list(shown) if shown is not None else list(metrics.groups(chunked[0].nll.shape[0]))
    parts = [s[g] for s in per_stream for g in groups]
    shared_tokens = sum(p["n_tokens"] for p in parts)
    return {
        "max_abs": max(s["max_abs"] for s in per_stream),
        "mean_abs": sum(s["mean_abs"] * s["n_tokens"] for s in per_stream) / tokens,
        # the tables' runs may cover different streams; this compares the modes on the same ones
        "shared": {"streams": len(per_stream), "frames": sum(s["frames"] for s in per_stream), "n_tokens": shared_tokens,
                   "groups": groups,
                   "chunked_nll": sum(p["nll_a"] * p["n_tokens"] for p in parts) / shared_tokens,
                   "native_nll": sum(p["nll_b"] * p["n_tokens"] for p in parts) / shared_tokens},
        "per_stream": per_stream,
        "speed_ratio": c / n if c and n else None,
        "chunked_frames_per_s": c, "native_frames_per_s": n,
        "chunked_peak_bytes": chunked_run["memory"]["peak_bytes"], "native_peak_bytes": native_run["memory"]["peak_bytes"],
        "memory_kind": chunked_run["memory"]["kind"],
    }


def baseline_difference(run: dict, base_run: dict, results: Sequence[StreamNLL],
                        base_results: Sequence[StreamNLL]) -> dict:
    """A model − the baseline, one mode, the same streams (negative = the model predicts better):
    at the reported positions per group ("positions": {group: [{position, local, cumulative}]}) and
    binned along the stream with its standard error across streams ("curve": {group: [bins]},
    `metrics.paired_difference` over `metrics.log_edges`)."""
    positions, curves = {}, {}
    longest = max(r.frames for r in results)
    series, base_series = [metrics.group_series(r) for r in results], [metrics.group_series(r) for r in base_results]
    for group, g in run["groups"].items():
        rows = []
        for a, b in zip(g["positions"], base_run["groups"][group]["positions"]):
            row = {"position": a["position"]}
            for kind in ("local", "cumulative"):
                if "nll" in a.get(kind, {}) and "nll" in b.get(kind, {}):
                    row[kind] = a[kind]["nll"] - b[kind]["nll"]
                else:
                    row[kind] = {"skipped": "missing in one of the runs"}
            rows.append(row)
        positions[group] = rows
        curves[group] = metrics.paired_difference([x[group] for x in series], [x[group] for x in base_series],
                                                  metrics.log_edges(longest))
    return {"positions": positions, "curve": curves}


def librilight_report(config, described: dict[str, dict], data, results: dict[str, list[StreamNLL]],
                      alignment: dict[str, dict], device: torch.device) -> dict:
    """report.json of `eval librilight` (its schema is pinned by tests/test_eval_run.py): every run's
    summary (`run_summary`), chunked vs native per model, each model − the baseline per mode.
    described: {model: `EvalModel.describe()`} in plan order; data: the `streams.LoadedData`."""
    ids = [s.book.id for s in data.streams]
    available = {s.book.id: s.frames for s in data.streams}
    runs = {name: run_summary(r, ids, config.eval, available) for name, r in results.items()}
    uninformative = metrics.uninformative_groups([s.codes for s in data.streams],
                                                 next(iter(results.values()))[0].nll.shape[0])
    shown = list(metrics.shown_groups(next(iter(runs.values()))["groups"], uninformative))
    comparisons: dict = {}
    for model in described:
        chunked, native = results.get(f"{model}/chunked"), results.get(f"{model}/native")
        if chunked and native:
            comparisons.setdefault("modes", {})[model] = mode_comparison(
                chunked, native, ids, runs[f"{model}/chunked"], runs[f"{model}/native"], shown)
    for model in described:
        for mode in ("chunked", "native"):
            run, base = f"{model}/{mode}", f"baseline/{mode}"
            if model != "baseline" and run in runs and base in runs:
                comparisons.setdefault("vs_baseline", {}).setdefault(model, {})[mode] = baseline_difference(
                    runs[run], runs[base], results[run], results[base])
    markers = {"train_window": config.eval.train_window,
               "attention_context": next((d["attention_context"] for d in described.values()), None)}
    return {**report.report_header("librilight", "LibriLight long-context evaluation", config, device),
            "settings": schema.to_dict(config.eval), "models": described,
            "data": {**data.to_dict(), "uninformative": uninformative}, "alignment": alignment, "markers": markers,
            "runs": runs, "comparisons": comparisons, "plots": {}}


def per_position_tensors(runs: dict[str, Sequence[StreamNLL]],
                         stream_ids: Sequence[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All per-position NLLs and masks ("<run>/<stream index>/nll|mask") and their metadata, for
    per_position.safetensors (read back by `read_per_position`)."""
    tensors = {}
    for run, results in runs.items():
        for i, r in enumerate(results):
            tensors[f"{run}/{i}/nll"] = r.nll.contiguous()
            tensors[f"{run}/{i}/mask"] = r.mask.to(torch.uint8).contiguous()
    return tensors, {"streams": json.dumps(list(stream_ids)), "format": report.FORMAT}


@dataclass
class LibriLightResult(ReportResult):
    """The report (report.json's document) and the per-position NLL it summarises."""

    results: dict[str, list[StreamNLL]]  # {"<model>/<mode>": one per stream}
    stream_ids: list[str]
    wandb_prefix: str = field(default="eval", init=False)

    def markdown(self) -> str:
        return report.markdown(self.report)

    def summary_lines(self) -> list[str]:
        return report.summary_lines(self.report)

    def scalars(self) -> dict[str, float]:
        return report.scalars(self.report["runs"], left_out=list(self.report["data"].get("uninformative", {})))

    def tables(self) -> dict[str, tuple[list[str], list[list]]]:
        return {"length_gen": report.length_gen_table(self.report["runs"],
                                                      list(self.report["data"].get("uninformative", {})))}

    def tensors(self):
        return per_position_tensors(self.results, self.stream_ids)

    def figures(self, output_dir: Path, files: dict[str, str]) -> dict[str, Path]:
        """NLL curves (with model − baseline), perplexity against length, fast weights, inner-loop grid."""
        r = self.report
        runs, groups = r["runs"], report.shown_groups(r)
        all_labels = next(iter(runs.values()))["groups"]
        labels = {g: all_labels[g]["label"] for g in groups}
        names = report.run_labels(runs)
        plotted = plotted_runs(runs)
        notes = [f"{names[n]}: scored {note}" for n, run in plotted.items() if (note := report.subset_note(run))]
        if len(plotted) < len(runs):
            notes.append(f"{', '.join(names[n] for n in runs if n not in plotted)} left out: a subset of the streams "
                         "(native mode's limits), whose agreement with chunked mode report.md shows on the same frames")
        notes += [f"{all_labels[g]['label']} left out: {why}" for g, why in r["data"].get("uninformative", {}).items()]
        images: dict[str, Path] = {}
        if groups:
            differences = {model: {mode: d for mode, d in per_mode.items() if f"{model}/{mode}" in plotted}
                           for model, per_mode in r["comparisons"].get("vs_baseline", {}).items()}
            images["nll_curves"] = plot_curves(plotted, labels, r["markers"], output_dir / files["nll_curves"],
                                               differences or None, notes, names)
            if r["markers"]["train_window"]:
                points = {n: {g: run["groups"][g]["length_gen"]["points"] for g in groups}
                          for n, run in plotted.items()}
                images["ppl_vs_length"] = plot_length_gen(points, labels, r["markers"]["train_window"],
                                                          output_dir / files["ppl_vs_length"], names, notes)
        traces = {}  # both modes trace the same fast weights (the modes agree): each model once, chunked first
        for n, run in runs.items():
            model = n.split("/")[0]
            if run["fast_weights"] and not any(k.split("/")[0] == model for k in traces):
                traces[n] = max(run["fast_weights"], key=lambda t: t["positions"][-1] if t["positions"] else 0)
        if traces:
            images["fast_weights"] = plot_fast_weights(traces, r["markers"], output_dir / files["fast_weights"])
        grid = r["comparisons"].get("inner_loop")
        if grid and groups:
            images["inner_loop"] = plot_inner_loop(grid, runs, labels, r["markers"], output_dir / files["inner_loop"],
                                                   names)
        r["plots"] = {k: p.name for k, p in images.items()}
        return images


def plotted_runs(runs: dict[str, dict]) -> dict[str, dict]:
    """The runs drawn in the figures: a run that scored a subset is left out when its model has a run
    over everything in another mode (lines over different streams side by side would mislead; the
    tables mark the subset and compare the modes on the same frames)."""
    full = {n.split("/")[0] for n, r in runs.items() if report.subset_note(r) is None}
    return {n: r for n, r in runs.items() if report.subset_note(r) is None or n.split("/")[0] not in full}
