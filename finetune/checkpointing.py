"""Training checkpoints: everything `--resume` needs to continue exactly where a run stopped.

`<output_dir>/checkpoints/step_000120/`, in one of two formats (`checkpoint_format`):
  trainable.safetensors  consolidated: trainable parameters (by name, whole tensors; AdamW's state,
                         by name, in train_state.pt), gathered to rank 0 and written by it
  sharded/               sharded: trainable parameters and AdamW's state written by every rank in
                         parallel (`sharded_state`, torch.distributed.checkpoint)
  carry.safetensors      carried TTT stream state of every global row (rows stacked in order)
  train_state.pt         step, format, optimizer (consolidated state or hyperparameters), scheduler,
                         data position of every row, RNG states per rank
  config.yaml            the resolved config
Written into a temporary folder and renamed: a crash never leaves half a checkpoint. Either format
resumes onto any number of ranks and either strategy.
"""
from __future__ import annotations

import logging
import os
import random
import re
import shutil
import tempfile
import time
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)

from ttt_speech.files import save_tensors_atomic, write_text_atomic
from ttt_speech.sharding import full_tensor

from .sharded_state import SHARDED_DIR, read_weights, save_sharded, shard_problem, sharded_shapes, state_to_save
from .stop import torchrun_grace

if TYPE_CHECKING:
    from .distributed import Dist

STEP_DIR = re.compile(r"^step_(\d{6,})$")
logger = logging.getLogger("finetune")


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


SHARDED, CONSOLIDATED = "sharded", "consolidated"  # the formats a checkpoint's train_state names


