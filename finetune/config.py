"""The training config: one dataclass per concern, loaded from YAML and validated here only.

`ttt-speech train CONFIG.yaml key.sub=value ...` (also under torchrun) goes through
`load_train_config`; the resolved config is saved with every checkpoint.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ttt_speech.config import TTTConfig, resolve_chunk_size
from ttt_speech.data import CODES_CACHE, FRAME_RATE
from ttt_speech.models import ModelConfig
from ttt_speech.schema import check, doc, load_config
from ttt_speech.tracking import WandbConfig
from ttt_speech_apps.eval.config import LengthGenConfig


LLAMA_TRAINABLE = ("ttt", "ttt+lora", "full", "lora")  # host llama: no E2E meta-training


@dataclass
class TrainDataConfig:
    train_manifest: Path = doc(None, "JSONL manifest of training recordings (audio files or code files; host llama: "
                                     "token files .npy or text files .txt)")
    eval_manifest: Path | None = doc(None, "JSONL manifest of held-out recordings (null: no evaluation)")
    window_frames: int | None = doc(256, f"frames per training window ({FRAME_RATE:g} frames = 1 s; host llama: "
                                         "tokens); or set window_seconds")
    window_seconds: float | None = doc(None, "window length in seconds (overrides window_frames when set)")
    batch_size: int = doc(4, "recordings read side by side per step, across all ranks (global batch)")
    codes_cache: Path = doc(CODES_CACHE, "folder of the content-addressed Mimi codes cache (audio manifests)")
    first_codebook_weight: float = doc(100.0, "loss weight of the first (semantic) audio codebook, as moshi-finetune")
    text_padding_weight: float = doc(0.5, "loss weight of text padding tokens, as moshi-finetune")
    shuffle: bool = doc(True, "shuffle the order of recordings each epoch (seeded)")

    def __post_init__(self) -> None:
        check(self.train_manifest is not None, "data.train_manifest", "a path to a JSONL manifest", None)
        if self.window_seconds is not None:
            check(self.window_seconds > 0, "data.window_seconds", "a positive number", self.window_seconds)
            self.window_frames = max(1, round(self.window_seconds * FRAME_RATE))
        check(self.window_frames is not None and self.window_frames >= 1, "data.window_frames",
              "an integer >= 1", self.window_frames)
        check(self.batch_size >= 1, "data.batch_size", "an integer >= 1", self.batch_size)
        check(self.first_codebook_weight > 0, "data.first_codebook_weight", "a positive number", self.first_codebook_weight)
        check(self.text_padding_weight >= 0, "data.text_padding_weight", "a non-negative number", self.text_padding_weight)


@dataclass
class LoraConfig:
    rank: int = doc(16, "LoRA rank (trainable: ttt+lora, lora, e2e-meta+lora); 1-4 gives TinyLoRA-style adapters "
                        "of a few thousand parameters per layer")
    scale: float = doc(2.0, "LoRA scaling of B·A")

    def __post_init__(self) -> None:
        check(self.rank >= 1, "lora.rank", "an integer >= 1", self.rank)


@dataclass
class OptimConfig:
    lr: float = doc(1e-3, "AdamW peak learning rate")
    weight_decay: float = doc(0.0, "AdamW weight decay")
    betas: list[float] = doc(factory=lambda: [0.9, 0.95], help="AdamW betas")
    warmup_steps: int = doc(0, "linear warm-up steps")
    schedule: Literal["cosine", "constant"] = doc("cosine", "learning-rate schedule after warm-up")
    min_lr_ratio: float = doc(0.1, "cosine: final lr as a fraction of lr")
    grad_clip: float = doc(1.0, "max global gradient norm (0 = no clipping)")

    def __post_init__(self) -> None:
        check(self.lr > 0, "optim.lr", "a positive number", self.lr)
        check(self.weight_decay >= 0, "optim.weight_decay", "a non-negative number", self.weight_decay)
        check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "optim.betas",
              "two numbers in [0, 1)", self.betas)
        check(self.warmup_steps >= 0, "optim.warmup_steps", "an integer >= 0", self.warmup_steps)
        check(0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio", "a number in [0, 1]", self.min_lr_ratio)
        check(self.grad_clip >= 0, "optim.grad_clip", "a non-negative number", self.grad_clip)


@dataclass
class StageConfig:
    """One stage of a staged run (`stages:`, docs/training.md): it starts from the weights the stage before
    ended with, with a fresh optimizer and learning-rate schedule, new data rows (TTT state reset), and
    its own length, window, batch, data and learning rate. A field left null is the run's own."""

    name: str = doc(None, "the stage's name: in the log, metrics.jsonl (`stage`), loss.png and length_gen/<name>/")
    steps: int = doc(None, "optimizer steps of this stage")
    window_frames: int | None = doc(None, "data.window_frames of this stage")
    window_seconds: float | None = doc(None, "data.window_seconds of this stage (instead of window_frames)")
    batch_size: int | None = doc(None, "data.batch_size of this stage (global rows)")
    train_manifest: Path | None = doc(None, "data.train_manifest of this stage (e.g. longer recordings)")
    lr: float | None = doc(None, "optim.lr of this stage (its peak)")
    warmup_steps: int | None = doc(None, "optim.warmup_steps of this stage")
    schedule: Literal["cosine", "constant"] | None = doc(None, "optim.schedule of this stage")
    min_lr_ratio: float | None = doc(None, "optim.min_lr_ratio of this stage")

    def __post_init__(self) -> None:
        check(isinstance(self.name, str) and bool(self.name) and self.name.strip() == self.name
              and "/" not in self.name and not self.name.startswith("."), "name",
              "a name without '/' or a leading '.' (it names a folder)", self.name)
        check(self.steps is not None and self.steps >= 1, "steps", "an integer >= 1", self.steps)
        if self.window_frames is not None and self.window_seconds is not None:
            raise ValueError("window_frames and window_seconds: set one")

    def apply(self, run: "TrainConfig") -> "TrainConfig":
        """`run` as this stage runs it: its fields replaced where set, `steps` the stage's, no stages;
        validated as any config is (ValueError naming the field)."""
        data = {k: v for k, v in (("batch_size", self.batch_size), ("train_manifest", self.train_manifest))
                if v is not None}
        if self.window_frames is not None:
            data.update(window_frames=self.window_frames, window_seconds=None)
        elif self.window_seconds is not None:
            data.update(window_seconds=self.window_seconds)
        optim = {k: getattr(self, k) for k in ("lr", "warmup_steps", "schedule", "min_lr_ratio")
                 if getattr(self, k) is not None}
        return dataclasses.replace(run, stages=[], steps=self.steps, data=dataclasses.replace(run.data, **data),
                                   optim=dataclasses.replace(run.optim, **optim))


