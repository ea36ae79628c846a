"""Helpers of the fine-tuning tests: a tiny synthetic corpus and a tiny training config."""
import copy
from pathlib import Path

import yaml

from ttt_speech.data.synthetic import SynthConfig, write_corpus

TINY_MODEL = {"name": "tiny", "tiny": {"card": 64, "text_card": 100, "dim": 64, "num_layers": 2, "context": 16,
                                       "depformer_dim": 32, "depformer_dim_feedforward": 64,
                                       "depformer_num_layers": 1}, "device": "cpu"}


def make_corpus(root: Path, recordings: int = 6, frames: int = 40, eval_recordings: int = 2) -> dict:
    return write_corpus(SynthConfig(recordings=recordings, frames=frames, length_jitter=0.0, eval_frames=None,
                                    card=64, num_motifs=2, motif_frames=4,
                                    eval_recordings=eval_recordings), root / "corpus")


def write_config(root: Path, corpus: dict, **overrides) -> Path:
    config = {
        "model": copy.deepcopy(TINY_MODEL),  # the overrides below write into it
        "ttt": {"layer_type": "linear", "mode": "hybrid", "mini_batch_size": 4, "gate_init": 0.5},
        "data": {"train_manifest": str(corpus["train"]), "window_frames": 12, "batch_size": 2},
        "trainable": "full",
        "optim": {"lr": 1e-3, "schedule": "constant", "warmup_steps": 0},
        "steps": 4, "log_every": 1, "output_dir": str(root / "run"), "wandb": {"mode": "disabled"},
    }
    for key, value in overrides.items():
        node = config
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        if value is None:
            node.pop(last, None)
        else:
            node[last] = value
    root.mkdir(parents=True, exist_ok=True)
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def read_trainable(checkpoint: Path) -> dict:
    """The trainable weights of a training checkpoint folder, whole tensors by name (either format)."""
    from ttt_speech_apps.finetune.checkpointing import read_trainable as read

    return read(checkpoint)