class Checkpointer:
    """Writes the checkpoints of a run in its format, one at a time (collective: every rank calls
    `save` after the same step). Sharded: every rank writes its shards; `asynchronous`: the shards
    are copied to CPU memory and written while training goes on, and the checkpoint appears (its
    folder renamed into place) once every rank has written, at the latest at the next `save` or
    `wait`. Consolidated: the tensors are gathered to rank 0, which writes them. The `keep` newest are
    kept, and beside them the checkpoints of the steps in `boundaries` (the ends of a run's stages)."""

    def __init__(self, root: Path, env: "Dist", lm: nn.Module, optimizer: torch.optim.Optimizer | None, scheduler,
                 config_yaml: str, keep: int, sharded: bool, asynchronous: bool,
                 boundaries: frozenset[int] = frozenset()) -> None:
        self.root, self.env, self.lm, self.optimizer, self.scheduler = root, env, lm, optimizer, scheduler
        self.config_yaml, self.keep, self.sharded, self.asynchronous = config_yaml, keep, sharded, asynchronous
        self.boundaries = boundaries
        self.group = None  # torch.distributed.checkpoint's collectives (None: one process)
        if env.enabled:
            import torch.distributed as dist

            # apart from training's: a CPU backend, as async saves need; also reads sharded checkpoints
            self.group = dist.new_group(backend="gloo")
            if sharded:
                _check_shared(root.parent, env)
        self._pending: _Pending | None = None
        self._warned_grace = False

    def follow(self, optimizer: torch.optim.Optimizer, scheduler) -> None:
        """Save this optimizer and schedule from now on (a new stage has its own)."""
        self.wait()
        self.optimizer, self.scheduler = optimizer, scheduler

    def save(self, step: int, data_state: Any, carry_state: dict[str, Tensor] | None,
             blocking: bool = False) -> Path | None:
        """Checkpoint `step` (rank 0: the folder it is, or will be once written; None elsewhere).
        blocking: written when this returns, whatever `asynchronous` says (stops, divergence)."""
        self.wait()
        env = self.env
        started = time.perf_counter()
        states = env.gather_objects({"data": data_state, "rng": rng_state(),
                                     "carry": None if carry_state is None else {k: v.cpu() for k, v in carry_state.items()}})
        stage = self._stage(step)
        try:
            if self.sharded:
                future = save_sharded(stage / SHARDED_DIR, state_to_save(self.lm, self.optimizer), self.group,
                                      self.asynchronous and not blocking)
                trainable = None
                optimizer_state = {"param_groups": self.optimizer.state_dict()["param_groups"]}
            else:
                future = None
                trainable = full_trainable_state(self.lm, keep=env.is_main)
                optimizer_state = full_optimizer_state(self.lm, self.optimizer)
            if env.is_main:
                rows = {int(g): pos for s in states for g, pos in s["data"].items()}
                carry = None
                if carry_state is not None:
                    carry = {k: torch.cat([s["carry"][k] for s in states]) for k in states[0]["carry"]}
                train_state = {"step": step, "format": SHARDED if self.sharded else CONSOLIDATED,
                               "optimizer": optimizer_state, "scheduler": self.scheduler.state_dict(), "data": rows,
                               "rng": [s["rng"] for s in states], "world": env.world}
                _write_files(stage, trainable, carry, train_state, self.config_yaml)
        except BaseException:
            if env.is_main:  # never a checkpoint-sized leftover (e.g. a full disk)
                shutil.rmtree(stage, ignore_errors=True)
            raise
        final = self.root / f"step_{step:06d}" if env.is_main else None
        self._pending = _Pending(future, stage if env.is_main else None, final, started)
        if future is None:
            self.wait()
        return final

    def _stage(self, step: int) -> Path:
        """A fresh temporary folder for checkpoint `step`, made by rank 0 (the same path on every rank;
        a failure to make it is raised on every rank alike, so that none waits in a collective)."""
        stage = error = None
        if self.env.is_main:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                stage = str(tempfile.mkdtemp(dir=self.root, prefix=f".step_{step:06d}."))
            except OSError as e:
                error = f"checkpoint: cannot create a folder in {self.root} ({e.strerror or e})"
        stage, error = self.env.broadcast_object((stage, error))
        if error is not None:
            raise ValueError(error)
        return Path(stage)

    def wait(self) -> None:
        """Finish the checkpoint in flight, if any: its files written, its folder in place (rank 0)."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        try:
            if pending.future is not None:
                pending.future.result()
        except BaseException:
            if pending.stage is not None:
                shutil.rmtree(pending.stage, ignore_errors=True)
            raise
        if pending.stage is not None:
            self._publish(pending)

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is not None:
            self.close()

    def close(self) -> None:
        """On the way out of a failed run: publish the checkpoint in flight if every rank has written
        it, without waiting (other ranks may be gone); otherwise leave its folder to the next start."""
        pending, self._pending = self._pending, None
        if pending is not None and pending.stage is not None and pending.future is not None \
                and pending.future.done() and pending.future.exception() is None:
            self._publish(pending)

    def _publish(self, pending: "_Pending") -> None:
        _publish(pending.stage, pending.final)
        rotated = [p for p in list_checkpoints(self.root)
                   if int(STEP_DIR.match(p.name).group(1)) not in self.boundaries]
        for old in rotated[:-self.keep]:
            shutil.rmtree(old)
        self._report(pending)

    def _report(self, pending: "_Pending") -> None:
        """Log the time a checkpoint took to write; warn (once) when that is more than half the grace
        torchrun gives a stop's checkpoint after a SIGTERM (a stop writes the same bytes)."""
        seconds = pending.seconds()
        logger.info("checkpoint %s written in %.1f s (%s%s)", pending.final.name, seconds,
                    SHARDED if self.sharded else CONSOLIDATED, ", in the background" if pending.future else "")
        grace = torchrun_grace()
        if grace is not None and seconds > grace / 2 and not self._warned_grace:
            self._warned_grace = True
            logger.warning("a checkpoint takes %.0f s and torchrun kills the ranks %.0f s after a SIGTERM: a stop "
                           "could be cut (the previous checkpoint would resume). Give it more time: --shutdown-timeout "
                           "(ttt-speech train --nproc-per-node, or torchrun's), and the scheduler's grace (e.g. "
                           "SLURM's KillWait); docs/training.md §4", seconds, grace)


class _Pending:
    """A checkpoint being written: its future (async sharded saves; None once written), rank 0's
    staging folder and final path (None elsewhere), and when it started and finished."""

    def __init__(self, future: Future | None, stage: Path | None, final: Path | None, started: float) -> None:
        self.future, self.stage, self.final, self.started = future, stage, final, started
        self.finished: float | None = None
        if future is not None:  # the write time, not the training steps until someone waits for it
            future.add_done_callback(lambda _: setattr(self, "finished", time.perf_counter()))

    def seconds(self) -> float:
        return (self.finished or time.perf_counter()) - self.started


def _write_files(stage: Path, trainable: dict[str, Tensor] | None, carry: dict[str, Tensor] | None,
                 train_state: dict[str, Any], config_yaml: str) -> None:
    """Rank 0's files of a checkpoint (trainable.safetensors: consolidated only) into `stage`."""
    if trainable is not None:
        save_tensors_atomic(stage / "trainable.safetensors", {k: v.detach().cpu().contiguous() for k, v in trainable.items()})
    if carry is not None:
        save_tensors_atomic(stage / "carry.safetensors", {k: v.cpu().contiguous() for k, v in carry.items()})
    torch.save(train_state, stage / "train_state.pt")
    write_text_atomic(stage / "config.yaml", config_yaml)


