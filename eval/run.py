"""Orchestration of `ttt-speech eval librilight` and `ttt-speech eval length-gen`.

Builds the models (TTT and/or baseline), loads the streams, scores them in the configured
mode(s), and writes report.json, report.md, per_position.safetensors and the PNG plots.
"""
from __future__ import annotations

import contextlib
import functools
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator

import torch

from ttt_speech import schema
from ttt_speech.config import TTTConfig, resolve_chunk_size
from ttt_speech.data import FRAME_RATE
from ttt_speech.data.cache import CodesCache
from ttt_speech.export import export_ttt_config
from ttt_speech.files import fresh_output_dir
from ttt_speech.handle import TTTModel
from ttt_speech.models import ModelConfig, check_family, load_lm, load_mimi, load_text_tokenizer
from ttt_speech.stats import runaway_warning
from ttt_speech.tracking import start_wandb

from . import metrics
from .alignment import chunk_alignment
from .books import BookLeftOut, Skipped, Stream, find_books, load_stream
from .config import EvalConfig, EvalSettings, InnerLoopVariant
from .length_gen import OUTPUTS as LENGTH_GEN_OUTPUTS
from .length_gen import length_generalisation, write_length_gen
from .nll import MODES, StreamNLL
from .report import (
    baseline_difference,
    mode_comparison,
    report_header,
    run_labels,
    run_summary,
    save_per_position,
    shown_groups,
    subset_note,
    write_json,
    write_markdown,
)

logger = logging.getLogger(__name__)
# `eval librilight`'s figures; `eval length-gen` writes length_gen.* (eval/length_gen.py) into the same
# output_dir without touching these
PLOTS = {"nll_curves": "nll_curves.png", "ppl_vs_length": "ppl_vs_length.png", "fast_weights": "fast_weights.png",
         "inner_loop": "inner_loop.png"}
REPORT = {"json": "report.json", "markdown": "report.md", "per_position": "per_position.safetensors"}
OUTPUTS = (*REPORT.values(), *PLOTS.values())  # everything `eval librilight` may write


VARIANT = "@"  # "ttt@online": the "ttt" model under the inner-loop variant `eval.inner_loop.online`


@dataclass
class EvalModel:
    """A model under evaluation: "ttt" (with TTT layers), "baseline" (the same model without), a
    name of `compare` (another export), or "ttt@NAME": the "ttt" model's own weights (the same
    `lm`) under the inner-loop variant `eval.inner_loop.NAME`."""

    name: str
    lm: torch.nn.Module
    source: str
    inner_loop: InnerLoopVariant | None = None
    ttt: TTTModel | None = field(init=False)  # the handle on its TTT layers (None for the baseline)

    def __post_init__(self) -> None:
        self.ttt = TTTModel.find(self.lm)

    @property
    def ttt_config(self) -> TTTConfig | None:
        """The TTT config it is scored with (a variant's: the overridden one)."""
        if self.ttt is None:
            return None
        return self.inner_loop.resolve(self.ttt.config, self.where) if self.inner_loop else self.ttt.config

    @property
    def where(self) -> str:
        return f"eval.inner_loop.{self.name.split(VARIANT, 1)[1]}" if self.inner_loop else self.name

    @contextlib.contextmanager
    def scoring(self) -> Iterator[TTTModel | None]:
        """The block it is scored in: a variant's TTT layers run its inner loop there (restored after)."""
        if self.inner_loop is None:
            yield self.ttt
            return
        with self.ttt.inner_loop(self.inner_loop, self.where) as handle:
            yield handle

    def modes(self, settings: EvalSettings) -> list[str]:
        if self.inner_loop is not None and self.inner_loop.modes:
            return list(self.inner_loop.modes)
        return ["chunked", "native"] if settings.mode == "both" else [settings.mode]

    def describe(self) -> dict:
        from ttt_speech.moshi import attention_context

        out = {"source": self.source, "ttt": self.ttt.report.to_dict() if self.ttt else None,
               "params": sum(p.numel() for p in self.lm.parameters()),
               "attention_context": attention_context(self.lm)}
        if self.inner_loop is not None:
            with self.scoring() as handle:
                config = handle.config
                out["inner_loop"] = {**schema.to_dict(self.inner_loop), "trained_mini_batch_size":
                                     self.ttt.config.mini_batch_size, "trained_base_lr": self.ttt.config.base_lr,
                                     "effective_mini_batch_size": config.mini_batch_size,
                                     "effective_base_lr": config.base_lr,
                                     "layer_base_lr": {str(k): v for k, v in handle.layer_base_lr.items()}}
        return out


