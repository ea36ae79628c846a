"""What `eval librilight`'s report.json renders as: report.md, the terminal summary, wandb values; and the
pieces other probes' renderers share (tables, model lines, the length-generalisation tables).

A *run* is one model ("ttt" or "baseline") in one mode ("chunked" or "native") over all streams.
Missing data is never a number: an aggregate without data is {"skipped": reason}, shown as
"skipped" in Markdown, and report.json is written with `allow_nan=False` so a stray NaN fails.
"""
from __future__ import annotations

import datetime
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from ttt_speech import schema
from ttt_speech.data import FRAME_RATE

from . import metrics
from .memory import CPU_FLOOR, informative_peaks

FORMAT = "ttt-speech-eval"
VERSION = 1


def report_header(kind: str, title: str, config, device: torch.device) -> dict:
    """The fields every report starts with: format, kind, title, when, where (torch, device), config."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    return {"format": FORMAT, "version": VERSION, "kind": kind, "title": title,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "environment": {"torch": torch.__version__, "device": name}, "config": schema.to_dict(config)}


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


def table(header: list[str], rows: list[list[str]]) -> list[str]:
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


@dataclass(frozen=True)
class _View:
    """What every section of report.md reads: the runs, their column labels, the groups shown."""

    report: dict
    runs: dict
    labels: dict[str, str]  # run → column name (marked † when it scored a subset)
    groups: list[str]  # the groups shown
    group_label: dict[str, str]

    @property
    def names(self) -> list[str]:
        return list(self.runs)

    @property
    def settings(self) -> dict:
        return self.report["settings"]

    @property
    def measured(self) -> bool:
        """Whether peak memory rose above what the memory probe can see (else it is not shown)."""
        kind = next(iter(self.runs.values()))["memory"]["kind"]
        return informative_peaks([r["memory"]["peak_bytes"] for r in self.runs.values()], kind)


def markdown(report: dict) -> str:
    """The human-readable report (tables + links to the PNG plots)."""
    runs = report["runs"]
    view = _View(report, runs, run_labels(runs), shown_groups(report),
                 {g: v["label"] for g, v in next(iter(runs.values()))["groups"].items()})
    out = [f"# {report['title']}", "",
           f"Created {report['created']} on {report['environment']['device']} (torch {report['environment']['torch']}).",
           ""]
    for section in (_setup, _positions, _length_generalisation, _context_use, _speed, _modes, _inner_loop,
                    _vs_baseline, _plots, _left_out):
        out += section(view)
    return "\n".join(out)


def _setup(v: _View) -> list[str]:
    out = ["## Setup", ""]
    out += [model_line(name, model) for name, model in v.report["models"].items()]
    data = v.report["data"]
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
        out.append(f"- {v.group_label.get(group, group)}: left out of every table and plot: {why}")
    for name, run in v.runs.items():
        if (note := subset_note(run)) is not None:
            out.append(f"- {v.labels[name]} scored {note}; its numbers are over those only (the chunked vs native "
                       "section compares the modes on the same frames)")
    for name, a in v.report["alignment"].items():
        out.append(f"- {name}: chunk {a['chunk_size']} vs TTT mini-batch {a['mini_batch_size']}: "
                   f"{'aligned' if a['aligned'] else 'NOT aligned'}, TTT slot efficiency {a['efficiency']:.1%} "
                   f"({a['padding_slots']:,} padding slots); native mode: {a['native_efficiency']:.1%}")
    out.append(f"- training window: {v.report['markers']['train_window'] or 'not set'} frames; bins of "
               f"{v.settings['bin_frames']} frames; NLL in nats per token, perplexity in brackets; "
               "[n] = streams averaged, shown where runs differ")
    return out + [""]


def model_line(name: str, model: dict) -> str:
    """A report's line about one model (`EvalModel.describe()`; `chunk_size` where the probe records it)."""
    patch = model.get("ttt")
    desc = ("no TTT layers" if patch is None else
            f"TTT {patch['layer_type']} {patch['mode']}, layers {patch['layers']}, b={patch['mini_batch_size']}")
    if (loop := model.get("inner_loop")) is not None:
        desc += (f", run with b={loop['effective_mini_batch_size']}, base_lr {loop['effective_base_lr']:.4g} "
                 f"(scale {loop['scale'] or 'none'}, offsets {loop['offsets']})")
    chunks = f"chunks of {model['chunk_size']} frames; " if "chunk_size" in model else ""
    return (f"- **{name}**: {model['source']}; {desc}; {model['params']:,} parameters; {chunks}"
            f"attention context {model['attention_context'] or 'none'} frames")


