"""The demo's comparison: TTT vs baseline beyond the attention window, chunked vs native; text renderings.

`comparison` turns the evaluation report (and its per-position NLLs) into one JSON-ready summary;
`render_terminal` and `render_markdown` show it. Missing data is never a number: a range no stream
reaches is "skipped".
"""
from __future__ import annotations

import datetime
import math
from pathlib import Path

from ttt_speech.data import FRAME_RATE
from ttt_speech_apps.eval import metrics
from ttt_speech_apps.eval.memory import CPU_FLOOR, informative_peaks
from ttt_speech_apps.eval.report import read_per_position



def range_edges(context: int | None, window: int | None, frames: int) -> list[int]:
    """[0, attention context, training window, 4x, 16x, ..., frames]: where memory beyond attention starts to count."""
    edges = [0] + [e for e in (context, window) if e]
    step = window or context or max(1, frames // 4)
    edge = 4 * step
    while edge < frames:
        edges.append(edge)
        edge *= 4
    edges.append(frames)
    return sorted({e for e in edges if 0 <= e <= frames})


def _series(per_position: dict, run: str) -> dict[str, list]:
    streams = [metrics.series_by_group(nll, mask) for nll, mask in per_position[run]]
    return {g: [s[g] for s in streams] for g in streams[0]}


def comparison(report: dict, config, eval_paths: dict[str, Path], train_seconds: dict[str, float],
               timings: dict[str, float], audio: dict) -> dict:
    """The demo summary (demo.json) from the evaluation report of the TTT model and the baseline."""
    per_position = read_per_position(eval_paths["per_position"])
    models = report["models"]
    context = models["baseline"]["attention_context"]
    window = config.train.data.window_frames
    frames = max(s["frames"] for s in report["data"]["streams"])
    edges = range_edges(context, window, frames)
    ttt, base = _series(per_position, "ttt/chunked"), _series(per_position, "baseline/chunked")
    table = {}
    groups = metrics.shown_groups(report["runs"]["ttt/chunked"]["groups"], report["data"].get("uninformative", {}))
    for group in groups:
        rows = []
        for lo, hi in zip(edges[:-1], edges[1:]):
            a, b = metrics.range_nll(ttt[group], lo, hi), metrics.range_nll(base[group], lo, hi)
            row = {"start": lo, "stop": hi, "ttt": a.get("nll"), "baseline": b.get("nll")}
            if row["ttt"] is None or row["baseline"] is None:
                row = {"start": lo, "stop": hi, "skipped": a.get("skipped") or b.get("skipped")}
            else:
                row["diff"] = row["ttt"] - row["baseline"]
            rows.append(row)
        table[group] = rows
    late = table["cb1"][-1]
    modes = {}
    for name, c in report["comparisons"].get("modes", {}).items():
        native = report["runs"][f"{name}/native"]
        modes[name] = {"max_abs": c["max_abs"], "mean_abs": c["mean_abs"], "speed_ratio": c["speed_ratio"],
                       "chunked_frames_per_s": c["chunked_frames_per_s"], "native_frames_per_s": c["native_frames_per_s"],
                       "chunked_peak_bytes": c["chunked_peak_bytes"], "native_peak_bytes": c["native_peak_bytes"],
                       "memory_kind": c["memory_kind"], "native_streams": native["streams"],
                       "native_frames": native["speed"]["frames"]}
    inner_loop = inner_loop_rows(report, per_position, late)
    train = config.train
    return {
        "title": "ttt-speech demo: TTT vs sliding-window attention on held-out long streams",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "environment": report["environment"],
        "setup": {
            "corpus": {"train_recordings": config.corpus.recordings - config.corpus.eval_recordings,
                       "frames": config.corpus.frames, "length_jitter": config.corpus.length_jitter,
                       "eval_streams": len(report["data"]["streams"]), "eval_frames": frames,
                       "card": config.corpus.card, "vocab": config.corpus.vocab,
                       "repeat_prob": config.corpus.repeat_prob, "seed": config.corpus.seed},
            "models": {n: {"params": m["params"], "attention_context": m["attention_context"], "ttt": m["ttt"]}
                       for n, m in models.items()},
            "training": {"steps": train.steps, "batch_size": train.data.batch_size, "window_frames": window,
                         "frames_per_model": train.steps * train.data.batch_size * window,
                         "persistent_state": train.persistent_state, "seed": train.seed,
                         "seconds": train_seconds, "parallel": config.parallel},
        },
        "nll": table,
        "group_labels": groups,
        "late": {"group": "cb1", **late, "ttt_better": "diff" in late and late["diff"] < 0},
        "modes": modes,
        "inner_loop": inner_loop,
        "curves": {name: report["runs"][f"{name}/chunked"]["groups"]["cb1"]["curve"] for name in ("ttt", "baseline")},
        "eval_report": str(eval_paths["markdown"]),
        "plots": {k: str(v) for k, v in eval_paths.items() if str(v).endswith(".png")},
        "audio": audio,
        "timings": timings,
    }


def inner_loop_rows(report: dict, per_position: dict, late: dict) -> list[dict]:
    """The TTT model under each `eval.inner_loop` variant (chunked runs: every stream, every frame):
    its inner loop, the codebook-1 NLL over the late range of the TTT vs baseline table, and the
    difference to the model as trained."""
    grid = report["comparisons"].get("inner_loop", {})
    rows = []
    for name, r in grid.items():
        if r["mode"] != "chunked" or "skipped" in late:
            continue
        nll = metrics.range_nll(_series(per_position, name)["cb1"], late["start"], late["stop"]).get("nll")
        rows.append({"run": name, "mini_batch_size": r["mini_batch_size"], "base_lr": r["base_lr"],
                     "scale": r["scale"], "offsets": r["offsets"], "nll": nll, "distance": r["distance_final"],
                     "frames_per_s": r["frames_per_s"], "start": late["start"], "stop": late["stop"]})
    trained = next((r["nll"] for r in rows if r["run"] == "ttt/chunked"), None)
    for r in rows:
        r["vs_trained"] = r["nll"] - trained if r["nll"] is not None and trained is not None else None
    return rows if len(rows) > 1 else []


def inner_loop_table(summary: dict) -> tuple[list[str], list[list[str]]]:
    rows = [[r["run"], str(r["mini_batch_size"]), f"{r['base_lr']:.4g}", r["scale"] or "-", _f(r["nll"], ".4f"),
             _f(r["vs_trained"], "+.4f"), _f(r["distance"], ".3g"), _f(r["frames_per_s"], ".0f")]
            for r in summary["inner_loop"]]
    first = summary["inner_loop"][0]
    return (["run", "b", "base_lr", "scale", f"cb1 NLL {first['start']:,}-{first['stop']:,}", "vs trained",
             "|W - W0|", "frames/s"], rows)


def audio_summary(audio: dict) -> dict:
    """The audio path's few numbers (or why it was skipped)."""
    if "skipped" in audio:
        return audio
    report = audio["report"]
    counts = report["data"]["counts"]
    mode = report["comparisons"].get("modes", {}).get("ttt", {})
    return {"books": counts["streams"], "frames": counts["frames"], "files_skipped": counts["files_skipped"],
            "skipped_files": [s["path"] for s in report["data"]["skipped_files"]],
            "max_abs": mode.get("max_abs"), "report": audio["paths"]["markdown"],
            "distinct_codes": [report["data"]["codes"]["distinct_min"], report["data"]["codes"]["distinct_max"]]}


# ---------------------------------------------------------------- rendering


def _f(value, fmt: str) -> str:
    return "-" if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, fmt)