@dataclass
class LoadedData:
    streams: list[Stream]
    skipped_files: list[Skipped] = field(default_factory=list)
    left_out_books: list[Skipped] = field(default_factory=list)
    cache: dict = field(default_factory=dict)

    @property
    def constant_streams(self) -> list[str]:
        """Ids of the streams with a constant audio codebook (a codec that carries no information)."""
        return [s.book.id for s in self.streams if min(s.distinct_codes) <= 1]

    def to_dict(self) -> dict:
        distinct = [n for s in self.streams for n in s.distinct_codes]
        return {
            "streams": [{"id": s.book.id, "frames": s.frames, "minutes": s.frames / FRAME_RATE / 60,
                         "files_used": len(s.file_starts), "file_starts": s.file_starts,
                         "distinct_codes": s.distinct_codes, "book": s.book.to_dict()}
                        for s in self.streams],
            "skipped_files": [s.to_dict() for s in self.skipped_files],
            "left_out_books": [s.to_dict() for s in self.left_out_books],
            "counts": {"streams": len(self.streams), "frames": sum(s.frames for s in self.streams),
                       "files_skipped": len(self.skipped_files), "books_left_out": len(self.left_out_books)},
            # distinct codes per audio codebook, min and max over streams and codebooks
            "codes": {"distinct_min": min(distinct), "distinct_max": max(distinct),
                      "constant_streams": self.constant_streams},
            "cache": self.cache,
        }


def planned_models(config: EvalConfig) -> dict[str, TTTConfig | None]:
    """The models the config asks for, in order, and the TTT config each will have (None: no TTT
    layers), read from the config and the exports' metadata without loading any weights: "ttt" (an
    export, or the base model with fresh layers) and/or "baseline" (a baseline export, or the base
    model, when asked for or when there is nothing else to score), with the `compare` exports
    between them."""
    planned: dict[str, TTTConfig | None] = {}
    if config.export is not None:
        planned["ttt"] = export_ttt_config(config.export)
    elif config.ttt is not None:
        planned["ttt"] = config.ttt
    for name, variant in config.eval.inner_loop.items():
        where = f"eval.inner_loop.{name}"
        if planned.get("ttt") is None:
            raise ValueError(f"{where}: inner-loop variants need the TTT model (set export, or ttt for fresh layers)")
        planned[f"ttt{VARIANT}{name}"] = variant.resolve(planned["ttt"], where)
    for name, path in config.compare.items():
        planned[name] = export_ttt_config(path)
    if config.baseline_export is not None:
        if export_ttt_config(config.baseline_export) is not None:
            raise ValueError(f"baseline_export: {config.baseline_export} has TTT layers (expected a model trained "
                             "with ttt: null)")
        planned["baseline"] = None
    elif not planned or config.eval.baseline:
        planned["baseline"] = None
    return planned


def check_model_settings(settings: EvalSettings, ttt: TTTConfig | None, where: str = "eval.chunk_size",
                         variant: InnerLoopVariant | None = None) -> int:
    """Refuse what a model patched with `ttt` (None: no TTT layers; for an inner-loop `variant`, the
    overridden config) cannot run (native mode for E2E layers, a chunk they cannot take, an
    unaligned chunk where a variant asks for alignment); returns the chunk it is scored with
    (`resolve_chunk_size`: the variant's chunk_size, else eval.chunk_size)."""
    if ttt is not None and ttt.is_e2e and settings.mode in ("native", "both"):
        raise ValueError(f"eval.mode: {settings.mode!r} includes native (LMGen.step), which e2e_mlp models "
                         "cannot run: their update differentiates the model's loss over a whole mini-batch; "
                         "use eval.mode=chunked")
    requested = variant.chunk_size if variant is not None and variant.chunk_size is not None else settings.chunk_size
    chunk = resolve_chunk_size(requested, ttt, where)
    if variant is not None and variant.align and chunk % ttt.mini_batch_size:
        raise ValueError(f"{where}: align is set and {chunk} frames is not a multiple of the mini-batch size "
                         f"{ttt.mini_batch_size}")
    return chunk


