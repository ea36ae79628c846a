"""A training run's output folder: one run per folder, one process at a time, leftovers of killed runs.

- `claim` locks the folder for the life of the run (an advisory `flock` on `output_dir/.lock`, which
  the kernel releases when the process dies, even by SIGKILL), so a second concurrent run fails at
  once with one line naming the first one's pid.
- A folder holding another run's outputs is refused unless the run continues it (`--resume` from
  its checkpoints) or replaces it (`--overwrite`, which deletes those outputs first): a fresh run
  would otherwise have its checkpoints rotated away by the old run's higher steps, overwrite its
  export and append to its metrics.
- Temporary checkpoint folders a killed run left (`checkpoints/.step_NNNNNN.*`, up to the size of a
  whole checkpoint) are deleted, and on resume `metrics.jsonl` / `ttt_stats.csv` are cut back to
  the resumed step, so that the re-done steps are not logged twice.
"""
from __future__ import annotations

import csv
import fcntl
import io
import json
import logging
import os
import shutil
import socket
import time
from pathlib import Path

from ttt_speech.files import writable_dir, write_text_atomic

from .checkpointing import STEP_DIR, list_checkpoints

logger = logging.getLogger("finetune")

LOCK = ".lock"
# What a run writes into its folder (train.log, which the demo writes beside it, is not a run's).
RUN_OUTPUTS = ("checkpoints", "export", "metrics.jsonl", "ttt_stats.csv", "loss.png", "memory.json",
               "length_gen", "wandb")
STEP_LOGS = ("metrics.jsonl", "ttt_stats.csv")


class RunFolder:
    """The claimed output folder of one run (rank 0 only); `release()` (or process exit) unlocks it."""

    def __init__(self, path: Path, lock_file, created: bool) -> None:
        self.path = path
        self._lock = lock_file
        self._created = created

    def release(self) -> None:
        """Unlock; a folder this run created and left empty (it failed before writing) is removed."""
        if self._lock is None:
            return
        if [p.name for p in self.path.iterdir()] == [LOCK]:
            (self.path / LOCK).unlink()
            if self._created:
                self.path.rmdir()
        self._lock.close()  # closing the descriptor drops the flock
        self._lock = None

    def truncate_logs(self, step: int) -> None:
        """Drop the rows of `metrics.jsonl` and `ttt_stats.csv` past `step` (a resume re-does them)."""
        for name in STEP_LOGS:
            path = self.path / name
            if not path.is_file():
                continue
            lines = path.read_text().splitlines(keepends=True)
            if name.endswith(".jsonl"):
                kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
            else:
                kept = lines[:1] + [line for line in lines[1:] if int(next(csv.reader(io.StringIO(line)))[0]) <= step]
            if len(kept) != len(lines):
                write_text_atomic(path, "".join(kept))
                logger.info("%s: dropped %d row(s) past the resumed step %d", path, len(lines) - len(kept), step)


def claim(path: Path, resume_from: Path | None, overwrite: bool) -> RunFolder:
    """Lock `path` for this run and check that it may write there (see the module docstring).

    resume_from: the checkpoint folder the run resumes from (None: a fresh run)."""
    created = not path.exists()
    path = writable_dir(path, "output_dir")
    lock = open(path / LOCK, "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.seek(0)
        holder = lock.read().strip() or "unknown process"
        lock.close()
        raise ValueError(f"output_dir: {path} is in use by another run ({holder}); wait for it to finish "
                         "or choose another output_dir") from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    lock.flush()
    try:
        _check_owner(path, resume_from, overwrite)
        _clean_partial_checkpoints(path / "checkpoints")
    except BaseException:
        RunFolder(path, lock, created).release()
        raise
    return RunFolder(path, lock, created)


def _check_owner(path: Path, resume_from: Path | None, overwrite: bool) -> None:
    previous = [name for name in RUN_OUTPUTS if (path / name).exists()]
    if not previous:
        return
    continues = resume_from is not None and resume_from.resolve().is_relative_to(path.resolve())
    if continues:
        _check_newest(path, resume_from.resolve(), overwrite)
        return
    if overwrite:
        for name in previous:
            target = path / name
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        logger.warning("--overwrite: removed the previous run's %s from %s", ", ".join(previous), path)
        return
    raise ValueError(f"output_dir: {path} holds another run ({', '.join(previous)}); continue it with "
                     f"--resume {path}, pass --overwrite to replace it, or choose another output_dir")


def _check_newest(path: Path, resume_from: Path, overwrite: bool) -> None:
    """Resuming an older checkpoint of the run in `path` branches its history: the newer checkpoints
    would outlive the resumed run's own in rotation. Refused, unless `overwrite` deletes them."""
    step = STEP_DIR.match(resume_from.name)
    if resume_from.parent != (path / "checkpoints").resolve() or step is None:
        return
    newer = [p for p in list_checkpoints(path / "checkpoints") if int(STEP_DIR.match(p.name).group(1)) > int(step.group(1))]
    if not newer:
        return
    if not overwrite:
        raise ValueError(f"--resume: {resume_from.name} is not the newest checkpoint of {path} (newer: "
                         f"{', '.join(p.name for p in newer)}); continuing it there would mix two histories: pass "
                         "--overwrite to delete the newer checkpoints, or set another output_dir")
    for p in newer:
        shutil.rmtree(p)
    logger.warning("--overwrite: removed the checkpoints newer than %s: %s", resume_from.name,
                   ", ".join(p.name for p in newer))


def _clean_partial_checkpoints(root: Path) -> None:
    """Delete the temporary folders of checkpoints whose writing was killed (never renamed into place)."""
    if not root.is_dir():
        return
    for stale in sorted(root.glob(".step_*")):
        size = sum(f.stat().st_size for f in stale.rglob("*") if f.is_file())
        shutil.rmtree(stale, ignore_errors=True)
        logger.warning("removed %s (%.1f MiB), a checkpoint a killed run did not finish writing", stale, size / 2**20)