def _publish(stage: Path, final: Path) -> None:
    """Rename the written `stage` folder to `final` (replacing an older one of the same step)."""
    try:
        os.chmod(stage, 0o755)
        if final.exists():
            shutil.rmtree(final)
        os.replace(stage, final)
    finally:
        if stage.exists():
            shutil.rmtree(stage)


def _check_shared(folder: Path, env: "Dist") -> None:
    """Every rank sees a file rank 0 writes into `folder`: sharded checkpoints are written by every
    rank into one folder, so on several nodes it must be on a shared filesystem."""
    probe = error = None
    if env.is_main:
        probe = str(folder / f".shared-probe-{os.getpid()}")
        try:
            Path(probe).write_text("")
        except OSError as e:  # said on every rank: none may be left waiting in the broadcast
            error = f"output_dir: cannot write into {folder} ({e.strerror or e})"
    probe, error = env.broadcast_object((probe, error))
    if error is not None:
        raise ValueError(error)
    probe = Path(probe)
    blind = [rank for rank, seen in enumerate(env.gather_objects(probe.is_file())) if not seen]
    env.barrier()
    if env.is_main:
        probe.unlink()
    if blind:
        raise ValueError(f"output_dir: {folder} is not visible from rank {blind[0]} (another node): sharded "
                         "checkpoints are written by every rank into one folder, which needs a filesystem shared "
                         "by all nodes; or set checkpoint_format: consolidated (rank 0 writes)")


def list_checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name)]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def resolve_resume(path: Path) -> Path:
    """`--resume` accepts a checkpoint folder or a run's output folder: its newest readable
    checkpoint, falling back (with a warning) past damaged ones, e.g. one truncated by a full disk."""
    path = Path(path)
    if (path / "train_state.pt").is_file():
        verify_checkpoint(path)
        return path
    found = list_checkpoints(path / "checkpoints")
    if not found:
        raise ValueError(f"--resume: {path} is neither a checkpoint nor a run folder with checkpoints")
    problems = []
    for candidate in reversed(found):
        try:
            verify_checkpoint(candidate)
        except DamagedCheckpoint as e:
            logger.warning("skipping a damaged checkpoint: %s", e)
            problems.append(str(e))
            continue
        if problems:
            logger.warning("--resume: continuing from %s, the newest readable checkpoint", candidate)
        return candidate
    raise ValueError(f"--resume: no readable checkpoint in {path / 'checkpoints'} ({problems[0]})")


def verify_checkpoint(path: Path) -> None:
    """Parse every file of a checkpoint (train_state.pt memory-mapped, carry.safetensors whole, the
    header of trainable.safetensors or the index of sharded/ and its files' presence, config.yaml);
    a damaged one → `DamagedCheckpoint` naming it."""
    _, _, state = load_checkpoint(path, tensors=False)
    trainable_shapes(path, state)
    read_checkpoint_config(path)


def is_sharded_format(state: dict[str, Any]) -> bool:
    """Whether a checkpoint's train_state describes the sharded format (older ones: consolidated)."""
    return state.get("format", CONSOLIDATED) == SHARDED