def _positions(v: _View) -> list[str]:
    out = ["## NLL (perplexity) at positions", "",
           f"local = mean over the {v.settings['position_window']} frames before the position; "
           "cumulative = mean over all frames before it. Averaged over the streams that reach the position.", ""]
    if not v.groups:
        return out
    reached, unreached = _reached([v.runs[n]["groups"][v.groups[0]]["positions"] for n in v.names], "position")
    if unreached:
        out += [f"Not reached by any stream (left out): position(s) {', '.join(f'{p:,}' for p in unreached)}.", ""]
    for group in v.groups if reached else []:
        rows = []
        for i in reached:
            entries = [v.runs[n]["groups"][group]["positions"][i] for n in v.names]
            rows += [[f"{entries[0]['position']:,}", kind, *_cells(entries, kind)] for kind in ("local", "cumulative")]
        out += [f"### {v.group_label[group]}", ""] + table(["frame", "window"] + [v.labels[n] for n in v.names],
                                                           rows) + [""]
    return out


def _length_generalisation(v: _View) -> list[str]:
    out = ["## Length generalisation", ""]
    first = v.runs[v.names[0]]["groups"][v.groups[0]]["length_gen"] if v.groups else {
        "skipped": "no group carries information"}
    if "skipped" in first:
        return out + [f"Not reported: {first['skipped']}.", ""]
    lg = v.settings["length_gen"]
    out += [f"Perplexity of the first L frames (one stateful pass), L = {lg['min_factor']:g}x ... "
            f"{lg['max_factor']:g}x the training window ({first['train_window']} frames).", ""]
    entries = {v.labels[n]: {g: run["groups"][g]["length_gen"] for g in v.groups} for n, run in v.runs.items()}
    longest = max(st["frames"] for st in v.report["data"]["streams"]) if v.report["data"].get("streams") else 0
    return out + length_tables(entries, {g: v.group_label[g] for g in v.groups}, longest)


def length_tables(entries: dict[str, dict[str, dict]], groups: dict[str, str], longest: int,
                  unit: str = "frames") -> list[str]:
    """Markdown of length generalisation ({column: {group: {"points": `metrics.length_points`, "figures":
    `metrics.length_figures`}}}, `groups`: {group: label} to show; `longest`: frames of the longest
    stream): what lengths no stream reaches, then per group the perplexity at each reached length and
    the figures (1x / 5x / 10x, degradation ratio, best length)."""
    columns = list(entries)
    points = {c: {g: e["points"] for g, e in per_group.items()} for c, per_group in entries.items()}
    reached, unreached = _reached([points[c][next(iter(groups))] for c in columns], "length") if groups else ([], [])
    out = []
    if unreached:
        some = points[columns[0]][next(iter(groups))]
        out += [f"{len(unreached)} of {len(some)} lengths ({frame_span(unreached)} {unit}) are longer than every "
                f"stream (the longest: {longest:,} {unit}) and left out.", ""]
    for group, label in groups.items() if reached else []:
        rows = []
        for i in reached:
            at = [points[c][group][i] for c in columns]
            rows.append([f"{at[0]['length']:,}", f"{at[0]['factor']:.2f}x", *_cells(at, "cumulative")])
        out += [f"### {label}", ""] + table([f"L ({unit})", "L / window"] + columns, rows) + [""]
        figures = {c: entries[c][group]["figures"] for c in columns}
        factors = list(next(iter(figures.values()))["ppl_at"])
        out += table(["run", *(f"ppl @{f}" for f in factors), "max / min ppl", "best L"],
                     [[c, *(ppl_at(f["ppl_at"][k]) for k in factors), ratio(f["degradation_ratio"]),
                       best(f["best"])] for c, f in figures.items()])
        out += ["", "ppl @Nx: interpolated (log-log) between the grid's lengths where marked ~; "
                "max / min: the degradation ratio over the lengths reached.", ""]
    return out


def ppl_at(entry: dict) -> str:
    """A length figure's perplexity: ~ where interpolated, "not reached" where skipped."""
    if "ppl" not in entry:
        return "not reached"
    return ("~" if entry["interpolated"] else "") + f"{entry['ppl']:.3f}"


def ratio(value: float | dict) -> str:
    """The degradation ratio, or "—" where it was skipped ({"skipped": why}: fewer than 2 lengths reached)."""
    return "—" if isinstance(value, dict) else _num(value, ".3f")


def best(value: dict) -> str:
    """The best length of the length figures, "—" where skipped."""
    return "—" if "skipped" in value else f"{value['length']:,} ({value['factor']:.2f}x, ppl {value['ppl']:.3f})"


