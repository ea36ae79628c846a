"""loss.png: training curves from metrics.jsonl, for one run (train) or several overlaid (the demo)."""
from __future__ import annotations

import json
from pathlib import Path

from ttt_speech.figures import pyplot, run_colours, save_figure

from .monitor import METRICS

LOSS_PLOT = "loss.png"
SMOOTHING = 0.05  # the smoothed train loss: a centred mean over this fraction of the log points (no lag)


def read_history(run_dir: Path) -> list[dict]:
    """The rows of a run's metrics.jsonl (none when it has no log yet); partial lines are skipped."""
    path = Path(run_dir) / METRICS
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line a killed run left half-written
                continue
    return rows


def smooth(values: list[float], fraction: float = SMOOTHING) -> list[float]:
    """Centred moving mean over `fraction` of the points (shrinking at the ends): unlike an EMA it does
    not lag behind a loss that falls fast early on."""
    half = max(0, round(len(values) * fraction / 2))
    return [sum(values[max(0, i - half):i + half + 1]) / len(values[max(0, i - half):i + half + 1])
            for i in range(len(values))]


def plot_loss(histories: dict[str, list[dict]], path: Path, title: str = "Training loss",
              stages: dict[str, int] | None = None) -> Path | None:
    """Train loss (faint: as logged; solid: smoothed) and held-out loss (dashed, markers) against the
    step, one colour per run; `stages` ({name: the step before its first}) marked by vertical lines and
    names. None when no run has logged a loss."""
    if not any("loss" in r for rows in histories.values() for r in rows):
        return None
    plt = pyplot()
    from matplotlib import ticker

    colours = run_colours(list(histories))
    fig, ax = plt.subplots(figsize=(7, 3.8), layout="constrained")
    for name, rows in histories.items():
        colour = colours[name]
        train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
        if train:
            steps, losses = zip(*train)
            ax.plot(steps, losses, color=colour, alpha=0.25, lw=0.8)
            ax.plot(steps, smooth(list(losses)), color=colour, lw=1.6, label=f"{name}: train (smoothed)")
        held_out = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
        if held_out:
            ax.plot(*zip(*held_out), color=colour, ls="--", marker="o", ms=4, lw=1.2, label=f"{name}: held-out")
    for name, start in (stages or {}).items():
        ax.axvline(start, color="k", lw=0.8, ls=":")
        ax.annotate(name, (start, 1), xycoords=("data", "axes fraction"), xytext=(3, -3),
                    textcoords="offset points", va="top", fontsize=8)
    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    ax.set_xlabel("step")
    ax.set_ylabel("loss (text + audio)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=11)
    return save_figure(fig, path)
