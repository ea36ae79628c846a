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


def run_summary(results: Sequence[StreamNLL], stream_ids: Sequence[str], settings: EvalSettings) -> dict:
    """Everything reported about one run: speed, memory, per-group curves and points, fast weights."""
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
    return {
        "mode": results[0].mode,
        "streams": len(results),
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
                    chunked_run: dict, native_run: dict) -> dict:
    """`--mode both`: per-position NLL differences between modes, speed ratio, memory of each."""
    per_stream = [{"stream": sid, **metrics.mode_difference(a, b)} for sid, a, b in zip(stream_ids, chunked, native)]
    c, n = chunked_run["speed"]["frames_per_s"], native_run["speed"]["frames_per_s"]
    return {
        "max_abs": max(s["max_abs"] for s in per_stream),
        "mean_abs": sum(s["mean_abs"] * s["frames"] for s in per_stream) / sum(s["frames"] for s in per_stream),
        "per_stream": per_stream,
        "speed_ratio": c / n if c and n else None,
        "chunked_frames_per_s": c, "native_frames_per_s": n,
        "chunked_peak_bytes": chunked_run["memory"]["peak_bytes"], "native_peak_bytes": native_run["memory"]["peak_bytes"],
        "memory_kind": chunked_run["memory"]["kind"],
    }


