"""A live conversation with a (TTT-patched) Moshi, frame by frame, as moshi's server runs one.

Each 80 ms of the user's audio (one Mimi frame, `mimi.frame_size` samples) is encoded by Mimi's
streaming encoder, its codes go to one `LMGen.step` (the user stream's newest frame,
`GenerationSession.step`), and the frame the step emits is decoded by Mimi's streaming decoder:
one frame in, at most one frame out (none during the first `max_delay` steps). Codes can be fed
instead of audio (`feed_codes`), which keeps the codec out of the loop.

A fresh stream applies moshi's first-frame rule (moshi 0.2.13 `server.py`, `recv_loop`): the
first encoded frame still goes to `LMGen.step`, but Mimi's streaming state is reset after it, so
the encoder re-applies its left padding to the next frame. A restored stream continues its saved
Mimi state instead: the user's audio is one stream across connections.

`state_dict` holds everything the conversation needs to go on: the generation session's (LMGen,
KV caches, TTT state, RNG), Mimi's streaming state (encoder and decoder) and the audio not yet a
whole frame. Restored into a new `LiveStream` of the same model and codec, it continues exactly.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor

from ..moshi.internals import load_moshi_states, moshi_states_to_tensors, stream_position
from .config import GenerationConfig
from .contexts import OwnsContexts
from .decode import PREFIX as MIMI_PREFIX
from .loading import check_codec
from .session import Frame, GenerationSession
from .state import model_fingerprint


@dataclass
class LiveFrame:
    """What one frame of input produced."""

    frame: Frame         # the step's output (batch of 1)
    pcm: Tensor | None   # float32 [frame_size] decoded audio of the emitted frame (None: nothing emitted,
                         # or codes fed without decoding)
    seconds: float       # time spent on this frame: encode + LMGen.step + decode

    @property
    def emitted(self) -> bool:
        return bool(self.frame.emitted[0])

    @property
    def text(self) -> int:
        """The emitted frame's text token (-1: none)."""
        return int(self.frame.text[0])

    @property
    def codes(self) -> Tensor:
        """[1 + dep_q] text token then Moshi's audio codes of the emitted frame (all -1: none)."""
        return torch.cat([self.frame.text[:1], self.frame.audio[0]])


def check_live_model(lm, mimi) -> None:
    """A live conversation needs an LM that streams Mimi's codebooks both ways (Moshi's 8 + the user's 8),
    with Mimi's codes (a model trained on other codes, e.g. `ttt-speech train tiny`'s, cannot use Mimi)."""
    if lm.dep_q < mimi.num_codebooks or lm.num_codebooks - 1 - lm.dep_q != mimi.num_codebooks:
        raise ValueError(f"the LM streams {lm.dep_q} + {lm.num_codebooks - 1 - lm.dep_q} audio codebooks; "
                         f"Mimi encodes and decodes {mimi.num_codebooks}: a live conversation needs both")
    check_codec(lm, mimi)


