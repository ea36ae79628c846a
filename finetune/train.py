"""The training loop (`train(config)`); its command line is `cli.py` (`ttt-speech train`, also
`torchrun --nproc-per-node N --no-python ttt-speech train CONFIG.yaml` or `-m ttt_speech_apps.finetune`).

Orchestration only: the model comes from `ttt_speech.models`, TTT from `patch_moshi` / `patch_llama`
(and its `TTTModel` handle), batches from `WindowBatcher`; what depends on the model family (streams,
one window's forward and loss, the carried state, length generalisation) from its adapter in
`hosts.py` (`model.host`).
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from ttt_speech import schema
from ttt_speech.data import FRAME_RATE
from ttt_speech.data.manifest import ManifestEntry, read_manifest
from ttt_speech.export import save_export
from ttt_speech.files import write_text_atomic
from ttt_speech.sharding import is_sharded, ttt_units, unsharded
from ttt_speech.stats import runaway, runaway_warning

from .checkpointing import (Checkpointer, is_sharded_format, load_checkpoint, load_full_state,
                            read_checkpoint_config, resolve_resume, set_rng_state, split_rows, trainable_shapes)
from .config import TrainConfig, resume_changes
from .data import WindowBatcher, check_rows
from .distributed import Dist, build_device, chunk_model, close_distributed, consolidated, init_distributed, wrap
from .hosts import Carry, StreamLoader, TrainHost, autocast, host_of
from .memory import rank_memory
from .model import build_model, master_to_model_dtype
from .monitor import MEMORY, InnerLrProbe, Monitor, truncate_step_logs
from .plots import LOSS_PLOT, plot_loss, read_history
from .run_folder import RunFolder, claim
from .sharded_state import SHARDED_DIR, load_sharded
from .stages import Stage, check_resume_stages, plan_stages, stage_of
from .stop import StopRequest, TrainingInterrupted, sigterm_interrupts

logger = logging.getLogger("finetune")


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient; a checkpoint of the last good state has been written."""


def lr_factor(config: TrainConfig, step: int) -> float:
    """Multiplier of optim.lr at `step` (0-based): linear warm-up, then cosine or constant."""
    o = config.optim
    if step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    if o.schedule == "constant":
        return 1.0
    progress = (step - o.warmup_steps) / max(1, config.steps - o.warmup_steps)
    return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def train(config: TrainConfig, resume: Path | None = None, progress: bool = True,
          overwrite: bool = False) -> dict[str, Any]:
    """Run (or resume) a training run. Returns the final metrics; writes everything under output_dir.

    Before any work: the resume checkpoint and its config are checked against `config`, the output
    folder is locked and must not hold another run (`overwrite`: delete that run's outputs), and every
    manifest entry is read. Ctrl-C / SIGTERM: a checkpoint, then `TrainingInterrupted`."""
    env = init_distributed(config.model.device)
    folder = None
    try:
        with sigterm_interrupts():
            host = host_of(config)
            manifests = (_train_manifests(config, host), read_manifest(config.data.eval_manifest, "data.eval_manifest",
                                                                       host.kinds) if config.data.eval_manifest else [])
            resume_dir = _check_resume(config, resume) if resume is not None else None
            host.check_model(config.model)  # before the output folder is claimed (--overwrite deletes a run)
            folder = _claim(config, env, resume_dir, overwrite)
            return _train(config, env, manifests, resume_dir, folder, progress)
    finally:
        if folder is not None:
            folder.release()
        close_distributed()


def _claim(config: TrainConfig, env: Dist, resume_dir: Path | None, overwrite: bool) -> RunFolder | None:
    """Rank 0 claims the output folder (`run_folder.claim`); a refusal is raised on every rank alike,
    so that no rank goes on to wait for the others in a collective."""
    env.barrier()  # every rank has read the resume checkpoint before rank 0 may set damaged ones aside
    folder, error = None, None
    if env.is_main:
        try:
            folder = claim(config.output_dir, resume_dir, overwrite)
        except ValueError as e:
            error = str(e)
    error = env.broadcast_object(error)
    if error is not None:
        raise ValueError(error)
    return folder


def _train_manifests(config: TrainConfig, host: TrainHost) -> dict[Path, list[ManifestEntry]]:
    """The entries of every stage's training manifest (read before anything else: a bad line fails now)."""
    out: dict[Path, list[ManifestEntry]] = {}
    for i, (name, stage) in enumerate(config.stage_configs()):
        path = stage.data.train_manifest
        if path not in out:
            out[path] = read_manifest(path, "data.train_manifest" if name is None or path == config.data.train_manifest
                                      else f"stages[{i}].train_manifest", host.kinds)
    return out