def model_chunk(settings: EvalSettings, model: EvalModel) -> int:
    """The chunk `model` is scored with in chunked mode (checked as `check_settings` did)."""
    where = f"{model.where}.chunk_size" if model.inner_loop else "eval.chunk_size"
    return check_model_settings(settings, model.ttt_config, where, model.inner_loop)


def check_settings(config: EvalConfig) -> None:
    """`check_model_settings` for every model the config plans, and that the `compare` exports read
    the streams the others read (one codec), before any model or data is loaded."""
    from ttt_speech.export import export_model_config

    for name, ttt in planned_models(config).items():
        if VARIANT in name:  # its errors name the variant's own chunk_size (which may replace eval.chunk_size)
            variant_name = name.split(VARIANT, 1)[1]
            check_model_settings(config.eval, ttt, f"eval.inner_loop.{variant_name}.chunk_size",
                                 config.eval.inner_loop[variant_name])
        else:
            check_model_settings(config.eval, ttt)
    check_family(config.base_model())
    codec = config.base_model().codec_id()
    for name, path in config.compare.items():
        other = export_model_config(path).codec_id()
        if other != codec:
            raise ValueError(f"compare.{name}: {path} was trained on {other} codes, the streams are encoded with "
                             f"{codec}; compare models of one codec")


def build_models(config: EvalConfig, device: torch.device | None = None) -> list[EvalModel]:
    """The models of `planned_models(config)`, built."""
    from ttt_speech import patch_moshi
    from ttt_speech.export import load_exported_lm

    plan = planned_models(config)
    base = config.base_model()
    device = device or base.torch_device()
    models = []
    if "ttt" in plan and config.export is not None:
        lm, base = load_exported_lm(config.export, device=device, model=config.model)
        models.append(EvalModel("ttt", lm, f"export {_source(config.export)} (base {base.name})"))
    elif "ttt" in plan:
        lm = load_lm(base, device=device)
        with torch.random.fork_rng(devices=[]):  # the fresh TTT layers are seeded like the tiny model
            torch.manual_seed(base.seed)
            patch_moshi(lm, config.ttt)
        models.append(EvalModel("ttt", lm, f"{base.name} + fresh (untrained) TTT layers"))
    if models:  # the inner-loop variants: the same weights, another inner loop while scored
        models += [EvalModel(f"ttt{VARIANT}{name}", models[0].lm, f"{models[0].source}, inner loop '{name}'", variant)
                   for name, variant in config.eval.inner_loop.items()]
    for name, path in config.compare.items():
        lm, other = load_exported_lm(path, device=device)
        models.append(EvalModel(name, lm, f"export {_source(path)} (base {other.name})"))
    if "baseline" in plan and config.baseline_export is not None:
        lm, _ = load_exported_lm(config.baseline_export, device=device)
        models.append(EvalModel("baseline", lm, f"export {_source(config.baseline_export)} (no TTT)"))
    elif "baseline" in plan:
        models.append(EvalModel("baseline", load_lm(base, device=device), f"{base.name} (no TTT)"))
    shape = _stream_shape(models[0].lm)
    for model in models[1:]:  # the streams are laid out once, for the first model
        if _stream_shape(model.lm) != shape:
            raise ValueError(f"{model.name}: its streams (codebooks, audio streams, card, text card) "
                             f"{_stream_shape(model.lm)} differ from {models[0].name}'s {shape}; compare models "
                             "that read the same streams")
    return models


def _source(export: Path) -> str:
    """An export as the report names it: a hub repo id with the commit that was scored."""
    from ttt_speech.export import export_dir

    folder = export_dir(export)
    return str(export) if folder == Path(export) else f"{export} (hub commit {folder.name})"


