"""Streaming generation with a (TTT-patched) Moshi: continue prompts frame by frame with `LMGen.step`.

    from ttt_speech.generate import GenerationConfig, stream

    config = GenerationConfig(max_duration=5, temperature=0.8, top_p=0.95, seed=1)
    for frame in stream(lm, ["prompt.wav"], config, mimi=mimi):   # one Frame per LMGen.step
        if frame.generated[0]:
            print(frame.index[0].item(), frame.text[0].item(), frame.audio[0].tolist())

For several consecutive generations on one stream, and to save / resume it, use a session:

    with GenerationSession(lm, batch_size=1, config=config, silence=silence) as session:
        frames = list(session.run([streams]))          # prompt [lm.num_codebooks, T], then 5 s
        save_state("state.safetensors", session)       # TTT + moshi streaming state + RNG
    ...                                                # later, in a new session of the same model:
        load_state("state.safetensors", session)
        more = list(session.run(None, num_frames=25))  # == what the first session would have made next

See docs/generate.md for the command line (`ttt-speech generate`) and the timeline of a stream.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor

from .data import FRAME_RATE
from .data.codes import Recording
from .generation.config import GenerationConfig, SamplingConfig, validate
from .generation.decode import AudioDecoder
from .generation.prompts import load_prompt, prompt_streams
from .generation.sampling import check_sampling, sample_tokens
from .generation.session import Frame, GenerationDiverged, GenerationSession, SamplingLMGen
from .generation.state import read_state, write_state

__all__ = ["FRAME_RATE", "GenerationConfig", "SamplingConfig", "validate", "Frame", "GenerationSession", "GenerationDiverged",
           "SamplingLMGen", "AudioDecoder", "sample_tokens", "check_sampling", "load_prompt", "prompt_streams",
           "save_state", "load_state", "read_state", "write_state", "stream", "continuation", "default_silence",
           "Continuations", "generate"]

Prompt = str | Path | Recording | Tensor


def save_state(path: str | Path, session: GenerationSession, decoder: AudioDecoder | None = None,
               **meta) -> Path:
    """Write the live stream (session, and the decoder's Mimi state if given) to one safetensors file."""
    tensors, info = session.state_dict()
    info["audio_state"] = decoder is not None
    if decoder is not None:
        decoder.flush()
        tensors.update(decoder.state_dict())
    return write_state(path, tensors, {**info, **meta})


def load_state(path: str | Path | tuple[dict, dict], session: GenerationSession,
               decoder: AudioDecoder | None = None) -> dict:
    """Restore a file written by `save_state` (or its (tensors, meta)); returns its metadata.

    A decoder given without saved Mimi state starts fresh (its audio restarts at the boundary).
    """
    where = str(path) if isinstance(path, (str, Path)) else "generation state"
    tensors, meta = read_state(path) if isinstance(path, (str, Path)) else path
    session.load_state_dict(tensors, meta, where)
    if decoder is not None and meta.get("audio_state"):
        decoder.load_state_dict(tensors, where)
    return meta


def _streams(lm, prompt: Prompt, mimi, silence: Tensor | None) -> Tensor:
    if isinstance(prompt, Tensor) and prompt.dim() == 2 and prompt.shape[0] == lm.num_codebooks:
        return prompt
    if isinstance(prompt, Tensor):
        prompt = Recording(prompt)
    elif not isinstance(prompt, Recording):
        prompt = load_prompt(prompt, mimi)
    return prompt_streams(lm, prompt, silence)


def stream(lm, prompts: Sequence[Prompt] | None, config: GenerationConfig | None = None, *, mimi=None,
           silence: Tensor | None = None, state: str | Path | tuple[dict, dict] | None = None) -> Iterator[Frame]:
    """Continue each prompt (audio or code file path, `Recording`, codes [8|16, T] or streams
    [lm.num_codebooks, T]) for `config.max_duration` seconds; one `Frame` per `LMGen.step`.

    `silence` (the user stream outside prompts) defaults to a prompt's own silence codes, else to
    `silence_codes(mimi)`. `state` resumes a saved stream (prompts may then be None: continue).
    """
    config = config or GenerationConfig()
    if prompts is None and state is None:
        raise ValueError("stream: give prompts, or a saved state to continue")
    saved = None
    if state is not None:
        saved = read_state(state) if isinstance(state, (str, Path)) else state
    if silence is None:
        silence = default_silence(prompts or (), saved, mimi)
    streams = None if prompts is None else [_streams(lm, p, mimi, silence) for p in prompts]
    batch = len(streams) if streams is not None else saved[1]["batch_size"]
    with GenerationSession(lm, batch, config, silence) as session:
        if saved is not None:
            load_state(saved, session)
        yield from session.run(streams)


def default_silence(prompts: Sequence[Prompt], saved: tuple[dict, dict] | None, mimi=None) -> Tensor | None:
    """The codes of the user stream outside prompts: a saved stream's, else the first prompt's own
    silence codes (a `Recording` that has them), else Mimi's (`silence_codes`); None without any."""
    if saved is not None:
        return saved[0]["session.silence"]
    for p in prompts:
        if isinstance(p, Recording) and p.silence is not None:
            return p.silence
    if mimi is not None:
        from .data.audio import silence_codes

        return silence_codes(mimi)
    return None


@dataclass
class Continuations:
    """What `generate` made, per row: audio codes [dep_q, T] and text tokens [T] of the frames it
    kept, decoded audio [S] (None without Mimi); the LMGen steps it ran and their seconds (Mimi
    decoding included); whether the audio restarts at a resumed stream (saved without Mimi state)."""

    codes: list[Tensor]
    text: list[Tensor]
    pcm: list[Tensor] | None
    steps: int
    seconds: float
    audio_restarts: bool = False


def generate(lm, streams: list[Tensor] | None, config: GenerationConfig, silence: Tensor, *, batch: int,
             mimi=None, saved: tuple[dict, dict] | None = None, include_prompt: bool = False,
             state_out: str | Path | None = None, state_meta: dict | None = None,
             on_step: Callable[[int, int], None] | None = None) -> Continuations:
    """Continue `streams` ([lm.num_codebooks, T] each; None: only `saved`, the stream `save_state`
    wrote) for `config.num_frames` frames in one batch of `batch` rows, keeping the generated frames
    (and the prompt's with `include_prompt`), decoded by `mimi` when given; the live stream is saved
    to `state_out` at the end (with `state_meta`). on_step(done, total) after each LMGen step.
    A diverged model raises `GenerationDiverged` (nothing saved)."""
    texts: list[list[int]] = [[] for _ in range(batch)]
    audio: list[list[Tensor]] = [[] for _ in range(batch)]
    restarts = False
    with GenerationSession(lm, batch, config, silence) as session:
        decoder = None if mimi is None else AudioDecoder(mimi, batch, keep_prompt=include_prompt)
        try:
            if saved is not None:
                restarts = decoder is not None and not load_state(saved, session, decoder).get("audio_state")
            lengths = [0 if s is None else s.shape[1] for s in (streams or [None] * batch)]
            total = max(session.plan(lengths, config.num_frames))
            start = time.perf_counter()
            for done, frame in enumerate(session.run(streams), start=1):
                keep = frame.emitted if include_prompt else frame.generated
                for i in torch.nonzero(keep).flatten().tolist():
                    texts[i].append(int(frame.text[i]))
                    audio[i].append(frame.audio[i])
                if decoder is not None:
                    decoder.push(frame)
                if on_step is not None:
                    on_step(done, total)
            pcm = decoder.pull(flush=True) if decoder is not None else None
            seconds = time.perf_counter() - start
            if state_out is not None:
                save_state(state_out, session, decoder, **(state_meta or {}))
        finally:
            if decoder is not None:
                decoder.close()
    codes = [torch.stack(a, dim=1) if a else torch.zeros(lm.dep_q, 0, dtype=torch.long) for a in audio]
    return Continuations(codes, [torch.tensor(t, dtype=torch.long) for t in texts],
                         None if pcm is None else list(pcm), total, seconds, restarts)


def continuation(frames: Sequence[Frame], include_prompt: bool = False) -> list[Tensor]:
    """Per row, the frames emitted (generated ones; prompt frames too with `include_prompt`) as
    codes [1 + dep_q, T]: text token then Moshi's audio codes, in order."""
    if not frames:
        return []
    out = []
    for i in range(frames[0].emitted.shape[0]):
        cols = [torch.cat([f.text[i:i + 1], f.audio[i]]) for f in frames
                if f.emitted[i] and (include_prompt or not f.prompt[i])]
        out.append(torch.stack(cols, dim=1) if cols else torch.zeros(1 + frames[0].audio.shape[1], 0, dtype=torch.long))
    return out
