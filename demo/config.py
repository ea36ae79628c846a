"""`DemoConfig`: the config of `ttt-speech demo` (configs/demo.yaml), loaded and validated here only.

Its sections are the project's ordinary configs: `corpus` is a `SynthConfig` (`ttt-speech data
synth`), `train` a `TrainConfig` (`ttt-speech train`; the baseline is the same section with
`ttt: null`), `eval` the `EvalSettings` of `ttt-speech eval`. The demo only fills in the paths
that connect them (all under `output_dir`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ttt_speech.data.synth_config import SynthConfig
from ttt_speech.models import TINY_MOSHI_KWARGS
from ttt_speech.schema import check, doc, load_config
from ttt_speech_apps.eval.config import EvalSettings
from ttt_speech_apps.finetune.config import TrainConfig


@dataclass
class AudioCheckConfig:
    """The audio path: real LibriVox speech → Mimi codes → both evaluation modes (pipeline check)."""

    enabled: bool = doc(True, "run it when Debian's pocketsphinx-testdata is installed (skipped with a note otherwise)")
    synthetic_seconds: float = doc(20.0, "seconds of the fixture's synthetic book (next to the 24.7 s real one)")
    max_frames: int = doc(400, "frames per stream scored (12.5 per second)")
    native_max_frames: int = doc(100, "frames per stream scored in native mode")

    def __post_init__(self) -> None:
        check(self.synthetic_seconds > 0, "audio.synthetic_seconds", "a positive number", self.synthetic_seconds)
        check(self.max_frames >= 1, "audio.max_frames", "an integer >= 1", self.max_frames)
        check(self.native_max_frames >= 1, "audio.native_max_frames", "an integer >= 1", self.native_max_frames)


@dataclass
class DemoConfig:
    corpus: SynthConfig = doc(factory=SynthConfig, help="")
    train: TrainConfig = doc(factory=TrainConfig, help="")
    eval: EvalSettings = doc(factory=EvalSettings, help="")
    audio: AudioCheckConfig = doc(factory=AudioCheckConfig, help="")
    eval_max_frames: int = doc(1024, "frames scored per held-out stream")
    parallel: bool = doc(True, "train the TTT model and the baseline side by side, one CPU thread each (on 2 "
                               "cores ~1.4x faster than one after the other with 2 threads)")
    output_dir: Path = doc("runs/demo", "everything goes here: corpus/, ttt/, baseline/, eval/, audio/, demo.md, "
                                        "demo.json")

    def __post_init__(self) -> None:
        self.output_dir = Path(self.output_dir)
        check(self.train.ttt is not None, "train.ttt", "a TTT section (the baseline is the same without it)", None)
        check(self.eval_max_frames >= 1, "eval_max_frames", "an integer >= 1", self.eval_max_frames)
        check(self.corpus.eval_recordings >= 1, "corpus.eval_recordings", "an integer >= 1 (held-out streams)",
              self.corpus.eval_recordings)
        model = self.train.model
        card = {**TINY_MOSHI_KWARGS, **model.tiny}["card"] if model.is_tiny else 2048  # Mimi's codebook
        check(card >= self.corpus.card, "train.model.tiny.card", f"at least corpus.card ({self.corpus.card})", card)


def load_demo_config(path: str | Path, overrides: list[str] = ()) -> DemoConfig:
    """configs/demo.yaml + `key.sub=value` overrides → a validated `DemoConfig` (errors name the field)."""
    return load_config(DemoConfig, path, overrides, "demo")