@dataclass
class TrainConfig:
    model: ModelConfig = doc(factory=ModelConfig, help="")
    ttt: TTTConfig | None = doc(None, "TTT layers to insert (the TTTConfig fields); null trains the plain model "
                                      "(the baseline)")
    data: TrainDataConfig = doc(factory=lambda: TrainDataConfig(train_manifest=Path("train.jsonl")), help="")
    trainable: Literal["ttt", "ttt+lora", "lora", "full", "e2e-meta", "e2e-meta+lora"] = doc(
        "ttt", "what is trained: the TTT layers; TTT + LoRA adapters; LoRA only; every parameter; or, for "
               "e2e_mlp layers, meta-training (the inner updates kept in the graph, second order): every "
               "parameter (e2e-meta) or the E2E layers + LoRA (e2e-meta+lora). With ttt/ttt+lora/full, E2E "
               "layers train first order (docs/e2e.md)")
    lora: LoraConfig = doc(factory=LoraConfig, help="")
    optim: OptimConfig = doc(factory=OptimConfig, help="")
    precision: Literal["fp32", "bf16"] = doc("fp32", "fp32, or bf16 autocast (trainable weights kept as float32 "
                                                    "master copies; TTT fast weights stay float32)")
    gradient_checkpointing: bool = doc(False, "recompute each transformer layer in backward (saves memory)")
    persistent_state: bool = doc(True, "carry each row's TTT state across consecutive windows of its recording; "
                                       "false: every window starts fresh (the ablation)")
    distributed: Literal["ddp", "fsdp"] = doc(
        "ddp", "multi-process strategy under torchrun (gloo on CPU, nccl on GPU): ddp (every rank holds the whole "
               "model, gradients and optimizer state) or fsdp (all three sharded per transformer layer; docs/training.md)")
    steps: int = doc(100, "optimizer steps (with stages: their total)")
    log_every: int = doc(10, "steps between log lines / wandb points / the TTT-stats CSV")
    eval_every: int = doc(0, "steps between evaluations on eval_manifest (0: only at the end)")
    eval_frames: int = doc(1024, "frames per held-out recording used by the periodic evaluation")
    checkpoint_every: int = doc(0, "steps between checkpoints (0: only at the end)")
    keep_checkpoints: int = doc(2, "checkpoints kept on disk (oldest deleted first; a stage's last one is kept beside them)")
    checkpoint_format: Literal["auto", "sharded", "consolidated"] = doc(
        "auto", "sharded: every rank writes its shards of the trainable weights and AdamW's state in parallel "
                "(torch.distributed.checkpoint; output_dir on a filesystem every node sees); consolidated: gathered "
                "to rank 0, which writes whole tensors; auto: sharded under fsdp on several ranks. Either resumes "
                "onto any number of ranks and either strategy")
    async_checkpoint: bool = doc(False, "sharded checkpoints: copy the shards to CPU memory and write them while "
                                        "training goes on (periodic checkpoints; the last one and stops are written "
                                        "before the command returns)")
    output_dir: Path = doc("runs/train", "folder of checkpoints, the export, logs and the TTT-stats CSV")
    seed: int = doc(0, "seed of data order and initialisation of new layers")
    wandb: WandbConfig = doc(factory=WandbConfig, help="")
    length_gen: LengthGenConfig | None = doc(None, "after training, evaluate perplexity at lengths from min_factor to "
                                                   "max_factor x the training window on eval_manifest ({} for the "
                                                   "defaults, or eval's length_gen fields); null: not. With stages: "
                                                   "at the end of each, against its window")
    stages: list[StageConfig] = doc(factory=list, help="staged context extension: stages run in order, each from the "
                                                       "last one's weights with its own steps, window, batch, data and "
                                                       "learning rate (StageConfig fields); `steps` is then their "
                                                       "total. Empty: one stage, this config")

    def __post_init__(self) -> None:
        self.output_dir = Path(self.output_dir)
        for name in ("steps", "log_every", "eval_frames", "keep_checkpoints"):
            check(getattr(self, name) >= 1, name, "an integer >= 1", getattr(self, name))
        for name in ("eval_every", "checkpoint_every"):
            check(getattr(self, name) >= 0, name, "an integer >= 0", getattr(self, name))
        if self.async_checkpoint and self.checkpoint_format == "consolidated":
            raise ValueError("async_checkpoint: writes sharded checkpoints in the background; checkpoint_format "
                             "consolidated gathers them to rank 0 (use sharded, or auto under fsdp)")
        if self.length_gen is not None and self.data.eval_manifest is None:
            raise ValueError("length_gen: evaluates on data.eval_manifest, which is not set")
        if self.ttt is None and self.trainable in ("ttt", "ttt+lora"):
            raise ValueError(f"trainable: {self.trainable!r} needs a 'ttt' section (the baseline trains 'lora' or 'full')")
        if self.ttt is not None and self.trainable == "lora":
            raise ValueError("trainable: 'lora' leaves the TTT layers untrained; use 'ttt+lora'")
        if self.model.is_llama:
            self._check_llama()
        e2e = self.ttt is not None and self.ttt.is_e2e
        if self.meta and not e2e:
            raise ValueError(f"trainable: {self.trainable!r} meta-trains E2E layers; it needs ttt.layer_type: e2e_mlp")
        if self.ttt is not None:  # a window is a chunk of the stream: the one chunk rule (E2E: multiples of b)
            resolve_chunk_size(self.data.window_frames, self.ttt, "data.window_frames")
        if e2e:
            b, window = self.ttt.mini_batch_size, self.data.window_frames
            if self.meta and window < 2 * b:
                raise ValueError(f"data.window_frames: meta-training needs >= 2 mini-batches per window (the loss "
                                 f"after an adaptation), got {window} frames for mini_batch_size {b}")
            if self.gradient_checkpointing:
                raise ValueError("gradient_checkpointing: not available with e2e_mlp layers")
            if self.distributed == "fsdp":
                # Tried (torch 2.13): the E2E update differentiates the model's loss *inside* the outer
                # forward (torch.autograd.grad); that inner backward fires FSDP's backward hooks, which
                # reshard the units, the root included, in the middle of the forward that reads them
                # (DTensor mixed with Tensor); the update also reads W₀ outside any unit's forward, and
                # fully_shard refuses the scalar lr_logit. Working around it would keep every unit
                # gathered for the whole step: DDP's memory for weights, FSDP's complexity.
                raise ValueError("distributed: 'fsdp' does not take e2e_mlp layers (their test-time update runs a "
                                 "backward inside the forward, where FSDP's hooks reshard the parameters the "
                                 "forward still reads; docs/training.md §5); use ddp")
        self._check_stages()  # last: the run's own fields are refused as themselves, not as a stage's

    def _check_llama(self) -> None:
        """What host llama does not take (docs/llama_omni.md, "Train")."""
        if self.trainable not in LLAMA_TRAINABLE:
            raise ValueError(f"trainable: model.host llama trains {', '.join(LLAMA_TRAINABLE)}, got {self.trainable!r}")
        if self.ttt is not None and self.ttt.is_e2e:
            raise ValueError("ttt.layer_type: e2e_mlp is implemented for Moshi only; model.host llama takes linear or mlp")
        if self.data.window_seconds is not None:
            raise ValueError("data.window_seconds: model.host llama reads token streams; give data.window_frames "
                             "(tokens per window)")

    def _check_stages(self) -> None:
        """Every stage valid as the config it runs as (before step 1, not at its start); `steps` their total."""
        if not self.stages:
            return
        names = [s.name for s in self.stages]
        check(len(set(names)) == len(names), "stages", "stages of distinct names", names)
        total = sum(s.steps for s in self.stages)
        check(self.steps == total, "steps", f"the stages' total, {total} (with stages, steps is their sum)", self.steps)
        for i, stage in enumerate(self.stages):
            try:
                stage.apply(self)
            except ValueError as e:
                raise ValueError(f"stages[{i}] ({stage.name}): {e}") from None

    def stage_configs(self) -> list[tuple[str | None, "TrainConfig"]]:
        """(name, the config it runs as) of each stage; without stages one, (None, self)."""
        return [(s.name, s.apply(self)) for s in self.stages] or [(None, self)]

    @property
    def uses_lora(self) -> bool:
        return "lora" in self.trainable

    @property
    def meta(self) -> bool:
        """Meta-training of E2E layers: second-order gradients through the inner updates."""
        return self.trainable.startswith("e2e-meta")


