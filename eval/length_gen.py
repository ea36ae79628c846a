"""Length generalisation: perplexity at 0.5x … 10x the training window, one stateful pass per stream.

`length_generalisation(lm, streams, train_window)` is the entry point for the fine-tuning loop
(after training) and for `ttt-speech eval length-gen`. Each stream is scored once in chunked mode
up to the longest evaluation length; the perplexity at length L is the mean NLL over its first
L frames (exactly what evaluating a stream of length L would give: the model is causal), over
the streams that are at least L frames long. Lengths no stream reaches are skipped entries of the
result, which the reports list once.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

from torch import Tensor

from ttt_speech.files import write_text_atomic
from ttt_speech.config import resolve_chunk_size
from ttt_speech.handle import TTTModel

from . import metrics
from .nll import chunked_nll
from .report import frame_span

OUTPUTS = {"json": "length_gen.json", "markdown": "length_gen.md", "png": "length_gen.png"}  # `write_length_gen`'s


def length_generalisation(lm, streams: Sequence[Tensor] | Mapping[str, Tensor], train_window: int, *,
                          chunk_size: int | None = None, num_lengths: int = 20, min_factor: float = 0.5,
                          max_factor: float = 10.0, max_frames: int | None = None, window: int | None = None,
                          progress: bool = False, model_name: str | None = None) -> dict:
    """Perplexity of `lm` at `num_lengths` lengths from min_factor to max_factor × `train_window`.

    streams: codes [K, T] in Moshi's layout (`ttt_speech.data.layout.moshi_streams`), a list or a
    {name: codes} mapping. max_frames caps the evaluated length (default: the longest length).
    window: frames of the "local" NLL before each length (default: half the shortest length).
    model_name: named with the stream in error messages (a NaN names the model and the stream).
    Returns a JSON-ready dict: {"train_window", "chunk_size", "lengths", "streams": [{id, frames}],
    "groups": {group: {"label", "points": [{"length", "factor", "local", "cumulative"} or
    {"length", "factor", "skipped"}]}}, "uninformative": {group: why} (`metrics.uninformative_groups`),
    "speed"}.
    """
    if train_window < 1:
        raise ValueError(f"train_window: expected a positive number of frames, got {train_window}")
    items = list(streams.items()) if isinstance(streams, Mapping) else [(f"stream {i}", s) for i, s in enumerate(streams)]
    if not items:
        raise ValueError("length_generalisation: no streams")
    lengths = metrics.evaluation_lengths(train_window, num_lengths, min_factor, max_factor)
    cap = min(max_frames or lengths[-1], lengths[-1])
    handle = TTTModel.find(lm)
    chunk = resolve_chunk_size(chunk_size, handle.config if handle else None, "eval.chunk_size")
    window = window or max(1, lengths[0] // 2)
    prefix = f"{model_name}: " if model_name else ""
    results = [chunked_nll(lm, codes[:, :cap], chunk, where=prefix + name, progress=progress) for name, codes in items]
    series = [metrics.group_series(r) for r in results]
    groups = {}
    for group in series[0]:
        s = [x[group] for x in series]
        groups[group] = {"label": metrics.group_label(group),
                         "points": metrics.length_points(s, lengths, train_window, window)}
    frames = sum(r.frames for r in results)
    seconds = sum(r.seconds for r in results)
    return {"train_window": train_window, "chunk_size": chunk, "window": window, "lengths": lengths,
            "streams": [{"id": name, "frames": r.frames} for (name, _), r in zip(items, results)],
            "groups": groups, "uninformative": metrics.uninformative_groups([c for _, c in items], results[0].nll.shape[0]),
            "speed": {"frames": frames, "seconds": seconds,
                                        "frames_per_s": frames / seconds if seconds else None}}


def shown_groups(result: dict) -> dict[str, str]:
    """{group: label} of a result's groups that carry information (`metrics.shown_groups`)."""
    return metrics.shown_groups(result["groups"], result.get("uninformative", {}))


def _reached(result: dict) -> list[dict]:
    """The points some stream reaches (a stream at least L frames long)."""
    return [p for p in next(iter(result["groups"].values()))["points"] if "skipped" not in p]