def _mib(n) -> str:
    return "-" if n is None else f"{n / 2**20:.0f} MiB"


def _range(row: dict, context: int | None) -> str:
    label = f"{row['start']:,}-{row['stop']:,}"
    return label + (" (in attention)" if context and row["stop"] <= context else "")


def nll_rows(summary: dict) -> list[list[str]]:
    context = summary["setup"]["models"]["baseline"]["attention_context"]
    rows = []
    for group, label in summary["group_labels"].items():
        for i, row in enumerate(summary["nll"][group]):
            name = label if i == 0 else ""
            if "skipped" in row:
                rows.append([name, _range(row, context), "skipped", "skipped", row["skipped"]])
            else:
                rows.append([name, _range(row, context), f"{row['ttt']:.3f}", f"{row['baseline']:.3f}",
                             f"{row['diff']:+.3f}"])
    return rows


def memory_measured(summary: dict) -> bool:
    """Whether the modes' peak memory figures say something (`informative_peaks`)."""
    modes = summary["modes"].values()
    return informative_peaks([m[k] for m in modes for k in ("chunked_peak_bytes", "native_peak_bytes")],
                             next(iter(modes))["memory_kind"])


def mode_table(summary: dict) -> tuple[list[str], list[list[str]], str]:
    """Header, rows and the memory note of the chunked vs native table (memory columns only when measured)."""
    measured = memory_measured(summary)
    header = MODE_HEADER + (["chunked memory", "native memory"] if measured else [])
    rows = [[name, f"{m['native_streams']} x {m['native_frames'] // max(m['native_streams'], 1):,}",
             f"{m['max_abs']:.1e}", _f(m["chunked_frames_per_s"], ".0f"), _f(m["native_frames_per_s"], ".0f"),
             _f(m["speed_ratio"], ".1f") + "x"] + ([_mib(m["chunked_peak_bytes"]), _mib(m["native_peak_bytes"])]
                                                  if measured else [])
            for name, m in summary["modes"].items()]
    kind = next(iter(summary["modes"].values()))["memory_kind"]
    note = (MEMORY_NOTE.get(kind, f"memory: {kind}") if measured else
            f"memory: not shown, no mode rose above {CPU_FLOOR // 2**20} MiB ({kind}: too coarse for tiny models)")
    return header, rows, note


