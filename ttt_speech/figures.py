"""Figures for every app (matplotlib, Agg backend): a figure is written to a temporary name and
renamed, so a reader never sees half a PNG; one colour per model in every figure."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def pyplot():
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
        pyplot().close(fig)
    return path


def run_colours(names: list[str]) -> dict[str, str]:
    """One colour per model (the part before "/"), the same in every plot; the mode sets the line style."""
    models = list(dict.fromkeys(n.split("/")[0] for n in names))
    return {m: f"C{i % 10}" for i, m in enumerate(models)}