def _check_resume(config: TrainConfig, resume: Path) -> Path:
    """The checkpoint to resume from (damaged newest ones skipped), its config compatible with `config`
    (the stages it ran unchanged; later ones may change: `check_resume_stages`)."""
    path = resolve_resume(resume)
    saved, current = read_checkpoint_config(path), schema.to_dict(config)
    if saved.get("stages") or config.stages:  # the stages that ran are compared as they ran
        check_resume_stages(schema.from_dict(TrainConfig, saved, f"{path / 'config.yaml'}"), config,
                            _resumed_step(path))
    saved, current = ({k: v for k, v in c.items() if k != "stages"} for c in (saved, current))
    free, moves = resume_changes(saved, current)
    for line in free:
        logger.info("resume with a new setting: %s", line)
    for line in moves:
        logger.warning("resume with %s: the run continues, but not bit for bit", line)
    return path


def _train(config: TrainConfig, env: Dist, manifests: tuple[dict[Path, list[ManifestEntry]], list[ManifestEntry]],
           resume_dir: Path | None, folder: RunFolder | None, progress: bool) -> dict[str, Any]:
    recipe = TrainingRecipe(config, env, *manifests, progress)
    recipe.setup(resume_dir, folder)
    # Ctrl-C / SIGTERM: the step in flight finishes, then a checkpoint; a failure publishes one written in the background
    with StopRequest() as stop, recipe.checkpointer:
        recipe.train(stop)
    return recipe.finish()