class LiveStream(OwnsContexts):
    """One conversation (batch 1): user audio or codes in, Moshi's audio, text and codes out.

        with LiveStream(lm, mimi, GenerationConfig(seed=1)) as live:
            for out in live.feed_pcm(pcm):          # float32 [S] at mimi.sample_rate, any length
                play(out.pcm) if out.pcm is not None else None
            tensors, meta = live.state_dict()       # later, in a new LiveStream of the same model:
            live.load_state_dict(tensors, meta)     # the conversation goes on
    """

    def __init__(self, lm, mimi, config: GenerationConfig | None = None, silence: Tensor | None = None) -> None:
        from ..data.audio import silence_codes

        check_live_model(lm, mimi)
        self.lm, self.mimi = lm, mimi
        self.frame_size = mimi.frame_size
        self.sample_rate = mimi.sample_rate
        self.device = next(mimi.parameters()).device
        # the user stream is always given here; the session still needs the codec's silence (its state holds it)
        silence = silence_codes(mimi) if silence is None else silence
        super().__init__()
        self.session = self._stack.enter_context(GenerationSession(lm, 1, config, silence))
        self._stack.enter_context(mimi.streaming(1))
        self._pcm = torch.zeros(0)       # user audio not yet a whole frame
        self.fresh_encoder = True        # moshi's first-frame rule still to apply
        self.frames_in = 0               # user frames taken (audio or codes)
        self.frames_out = 0              # frames Moshi emitted


    @property
    def position(self) -> int:
        """Steps the LM's streaming transformer has seen (== frames_in; -1 when unknown)."""
        return stream_position(self.lm)

    def ttt_state(self) -> dict[str, Tensor]:
        """The TTT layers' live state (fast weights and counters), keyed as in `state_dict` (`ttt.*`);
        empty for a model without TTT layers."""
        ttt = self.session.ttt
        return {} if ttt is None else {f"ttt.{k}": v.cpu() for k, v in ttt.stream_state().items()}

    # ------------------------------------------------------------------ input
    @torch.no_grad()
    def feed_pcm(self, pcm: Tensor) -> list[LiveFrame]:
        """User audio (float32 [S], mono, at `sample_rate`, any length): one `LiveFrame` per whole
        frame completed; the rest waits for the next call."""
        pcm = torch.as_tensor(pcm, dtype=torch.float32).reshape(-1)
        buffer = torch.cat([self._pcm, pcm])
        whole = buffer.shape[0] // self.frame_size * self.frame_size
        frames, self._pcm = buffer[:whole], buffer[whole:].clone()
        out = []
        for chunk in frames.reshape(-1, self.frame_size):  # [n, frame_size]
            start = time.perf_counter()
            codes = self.mimi.encode(chunk.to(self.device)[None, None])  # [1, 8, 1]
            if self.fresh_encoder:
                self.mimi.reset_streaming()  # moshi's first-frame rule (see the module docstring)
                self.fresh_encoder = False
            out.append(self._take(codes[0, :, 0].cpu(), start, decode=True))
        return out

    @torch.no_grad()
    def feed_codes(self, codes: Tensor, decode: bool = False) -> list[LiveFrame]:
        """User codes [T, n_user] (or [n_user] for one frame), one `LiveFrame` per frame; `decode`
        also decodes Moshi's frames to audio (off: the codec stays out of the loop)."""
        codes = torch.as_tensor(codes)
        codes = codes[None] if codes.dim() == 1 else codes
        return [self._take(row, time.perf_counter(), decode) for row in codes]

    def _take(self, user: Tensor, start: float, decode: bool) -> LiveFrame:
        frame = self.session.step(user[None])
        self.frames_in += 1
        pcm = None
        if frame.emitted[0]:
            self.frames_out += 1
            if decode:
                codes = frame.audio[:, :self.mimi.num_codebooks, None].to(self.device)  # [1, 8, 1]
                pcm = self.mimi.decode(codes)[0, 0].float().cpu()
        return LiveFrame(frame, pcm, time.perf_counter() - start)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> tuple[dict[str, Tensor], dict]:
        """(tensors, JSON-ready meta): the session's state, Mimi's, and the pending audio."""
        tensors, meta = self.session.state_dict()
        tensors.update(moshi_states_to_tensors(self.mimi.get_streaming_state(), MIMI_PREFIX))
        tensors["live.pcm"] = self._pcm.clone()
        meta["live"] = {"frames_in": self.frames_in, "frames_out": self.frames_out,
                        "fresh_encoder": self.fresh_encoder, "position": self.position,
                        "mimi": model_fingerprint(self.mimi)}
        return tensors, meta

    def load_state_dict(self, tensors: dict[str, Tensor], meta: dict, where: str = "live stream state") -> None:
        """Continue the conversation saved by `state_dict` (same model and codec)."""
        live = meta.get("live")
        if not isinstance(live, dict) or "live.pcm" not in tensors:
            raise ValueError(f"{where}: not the state of a live stream (ttt-speech serve)")
        if live.get("mimi") != model_fingerprint(self.mimi):
            raise ValueError(f"{where}: saved with a different Mimi codec")
        self.session.load_state_dict(tensors, meta, where)
        load_moshi_states(self.mimi.get_streaming_state(), tensors, MIMI_PREFIX, where)
        self._pcm = tensors["live.pcm"].float().reshape(-1)
        self.fresh_encoder = bool(live["fresh_encoder"])
        self.frames_in, self.frames_out = int(live["frames_in"]), int(live["frames_out"])