def markdown(results: dict[str, dict]) -> str:
    """Markdown table(s) of one or more `length_generalisation` results ({run name: result})."""
    names = list(results)
    first = results[names[0]]
    reached = {p["length"] for n in names for p in _reached(results[n])}
    longest = max(s["frames"] for n in names for s in results[n]["streams"])
    out = ["# Length generalisation", "",
           f"Perplexity (cumulative NLL, streams averaged) of the first L frames, one stateful chunked pass per "
           f"stream; training window {first['train_window']} frames.", ""]
    unreached = [L for L in first["lengths"] if L not in reached]
    if unreached:
        out += [f"{len(unreached)} of {len(first['lengths'])} lengths ({frame_span(unreached)} frames) are "
                f"longer than every stream (the longest: {longest:,} frames) and left out.", ""]
    for group, why in first.get("uninformative", {}).items():
        out += [f"{first['groups'][group]['label']}: left out ({why}).", ""]
    for group, label in (shown_groups(first) if reached else {}).items():  # no table without a row
        out += [f"## {label}", "", "| L (frames) | L / window | " + " | ".join(names) + " |",
                "|---|---|" + "---|" * len(names)]
        for i, p in enumerate(first["groups"][group]["points"]):
            if p["length"] not in reached:
                continue
            cells = []
            for n in names:
                c = results[n]["groups"][group]["points"][i].get("cumulative", {})
                cells.append(f"{c['ppl']:.3f} ({c['nll']:.3f}, {c['n_streams']})" if "nll" in c else "—")
            out.append(f"| {p['length']:,} | {p['factor']:.2f}x | " + " | ".join(cells) + " |")
        out.append("")
    for n in names:
        out.append(f"- {n}: streams " + ", ".join(f"{s['id']} ({s['frames']:,} frames)" for s in results[n]["streams"]))
    return "\n".join(out) + "\n"


def summary_lines(results: dict[str, dict]) -> list[str]:
    """For the terminal: per run and informative group, the perplexity at the training window (or the
    nearest reached length) and at the longest reached length."""
    lines = []
    for name, r in results.items():
        reached = _reached(r)
        if not reached:
            lines.append(f"{name}: no stream reaches {r['lengths'][0]:,} frames")
            continue
        near = min(reached, key=lambda p: abs(math.log(p["factor"])))
        far = reached[-1]
        cells = []
        for group in shown_groups(r):
            points = {p["length"]: p for p in r["groups"][group]["points"]}
            cells.append(f"{group} {points[near['length']]['cumulative']['ppl']:.2f} -> "
                         f"{points[far['length']]['cumulative']['ppl']:.2f}")
        lines.append(f"{name}: perplexity at L = {near['factor']:.2f}x -> {far['factor']:.2f}x the window "
                     f"({near['length']:,} -> {far['length']:,} frames): " + ", ".join(cells))
        if len(reached) < len(r["lengths"]):
            lines.append(f"  {len(r['lengths']) - len(reached)} longer length(s) left out: no stream reaches them")
    return lines


def write_length_gen(results: dict[str, dict], output_dir: str | Path, wandb_run=None) -> dict[str, Path]:
    """length_gen.json / .md / .png for {run name: result} into output_dir (atomic); optional wandb
    (keys under `length_gen/`, so that a training run's own keys stay apart)."""
    import json

    from .plots import plot_length_gen

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    first = next(iter(results.values()))
    paths = {kind: output_dir / name for kind, name in OUTPUTS.items()}
    write_text_atomic(paths["json"], json.dumps(results, indent=1, allow_nan=False) + "\n")
    write_text_atomic(paths["markdown"], markdown(results))
    labels = shown_groups(first)
    points = {n: {g: r["groups"][g]["points"] for g in labels} for n, r in results.items()}
    notes = [f"{first['groups'][g]['label']} left out: {why}" for g, why in first.get("uninformative", {}).items()]
    if labels:
        plot_length_gen(points, labels, first["train_window"], paths["png"], notes=notes)
    else:
        del paths["png"]
    if wandb_run is not None:
        from .tracking import log_results

        runs = {n: {"groups": {g: {"length_gen": {"points": v["points"]}} for g, v in r["groups"].items()}}
                for n, r in results.items()}
        log_results(wandb_run, runs, {"length_gen": paths["png"]} if "png" in paths else {}, [paths["json"]],
                    prefix="length_gen", left_out=list(first.get("uninformative", {})))
    return paths