class TrainingRecipe:
    """One training run, in torchtune's lifecycle: `setup` (model, every stage's data checks, the first
    stage's optimizer and data, resume; before step 1), `train` (the steps of each stage, periodic, stage
    boundary and stop checkpoints, each stage's length generalisation), `finish` (final evaluation,
    length generalisation, export). Its state lives on the object; `config` is the running stage's."""

    def __init__(self, config: TrainConfig, env: Dist, entries: dict[Path, list[ManifestEntry]],
                 eval_entries: list[ManifestEntry], progress: bool) -> None:
        self.run_config, self.env, self.entries_of, self.eval_entries = config, env, entries, eval_entries
        self.progress = progress
        self.host: TrainHost = host_of(config)
        self.stages = plan_stages(config)
        self.stage = self.stages[0]
        self.config = self.stage.config
        self.out_dir = config.output_dir
        self.step = 0
        self.metrics: dict[str, Any] = {}
        self.warned_runaway = False  # fast weights grown far past ‖W₀‖: said once per run
        self.carry: Carry | None = None  # the running stage's carried states (`enter_stage`)
        self.probe: InnerLrProbe | None = None

    @property
    def staged(self) -> bool:
        return bool(self.run_config.stages)

    @property
    def entries(self) -> list[ManifestEntry]:
        """The running stage's training recordings."""
        return self.entries_of[self.config.data.train_manifest]

    def setup(self, resume_dir: Path | None, folder: RunFolder | None) -> None:
        """Build the model (sharded or replicated); read every stage's recordings; enter the first stage
        (or the checkpoint's) and restore `resume_dir`; then (rank 0) claim the folder's old outputs."""
        config, env = self.run_config, self.env
        self.lm = lm = build_model(self.config, build_device(env, config.distributed))
        model = self.host.window_model(lm, config)
        full_state = model.state_dict() if config.distributed == "fsdp" and env.is_main else None
        self.model = wrap(model, env, config.distributed, self.host.layers(lm), full_state)
        del full_state  # rank 0's unsharded weights: only its shards stay
        self.sharded = is_sharded(self.model)
        self.gathered_ttt = functools.partial(unsharded, ttt_units(lm))  # TTT parameters read outside forward
        if env.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(env.device)  # MEMORY: not rank 0's whole copy before sharding
        self.params = [p for p in lm.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError(f"trainable: {config.trainable!r} selects no parameter of this model")
        self._check_data()
        self.checkpointer = Checkpointer(self.out_dir / "checkpoints", env, lm, None, None,
                                         yaml.safe_dump(schema.to_dict(config), sort_keys=False),
                                         config.keep_checkpoints, _writes_sharded(config, env), config.async_checkpoint,
                                         boundaries=frozenset(s.end for s in self.stages[:-1]))
        resumed = _resumed_step(resume_dir) if resume_dir is not None else 0
        self.enter_stage(stage_of(self.stages, resumed))
        if resume_dir is not None:
            self.step = _restore(resume_dir, self.model, lm, self.optimizer, self.scheduler, self.batcher, self.carry,
                                 env, self.checkpointer.group)
            logger.info("resumed from %s at step %d%s", resume_dir, self.step,
                        f" (stage {self.stage.name})" if self.staged else "")
        else:
            torch.manual_seed(config.seed + env.rank)
        if folder is not None:  # rank 0, every check passed: now --overwrite deletes, a resume cuts the logs back
            folder.replace_previous()
            truncate_step_logs(self.out_dir, self.step)
        self.monitor = Monitor(self.out_dir, config.wandb, schema.to_dict(config), enabled=env.is_main,
                               resume=resume_dir is not None)
        if self.staged and env.is_main:
            logger.info("stages:\n%s", "\n".join(_stage_line(s, self.host.unit) for s in self.stages))

    def _check_data(self) -> None:
        """Before step 1: every recording reads, and every stage's rows fit its recordings and ranks, and
        its window fits in its longest recording (a longer one would be mostly padding: in a staged run a
        mistake that would show only after the stages before it ran)."""
        unit = self.host.unit
        longest = {path: _check_entries(entries, self.host.loader(entries, self.lm, self.config),
                                        f"data.train_manifest ({path})" if self.staged else "data.train_manifest",
                                        self.env, self.progress, unit)
                   for path, entries in self.entries_of.items()}
        for stage in self.stages:
            data, where = stage.config.data, f"stages[{stage.index}] ({stage.name}): " if self.staged else ""
            try:
                check_rows(data.batch_size, len(self.entries_of[data.train_manifest]), self.env.world)
            except ValueError as e:
                raise ValueError(f"{where}{e}") from None
            if data.window_frames > longest[data.train_manifest]:
                raise ValueError(f"{where}data.window_frames: {data.window_frames} {unit} is longer than every "
                                 f"recording of {data.train_manifest} (the longest: {longest[data.train_manifest]} "
                                 f"{unit}); give {'the stage ' if self.staged else ''}longer recordings "
                                 "(train_manifest) or a shorter window")
        if self.eval_entries:
            _check_entries(self.eval_entries, self.host.loader(self.eval_entries, self.lm, self.config),
                           "data.eval_manifest", self.env, self.progress, unit)

    def enter_stage(self, stage: Stage) -> None:
        """Start `stage`: a fresh optimizer and learning-rate schedule, its rows of its recordings (seeded
        by seed + its index), fresh carried TTT states. The weights are the previous stage's."""
        config, env, lm = stage.config, self.env, self.lm
        self.stage, self.config = stage, config
        if self.carry is not None:
            self.carry.close()
        o = config.optim
        self.optimizer = torch.optim.AdamW(self.params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(config, s))
        self.checkpointer.follow(self.optimizer, self.scheduler)
        loader = self.host.loader(self.entries, lm, config)
        self.batcher = WindowBatcher(self.entries, loader, config.data.batch_size, config.data.window_frames, env.rank,
                                     env.world, seed=config.seed + stage.index, shuffle=config.data.shuffle,
                                     persistent=config.persistent_state, pad_id=self.host.pad_id(lm))
        with self.gathered_ttt():  # the initial states are copies of the initial fast weights
            self.carry = self.host.carry(lm, config.data.batch_size // env.world) if config.ttt is not None else None
        if self.probe is None and config.ttt is not None:
            self.probe = InnerLrProbe(lm)
        self.memory_reported = False
        if env.device.type == "cuda":  # memory.json: this stage's peak, not the last one's or a measurement's
            torch.cuda.reset_peak_memory_stats(env.device)

    def train(self, stop: StopRequest) -> None:
        """Every stage's steps: each stage ends with a checkpoint (kept beside the rotated ones) and, with
        length_gen, length generalisation against its window; then the next starts. A stop request ends
        after the step in flight with a checkpoint (`TrainingInterrupted`)."""
        while True:
            self._train_stage(stop)
            if self.stage.index + 1 == len(self.stages):
                return
            following = self.stages[self.stage.index + 1]
            if self.run_config.length_gen is not None:
                self._length_gen_of_stage()
                if stop.requested(self.env):  # collective: the measurement can take long enough to be stopped
                    raise _stopped(stop, self.step, self.out_dir / "checkpoints" / f"step_{self.step:06d}",
                                   self.out_dir, None, self.monitor, f" (the end of stage {self.stage.name}: --resume "
                                                                     f"starts {following.name})")
            self.enter_stage(following)

    def _length_gen_of_stage(self) -> None:
        """Length generalisation at the end of the running stage, against its window, into
        length_gen/<stage>/ (rank 0; under FSDP every rank takes part in gathering the weights). Its
        carried states are dropped first: the next stage starts fresh ones."""
        config, env = self.config, self.env
        if self.carry is not None:
            self.carry.close()
            self.carry = None
        whole = consolidated(self.model, self.lm, functools.partial(build_model, config), env, env.device)
        if env.is_main:
            try:
                with autocast(config, env.device):
                    _length_gen(self.host, whole, self.eval_entries, config, self.monitor, self._length_gen_dir())
            except (ValueError, RuntimeError) as e:  # a NaN at 10x the window, out of memory: a measurement
                # must not end the run (a resume would replay it and fail again)
                logger.warning("length generalisation of stage %s failed (%s); training goes on",
                               self.stage.name, str(e).splitlines()[0] if str(e) else type(e).__name__)
        env.barrier()

    def _stage_tag(self) -> tuple[int, str] | None:
        """(index, name) of the running stage for the metrics rows; None without stages."""
        return (self.stage.index, self.stage.name) if self.staged else None

    def _length_gen_dir(self) -> Path:
        """length_gen/, or length_gen/<stage>/ in a staged run (one per stage: the context extending)."""
        return self.out_dir / "length_gen" / (self.stage.name if self.staged else "")

    def _train_stage(self, stop: StopRequest) -> None:
        """The running stage's steps up to its end, each logged, evaluated and checkpointed as configured."""
        from ttt_speech.progress import progress_bar

        config, env, end, total = self.config, self.env, self.stage.end, self.run_config.steps
        if self.step >= end:  # resumed at this stage's end: its checkpoint exists
            return
        bar = progress_bar(total=total, initial=self.step, desc=self.stage.label, unit="step",
                           enabled=self.progress and env.is_main)
        self.clock = _Throughput(config.data.batch_size * config.data.window_frames
                                 * self.host.tokens_per_position(self.lm), self.step)
        while self.step < end:
            log_now = (self.step + 1) % config.log_every == 0 or self.step + 1 == end
            values, grad_norm = self._training_step(log_now, bar)
            if not self.memory_reported:  # after the first step: gradients and optimizer state exist
                _report_memory(self.out_dir, env, config, self.lm, self.optimizer, self.stage.name)
                self.memory_reported = True
            bar.update(1)
            if log_now:
                self._log(values, grad_norm, bar)
            if self.eval_entries and config.eval_every and self.step % config.eval_every == 0 and self.step < total:
                _log_eval(self.step, self.model, self.eval_entries, config, self.carry, self.monitor, env,
                          self._stage_tag())
            saved = None  # a path on rank 0 only: decisions below use `periodic`, the same on every rank
            periodic = bool(config.checkpoint_every) and self.step % config.checkpoint_every == 0 and self.step < end
            if periodic:
                saved = self.save_checkpoint()
            if self.step < end and stop.requested(env):  # collective: every rank stops after the same step
                if not periodic:  # not twice: rewriting step N would first delete the one just written
                    saved = self.save_checkpoint(blocking=True)
                self.checkpointer.wait()
                raise _stopped(stop, self.step, saved, self.out_dir, bar, self.monitor, "")
        bar.close()
        saved = self.save_checkpoint(blocking=True)
        if stop.requested(env):  # during the stage's last step: its checkpoint is written, the rest is left
            last = self.stage.index + 1 == len(self.stages)
            raise _stopped(stop, self.step, saved, self.out_dir, bar, self.monitor,
                           " (the last one; the final evaluation and export were not done: --resume does them)" if last
                           else f" (the end of stage {self.stage.name}: --resume starts {self.stages[self.stage.index + 1].name})")

    def _training_step(self, log_now: bool, bar) -> tuple[dict[str, float], float]:
        """One optimizer step on the next window of every row: (the step's loss terms, gradient norm).
        A non-finite loss or gradient: a checkpoint of the state before the step, `TrainingDiverged`."""
        config, env, carry = self.config, self.env, self.carry
        data_before = self.batcher.state_dict()  # a few integers per row
        batch = self.batcher.next()
        restarts = True  # whether a row of any rank reads W₀ in this step (a fresh state is a copy of it)
        if carry is not None:
            carry.next_window(batch.new_recording.to(env.device))
            restarts = env.any(carry.resets_pending)
        if self.probe is not None:
            self.probe.armed = log_now
        terms = self.host.window_terms(self.model, self.lm, config, batch.codes, carry, env.device)
        if self.probe is not None:
            self.probe.armed = False  # not again in backward, where checkpointed layers run their forward again
        sums = env.all_reduce(terms.stacked())
        values = self.host.summarize(sums)
        loss = self.host.total_loss(terms, sums if env.enabled else None, env.world)
        grad_norm = float("nan")
        if math.isfinite(values["loss"]):
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if not restarts:  # W₀ was not read: its zero gradient must not let AdamW move it by momentum
                for p in carry.initial_weights():
                    p.grad = None
            clip = config.optim.grad_clip if config.optim.grad_clip > 0 else float("inf")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, clip))
        if not (math.isfinite(values["loss"]) and math.isfinite(grad_norm)):  # the same on every rank (reduced)
            self._diverged(values, grad_norm, data_before, bar)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        return values, grad_norm

    def _diverged(self, values: dict[str, float], grad_norm: float, data_before: Any, bar) -> None:
        """Checkpoint the state before the failed step (no update was applied: the parameters are
        those; the carried state is the window's start, kept by the carry) and raise."""
        if self.step == self.stage.start and self.stage.index > 0:
            # a stage's first step: the state before it is the boundary checkpoint, which holds the previous
            # stage's optimizer and rows (what a resume there restores); writing this stage's over it would lose it
            saved = self.out_dir / "checkpoints" / f"step_{self.step:06d}"
        else:
            carry_before = None
            if self.carry is not None:
                with self.gathered_ttt():  # every rank is here (the loss is reduced): the gather is collective
                    carry_before = self.carry.window_start_state_dict()
            saved = self.checkpointer.save(self.step, data_before, carry_before, blocking=True)
        bar.close()
        what = "loss" if not math.isfinite(values["loss"]) else "gradient norm"
        norm = "" if math.isnan(grad_norm) and what == "loss" else f", grad_norm={grad_norm:.4g}"
        raise TrainingDiverged(
            f"non-finite {what} at step {self.step + 1} ({', '.join(f'{k}={v:.4g}' for k, v in values.items())}"
            f"{norm}); last good state saved to {saved or self.out_dir / 'checkpoints'}")

    def _log(self, values: dict[str, float], grad_norm: float, bar) -> None:
        """A log step: metrics.jsonl / wandb / ttt_stats.csv, the bar or a log line, the runaway check."""
        config, carry = self.config, self.carry
        self.metrics = {**values, "lr": self.optimizer.param_groups[0]["lr"], "grad_norm": grad_norm,
                        "tokens_per_s": self.clock.tokens_per_s(self.step)}
        stats = None
        if carry is not None:
            with self.gathered_ttt():  # ‖W − W₀‖ and ‖W₀‖ read the initial fast weights
                stats = carry.handle.fast_weight_stats(carry.current(), self.probe.values)
                norms = carry.handle.initial_norms()
            self.warned_runaway = self.warned_runaway or _warn_runaway(stats, norms, self.step, config)
        self.monitor.log(self.step, self.metrics, stats, stage=self._stage_tag())
        bar.set_postfix(loss=f"{values['loss']:.3f}", tok_s=f"{self.metrics['tokens_per_s']:.0f}")
        if bar.disable and self.env.is_main:  # no bar (no terminal, or --quiet): a log line says where it is
            logger.info("%sstep %d/%d: loss=%.4f lr=%.2e grad_norm=%.3g tokens/s=%.0f",
                        f"[{self.stage.name}] " if self.staged else "", self.step, self.run_config.steps,
                        values["loss"], self.metrics["lr"], grad_norm, self.metrics["tokens_per_s"])

    def save_checkpoint(self, blocking: bool = False) -> Path | None:
        """A checkpoint after `self.step` (collective; rank 0: its folder)."""
        carry_state = None
        if self.carry is not None:
            pending = self.carry.resets_pending
            if self.sharded:  # gathering is collective: every rank must take the same branch
                pending = self.env.any(pending)
            with self.gathered_ttt() if pending else contextlib.nullcontext():
                carry_state = self.carry.state_dict()
        return self.checkpointer.save(self.step, self.batcher.state_dict(), carry_state, blocking)

    def finish(self) -> dict[str, Any]:
        """After the last step: the final evaluation, length generalisation, the export and the loss
        plot (rank 0 writes); the final metrics."""
        config, env = self.config, self.env
        if self.eval_entries:
            self.metrics.update(_log_eval(self.step, self.model, self.eval_entries, config, self.carry, self.monitor, env,
                                          self._stage_tag()))
        if self.carry is not None:
            self.carry.close()
        # rank 0: the whole model (a gathered copy under FSDP, on the device only for length-gen)
        final = consolidated(self.model, self.lm, functools.partial(build_model, config), env,
                             env.device if config.length_gen is not None else torch.device("cpu"))
        if env.is_main and config.length_gen is not None:
            with autocast(config, env.device):
                _length_gen(self.host, final, self.eval_entries, config, self.monitor, self._length_gen_dir())
            if self.staged:
                _stages_report(self.out_dir / "length_gen", [s.name for s in self.stages], self.monitor)
        if env.is_main:
            self._export(final)
        self.monitor.finish()
        env.barrier()
        return {"step": self.step, **self.metrics}

    def _export(self, final: nn.Module) -> None:
        """export/ (the model's dtype, provenance), its wandb artifact, loss.png."""
        config, out_dir = self.config, self.out_dir
        lora = {"rank": config.lora.rank, "scale": config.lora.scale} if config.uses_lora else None
        durations = [e.duration for e in self.entries]  # hours only when every entry declares its duration
        provenance = {"steps": self.step, "train_loss": self.metrics.get("loss"),
                      "data": {"train_manifest": str(config.data.train_manifest), "entries": len(self.entries),
                               "hours": None if None in durations else sum(durations) / 3600,
                               "eval_manifest": str(config.data.eval_manifest) if self.eval_entries else None},
                      "eval": {k: v for k, v in self.metrics.items() if k.startswith("eval_")} or None}
        if self.staged:
            provenance["stages"] = [_stage_summary(s) for s in self.stages]
        save_export(master_to_model_dtype(final, config), config.model, out_dir / "export", config.trainable, lora,
                    provenance)
        self.monitor.log_export(out_dir / "export", {"trainable": config.trainable, "steps": self.step,
                                                     "ttt": schema.to_dict(config.ttt), "base_model": config.model.name})
        plot_loss({config.output_dir.name: read_history(out_dir)}, out_dir / LOSS_PLOT,
                  stages={s.name: s.start for s in self.stages} if self.staged else None)
        logger.info("export written to %s", out_dir / "export")


