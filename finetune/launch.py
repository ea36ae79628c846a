"""`ttt-speech train CONFIG --nproc-per-node N`: torchrun on this node, with the command's exit codes.

Runs torchrun's own launcher (`torch.distributed.run`, standalone rendezvous) in this process over
`python -m ttt_speech_apps.finetune CONFIG ...`, and turns its endings into the command's:

- a SIGTERM / Ctrl-C to the launcher: torchrun forwards it, every rank stops after the same step and
  writes its checkpoint; exit 130, as one process does (torchrun itself exits 1 with a traceback);
- a rank that fails: that rank's exit code (2 for bad input, 1 for divergence), its one-line error
  already printed, not torchrun's report of it; a rank killed by a signal: 128 + the signal, named.

Grace: torchrun kills its workers `shutdown_timeout` seconds after forwarding a signal; a checkpoint
that takes longer is cut. The launcher sets it (`TORCH_ELASTIC_SHUTDOWN_TIMEOUT`, which the workers
read to warn when their checkpoints come close to it, `stop.torchrun_grace`).
"""
from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path

DEFAULT_SHUTDOWN_TIMEOUT = 120  # seconds; torchrun's own default is 30


def launch(nproc: int, shutdown_timeout: int, worker_args: list[str], checkpoints: Path) -> int:
    """Run `python -m ttt_speech_apps.finetune *worker_args` on `nproc` local ranks; the exit code.
    checkpoints: the run's checkpoint folder (a stop's checkpoint cut by the timeout is said)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    os.environ["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] = str(shutdown_timeout)  # torchrun's, and the workers' warning
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))  # torchrun says 1
    # torchrun's agent narrates every start and stop at WARNING; the ranks say what matters
    logging.getLogger("torch.distributed.elastic").setLevel(logging.ERROR)
    try:
        torchrun(["--standalone", "--nproc-per-node", str(nproc), "-m", "ttt_speech_apps.finetune", *worker_args])
    except SignalException as e:  # the ranks stopped on it (rank 0 said where its checkpoint is)
        cut = sorted(checkpoints.glob(".step_*")) if checkpoints.is_dir() else []
        if cut:  # the stop's checkpoint was still being written when torchrun killed the ranks
            print(f"ttt-speech train: error: torchrun killed the ranks {shutdown_timeout} s after the signal, while "
                  f"they wrote {cut[-1].name}: the previous checkpoint resumes; give a stop more time "
                  "(--shutdown-timeout)", file=sys.stderr)
            return 128 + signal.SIGKILL
        return 130 if e.sigval in (signal.SIGTERM, signal.SIGINT) else 128 + int(e.sigval)
    except ChildFailedError as e:
        # a rank's own exit code (it printed its line) over one killed by a signal at exit
        failures = sorted(e.failures.items(), key=lambda item: (item[1].exitcode < 0, item[1].timestamp))
        rank, failure = failures[0]
        if failure.exitcode < 0:  # killed by a signal: no line of its own was printed
            name = signal.Signals(-failure.exitcode).name
            print(f"ttt-speech train: error: rank {rank} was killed by {name} (out of memory?)", file=sys.stderr)
            return 128 - failure.exitcode
        return failure.exitcode
    return 0
