"""`GenerationConfig`: what to generate and how to sample it (validated in one place)."""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Literal, Mapping

from ..data import FRAME_RATE
from ..schema import doc
from .sampling import check_value

# field → kind of check (see sampling.check_value)
_CHECKS = {
    "max_duration": "duration",
    "temperature": "temperature", "text_temperature": "temperature",
    "top_k": "top_k", "text_top_k": "top_k",
    "top_p": "top_p", "text_top_p": "top_p",
}


@dataclass
class SamplingConfig:
    """How a stream is sampled (defaults: moshi's LMGen, no top-p): a generation without its length,
    for callers that set the length themselves (`eval continuation`)."""

    temperature: float = doc(0.8, "audio sampling temperature; 0 = greedy")
    text_temperature: float = doc(0.7, "text sampling temperature; 0 = greedy")
    top_k: int = doc(250, "audio: sample among the k most likely codes; 0 = no limit")
    text_top_k: int = doc(25, "text: sample among the k most likely tokens; 0 = no limit")
    top_p: float = doc(1.0, "audio: nucleus sampling, in (0, 1]; 1 = off")
    text_top_p: float = doc(1.0, "text: nucleus sampling, in (0, 1]; 1 = off")
    seed: int = doc(0, "seed of the sampling RNG of a new stream (a resumed stream continues its saved RNG)")
    prompt_text: Literal["force", "free"] = doc(
        "force", "text stream during a prompt: 'force' = the prompt's transcript, or padding when it has "
                 "none (the training layout); 'free' = the model samples it")

    def __post_init__(self) -> None:
        validate({f.name: getattr(self, f.name) for f in fields(self)})


@dataclass
class GenerationConfig(SamplingConfig):
    """Sampling settings and length of a generation."""

    max_duration: float = doc(10.0, f"seconds generated after each prompt ({FRAME_RATE:g} frames per second)")

    @property
    def num_frames(self) -> int:
        """Frames generated per prompt: ⌈max_duration · FRAME_RATE⌉."""
        return max(1, math.ceil(self.max_duration * FRAME_RATE - 1e-9))


def validate(values: Mapping[str, object], names: Mapping[str, str] | None = None) -> None:
    """Check generation settings; errors name a setting as `names[field]` (default: the field)."""
    names = names or {}
    for field, kind in _CHECKS.items():
        if field in values:
            check_value(values[field], names.get(field, field), kind=kind)
    if "seed" in values:
        seed = values["seed"]
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"{names.get('seed', 'seed')}: expected an integer >= 0, got {seed!r}")
    if "prompt_text" in values and values["prompt_text"] not in ("force", "free"):
        raise ValueError(f"{names.get('prompt_text', 'prompt_text')}: expected force or free, "
                         f"got {values['prompt_text']!r}")