def _stream_shape(lm) -> tuple[int, int, int, int]:
    return lm.num_codebooks, lm.dep_q, lm.card, lm.text_card


def load_data(config: EvalConfig, lm, model_config: ModelConfig, progress: bool = True) -> LoadedData:
    """Find the books / manifest entries, encode (or read cached) codes, lay them out for `lm`."""
    from ttt_speech.progress import progress_bar

    found = find_books(config.data)
    device = model_config.torch_device()
    cache = CodesCache(config.data.codes_cache, model_config.codec_id(), lambda: load_mimi(model_config, device))
    tokenizer = functools.cache(lambda: load_text_tokenizer(model_config))  # only for files with a transcript
    data = LoadedData([], list(found.skipped_files), list(found.filtered_books))
    with progress_bar(found.books, desc="loading streams", unit="book", enabled=progress) as bar:
        for book in bar:
            try:
                stream = load_stream(book, lm, cache, config.data.max_frames,
                                     progress=lambda name: bar.set_postfix_str(name[-40:], refresh=False),
                                     tokenizer=tokenizer)
            except BookLeftOut as e:
                logger.warning("leaving out %s", e)
                data.skipped_files.extend(e.skipped_files)
                data.left_out_books.append(Skipped(book.id, e.reason))
                continue
            data.skipped_files.extend(stream.skipped_files)
            if stream.frames < config.data.min_frames:
                data.left_out_books.append(Skipped(book.id, f"{stream.frames} frames < min_frames {config.data.min_frames}"))
            else:
                data.streams.append(stream)
    data.cache = {"codec": cache.codec_id, "hits": cache.hits, "misses": cache.misses, "root": str(cache.root)}
    if not data.streams:
        raise ValueError("data: no stream left to evaluate (" + "; ".join(
            f"{s.path}: {s.reason}" for s in (data.left_out_books + data.skipped_files)[:5]) + ")")
    if data.constant_streams:
        logger.warning("%d stream(s) have a constant audio codebook (e.g. %s): the codec carries no information, "
                       "their audio NLL measures nothing", len(data.constant_streams), data.constant_streams[0])
    return data


def evaluate(models: list[EvalModel], streams: list[Stream], config: EvalConfig,
             progress: bool = True) -> dict[str, list[StreamNLL]]:
    """Score every stream with every model in every configured mode → {"<model>/<mode>": [StreamNLL]}."""
    out = {}
    for model in models:
        chunk = model_chunk(config.eval, model)
        for mode in model.modes(config.eval):
            with model.scoring():
                out[f"{model.name}/{mode}"] = _score(model, mode, chunk, streams, config, progress)
    return out


def _score(model: EvalModel, mode: str, chunk: int, streams: list[Stream], config: EvalConfig,
           progress: bool) -> list[StreamNLL]:
    """Every stream scored by `model` in `mode` (inside `model.scoring()`)."""
    scored = streams[:config.eval.native_max_streams] if mode == "native" else streams
    kwargs = {"chunk_size": chunk} if mode == "chunked" else {}
    # an untimed warm-up on a few frames: one-time costs (allocator, kernels, thread pools)
    # would otherwise be charged to the first stream's time and peak memory
    MODES[mode](model.lm, scored[0].codes[:, :2 * chunk if mode == "chunked" else 4],
                where=f"{model.name}: {scored[0].book.id} (warm-up)", **kwargs)
    results = []
    for stream in scored:
        codes = stream.codes
        if mode == "native" and config.eval.native_max_frames is not None:
            codes = codes[:, :config.eval.native_max_frames]
        results.append(MODES[mode](model.lm, codes, where=f"{model.name}: {stream.book.id}",
                                   progress=progress, trace_every=chunk, **kwargs))
    _warn_runaway(model, mode, scored, results)
    return results


def _warn_runaway(model: EvalModel, mode: str, streams: list[Stream], results: list[StreamNLL]) -> None:
    """One warning per model and mode when fast weights ran away on a stream (`FastWeightTrace.runaway`)."""
    for stream, result in zip(streams, results):
        grown = result.weights.runaway() if result.weights is not None else {}
        if grown:
            logger.warning(runaway_warning(grown, f"{model.name}/{mode} on {stream.book.id}", model.ttt_config.base_lr))
            return