def _context_use(v: _View) -> list[str]:
    out = ["## Context use", "",
           "slope: NLL vs ln(position), nats per e-fold (negative = improves with context); gain: mean NLL of the "
           f"first minus the last {v.settings['gain_window']} frames of each stream.", ""]
    rows = []
    for n in v.names:
        for group in v.groups:
            g = v.runs[n]["groups"][group]
            rows.append([v.labels[n], group, _num(g["slope"].get("slope"), "+.4f"),
                         _num(g["slope_beyond_window"].get("slope"), "+.4f"), _num(g["context_gain"].get("gain"), "+.4f")])
    return out + table(["run", "group", "slope", "slope beyond window", "context gain"], rows) + [""]


def _speed(v: _View) -> list[str]:
    kind = next(iter(v.runs.values()))["memory"]["kind"]
    rows = [[v.labels[n], f"{r['speed']['frames']:,}", _num(r["speed"]["frames_per_s"], ".1f"),
             _num(r["speed"]["tokens_per_s"], ".0f"), _num(r["speed"]["realtime_factor"], ".1f") + "x"]
            + ([_bytes(r["memory"]["peak_bytes"])] if v.measured else []) for n, r in v.runs.items()]
    out = ["## Speed and memory", ""]
    out += table(["run", "frames", "frames/s", "tokens/s", "real time"] + (["peak memory"] if v.measured else []), rows)
    return out + ["", f"Peak memory measured as {kind}." if v.measured else
                  f"Peak memory: not shown, none rose above {CPU_FLOOR // 2**20} MiB ({kind}: the process's resident "
                  "memory sampled every 5 ms, too coarse for small models); measure on CUDA, or with "
                  "scripts/bench_eval.py in fresh processes.", ""]


def _modes(v: _View) -> list[str]:
    modes = v.report.get("comparisons", {}).get("modes")
    if not modes:
        return []
    out = ["## Chunked vs native", "",
           "Both modes on the same streams and frames: mean NLL of each (over the groups shown), and the "
           "per-position difference over every row (the evaluator's self-check: float noise only).", ""]
    rows = []
    for m, c in modes.items():
        shared = c.get("shared", {})
        rows.append([m, f"{shared.get('streams', '—')} / {shared.get('frames', 0):,}",
                     _num(shared.get("chunked_nll"), ".4f"), _num(shared.get("native_nll"), ".4f"),
                     f"{c['max_abs']:.2e}", f"{c['mean_abs']:.2e}", _num(c["speed_ratio"], ".1f") + "x"]
                    + ([_bytes(c["chunked_peak_bytes"]), _bytes(c["native_peak_bytes"])] if v.measured else []))
    return out + table(["model", "streams / frames", "chunked NLL", "native NLL", "max abs ΔNLL", "mean abs ΔNLL",
                        "chunked / native speed"] + (["chunked memory", "native memory"] if v.measured else []),
                       rows) + [""]


def _inner_loop(v: _View) -> list[str]:
    grid = v.report.get("comparisons", {}).get("inner_loop")
    return inner_loop_markdown(grid, v.labels, v.groups, v.group_label, v.measured) if grid else []


def _vs_baseline(v: _View) -> list[str]:
    differences = v.report.get("comparisons", {}).get("vs_baseline")
    if not differences:
        return []
    rows = []
    for model, per_mode in differences.items():
        for mode, diff in per_mode.items():
            subset = v.labels.get(f"{model}/{mode}", "").endswith("†")  # as in the other tables
            rows += [[model + "†" * subset, mode, group, f"{p['position']:,}",
                      *(f"{p[k]:+.4f}" if isinstance(p[k], float) else "—" for k in ("local", "cumulative"))]
                     for group in v.groups for p in diff["positions"][group]
                     if any(isinstance(p[k], float) for k in ("local", "cumulative"))]
    return ["## Model − baseline", "",
            "NLL difference at each position, the same streams in both (negative: the model predicts better).", ""] + \
        table(["model", "mode", "group", "frame", "local", "cumulative"], rows) + [""]


def _plots(v: _View) -> list[str]:
    plots = v.report.get("plots")
    return ["## Plots", ""] + [f"![{name}]({file})" for name, file in plots.items()] + [""] if plots else []