def load_train_config(path: str | Path, overrides: list[str] = ()) -> TrainConfig:
    """YAML file + `key.sub=value` overrides → a validated `TrainConfig` (ValueError naming the field).
    Relative paths in the config are relative to the working directory, as in moshi-finetune."""
    return load_config(TrainConfig, path, overrides, "train")


# Settings a resumed run may change (applied, and recorded in its next checkpoints): how long it runs,
# how it reports, where it writes. Everything else would make the resumed run another run than the
# one checkpointed (batch rows, learning rate, data, model, TTT layers): refused. `model.device` and
# `distributed` move the run (e.g. onto more GPUs): allowed, but not bit for bit.
RESUME_FREE = ("steps", "log_every", "eval_every", "eval_frames", "checkpoint_every", "keep_checkpoints",
               "checkpoint_format", "async_checkpoint", "output_dir", "wandb", "length_gen", "data.eval_manifest", "data.codes_cache")
RESUME_MOVES = ("model.device", "distributed")


def resume_changes(saved: dict, current: dict) -> tuple[list[str], list[str]]:
    """Compare a checkpoint's config with the one of the resuming run (both `schema.to_dict` trees).

    Returns (free changes, moves) as "field: old in the checkpoint, new now" lines; a change of any
    other field is a ValueError naming it. A field one side lacks counts as a change when that side
    has a section above it null or empty (`ttt: null`, `model.tiny: {}`), and is ignored otherwise
    (a field of another version of the config)."""
    free, moves, refused = [], [], []
    old, new = _flatten(saved), _flatten(current)
    for key in sorted(set(old) | set(new)):
        before, after = old.get(key, _UNSET), new.get(key, _UNSET)
        if before == after:
            continue
        if before is _UNSET and not _under_empty(key, old) or after is _UNSET and not _under_empty(key, new):
            continue
        line = f"{key}: {_show(before)} in the checkpoint, {_show(after)} now"
        if any(key == p or key.startswith(p + ".") for p in RESUME_FREE):
            free.append(line)
        elif key in RESUME_MOVES:
            moves.append(line)
        else:
            refused.append(line)
    if refused:
        more = f" (and {len(refused) - 1} more change(s))" if len(refused) > 1 else ""
        raise ValueError(f"--resume: {refused[0]}{more}; an exact resume cannot change it: drop the override or "
                         f"start a new run (a resume may change {', '.join(RESUME_FREE)})")
    return free, moves


_UNSET = object()  # a field one config does not have


def _under_empty(key: str, flat: dict) -> bool:
    """Whether a section above `key` is null or empty in `flat` (so `key` is unset there, not unknown)."""
    parts = key.split(".")
    return any(flat.get(".".join(parts[:n]), _UNSET) in (None, {}) for n in range(1, len(parts)))


def _show(value) -> str:
    return "unset" if value is _UNSET else repr(value)


def _flatten(tree, prefix: str = "") -> dict:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        out.update(_flatten(value, name) if isinstance(value, dict) and value else {name: value})
    return out
