"""A training run's output folder: one run per folder, one process at a time, leftovers of killed runs.

- `claim` locks the folder for the life of the run (an advisory `flock` on `output_dir/.lock`, which
  the kernel releases when the process dies, even by SIGKILL), so a second concurrent run fails at
  once with one line naming the first one's pid.
- A folder holding another run's outputs is refused unless the run continues it (`--resume` from
  its checkpoints) or replaces it (`--overwrite`, which deletes those outputs once the run has
  passed its checks, just before its first step): a fresh run
  would otherwise have its checkpoints rotated away by the old run's higher steps, overwrite its
  export and append to its metrics.
- Temporary checkpoint folders a killed run left (`checkpoints/.step_NNNNNN.*`, up to the size of a
  whole checkpoint) are deleted, and on resume `metrics.jsonl` / `ttt_stats.csv` are cut back to
  the resumed step, so that the re-done steps are not logged twice.
"""
from __future__ import annotations

import fcntl
import logging
import os
import shutil
import socket
import time
from pathlib import Path

from ttt_speech.files import RUN_LOCK as LOCK  # its presence marks a run's folder for `eval` too
from ttt_speech.files import writable_dir
from ttt_speech.tracking import WANDB_DIR

from .checkpointing import STEP_DIR, DamagedCheckpoint, list_checkpoints, verify_checkpoint
from .monitor import MEMORY, METRICS, TTT_STATS
from .plots import LOSS_PLOT

logger = logging.getLogger("finetune")

# What a run writes into its folder (train.log, which the demo writes beside it, is not a run's).
RUN_OUTPUTS = ("checkpoints", "export", METRICS, TTT_STATS, MEMORY, LOSS_PLOT, "length_gen", WANDB_DIR)


class RunFolder:
    """The claimed output folder of one run (rank 0 only); `release()` (or process exit) unlocks it.

    `replaced`: what `--overwrite` deletes, once the run has passed its checks (`replace_previous`)."""

    def __init__(self, path: Path, lock_file, created: bool) -> None:
        self.path = path
        self.replaced: list[Path] = []
        self._lock = lock_file
        self._created = created

    def replace_previous(self) -> None:
        """Delete what --overwrite replaces; called just before the first step, so that a run that
        fails its checks (a bad manifest, a missing weight file) leaves the old run as it was."""
        for target in self.replaced:
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        if self.replaced:
            logger.warning("--overwrite: removed %s from %s", ", ".join(p.name for p in self.replaced), self.path)
        self.replaced = []

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
    folder = RunFolder(path, lock, created)
    try:
        folder.replaced = _replaced(path, resume_from, overwrite)
        _clean_partial_checkpoints(path / "checkpoints")
    except BaseException:
        folder.release()
        raise
    return folder


def _replaced(path: Path, resume_from: Path | None, overwrite: bool) -> list[Path]:
    """What of the folder's previous content the run replaces (with `overwrite`); a ValueError when
    it holds another run and may not."""
    previous = [path / name for name in RUN_OUTPUTS if (path / name).exists()]
    if not previous:
        return []
    if resume_from is not None and resume_from.resolve().is_relative_to(path.resolve()):
        return _newer_checkpoints(path, resume_from.resolve(), overwrite)
    if overwrite:
        return previous
    raise ValueError(f"output_dir: {path} holds another run ({', '.join(p.name for p in previous)}); continue it "
                     f"with --resume {path}, pass --overwrite to replace it, or choose another output_dir")


def _newer_checkpoints(path: Path, resume_from: Path, overwrite: bool) -> list[Path]:
    """Resuming an older checkpoint of the run in `path` branches its history: the newer checkpoints
    would outlive the resumed run's own in rotation. Damaged ones (which `resolve_resume` skipped)
    are set aside as `<name>.damaged`; readable ones are refused, unless `overwrite` replaces them."""
    step = STEP_DIR.match(resume_from.name)
    if resume_from.parent != (path / "checkpoints").resolve() or step is None:
        return []
    newer = []
    for p in list_checkpoints(path / "checkpoints"):
        if int(STEP_DIR.match(p.name).group(1)) <= int(step.group(1)):
            continue
        try:
            verify_checkpoint(p)
        except DamagedCheckpoint as e:
            aside = p.with_name(p.name + ".damaged")
            os.replace(p, aside)
            logger.warning("set the damaged %s aside as %s (%s); delete it once you have looked", p.name, aside.name, e)
            continue
        newer.append(p)
    if newer and not overwrite:
        raise ValueError(f"--resume: {resume_from.name} is not the newest checkpoint of {path} (newer: "
                         f"{', '.join(p.name for p in newer)}); continuing it there would mix two histories: pass "
                         "--overwrite to delete the newer checkpoints, or set another output_dir")
    return newer


def _clean_partial_checkpoints(root: Path) -> None:
    """Delete the temporary folders of checkpoints whose writing was killed (never renamed into place)."""
    if not root.is_dir():
        return
    for stale in sorted(root.glob(".step_*")):
        size = sum(f.stat().st_size for f in stale.rglob("*") if f.is_file())
        shutil.rmtree(stale, ignore_errors=True)
        logger.warning("removed %s (%.1f MiB), a checkpoint a killed run did not finish writing", stale, size / 2**20)