def _left_out(v: _View) -> list[str]:
    data = v.report["data"]
    out = ["## Left out", ""] + (["Nothing.", ""] if not data["skipped_files"] and not data["left_out_books"] else [])
    out += [f"- file `{s['path']}`: {s['reason']}" for s in data["skipped_files"]]
    return out + [f"- book `{s['path']}`: {s['reason']}" for s in data["left_out_books"]] + [""]


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
    out += table(["run", "b", "base_lr", "scale", "offsets", "chunk", "slot efficiency", "frames/s"]
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
    return out + table(header, rows) + [""]


# ---------------------------------------------------------------- terminal and wandb


def summary_lines(report: dict) -> list[str]:
    """A few lines for the terminal: cumulative NLL at each reached position, per run and informative
    group, the length-generalisation figures, and chunked vs native."""
    lines = []
    groups = shown_groups(report)
    for name, run in report["runs"].items():
        speed = run["speed"]
        note = subset_note(run)
        lines.append(f"{name}: {speed['frames']:,} frames at {speed['frames_per_s']:.1f} frames/s"
                     + (f", scored on {note}" if note else ""))
        for group in groups:
            g = run["groups"][group]
            cells = [f"@{p['position']}: {p['cumulative']['nll']:.3f}" for p in g["positions"]
                     if "nll" in p.get("cumulative", {})]
            lines.append(f"  {group:8s} " + ("  ".join(cells) or "no stream reaches a reported position"))
            if "figures" in g["length_gen"]:
                lines.append(f"  {'':8s} {length_figures_line(g['length_gen']['figures'])}")
    for group, why in report["data"].get("uninformative", {}).items():
        lines.append(f"{group}: left out ({why})")
    for model, c in report["comparisons"].get("modes", {}).items():
        shared = c["shared"]
        lines.append(f"{model}: chunked vs native on the same {shared['frames']:,} frames: NLL {shared['chunked_nll']:.4f}"
                     f" vs {shared['native_nll']:.4f}, max |dNLL| {c['max_abs']:.2e}; chunked {c['speed_ratio']:.1f}x faster")
    return lines


def length_figures_line(figures: dict) -> str:
    """`metrics.length_figures` in one line: "ppl @1x ~7.45, @5x 9.1, @10x not reached; max/min 1.31; best L 880"."""
    cells = [f"@{k} {ppl_at(e)}" for k, e in figures["ppl_at"].items()]
    best = figures["best"]
    return (f"ppl {', '.join(cells)}; max/min {ratio(figures['degradation_ratio'])}; best L "
            + ("—" if "skipped" in best else f"{best['length']:,} ({best['factor']:.2f}x)"))


def scalars(report_runs: dict[str, dict], prefix: str = "eval", left_out: Sequence[str] = ()) -> dict[str, float]:
    """Flat {"<prefix>/<run>/<group>/<kind>_nll@<frame>": value, ...} of every reported number (skipped
    ones and the `left_out` groups, which carry no information, are not logged)."""
    out: dict[str, float] = {}
    for run, r in report_runs.items():
        key = f"{prefix}/{run}"
        speed = r.get("speed") or {}
        for name in ("frames_per_s", "tokens_per_s"):
            if speed.get(name) is not None:
                out[f"{key}/{name}"] = speed[name]
        memory = r.get("memory") or {}
        if informative_peaks([memory.get("peak_bytes")], memory.get("kind", "")):  # as the report shows it
            out[f"{key}/peak_memory_mib"] = memory["peak_bytes"] / 2**20
        for group, g in r["groups"].items():
            if group in left_out:
                continue
            for p in g.get("positions", []):
                for kind in ("local", "cumulative"):
                    if "nll" in p.get(kind, {}):
                        out[f"{key}/{group}/{kind}_nll@{p['position']}"] = p[kind]["nll"]
            out.update(length_scalars(g.get("length_gen", {}), f"{key}/{group}"))
            for name, field in (("slope", "slope"), ("slope_beyond_window", "slope"), ("context_gain", "gain")):
                if field in g.get(name, {}):
                    out[f"{key}/{group}/{name}"] = g[name][field]
    return out


def length_scalars(length_gen: dict, key: str) -> dict[str, float]:
    """wandb values of one group's length generalisation ({"points", "figures"}): ppl at each reached
    grid length, at 1x / 5x / 10x, the degradation ratio and the best length."""
    out = {f"{key}/ppl@{p['factor']:.2f}x": p["cumulative"]["ppl"] for p in length_gen.get("points", [])
           if "nll" in p.get("cumulative", {})}
    figures = length_gen.get("figures", {})
    out.update({f"{key}/ppl_at_{k}": e["ppl"] for k, e in figures.get("ppl_at", {}).items() if "ppl" in e})
    if isinstance(figures.get("degradation_ratio"), float):
        out[f"{key}/degradation_ratio"] = figures["degradation_ratio"]
    if "length" in figures.get("best", {}):
        out[f"{key}/best_length"] = figures["best"]["length"]
    return out


def length_gen_table(report_runs: dict[str, dict], left_out: Sequence[str] = ()) -> tuple[list[str], list[list]]:
    """The wandb table of every run's length-generalisation points (columns, rows)."""
    rows = [[name, group, p["length"], p["factor"], p["cumulative"]["nll"], p["cumulative"]["ppl"],
             p["cumulative"]["n_streams"]]
            for name, r in report_runs.items() for group, g in r["groups"].items() if group not in left_out
            for p in g.get("length_gen", {}).get("points", []) if "nll" in p.get("cumulative", {})]
    return ["run", "group", "length", "factor", "nll", "ppl", "streams"], rows
