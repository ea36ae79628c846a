"""Stopping a training run cleanly: Ctrl-C (SIGINT) or SIGTERM (a cluster's preemption notice, or
torchrun passing one on) asks the loop to finish its step, save a checkpoint and exit 130; a second
Ctrl-C stops at once. Under torchrun the request is all-reduced each step, so every rank stops at the
same step and takes part in the (collective) checkpoint. (torchrun's agent kills its workers
`torchrun_grace` seconds after passing a signal on: a checkpoint that takes longer is cut, and the
previous one resumes; the checkpointer warns when its checkpoints come close.)"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from typing import Iterator

import torch

logger = logging.getLogger("finetune")


class TrainingInterrupted(RuntimeError):
    """The run stopped on a signal after saving a checkpoint (the message says where)."""


class StopRequest:
    """Context manager installing the handlers (main thread only; elsewhere a no-op)."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if signum == signal.SIGINT and self.reason == "Ctrl-C":
            raise KeyboardInterrupt  # the second Ctrl-C: stop now, without a checkpoint
        if self.reason is None:
            self.reason = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
            logger.warning("%s: stopping after this step and saving a checkpoint (Ctrl-C again to stop at once)",
                           self.reason)

    def requested(self, env) -> bool:
        """Whether any rank was asked to stop (collective under torchrun: every rank calls it each step)."""
        local = float(self.reason is not None)
        return env.all_reduce(torch.tensor(local, device=env.device)).item() > 0


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """SIGTERM ends the command as Ctrl-C does (KeyboardInterrupt: exit 130, one line, the run folder
    unlocked) outside the training loop, where `StopRequest` takes over; by default it would kill the
    process without a word."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


TORCHRUN_DEFAULT_GRACE = 30.0  # seconds: torch.distributed.run's shutdown timeout unless told otherwise


def torchrun_grace() -> float | None:
    """Seconds torchrun's agent gives the ranks after forwarding a signal before it kills them, as
    the environment says (`TORCH_ELASTIC_SHUTDOWN_TIMEOUT`: set by `--nproc-per-node`; torchrun's
    `--shutdown-timeout` flag is not visible here); None outside torchrun."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return None
    return float(os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", TORCHRUN_DEFAULT_GRACE))