def alignment_report(models: list[EvalModel], streams: list[Stream], config: EvalConfig) -> dict:
    out = {}
    frames = max(s.frames for s in streams)
    for model in models:
        if model.ttt is None:
            continue
        b = model.ttt_config.mini_batch_size
        a = chunk_alignment(frames, model_chunk(config.eval, model), b)
        a["native_efficiency"] = chunk_alignment(frames, 1, b)["efficiency"]
        a["frames"] = frames
        out[model.name] = a
    return out


def inner_loop_grid(models: list[EvalModel], runs: dict[str, dict], frames: int, config: EvalConfig,
                    shown: list[str]) -> dict[str, dict]:
    """The inner-loop comparison (`eval.inner_loop`): per run of "ttt" and of its variants, the
    inner loop it ran (b, base_lr, chunk, slot efficiency on the longest stream), its speed and
    peak memory, its final ‖W − W_0‖ (mean over layers, on the longest traced stream) and, per shown
    group, the cumulative NLL at each position and the slope."""
    out = {}
    for model in models:
        if model.ttt is None or not (model.name == "ttt" or model.inner_loop is not None):
            continue
        ttt = model.ttt_config
        variant = schema.to_dict(model.inner_loop) if model.inner_loop else {}
        for mode in model.modes(config.eval):
            run = runs[f"{model.name}/{mode}"]
            chunk = model_chunk(config.eval, model) if mode == "chunked" else 1
            traces = [t for t in run["fast_weights"] or [] if t["positions"]]
            longest = max(traces, key=lambda t: t["positions"][-1]) if traces else None
            out[f"{model.name}/{mode}"] = {
                "model": model.name, "mode": mode, "mini_batch_size": ttt.mini_batch_size, "base_lr": ttt.base_lr,
                "scale": variant.get("scale"), "offsets": variant.get("offsets") if model.inner_loop else None,
                "chunk_size": chunk, "slot_efficiency": chunk_alignment(frames, chunk, ttt.mini_batch_size)["efficiency"],
                "frames_per_s": run["speed"]["frames_per_s"], "peak_bytes": run["memory"]["peak_bytes"],
                "distance_final": (sum(lay["distance"][-1] for lay in longest["layers"]) / len(longest["layers"])
                                   if longest else None),
                "distance_position": longest["positions"][-1] if longest else None,
                "groups": {g: {"positions": [{"position": p["position"], "nll": p.get("cumulative", {}).get("nll")}
                                             for p in run["groups"][g]["positions"]],
                               "slope": run["groups"][g]["slope"].get("slope")} for g in shown},
            }
    return out