NLL_HEADER = ["stream", "frames", "TTT", "baseline", "TTT - baseline"]
MODE_HEADER = ["model", "native streams x frames", "max |dNLL|", "chunked frames/s", "native frames/s",
               "chunked/native"]
MEMORY_NOTE = {"cpu_rss_sampled": "memory: growth of the process's resident memory over the run, sampled every 5 ms "
                                  "(coarse on CPU)",
               "cuda_allocated": "memory: peak CUDA memory allocated above the start of the run"}


def _text_table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return [line(header), "  ".join("-" * w for w in widths)] + [line(r) for r in rows]


def ascii_plot(curves: dict[str, list[dict]], height: int = 9, width: int = 64) -> list[str]:
    """Binned cb1 NLL of both models as characters: T = TTT, b = baseline, * = both."""
    series = {name: [(c["start"], c["nll"]) for c in curve] for name, curve in curves.items()}
    values = [v for s in series.values() for _, v in s]
    if not values:
        return ["(no curve)"]
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    n = max(len(s) for s in series.values())
    step = max(1, math.ceil(n / width))
    cols = math.ceil(n / step)
    grid = [[" "] * cols for _ in range(height)]
    for name, mark in (("baseline", "b"), ("ttt", "T")):
        pts = series.get(name, [])
        for c in range(cols):
            chunk = [v for _, v in pts[c * step:(c + 1) * step]]
            if not chunk:
                continue
            r = round((hi - sum(chunk) / len(chunk)) / span * (height - 1))
            grid[r][c] = "*" if grid[r][c] not in (" ", mark) else mark
    last = max(c[-1]["stop"] for c in curves.values() if c)
    lines = [f"{hi - r * span / (height - 1):6.2f} |" + "".join(row) for r, row in enumerate(grid)]
    axis = f"frame 0{' ' * max(1, cols - len(f'{last:,}') - 7)}{last:,}"
    return lines + ["       +" + "-" * cols, "        " + axis]