def _stage_summary(stage: Stage) -> dict:
    """What a stage trained with: its steps, window, rows, data and peak learning rate."""
    c = stage.config
    return {"name": stage.name, "steps": c.steps, "first_step": stage.start + 1, "window_frames": c.data.window_frames,
            "batch_size": c.data.batch_size, "train_manifest": str(c.data.train_manifest), "lr": c.optim.lr}


def _stage_line(stage: Stage, unit: str) -> str:
    """A stage in the log: its steps, window, rows and tokens per step, learning rate."""
    c = stage.config
    tokens = c.data.batch_size * c.data.window_frames
    seconds = f" ({c.data.window_frames / FRAME_RATE:g} s)" if unit == "frames" else ""
    return (f"  {stage.index + 1}. {stage.name}: steps {stage.start + 1}-{stage.end}, window {c.data.window_frames} "
            f"{unit}{seconds} x {c.data.batch_size} rows = {tokens:,} {unit} per step, "
            f"lr {c.optim.lr:g} ({c.optim.schedule}), data {c.data.train_manifest}")


def _stages_report(folder: Path, names: list[str], monitor: Monitor) -> None:
    """folder/stages.md (.json, .png): each stage's length generalisation (read from its folder, so that
    the stages before a resume count too) beside the others'."""
    from ttt_speech_apps.eval.length_gen import FILES, stages_report

    found = {name: json.loads((folder / name / FILES.json).read_text())["trained"] for name in names
             if (folder / name / FILES.json).is_file()}
    if found:
        result, paths = stages_report(found, folder, monitor.wandb)
        logger.info("length generalisation stage by stage (written to %s):\n%s", paths["markdown"],
                    "\n".join(result.summary_lines()))