def ttt_vs_baseline(ttt_run: dict, base_run: dict) -> dict:
    """NLL difference (TTT − baseline; negative = TTT better) at the reported positions, per group."""
    out = {}
    for group, g in ttt_run["groups"].items():
        rows = []
        for a, b in zip(g["positions"], base_run["groups"][group]["positions"]):
            row = {"position": a["position"]}
            for kind in ("local", "cumulative"):
                if "nll" in a.get(kind, {}) and "nll" in b.get(kind, {}):
                    row[kind] = a[kind]["nll"] - b[kind]["nll"]
                else:
                    row[kind] = {"skipped": "missing in one of the runs"}
            rows.append(row)
        out[group] = rows
    return out


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


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def markdown(report: dict) -> str:
    """The human-readable report (tables + links to the PNG plots)."""
    runs: dict = report["runs"]
    out = [f"# {report['title']}", ""]
    out += [f"Created {report['created']} on {report['environment']['device']} "
            f"(torch {report['environment']['torch']}).", ""]
    out += ["## Setup", ""]
    for name, model in report["models"].items():
        patch = model.get("ttt")
        desc = ("no TTT layers" if patch is None else
                f"TTT {patch['layer_type']} {patch['mode']}, layers {patch['layers']}, b={patch['mini_batch_size']}")
        out.append(f"- **{name}**: {model['source']}; {desc}; {model['params']:,} parameters; "
                   f"attention context {model['attention_context'] or 'none'} frames")
    data = report["data"]
    counts = data["counts"]
    out.append(f"- data: {counts['streams']} stream(s), {counts['frames']:,} frames "
               f"({counts['frames'] / FRAME_RATE / 60:.1f} min); skipped files: {counts['files_skipped']}; "
               f"books filtered or unreadable: {counts['books_left_out']}")
    codes = data.get("codes")  # reports built by hand (tests) or by older versions have none
    if codes is not None:
        constant = codes["constant_streams"]
        out.append(f"- Mimi codes: {codes['distinct_min']}-{codes['distinct_max']} distinct values per codebook "
                   f"(min-max over streams and codebooks)" + (
                       f"; {len(constant)} stream(s) with a constant codebook: the codec carries no information"
                       if constant else ""))
    for name, a in report["alignment"].items():
        out.append(f"- {name}: chunk {a['chunk_size']} vs TTT mini-batch {a['mini_batch_size']}: "
                   f"{'aligned' if a['aligned'] else 'NOT aligned'}, TTT slot efficiency {a['efficiency']:.1%} "
                   f"({a['padding_slots']:,} padding slots); native mode: {a['native_efficiency']:.1%}")
    markers = report["markers"]
    out.append(f"- training window: {markers['train_window'] or 'not set'} frames; bins of "
               f"{report['settings']['bin_frames']} frames; NLL in nats per token, perplexity in brackets")
    out.append("")

    names = list(runs)
    groups = list(next(iter(runs.values()))["groups"])
    out += ["## NLL (perplexity) at positions", "",
            f"local = mean over the {report['settings']['position_window']} frames before the position; "
            "cumulative = mean over all frames before it. Averaged over the streams that reach the position.", ""]
    for group in groups:
        out += [f"### {runs[names[0]]['groups'][group]['label']}", ""]
        rows = []
        positions = runs[names[0]]["groups"][group]["positions"]
        for i, p in enumerate(positions):
            for kind in ("local", "cumulative"):
                row = [f"{p['position']:,}", kind]
                for n in names:
                    entry = runs[n]["groups"][group]["positions"][i]
                    row.append(_nll(entry.get(kind)) if "skipped" not in entry else "skipped")
                rows.append(row)
        out += _table(["frame", "window"] + names, rows) + [""]

    out += ["## Length generalisation", ""]
    first = runs[names[0]]["groups"][groups[0]]["length_gen"]
    if "skipped" in first:
        out += [f"Skipped: {first['skipped']}.", ""]
    else:
        out += [f"Perplexity of the first L frames (one stateful pass), L = 0.5x ... 10x the training window "
                f"({first['train_window']} frames); 'skipped' = no stream is that long.", ""]
        for group in groups:
            out += [f"### {runs[names[0]]['groups'][group]['label']}", ""]
            rows = []
            for i, p in enumerate(runs[names[0]]["groups"][group]["length_gen"]["points"]):
                row = [f"{p['length']:,}", f"{p['factor']:.2f}x"]
                for n in names:
                    entry = runs[n]["groups"][group]["length_gen"]["points"][i]
                    row.append(_nll(entry.get("cumulative")) if "skipped" not in entry else "skipped")
                rows.append(row)
            out += _table(["L (frames)", "L / window"] + names, rows) + [""]

    out += ["## Context use", "",
            "slope: NLL vs ln(position), nats per e-fold (negative = improves with context); gain: mean NLL of the "
            f"first minus the last {report['settings']['gain_window']} frames of each stream.", ""]
    rows = []
    for n in names:
        for group in groups:
            g = runs[n]["groups"][group]
            rows.append([n, group, _num(g["slope"].get("slope"), "+.4f"), _num(g["slope_beyond_window"].get("slope"), "+.4f"),
                         _num(g["context_gain"].get("gain"), "+.4f")])
    out += _table(["run", "group", "slope", "slope beyond window", "context gain"], rows) + [""]

    out += ["## Speed and memory", ""]
    rows = [[n, f"{r['speed']['frames']:,}", _num(r["speed"]["frames_per_s"], ".1f"),
             _num(r["speed"]["tokens_per_s"], ".0f"), _num(r["speed"]["realtime_factor"], ".1f") + "x",
             _bytes(r["memory"]["peak_bytes"]), r["memory"]["kind"]] for n, r in runs.items()]
    out += _table(["run", "frames", "frames/s", "tokens/s", "real time", "peak memory", "memory measure"], rows) + [""]

    comparisons = report.get("comparisons", {})
    if comparisons.get("modes"):
        out += ["## Chunked vs native", "",
                "Per-position NLL difference between the modes (the evaluator's self-check: float noise only).", ""]
        rows = [[m, f"{c['max_abs']:.2e}", f"{c['mean_abs']:.2e}", _num(c["speed_ratio"], ".1f") + "x",
                 _bytes(c["chunked_peak_bytes"]), _bytes(c["native_peak_bytes"])]
                for m, c in comparisons["modes"].items()]
        out += _table(["model", "max abs ΔNLL", "mean abs ΔNLL", "chunked / native speed", "chunked memory",
                       "native memory"], rows) + [""]
    if comparisons.get("ttt_vs_baseline"):
        out += ["## TTT − baseline", "", "NLL difference at each position (negative: TTT predicts better).", ""]
        rows = []
        for mode, per_group in comparisons["ttt_vs_baseline"].items():
            for group, points in per_group.items():
                for p in points:
                    rows.append([mode, group, f"{p['position']:,}",
                                 *(f"{p[k]:+.4f}" if isinstance(p[k], float) else "skipped" for k in ("local", "cumulative"))])
        out += _table(["mode", "group", "frame", "local", "cumulative"], rows) + [""]

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


def write_markdown(path: Path, report: dict) -> Path:
    write_text_atomic(path, markdown(report))
    return path
