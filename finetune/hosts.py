"""What the training recipe asks of a model family (`model.host`), one adapter each.

The recipe (`train.py`) owns the lifecycle (stages, rows, carried state, optimizer, checkpoints,
evaluation cadence, export); an adapter answers the family's questions: how a manifest entry
becomes a stream of training tokens, what one window's forward and loss are, which modules are the
FSDP units, how TTT state is carried between windows, and how length generalisation is measured.
`MoshiHost` (here) trains Kyutai's Moshi on Mimi codes; `LlamaHost` (`llama_host.py`) a
transformers Llama / Qwen2 on token streams.
"""
from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from ttt_speech.data.cache import CodesCache
from ttt_speech.data.layout import moshi_streams
from ttt_speech.data.manifest import ManifestEntry
from ttt_speech.data.recording import load_recording
from ttt_speech.config import TTTConfig
from ttt_speech.models import ModelConfig, check_family, load_mimi, load_text_tokenizer

from .config import TrainConfig
from .loss import LossTerms, loss_terms, summarize, total_loss


def autocast(config: TrainConfig, device: torch.device):
    """bf16 autocast when config.precision says so (TTT state stays float32 inside it)."""
    if config.precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class StreamLoader(Protocol):
    """Manifest entry index → its stream: `codes(i)` [K, T] (what length-gen reads; T its length),
    `loader(i)` the once-shifted training stream, inputs then targets stacked, [2K, T']."""

    def codes(self, index: int) -> Tensor: ...

    def __call__(self, index: int) -> Tensor: ...


class Carry(Protocol):
    """Each row's TTT state across the windows of its stream (`TTTCarry` for Moshi, `CacheCarry` for host
    llama): the recipe starts windows, checkpoints and restores it, and reads it for statistics."""

    handle: Any  # the model's `TTTModel`

    def next_window(self, reset: Tensor | None = None) -> None: ...

    def initial_weights(self) -> list[nn.Parameter]: ...

    @property
    def resets_pending(self) -> bool: ...

    def current(self) -> list: ...

    def window_start_state_dict(self) -> dict[str, Tensor]: ...

    def state_dict(self) -> dict[str, Tensor]: ...

    def load_state_dict(self, tensors: dict[str, Tensor], where: str = ...) -> None: ...

    def paused(self) -> contextlib.AbstractContextManager: ...

    def close(self) -> None: ...


class Terms(Protocol):
    """One window's loss as weighted sums and weights (`stacked()`: what the ranks all-reduce)."""

    def stacked(self) -> Tensor: ...


class TrainHost(Protocol):
    """A model family's answers to the recipe (see the module doc)."""

    unit: str  # what a stream position is called in logs: "frames" or "tokens"
    kinds: tuple[tuple[str, ...], str] | None  # the files its manifests list (`read_manifest`'s kinds)

    def check_model(self, model: ModelConfig) -> None: ...

    def patch(self, lm: nn.Module, ttt: TTTConfig) -> None: ...

    def checkpoint_layers(self, lm: nn.Module) -> None: ...

    def loader(self, entries: list[ManifestEntry], lm: nn.Module, config: TrainConfig) -> StreamLoader: ...

    def pad_id(self, lm: nn.Module) -> int: ...

    def tokens_per_position(self, lm: nn.Module) -> int: ...

    def window_model(self, lm: nn.Module, config: TrainConfig) -> nn.Module: ...

    def layers(self, lm: nn.Module) -> list[nn.Module]: ...

    def carry(self, lm: nn.Module, rows: int) -> Carry: ...

    def window_terms(self, model: nn.Module, lm: nn.Module, config: TrainConfig, stream: Tensor, carry: Carry | None,
                     device: torch.device, evaluating: bool = False) -> Terms: ...

    def summarize(self, stacked: Tensor) -> dict[str, float]: ...

    def total_loss(self, terms: Terms, global_sums: Tensor | None, world: int) -> Tensor: ...

    def length_gen(self, lm: nn.Module, entries: list[ManifestEntry], config: TrainConfig, folder: Path,
                   wandb_run) -> tuple[Any, dict]: ...


def host_of(config: TrainConfig) -> TrainHost:
    """The adapter of config.model.host."""
    if config.model.is_llama:
        from .llama_host import LlamaHost

        return LlamaHost()
    return MoshiHost()