def trainable_shapes(path: Path, state: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """{name: whole shape} of a checkpoint's trainable parameters (headers and index only)."""
    if not is_sharded_format(state):
        return _readable(path / "trainable.safetensors", safetensors_shapes)
    folder = path / SHARDED_DIR
    shapes = _readable(folder / ".metadata", lambda f: sharded_shapes(f.parent))
    problem = shard_problem(folder)
    if problem is not None:
        raise DamagedCheckpoint(f"--resume: {problem}")
    return shapes


def read_trainable(path: Path) -> dict[str, Tensor]:
    """The trainable parameters of a checkpoint, whole tensors on the CPU by name (either format;
    this process alone: for tools and tests, not for resuming)."""
    _, _, state = load_checkpoint(path, tensors=False)
    if not is_sharded_format(state):
        return _readable(path / "trainable.safetensors", lambda f: load_file(str(f)))
    return read_weights(path / SHARDED_DIR)


def read_checkpoint_config(path: Path) -> dict[str, Any]:
    """The resolved config a checkpoint was written with (its config.yaml)."""
    import yaml

    data = _readable(path / "config.yaml", lambda f: yaml.safe_load(f.read_text()))
    if not isinstance(data, dict):
        raise DamagedCheckpoint(f"--resume: {path / 'config.yaml'} is damaged (expected the run's config)")
    return data


class DamagedCheckpoint(ValueError):
    """A checkpoint file that exists but does not parse (truncated, corrupted): `--resume` on a run
    folder falls back past it. Failures to read (permissions, I/O errors) are plain ValueErrors."""


def _readable(file: Path, read):
    """`read(file)`; a missing file, a read failure or a parse failure → ValueError naming the file."""
    if not file.is_file():
        raise ValueError(f"--resume: {file} is missing")
    try:
        return read(file)
    except OSError as e:  # the file may be fine: never a reason to fall back past it
        raise ValueError(f"--resume: cannot read {file} ({e.strerror or e})") from None
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - torch, safetensors and yaml each raise their own kinds
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DamagedCheckpoint(f"--resume: {file} is damaged ({reason})") from None


def load_checkpoint(path: Path, tensors: bool = True
                    ) -> tuple[dict[str, Tensor], dict[str, Tensor] | None, dict[str, Any]]:
    """(trainable tensors, carried TTT state or None, train_state) of a checkpoint folder.

    train_state is memory-mapped: its optimizer tensors are read only where used. tensors=False or a
    checkpoint in the sharded format: the trainable tensors are not read here ({}; under FSDP ranks
    > 0 receive a consolidated checkpoint's from rank 0; the sharded format is read by every rank,
    `sharded_state.load_sharded`).
    A missing or damaged file → ValueError naming it."""
    carry_file = path / "carry.safetensors"
    carry = _readable(carry_file, lambda f: load_file(str(f))) if carry_file.is_file() else None
    state = _readable(path / "train_state.pt", lambda f: torch.load(f, weights_only=False, mmap=True))
    if not isinstance(state, dict) or "step" not in state:
        raise DamagedCheckpoint(f"--resume: {path / 'train_state.pt'} is not a ttt-speech training state")
    if tensors and not is_sharded_format(state):
        trainable = _readable(path / "trainable.safetensors", lambda f: load_file(str(f)))
    else:
        trainable = {}
    return trainable, carry, state


def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} of a safetensors file (its header only)."""
    with safe_open(str(path), framework="pt") as f:
        return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}


def full_trainable_state(model: nn.Module, keep: bool) -> dict[str, Tensor]:
    """The trainable parameters by name, whole tensors on the CPU where `keep` ({} elsewhere).
    Gathered one at a time from their shards under FSDP (collective: every rank calls it)."""
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            whole = full_tensor(p.detach())
            if keep:
                out[name] = whole.cpu()
    return out


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state keyed by parameter name, whole tensors (gathered from the shards under
    FSDP; collective), on the CPU of rank 0 (an empty dict on other ranks). The same format for
    every strategy and number of ranks: a checkpoint resumes onto any of them. {} before the
    first step (torch would take a zero-lr step to create the state, counting it in AdamW's step)."""
    if not optimizer.state:
        return {}
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(model, optimizer, options=options)


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, trainable: dict[str, Tensor],
                    optimizer_state: dict[str, Any], from_rank0: bool, is_main: bool) -> None:
    """Load trainable weights and `full_optimizer_state`'s format (each rank keeps its shards), or
    the index-keyed `optimizer.state_dict()` of checkpoints written before it.

    from_rank0: only rank 0's tensors are used; it sends every rank its part (collective). Every
    rank passes `optimizer_state` as `load_checkpoint` gave it (memory-mapped, not read), so that
    all take the same branch."""
    options = StateDictOptions(full_state_dict=True, strict=False, broadcast_from_rank0=from_rank0)
    set_model_state_dict(model, trainable, options=options)
    if not optimizer_state:  # saved before the first step: a fresh optimizer is that state
        return
    groups = optimizer_state.get("param_groups") or [{}]
    if any(isinstance(p, int) for p in groups[0].get("params", ())):  # by index: written before names
        if from_rank0:
            raise ValueError("--resume: this checkpoint's optimizer state predates sharded checkpoints; "
                             "resume it with distributed: ddp")
        optimizer.load_state_dict(optimizer_state)
        return
    set_optimizer_state_dict(model, optimizer, optimizer_state if is_main or not from_rank0 else {}, options=options)


def split_rows(tensors: dict[str, Tensor], rows: list[int]) -> dict[str, Tensor]:
    """This rank's rows of a stacked carried state."""
    index = torch.tensor(rows)
    return {k: v.index_select(0, index) for k, v in tensors.items()}