def _resumed_step(path: Path) -> int:
    """The step a checkpoint was written after."""
    return int(load_checkpoint(path, tensors=False)[2]["step"])


class _Throughput:
    """Tokens per second over the steps since the last log step (or the first step of this process)."""

    def __init__(self, tokens_per_step: int, step: int) -> None:
        self.tokens_per_step = tokens_per_step
        self.since, self.at_step = time.perf_counter(), step

    def tokens_per_s(self, step: int) -> float:
        now = time.perf_counter()
        rate = self.tokens_per_step * (step - self.at_step) / max(now - self.since, 1e-9)
        self.since, self.at_step = now, step
        return rate


def _writes_sharded(config: TrainConfig, env: Dist) -> bool:
    """checkpoint_format auto: sharded where the model is (FSDP on several ranks), consolidated elsewhere."""
    sharded = (config.distributed == "fsdp" and env.enabled if config.checkpoint_format == "auto"
               else config.checkpoint_format == "sharded")
    if config.async_checkpoint and not sharded and env.is_main:
        logger.warning("async_checkpoint: this run's checkpoints are consolidated (checkpoint_format: auto is sharded "
                       "only under fsdp on several ranks): they are written before training goes on")
    return sharded


def _stopped(stop: StopRequest, step: int, saved: Path | None, out_dir: Path, bar, monitor: Monitor,
             note: str) -> TrainingInterrupted:
    if bar is not None:
        bar.close()
    monitor.finish()
    return TrainingInterrupted(f"stopped by {stop.reason or 'another rank'} after step {step}{note}: checkpoint "
                               f"{saved or out_dir / 'checkpoints'}; continue with --resume {out_dir}")


