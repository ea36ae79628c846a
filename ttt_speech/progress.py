"""Progress bars only where someone watches them: every tqdm bar of the project goes through here.

A bar redraws itself with `\\r` frames; in a pipe, a log file or CI those pile up into one huge line.
So bars are drawn only when asked for (no `--quiet`) and stderr is a terminal; a long job without a
terminal still reports through its logger lines (training's `log_every` lines, the final summaries).
"""
from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any


def show_progress(enabled: bool = True) -> bool:
    """Whether to draw live progress: `enabled` (the command has no `--quiet`) and stderr is a terminal."""
    return enabled and sys.stderr is not None and sys.stderr.isatty()


def progress_bar(iterable: Iterable | None = None, *, enabled: bool, **tqdm_kwargs: Any):
    """A tqdm bar (on stderr), disabled unless `show_progress(enabled)`."""
    from tqdm import tqdm

    tqdm_kwargs.setdefault("dynamic_ncols", True)  # follow the terminal's width when it is resized
    return tqdm(iterable, disable=not show_progress(enabled), **tqdm_kwargs)