def render_terminal(summary: dict) -> str:
    s = summary["setup"]
    corpus, training = s["corpus"], s["training"]
    context = s["models"]["baseline"]["attention_context"]
    late = summary["late"]
    lines = [f"== {summary['title']} ==",
             f"{corpus['eval_streams']} held-out streams of {corpus['eval_frames']:,} frames "
             f"({corpus['eval_frames'] / FRAME_RATE:.0f} s, {corpus['eval_frames'] // training['window_frames']}x the "
             f"{training['window_frames']}-frame training window); attention sees {context} frames; "
             f"NLL in nats per token, chunked mode", ""]
    lines += _text_table(NLL_HEADER, nll_rows(summary)) + [""]
    if "diff" in late:
        verdict = ("TTT is better" if late["ttt_better"] else "TTT is NOT better: look into it")
        lines.append(f"codebook 1 at frames {late['start']:,}-{late['stop']:,}: TTT {late['ttt']:.3f} vs baseline "
                     f"{late['baseline']:.3f} nats ({late['diff']:+.3f}): {verdict}")
    lines += ["", "codebook-1 NLL vs position (chunked; T = TTT, b = baseline, * = both):"]
    lines += ascii_plot(summary["curves"]) + [""]
    if summary["modes"]:
        header, rows, note = mode_table(summary)
        lines += ["chunked vs native (LMGen.step, ground truth forced): same NLL, different speed"]
        lines += _text_table(header, rows) + [note, ""]
    if summary.get("inner_loop"):
        header, rows = inner_loop_table(summary)
        lines += ["the trained TTT model under other inner loops (eval.inner_loop; chunked, every stream):"]
        lines += _text_table(header, rows) + [""]
    audio = summary["audio"]
    if "skipped" in audio:
        lines.append(f"audio path: skipped ({audio['skipped']})")
    else:
        lo, hi = audio["distinct_codes"]
        lines.append(f"audio path: {audio['books']} LibriLight-layout books of real LibriVox speech, {audio['frames']:,} "
                     f"Mimi frames ({lo}-{hi} distinct codes per codebook), {audio['files_skipped']} "
                     "corrupt/empty/truncated files skipped and counted; "
                     f"chunked vs native max |dNLL| {_f(audio['max_abs'], '.1e')} (random-init models: a pipeline "
                     "check, not a score)")
    t = summary["timings"]
    lines.append(f"took {t['total'] / 60:.1f} min: corpus {t['corpus']:.0f} s, training {t['training']:.0f} s "
                 f"({training['frames_per_model']:,} frames per model), evaluation {t['evaluation']:.0f} s, "
                 f"audio {t['audio']:.0f} s")
    lines += ["", "files:"] + [f"  {name:14s} {path}" for name, path in summary["files"].items()]
    return "\n".join(lines)


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def render_markdown(summary: dict) -> str:
    s = summary["setup"]
    corpus, training = s["corpus"], s["training"]
    out_dir = Path(summary["files"]["demo.md"]).parent
    rel = lambda p: str(Path(p).relative_to(out_dir)) if Path(p).is_relative_to(out_dir) else str(p)  # noqa: E731
    lines = [f"# {summary['title']}", "", f"Created {summary['created']} on {summary['environment']['device']}.", ""]
    lines += ["## Setup", "",
              f"- corpus: {corpus['train_recordings']:,} training recordings of ~{corpus['frames']} frames "
              f"(±{corpus['length_jitter']:.0%}), each a 'speaker' with a private vocabulary of {corpus['vocab']} of "
              f"{corpus['card']} semantic codes (repeat probability {corpus['repeat_prob']}); "
              f"{corpus['eval_streams']} held-out streams of {corpus['eval_frames']:,} frames",
              f"- training: {training['steps']} steps x {training['batch_size']} rows x {training['window_frames']} "
              f"frames ({training['frames_per_model']:,} frames per model), persistent TTT state "
              f"{training['persistent_state']}, seed {training['seed']}"]
    for name, m in s["models"].items():
        patch = m["ttt"]
        what = "no TTT" if patch is None else f"TTT {patch['layer_type']} {patch['mode']} in layers {patch['layers']}, b={patch['mini_batch_size']}"
        lines.append(f"- {name}: {m['params']:,} parameters, attention context {m['attention_context']} frames, {what}")
    lines += ["", "## TTT vs baseline (NLL, nats per token, chunked mode)", ""]
    lines += _md_table(NLL_HEADER, nll_rows(summary)) + [""]
    if summary["modes"]:
        header, rows, note = mode_table(summary)
        lines += ["## Chunked vs native (`LMGen.step`)", ""] + _md_table(header, rows) + ["", note + ".", ""]
    if summary.get("inner_loop"):
        header, rows = inner_loop_table(summary)
        lines += ["## Other inner loops (`eval.inner_loop`)", "",
                  "The trained TTT model run with another mini-batch size b / inner learning rate (chunked, every "
                  "stream; negative \"vs trained\": better than the model as trained):", ""]
        lines += _md_table(header, rows) + [""]
    lines += ["## Plots", ""] + [f"![{k}]({rel(v)})" for k, v in summary["plots"].items()] + [""]
    lines += ["Codebook-1 NLL vs position (T = TTT, b = baseline, * = both):", "", "```"]
    lines += ascii_plot(summary["curves"]) + ["```", ""]
    audio = summary["audio"]
    lines += ["## Audio path", "", (f"Skipped: {audio['skipped']}." if "skipped" in audio else
              f"{audio['books']} books of LibriVox speech, {audio['frames']:,} frames ({audio['distinct_codes'][0]}-"
              f"{audio['distinct_codes'][1]} distinct Mimi codes per codebook); skipped and counted: "
              f"{', '.join(audio['skipped_files']) or 'none'}; chunked vs native max |dNLL| "
              f"{_f(audio['max_abs'], '.1e')}. Report: {rel(audio['report'])}."), ""]
    lines += ["## Files", ""] + [f"- {k}: `{rel(v)}`" for k, v in summary["files"].items()] + [""]
    lines += [f"Full evaluation report: `{rel(summary['eval_report'])}`.", ""]
    return "\n".join(lines)