def _check_entries(entries: list[ManifestEntry], loader: StreamLoader, field: str, env: Dist,
                   progress: bool, unit: str) -> int:
    """Read every manifest entry once before the first step (audio: encoded into the codes cache), so
    a bad file is a one-line error now, not hours into the run. Each rank checks its share. Returns
    the longest training stream's length (frames; tokens for host llama: a stream's length - 1)."""
    from ttt_speech.progress import progress_bar

    mine = range(env.rank, len(entries), env.world)
    error, longest = None, 0
    for i in progress_bar(mine, desc=f"checking {field}", unit="file", leave=False,
                          enabled=progress and env.is_main and len(mine) >= 2):
        try:
            frames = loader(i).shape[1]
            longest = max(longest, frames)
            if frames == 0:
                error = (f"{field}: {entries[i].path} holds nothing to train on (0 {unit}"
                         f"{'; a token stream needs at least 2 tokens' if unit == 'tokens' else ''})")
        except ValueError as e:
            error = f"{field}: {e}"
        if error is not None:
            break
    found = env.gather_objects((error, longest))
    errors = [e for e, _ in found if e is not None]  # every rank raises the same error
    if errors:
        raise ValueError(errors[0])
    return max(n for _, n in found)


def _warn_runaway(stats: dict | None, initial: dict[int, float], step: int, config: TrainConfig) -> bool:
    """Warn when a TTT layer's fast weights ran away (`stats.runaway`); whether it warned."""
    grown = runaway({layer: s.w_delta for layer, s in (stats or {}).items()}, initial)
    if grown:
        logger.warning("%s; see ttt_stats.csv", runaway_warning(grown, f"step {step}", config.ttt.base_lr))
    return bool(grown)


