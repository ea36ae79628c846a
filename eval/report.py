"""Evaluation reports: per-run summaries (JSON-ready), the Markdown rendering, atomic writes.

A *run* is one model ("ttt" or "baseline") in one mode ("chunked" or "native") over all streams.
Missing data is never a number: an aggregate without data is {"skipped": reason}, shown as
"skipped" in Markdown, and report.json is written with `allow_nan=False` so a stray NaN fails.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import torch

from ttt_speech.files import save_tensors_atomic, write_text_atomic
from ttt_speech.data import FRAME_RATE

from . import metrics
from .config import EvalSettings
from .memory import CPU_FLOOR, informative_peaks
from .nll import StreamNLL

FORMAT = "ttt-speech-eval"
VERSION = 1


def report_header(kind: str, title: str, config, device: torch.device) -> dict:
    """The fields every report starts with: format, kind, title, when, where (torch, device), config."""
    import datetime

    from ttt_speech import schema

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    return {"format": FORMAT, "version": VERSION, "kind": kind, "title": title,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "environment": {"torch": torch.__version__, "device": name}, "config": schema.to_dict(config)}


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
            "length_gen": ({"train_window": tw, "points": metrics.length_points(s, lengths, tw, settings.position_window)}
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


def save_per_position(path: Path, runs: dict[str, Sequence[StreamNLL]], stream_ids: Sequence[str]) -> Path:
    """All per-position NLLs and masks (safetensors: "<run>/<stream index>/nll|mask") for later analysis."""
    tensors = {}
    for run, results in runs.items():
        for i, r in enumerate(results):
            tensors[f"{run}/{i}/nll"] = r.nll.contiguous()
            tensors[f"{run}/{i}/mask"] = r.mask.to(torch.uint8).contiguous()
    save_tensors_atomic(path, tensors, metadata={"streams": json.dumps(list(stream_ids)), "format": FORMAT})
    return path


def read_per_position(path: Path) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
    """per_position.safetensors → {run: [(nll [K, T], mask [K, T] bool) per stream]}."""
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    runs: dict[str, dict[int, tuple]] = {}
    for key in tensors:
        run, index, kind = key.rsplit("/", 2)
        if kind == "nll":
            runs.setdefault(run, {})[int(index)] = (tensors[key], tensors[f"{run}/{index}/mask"].bool())
    return {run: [streams[i] for i in sorted(streams)] for run, streams in runs.items()}


def write_json(path: Path, report: dict) -> Path:
    """report.json, atomically; NaN/inf anywhere is a bug and raises instead of being written."""
    write_text_atomic(path, json.dumps(report, indent=1, allow_nan=False) + "\n")
    return path


# ---------------------------------------------------------------- Markdown


def _nll(entry: dict | None) -> str:
    if not entry or "nll" not in entry:
        return "skipped"
    return f"{entry['nll']:.3f} ({entry['ppl']:.2f})"


def _num(value, fmt: str = ".3g") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return format(value, fmt)


def _bytes(n: int | None) -> str:
    return "—" if n is None else f"{n / 2**20:.1f} MiB"


def frame_span(values: list[int]) -> str:
    """"320" or "341-640": the range of a sorted list of frame counts."""
    return f"{values[0]:,}" if values[0] == values[-1] else f"{values[0]:,}-{values[-1]:,}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def subset_note(run: dict) -> str | None:
    """What a run scored when it is less than every frame of every stream (native mode's limits), e.g.
    "the first 300 frames of 4 of 16 streams"; None when it scored everything."""
    c = run.get("coverage")
    if not c or (c["streams"] == c["of_streams"] and c["max_frames"] is None):
        return None
    streams = "each stream" if c["streams"] == c["of_streams"] else f"{c['streams']} of {c['of_streams']} streams"
    first = f"the first {c['max_frames']:,} frames of " if c["max_frames"] is not None else ""
    return f"{first}{streams} ({c['frames']:,} of {c['of_frames']:,} frames)"


def run_labels(runs: dict[str, dict]) -> dict[str, str]:
    """Column / legend names: the run name, marked † when the run scored a subset (`subset_note`)."""
    return {n: n + ("†" if subset_note(r) else "") for n, r in runs.items()}


def shown_groups(report: dict) -> list[str]:
    """The groups of an evaluation report that carry information (`metrics.shown_groups`)."""
    return list(metrics.shown_groups(next(iter(report["runs"].values()))["groups"],
                                     report.get("data", {}).get("uninformative", {})))


def _cells(entries: list[dict | None], kind: str) -> list[str]:
    """One table row's cells; the stream count is shown in each cell when the runs' counts differ."""
    counts = {e[kind]["n_streams"] for e in entries if e and "nll" in e.get(kind, {})}
    return [(_nll(e.get(kind)) + (f" [{e[kind]['n_streams']}]" if len(counts) > 1 and "nll" in e.get(kind, {}) else "")
             if e and "skipped" not in e else "—") for e in entries]


def _reached(rows_per_run: list[list[dict]], key: str) -> tuple[list[int], list]:
    """Indices of the points some run reached, and the values (e.g. positions) no run reached."""
    first = rows_per_run[0]
    reached = [i for i in range(len(first)) if any("skipped" not in rows[i] for rows in rows_per_run)]
    return reached, [first[i][key] for i in range(len(first)) if i not in reached]


def markdown(report: dict) -> str:
    """The human-readable report (tables + links to the PNG plots)."""
    runs: dict = report["runs"]
    labels = run_labels(runs)
    names = list(runs)
    groups = shown_groups(report)
    group_label = {g: v["label"] for g, v in next(iter(runs.values()))["groups"].items()}
    settings = report["settings"]
    out = [f"# {report['title']}", ""]
    out += [f"Created {report['created']} on {report['environment']['device']} "
            f"(torch {report['environment']['torch']}).", ""]
    out += ["## Setup", ""]
    for name, model in report["models"].items():
        patch = model.get("ttt")
        desc = ("no TTT layers" if patch is None else
                f"TTT {patch['layer_type']} {patch['mode']}, layers {patch['layers']}, b={patch['mini_batch_size']}")
        if (loop := model.get("inner_loop")) is not None:
            desc += (f", run with b={loop['effective_mini_batch_size']}, base_lr {loop['effective_base_lr']:.4g} "
                     f"(scale {loop['scale'] or 'none'}, offsets {loop['offsets']})")
        out.append(f"- **{name}**: {model['source']}; {desc}; {model['params']:,} parameters; "
                   f"attention context {model['attention_context'] or 'none'} frames")
    data = report["data"]
    counts = data["counts"]
    longest = max((st["frames"] for st in data.get("streams", [])), default=None)
    out.append(f"- data: {counts['streams']} stream(s), {counts['frames']:,} frames "
               f"({counts['frames'] / FRAME_RATE / 60:.1f} min" + (f"; the longest {longest:,}" if longest else "") +
               f"); skipped files: {counts['files_skipped']}; books filtered or unreadable: {counts['books_left_out']}")
    codes = data.get("codes")  # reports built by hand (tests) or by older versions have none
    if codes is not None:
        constant = codes["constant_streams"]
        out.append(f"- Mimi codes: {codes['distinct_min']}-{codes['distinct_max']} distinct values per codebook "
                   f"(min-max over streams and codebooks)" + (
                       f"; {len(constant)} stream(s) with a constant codebook: the codec carries no information"
                       if constant else ""))
    for group, why in data.get("uninformative", {}).items():
        out.append(f"- {group_label.get(group, group)}: left out of every table and plot: {why}")
    for name, run in runs.items():
        if (note := subset_note(run)) is not None:
            out.append(f"- {labels[name]} scored {note}; its numbers are over those only (the chunked vs native "
                       "section compares the modes on the same frames)")
    for name, a in report["alignment"].items():
        out.append(f"- {name}: chunk {a['chunk_size']} vs TTT mini-batch {a['mini_batch_size']}: "
                   f"{'aligned' if a['aligned'] else 'NOT aligned'}, TTT slot efficiency {a['efficiency']:.1%} "
                   f"({a['padding_slots']:,} padding slots); native mode: {a['native_efficiency']:.1%}")
    markers = report["markers"]
    out.append(f"- training window: {markers['train_window'] or 'not set'} frames; bins of "
               f"{settings['bin_frames']} frames; NLL in nats per token, perplexity in brackets; "
               "[n] = streams averaged, shown where runs differ")
    out.append("")

    out += ["## NLL (perplexity) at positions", "",
            f"local = mean over the {settings['position_window']} frames before the position; "
            "cumulative = mean over all frames before it. Averaged over the streams that reach the position.", ""]
    reached, unreached = _reached([runs[n]["groups"][groups[0]]["positions"] for n in names], "position") if groups else ([], [])
    if unreached:
        out += [f"Not reached by any stream (left out): position(s) {', '.join(f'{p:,}' for p in unreached)}.", ""]
    for group in groups if reached else []:
        out += [f"### {group_label[group]}", ""]
        rows = []
        for i in reached:
            entries = [runs[n]["groups"][group]["positions"][i] for n in names]
            for kind in ("local", "cumulative"):
                rows.append([f"{entries[0]['position']:,}", kind, *_cells(entries, kind)])
        out += _table(["frame", "window"] + [labels[n] for n in names], rows) + [""]

    out += ["## Length generalisation", ""]
    first = runs[names[0]]["groups"][groups[0]]["length_gen"] if groups else {"skipped": "no group carries information"}
    if "skipped" in first:
        out += [f"Not reported: {first['skipped']}.", ""]
    else:
        reached, unreached = _reached([runs[n]["groups"][groups[0]]["length_gen"]["points"] for n in names], "length")
        out += [f"Perplexity of the first L frames (one stateful pass), L = {settings['length_gen']['min_factor']:g}x "
                f"... {settings['length_gen']['max_factor']:g}x the training window ({first['train_window']} frames).", ""]
        if unreached:
            out += [f"{len(unreached)} of {len(first['points'])} lengths are longer than every stream and left out "
                    f"({frame_span(unreached)} frames).", ""]
        for group in groups if reached else []:
            out += [f"### {group_label[group]}", ""]
            rows = []
            for i in reached:
                entries = [runs[n]["groups"][group]["length_gen"]["points"][i] for n in names]
                rows.append([f"{entries[0]['length']:,}", f"{entries[0]['factor']:.2f}x", *_cells(entries, "cumulative")])
            out += _table(["L (frames)", "L / window"] + [labels[n] for n in names], rows) + [""]

    out += ["## Context use", "",
            "slope: NLL vs ln(position), nats per e-fold (negative = improves with context); gain: mean NLL of the "
            f"first minus the last {settings['gain_window']} frames of each stream.", ""]
    rows = []
    for n in names:
        for group in groups:
            g = runs[n]["groups"][group]
            rows.append([labels[n], group, _num(g["slope"].get("slope"), "+.4f"),
                         _num(g["slope_beyond_window"].get("slope"), "+.4f"), _num(g["context_gain"].get("gain"), "+.4f")])
    out += _table(["run", "group", "slope", "slope beyond window", "context gain"], rows) + [""]

    out += ["## Speed and memory", ""]
    kind = next(iter(runs.values()))["memory"]["kind"]
    measured = informative_peaks([r["memory"]["peak_bytes"] for r in runs.values()], kind)
    rows = [[labels[n], f"{r['speed']['frames']:,}", _num(r["speed"]["frames_per_s"], ".1f"),
             _num(r["speed"]["tokens_per_s"], ".0f"), _num(r["speed"]["realtime_factor"], ".1f") + "x"]
            + ([_bytes(r["memory"]["peak_bytes"])] if measured else []) for n, r in runs.items()]
    out += _table(["run", "frames", "frames/s", "tokens/s", "real time"] + (["peak memory"] if measured else []), rows)
    out += ["", f"Peak memory measured as {kind}." if measured else
            f"Peak memory: not shown, none rose above {CPU_FLOOR // 2**20} MiB ({kind}: the process's resident memory "
            "sampled every 5 ms, too coarse for small models); measure on CUDA, or with scripts/bench_eval.py in "
            "fresh processes.", ""]

    comparisons = report.get("comparisons", {})
    if comparisons.get("modes"):
        out += ["## Chunked vs native", "",
                "Both modes on the same streams and frames: mean NLL of each (over the groups shown), and the "
                "per-position difference over every row (the evaluator's self-check: float noise only).", ""]
        rows = []
        for m, c in comparisons["modes"].items():
            shared = c.get("shared", {})
            rows.append([m, f"{shared.get('streams', '—')} / {shared.get('frames', 0):,}",
                         _num(shared.get("chunked_nll"), ".4f"), _num(shared.get("native_nll"), ".4f"),
                         f"{c['max_abs']:.2e}", f"{c['mean_abs']:.2e}", _num(c["speed_ratio"], ".1f") + "x"]
                        + ([_bytes(c["chunked_peak_bytes"]), _bytes(c["native_peak_bytes"])] if measured else []))
        out += _table(["model", "streams / frames", "chunked NLL", "native NLL", "max abs ΔNLL", "mean abs ΔNLL",
                       "chunked / native speed"] + (["chunked memory", "native memory"] if measured else []), rows) + [""]
    if comparisons.get("inner_loop"):
        out += inner_loop_markdown(comparisons["inner_loop"], labels, groups, group_label, measured)
    if comparisons.get("vs_baseline"):
        out += ["## Model − baseline", "",
                "NLL difference at each position, the same streams in both (negative: the model predicts better).", ""]
        rows = []
        for model, per_mode in comparisons["vs_baseline"].items():
            for mode, diff in per_mode.items():
                for group in groups:
                    for p in diff["positions"][group]:
                        if any(isinstance(p[k], float) for k in ("local", "cumulative")):
                            subset = labels.get(f"{model}/{mode}", "").endswith("†")  # as in the other tables
                            rows.append([model + "†" * subset, mode, group, f"{p['position']:,}",
                                         *(f"{p[k]:+.4f}" if isinstance(p[k], float) else "—" for k in ("local", "cumulative"))])
        out += _table(["model", "mode", "group", "frame", "local", "cumulative"], rows) + [""]

    if report.get("plots"):
        out += ["## Plots", ""] + [f"![{name}]({file})" for name, file in report["plots"].items()] + [""]

    out += ["## Left out", ""]
    if not data["skipped_files"] and not data["left_out_books"]:
        out += ["Nothing.", ""]
    for s in data["skipped_files"]:
        out.append(f"- file `{s['path']}`: {s['reason']}")
    for s in data["left_out_books"]:
        out.append(f"- book `{s['path']}`: {s['reason']}")
    out.append("")
    return "\n".join(out)


def inner_loop_markdown(grid: dict[str, dict], labels: dict[str, str], groups: list[str],
                        group_label: dict[str, str], measured: bool) -> list[str]:
    """The inner-loop grid's two tables: how each run adapted, and its NLL (docs/evaluation.md)."""
    out = ["## Inner-loop grid", "",
           "The TTT model as trained and under each `eval.inner_loop` variant, on the same streams: b = tokens "
           "per inner step (1 = online GD), base_lr as run (per layer when compensated: report.json), chunk = "
           "frames per call (1 in native mode), slot efficiency = frames / TTT slots computed on the longest "
           "stream, ‖W − W₀‖ = mean over layers at the last traced frame of the longest stream.", ""]
    rows = [[labels.get(n, n), str(r["mini_batch_size"]), f"{r['base_lr']:.4g}", r["scale"] or "—",
             r["offsets"] or "—", str(r["chunk_size"]), f"{r['slot_efficiency']:.1%}", _num(r["frames_per_s"], ".1f")]
            + ([_bytes(r["peak_bytes"])] if measured else [])
            + [_num(r["distance_final"], ".4g") + (f" @{r['distance_position']:,}" if r["distance_position"] else "")]
            for n, r in grid.items()]
    out += _table(["run", "b", "base_lr", "scale", "offsets", "chunk", "slot efficiency", "frames/s"]
                  + (["peak memory"] if measured else []) + ["‖W − W₀‖"], rows) + [""]
    first = next(iter(grid.values()))
    header, rows = ["run"], []
    for g in groups:
        header += [f"{g} @{p['position']:,}" for p in first["groups"][g]["positions"]] + [f"{g} slope"]
    for n, r in grid.items():
        row = [labels.get(n, n)]
        for g in groups:
            row += [_num(p["nll"], ".4f") for p in r["groups"][g]["positions"]] + [_num(r["groups"][g]["slope"], "+.4f")]
        rows.append(row)
    out += ["Cumulative NLL (nats per token) at each position and the slope (nats per e-fold of position): "
            + ", ".join(f"{g} = {group_label[g]}" for g in groups) + ".", ""]
    return out + _table(header, rows) + [""]


def write_markdown(path: Path, report: dict) -> Path:
    write_text_atomic(path, markdown(report))
    return path