def run_librilight(config: EvalConfig, models: list[EvalModel] | None = None, progress: bool = True,
                   plots: bool = True, overwrite: bool = False) -> tuple[dict, dict[str, Path]]:
    """The whole evaluation; returns (report, {kind: path written}). `overwrite`: write into a
    training run's folder, or over an earlier report (refused otherwise: `fresh_output_dir`)."""
    check_settings(config)
    fresh_output_dir(config.output_dir, OUTPUTS, overwrite)  # before hours of scoring, not when writing the report
    model_config = config.base_model()
    device = model_config.torch_device()
    models = models or build_models(config, device)
    data = load_data(config, models[0].lm, model_config, progress)
    ids = [s.book.id for s in data.streams]
    available = {s.book.id: s.frames for s in data.streams}
    results = evaluate(models, data.streams, config, progress)
    runs = {name: run_summary(r, ids, config.eval, available) for name, r in results.items()}

    uninformative = metrics.uninformative_groups([s.codes for s in data.streams],
                                                 next(iter(results.values()))[0].nll.shape[0])
    shown = list(metrics.shown_groups(next(iter(runs.values()))["groups"], uninformative))
    comparisons: dict = {}
    for model in models:
        chunked, native = results.get(f"{model.name}/chunked"), results.get(f"{model.name}/native")
        if chunked and native:
            comparisons.setdefault("modes", {})[model.name] = mode_comparison(
                chunked, native, ids, runs[f"{model.name}/chunked"], runs[f"{model.name}/native"], shown)
    for model in models:
        for mode in ("chunked", "native"):
            run, base = f"{model.name}/{mode}", f"baseline/{mode}"
            if model.name != "baseline" and run in runs and base in runs:
                comparisons.setdefault("vs_baseline", {}).setdefault(model.name, {})[mode] = baseline_difference(
                    runs[run], runs[base], results[run], results[base])

    if config.eval.inner_loop:
        comparisons["inner_loop"] = inner_loop_grid(models, runs, max(s.frames for s in data.streams), config, shown)

    data_summary = {**data.to_dict(), "uninformative": uninformative}
    markers = {"train_window": config.eval.train_window,
               "attention_context": next((m.describe()["attention_context"] for m in models), None)}
    report = {
        **report_header("librilight", "LibriLight long-context evaluation", config, device),
        "settings": schema.to_dict(config.eval),
        "models": {m.name: m.describe() for m in models},
        "data": data_summary,
        "alignment": alignment_report(models, data.streams, config),
        "markers": markers,
        "runs": runs,
        "comparisons": comparisons,
    }
    paths = write_outputs(config, report, results, ids, plots)
    return report, paths


def plotted_runs(runs: dict[str, dict]) -> dict[str, dict]:
    """The runs drawn in the figures: a run that scored a subset is left out when its model has a run
    over everything in another mode (lines over different streams side by side would mislead; the
    tables mark the subset and compare the modes on the same frames)."""
    full = {n.split("/")[0] for n, r in runs.items() if subset_note(r) is None}
    return {n: r for n, r in runs.items() if subset_note(r) is None or n.split("/")[0] not in full}


def write_outputs(config: EvalConfig, report: dict, results: dict[str, list[StreamNLL]], ids: list[str],
                  plots: bool = True) -> dict[str, Path]:
    """PNG plots, report.json, report.md and per_position.safetensors into config.output_dir."""
    from .plots import plot_curves, plot_fast_weights, plot_inner_loop, plot_length_gen

    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = report["runs"]
    groups = shown_groups(report)
    all_labels = next(iter(runs.values()))["groups"]
    labels = {g: all_labels[g]["label"] for g in groups}
    names = run_labels(runs)
    plotted = plotted_runs(runs)
    notes = [f"{names[n]}: scored {note}" for n, r in plotted.items() if (note := subset_note(r))]
    notes += [f"{', '.join(names[n] for n in runs if n not in plotted)} left out: a subset of the streams (native mode's "
              "limits), whose agreement with chunked mode report.md shows on the same frames"] if len(plotted) < len(runs) else []
    notes += [f"{all_labels[g]['label']} left out: {why}" for g, why in report["data"].get("uninformative", {}).items()]
    images: dict[str, Path] = {}
    if plots and groups:
        differences = {model: {mode: d for mode, d in per_mode.items() if f"{model}/{mode}" in plotted}
                       for model, per_mode in report["comparisons"].get("vs_baseline", {}).items()}
        images["nll_curves"] = plot_curves(plotted, labels, report["markers"], out / PLOTS["nll_curves"],
                                           differences or None, notes, names)
        if config.eval.train_window:
            points = {n: {g: r["groups"][g]["length_gen"]["points"] for g in groups} for n, r in plotted.items()}
            images["ppl_vs_length"] = plot_length_gen(points, labels, config.eval.train_window,
                                                      out / PLOTS["ppl_vs_length"], names, notes)
    if plots:
        # both modes trace the same fast weights (the modes agree): draw each model once, chunked first
        traces = {}
        for n, r in runs.items():
            model = n.split("/")[0]
            if r["fast_weights"] and not any(k.split("/")[0] == model for k in traces):
                traces[n] = max(r["fast_weights"], key=lambda t: t["positions"][-1] if t["positions"] else 0)
        if traces:
            images["fast_weights"] = plot_fast_weights(traces, report["markers"], out / PLOTS["fast_weights"])
        grid = report["comparisons"].get("inner_loop")
        if grid and groups:
            images["inner_loop"] = plot_inner_loop(grid, runs, labels, report["markers"], out / PLOTS["inner_loop"],
                                                   names)
    report["plots"] = {k: p.name for k, p in images.items()}
    paths = {"json": write_json(out / REPORT["json"], report),
             "markdown": write_markdown(out / REPORT["markdown"], report),
             "per_position": save_per_position(out / REPORT["per_position"], results, ids), **images}
    tracker = start_wandb(config.wandb, report["config"], out, "eval-librilight")
    if tracker is not None:
        from .tracking import log_results

        log_results(tracker.run, runs, images, [paths["json"], paths["markdown"]],
                    left_out=list(report["data"].get("uninformative", {})))
        tracker.finish()
    return paths