class RecordingLoader:
    """Manifest entry → Moshi streams [K, T] (code files directly; audio through the codes cache)."""

    def __init__(self, entries: list[ManifestEntry], lm: nn.Module, config: TrainConfig) -> None:
        self.entries, self.lm = entries, lm
        model = config.model
        self.cache = CodesCache(config.data.codes_cache, model.codec_id(), lambda: load_mimi(model))
        self.tokenizer = functools.cache(lambda: load_text_tokenizer(model))  # loaded once, on first need

    def codes(self, index: int) -> Tensor:
        """The recording in Moshi's stream layout, [K, T] (text from a word-timed transcript next to an
        audio file, moshi-finetune's `.json`; padding otherwise)."""
        path = self.entries[index].path
        return moshi_streams(self.lm, load_recording(path, self.cache, self.lm, self.tokenizer), where=str(path))

    def __call__(self, index: int) -> Tensor:
        """The recording's once-delayed stream: inputs then targets stacked, [2K, T]."""
        from ttt_speech.moshi.teacher_forcing import delayed_streams

        codes = self.codes(index)
        inputs, targets = delayed_streams(self.lm, codes[None].to(next(self.lm.parameters()).device))
        return torch.cat([inputs[0], targets[0]]).cpu()


class MoshiHost:
    """Moshi: Mimi-code recordings, `ChunkModel` windows, `TTTCarry`, moshi-finetune's loss."""

    unit = "frames"
    kinds = None  # audio or code files

    def check_model(self, model: ModelConfig) -> None:
        """A family the commands run, from config.json alone (`ttt_speech/families.py`)."""
        check_family(model)

    def patch(self, lm: nn.Module, ttt: TTTConfig) -> None:
        from ttt_speech.moshi import patch_moshi

        patch_moshi(lm, ttt)  # logs its report

    def checkpoint_layers(self, lm: nn.Module) -> None:
        lm.transformer.checkpointing = True

    def loader(self, entries: list[ManifestEntry], lm: nn.Module, config: TrainConfig) -> RecordingLoader:
        return RecordingLoader(entries, lm, config)

    def pad_id(self, lm: nn.Module) -> int:
        return lm.zero_token_id  # no input, no loss

    def tokens_per_position(self, lm: nn.Module) -> int:
        return lm.num_codebooks

    def window_model(self, lm: nn.Module, config: TrainConfig) -> nn.Module:
        from ttt_speech.moshi.teacher_forcing import ChunkModel

        return ChunkModel(lm, meta=config.meta)

    def layers(self, lm: nn.Module) -> list[nn.Module]:
        from ttt_speech.moshi import transformer_layers

        return list(transformer_layers(lm))

    def carry(self, lm: nn.Module, rows: int):
        from ttt_speech.moshi.carry import TTTCarry

        return TTTCarry(lm, rows)

    def window_terms(self, model: nn.Module, lm: nn.Module, config: TrainConfig, stream: Tensor, carry,
                     device: torch.device, evaluating: bool = False) -> LossTerms:
        """stream [B, 2K, W] (inputs then targets) → the window's loss terms (the carried TTT state
        lives in the modules: `carry` is already set up for the window)."""
        inputs, targets = stream.to(device).chunk(2, dim=1)
        with autocast(config, device):
            text_logits, audio_logits = model(inputs, targets, **({"meta": False} if evaluating else {}))
        return loss_terms(text_logits, audio_logits, targets, lm.text_card, lm.card, lm.audio_offset,
                          lm.text_padding_token_id, config.data.first_codebook_weight, config.data.text_padding_weight)

    def summarize(self, stacked: Tensor) -> dict[str, float]:
        return summarize(stacked)

    def total_loss(self, terms: LossTerms, global_sums: Tensor | None, world: int) -> Tensor:
        return total_loss(terms, global_sums, world)

    def length_gen(self, lm: nn.Module, entries: list[ManifestEntry], config: TrainConfig, folder: Path, wandb_run):
        from ttt_speech_apps.eval.length_gen import after_training

        loader = RecordingLoader(entries, lm, config)
        streams = {entry.path.stem: loader.codes(i) for i, entry in enumerate(entries)}
        return after_training(lm, streams, config.data.window_frames, config.length_gen, folder, wandb_run)