def _report_memory(out_dir: Path, env: Dist, config: TrainConfig, lm: nn.Module,
                   optimizer: torch.optim.Optimizer, stage: str | None) -> None:
    """memory.json: the bytes every rank holds (parameters, gradients, optimizer state, peak); in a
    staged run one entry per stage under `stages` (its batch and window set the activations)."""
    ranks = env.gather_objects(rank_memory(env.rank, lm, optimizer, env.device).to_dict())
    if not env.is_main:
        return
    report = {"strategy": config.distributed if env.enabled else "single", "world": env.world, "ranks": ranks}
    if stage is not None:
        report["window_frames"], report["batch_size"] = config.data.window_frames, config.data.batch_size
        earlier = json.loads((out_dir / MEMORY).read_text()) if (out_dir / MEMORY).is_file() else {}
        report = {"stages": {**earlier.get("stages", {}), stage: report}}
    write_text_atomic(out_dir / MEMORY, json.dumps(report, indent=2) + "\n")
    if stage is not None:
        report = report["stages"][stage]
    r = ranks[0]
    logger.info("memory per rank (rank 0, %s x%d): parameters %.1f MiB, gradients %.1f MiB, optimizer %.1f MiB, "
                "peak %.1f MiB (%s)", report["strategy"], env.world, r["params"] / 2**20, r["grads"] / 2**20,
                r["optimizer"] / 2**20, r["peak"] / 2**20, r["peak_kind"])