def run_length_gen(config: EvalConfig, models: list[EvalModel] | None = None, progress: bool = True,
                   overwrite: bool = False) -> tuple[dict[str, dict], dict[str, Path]]:
    """`ttt-speech eval length-gen`: `length_generalisation` for each model on the configured streams.
    `overwrite`: as `run_librilight`'s, for length_gen.* (a report of `eval librilight` may share the folder)."""
    settings = config.eval
    if settings.train_window is None:
        raise ValueError("eval.train_window: length generalisation needs the training window (frames)")
    check_settings(replace(config, eval=replace(settings, mode="chunked")))  # length-gen runs chunked only
    fresh_output_dir(config.output_dir, list(LENGTH_GEN_OUTPUTS.values()), overwrite)  # before the scoring
    model_config = config.base_model()
    models = models or build_models(config, model_config.torch_device())
    data = load_data(config, models[0].lm, model_config, progress)
    lg = settings.length_gen
    results = {}
    for model in models:
        chunk = model.inner_loop.chunk_size if model.inner_loop and model.inner_loop.chunk_size else settings.chunk_size
        with model.scoring():  # an inner-loop variant runs its own inner loop here too
            results[model.name] = length_generalisation(
                model.lm, {s.book.id: s.codes for s in data.streams}, settings.train_window,
                chunk_size=chunk, num_lengths=lg.num_lengths, min_factor=lg.min_factor,
                max_factor=lg.max_factor, max_frames=config.data.max_frames, window=settings.position_window,
                progress=progress, model_name=model.name)
        results[model.name]["skipped_files"] = [s.to_dict() for s in data.skipped_files]
        results[model.name]["left_out_books"] = [s.to_dict() for s in data.left_out_books]
    tracker = start_wandb(config.wandb, schema.to_dict(config), Path(config.output_dir), "eval-length-gen")
    paths = write_length_gen(results, config.output_dir, wandb_run=tracker.run if tracker else None)
    if tracker is not None:
        tracker.finish()
    return results, paths


def summary_lines(report: dict) -> list[str]:
    """A few lines for the terminal: cumulative NLL at each reached position, per run and informative group."""
    lines = []
    groups = shown_groups(report)
    for name, run in report["runs"].items():
        speed = run["speed"]
        note = subset_note(run)
        lines.append(f"{name}: {speed['frames']:,} frames at {speed['frames_per_s']:.1f} frames/s"
                     + (f", scored on {note}" if note else ""))
        for group in groups:
            cells = [f"@{p['position']}: {p['cumulative']['nll']:.3f}" for p in run["groups"][group]["positions"]
                     if "nll" in p.get("cumulative", {})]
            lines.append(f"  {group:8s} " + ("  ".join(cells) or "no stream reaches a reported position"))
    for group, why in report["data"].get("uninformative", {}).items():
        lines.append(f"{group}: left out ({why})")
    for model, c in report["comparisons"].get("modes", {}).items():
        shared = c["shared"]
        lines.append(f"{model}: chunked vs native on the same {shared['frames']:,} frames: NLL {shared['chunked_nll']:.4f}"
                     f" vs {shared['native_nll']:.4f}, max |dNLL| {c['max_abs']:.2e}; chunked {c['speed_ratio']:.1f}x faster")
    return lines
