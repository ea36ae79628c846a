"""PNG plots of an evaluation report (matplotlib, Agg backend), written atomically.

Each function takes the JSON-ready report pieces (see `report.py`), so plots can be redrawn from
a saved report.json.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from ttt_speech.data import FRAME_RATE


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display; safe in tests, CI and under torchrun
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path) -> Path:
    """Write a figure to a temporary name and rename it: a reader never sees half a PNG."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
        _pyplot().close(fig)
    return path


def _markers(ax, markers: dict) -> None:
    """Vertical lines at the training window and the attention context (in frames)."""
    if markers.get("train_window"):
        ax.axvline(markers["train_window"], color="k", ls="--", lw=1, label="training window")
    if markers.get("attention_context"):
        ax.axvline(markers["attention_context"], color="gray", ls=":", lw=1, label="attention context")


def plot_curves(runs: dict[str, dict], group_labels: dict[str, str], markers: dict, path: str | Path) -> Path:
    """Binned NLL against position, one panel per group, one line per run (model/mode)."""
    plt = _pyplot()
    names = list(group_labels)
    fig, axes = plt.subplots(len(names), 1, figsize=(9, 3.0 * len(names)), sharex=True, squeeze=False)
    for ax, group in zip(axes[:, 0], names):
        for run_name, run in runs.items():
            curve = run["groups"][group]["curve"]
            if curve:
                x = [(b["start"] + b["stop"]) / 2 for b in curve]
                ax.plot(x, [b["nll"] for b in curve], marker=".", ms=3, label=run_name)
        _markers(ax, markers)
        ax.set_ylabel("NLL (nats)")
        ax.set_title(group_labels[group], fontsize=10)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    last = axes[-1, 0]
    last.set_xlabel(f"position (frames, {FRAME_RATE:g} per second)")
    top = last.secondary_xaxis("bottom", functions=(lambda f: f / FRAME_RATE / 60, lambda m: m * 60 * FRAME_RATE))
    top.set_xlabel("minutes")
    top.spines["bottom"].set_position(("outward", 36))
    fig.suptitle("Teacher-forced NLL vs position (binned)")
    return save_figure(fig, path)


def plot_length_gen(points: dict[str, dict[str, list[dict]]], group_labels: dict[str, str], train_window: int,
                    path: str | Path) -> Path:
    """Perplexity (cumulative over [0, L)) against L / training window; skipped lengths are absent.

    points[run][group]: the entries of `metrics.length_points`."""
    plt = _pyplot()
    from matplotlib import ticker

    names = list(group_labels)
    max_factor = max((p["factor"] for per_group in points.values() for ps in per_group.values() for p in ps), default=10)
    fig, axes = plt.subplots(1, len(names), figsize=(4.4 * len(names), 3.8), squeeze=False, layout="constrained")
    for ax, group in zip(axes[0], names):
        for run_name, per_group in points.items():
            ok = [p for p in per_group.get(group, []) if "ppl" in p.get("cumulative", {})]
            if ok:
                ax.plot([p["factor"] for p in ok], [p["cumulative"]["ppl"] for p in ok], marker="o", ms=3,
                        label=run_name)
        ax.axvline(1.0, color="k", ls="--", lw=1, label="training window")
        ax.set_xscale("log")
        ax.set_xticks([t for t in (0.5, 1, 2, 5, 10, 20, 50) if t <= max_factor * 1.01] or [1])
        ax.xaxis.set_major_formatter(ticker.FormatStrFormatter("%gx"))
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_xlabel(f"evaluation length / training window ({train_window} frames)")
        ax.set_ylabel("perplexity")
        ax.set_title(group_labels[group], fontsize=10)
        ax.grid(alpha=0.3, which="both")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle("Length generalisation")
    return save_figure(fig, path)


def plot_fast_weights(traces: dict[str, dict], markers: dict, path: str | Path) -> Path:
    """‖W_t − W_0‖ per TTT layer along the longest stream of each run."""
    plt = _pyplot()
    fig, axes = plt.subplots(len(traces), 1, figsize=(9, 3.0 * len(traces)), squeeze=False)
    for ax, (run_name, trace) in zip(axes[:, 0], traces.items()):
        for layer in trace["layers"]:
            ax.plot(trace["positions"], layer["distance"], label=f"layer {layer['layer']}")
        _markers(ax, markers)
        ax.set_title(f"{run_name}: {trace['stream']}", fontsize=10)
        ax.set_ylabel("‖W_t − W_0‖")
        ax.set_xlabel("position (frames)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=4)
    fig.suptitle("Distance of the TTT fast weights from their initial values")
    return save_figure(fig, path)