def _restore(path: Path, model: nn.Module, lm: nn.Module, optimizer: torch.optim.Optimizer, scheduler,
             batcher: WindowBatcher, carry: Carry | None, env: Dist, group) -> int:
    # sharded: rank 0 reads the tensors and sends each rank its shards (not N copies in host memory)
    from_rank0 = is_sharded(model)
    trainable, carried, state = load_checkpoint(path, tensors=env.is_main or not from_rank0)
    own = {n: tuple(p.shape) for n, p in lm.named_parameters() if p.requires_grad}  # whole shapes (FSDP too)
    saved = trainable_shapes(path, state)
    if set(own) != set(saved):
        raise ValueError(f"--resume: {path} holds other trainable parameters than this config selects "
                         f"(e.g. {sorted(set(own) ^ set(saved))[:3]})")
    wrong = [n for n in own if own[n] != saved[n]]
    if wrong:
        raise ValueError(f"--resume: {path} is a checkpoint of another architecture ({wrong[0]}: "
                         f"{saved[wrong[0]]} in the checkpoint, {own[wrong[0]]} in this model)")
    if is_sharded_format(state):  # every rank reads its part of the shards, whatever the world size
        load_sharded(path / SHARDED_DIR, lm, optimizer, state["optimizer"]["param_groups"], group)
    else:
        load_full_state(lm, optimizer, trainable, state["optimizer"], from_rank0, env.is_main)
    scheduler.load_state_dict(state["scheduler"])
    batcher.load_state_dict(state["data"])
    if state.get("world") == env.world:
        set_rng_state(state["rng"][env.rank])
    else:
        logger.warning("resuming on %d processes from a %d-process run: RNG streams restart", env.world, state.get("world"))
    if carry is not None:
        if carried is None:
            raise ValueError(f"--resume: {path} has no carried TTT state")
        with unsharded(ttt_units(lm)):  # the fresh carry's pending resets read the initial fast weights
            carry.load_state_dict({k: v.to(env.device) for k, v in split_rows(carried, batcher.rows).items()},
                                  where=str(path / "carry.safetensors"))
    return int(state["step"])


@torch.no_grad()
def evaluate(model: nn.Module, entries: list[ManifestEntry], config: TrainConfig, env: Dist) -> dict[str, float]:
    """Teacher-forced loss on the first `eval_frames` of each held-out recording, window by window
    with the TTT state carried (persistent_state) exactly as in training; one recording at a time.
    `model`: the (data-parallel) window model, called as a whole so that sharded parameters are
    gathered (every rank evaluates)."""
    host = host_of(config)
    lm = chunk_model(model).lm
    was_training = lm.training
    lm.eval()
    loader = host.loader(entries, lm, config)
    total = None  # the stacked loss terms, summed over windows and recordings
    W = config.data.window_frames
    for i in range(len(entries)):
        stream = loader(i)[:, :config.eval_frames][None]  # [1, 2K, T]
        with unsharded(ttt_units(lm)):
            carry = host.carry(lm, 1) if config.ttt is not None else None
        try:
            for start in range(0, stream.shape[2], W):
                if carry is not None:
                    carry.next_window(torch.tensor([start == 0 or not config.persistent_state], device=env.device))
                terms = host.window_terms(model, lm, config, stream[:, :, start:start + W], carry, env.device,
                                          evaluating=True).stacked()
                total = terms if total is None else total + terms
        finally:
            if carry is not None:
                carry.close()
    lm.train(was_training)
    return {f"eval_{k}": v for k, v in host.summarize(total).items()}


def _log_eval(step: int, model: nn.Module, entries: list[ManifestEntry], config: TrainConfig, carry: Carry | None,
              monitor: Monitor, env: Dist, stage: tuple[int, str] | None = None) -> dict:
    with carry.paused() if carry is not None else contextlib.nullcontext():
        values = evaluate(model, entries, config, env)
    monitor.log(step, values, stage=stage)
    if env.is_main:
        logger.info("step %d eval: %s", step, ", ".join(f"{k}={v:.4f}" for k, v in values.items()))
    return values


def _length_gen(host: TrainHost, lm: nn.Module, entries: list[ManifestEntry], config: TrainConfig, monitor: Monitor,
                folder: Path) -> None:
    """Perplexity at min_factor..max_factor x the training window on the held-out recordings (eval's
    length-gen; token streams for host llama), written into `folder`."""
    result, paths = host.length_gen(lm, entries, config, folder, monitor.wandb)
    logger.info("length generalisation (written to %s):\n%s", paths["markdown"], "\n".join(result.summary_lines()))
