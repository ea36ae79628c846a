"""Streaming Mimi decoding of generated frames, row by row, in chunks; its state can be saved.

Mimi decodes a stream of frames exactly like one whole sequence (causal convolutions and a
causal transformer, all moshi streaming modules), so the decoder runs inside `mimi.streaming(B)`
for the whole session and is fed every emitted frame, prompt frames included: the continuation's
audio is decoded with the prompt as context, and a saved decoder state lets a resumed stream's
audio continue without a click. Decoding frame by frame costs ~10x more than in chunks, so frames
are queued and decoded `chunk_frames` at a time (rows that fall behind are decoded later, with
moshi's exec mask leaving the other rows' state untouched).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..moshi import _import  # noqa: F401
from moshi.utils.compile import no_cuda_graph

from ..moshi.internals import load_moshi_states, moshi_states_to_tensors
from .contexts import OwnsContexts
from .session import Frame

PREFIX = "mimi."


class AudioDecoder(OwnsContexts):
    """Frames → pcm per row. `push(frame)` queues what each row emitted; `pull()` returns the
    audio decoded since the last pull (float32 [S] per row, `mimi.sample_rate`), only for frames
    that are kept (generated ones; prompt frames too with `keep_prompt`)."""

    def __init__(self, mimi, batch_size: int, chunk_frames: int = 25, keep_prompt: bool = False) -> None:
        if chunk_frames < 1:
            raise ValueError(f"chunk_frames: expected >= 1, got {chunk_frames}")
        self.mimi = mimi
        self.batch_size = batch_size
        self.chunk_frames = chunk_frames
        self.keep_prompt = keep_prompt
        self.frame_size = mimi.frame_size
        self.sample_rate = mimi.sample_rate
        self.device = next(mimi.parameters()).device
        self._queue: list[list[tuple[Tensor, bool]]] = [[] for _ in range(batch_size)]
        self._out: list[list[Tensor]] = [[] for _ in range(batch_size)]
        super().__init__()
        self._stack.enter_context(mimi.streaming(batch_size))


    @property
    def pending(self) -> int:
        """Frames queued but not decoded yet (largest over rows)."""
        return max(len(q) for q in self._queue)

    def push(self, frame: Frame) -> None:
        for i in range(self.batch_size):
            if frame.emitted[i]:
                if frame.audio.shape[1] < self.mimi.num_codebooks:
                    raise ValueError(f"the LM makes {frame.audio.shape[1]} codebooks, Mimi decodes {self.mimi.num_codebooks}")
                keep = self.keep_prompt or not bool(frame.prompt[i])
                self._queue[i].append((frame.audio[i, :self.mimi.num_codebooks], keep))
        while min(len(q) for q in self._queue) >= self.chunk_frames:
            self._decode(self.chunk_frames, list(range(self.batch_size)))

    def flush(self) -> None:
        """Decode everything queued (rows with fewer frames decoded in extra masked calls)."""
        while self.pending:
            rows = [i for i, q in enumerate(self._queue) if q]
            self._decode(min(min(len(self._queue[i]) for i in rows), self.chunk_frames), rows)

    def pull(self, flush: bool = False) -> list[Tensor]:
        """Audio decoded since the last pull, per row (float32 [S], S a multiple of frame_size)."""
        if flush:
            self.flush()
        out = [torch.cat(o) if o else torch.zeros(0) for o in self._out]
        self._out = [[] for _ in range(self.batch_size)]
        return out

    @torch.no_grad()
    def _decode(self, n: int, rows: list[int]) -> None:
        codes = torch.zeros(self.batch_size, self.mimi.num_codebooks, n, dtype=torch.long)
        keep: dict[int, list[bool]] = {}
        for i in rows:
            items, self._queue[i] = self._queue[i][:n], self._queue[i][n:]
            codes[i] = torch.stack([c for c, _ in items], dim=1)
            keep[i] = [k for _, k in items]
        partial = len(rows) < self.batch_size
        if partial:
            mask = torch.zeros(self.batch_size, dtype=torch.bool)
            mask[rows] = True
            self.mimi.set_exec_mask(mask.to(self.device))
        try:
            with no_cuda_graph():  # chunk sizes vary: no graph capture
                pcm = self.mimi.decode(codes.to(self.device)).float().cpu()  # [B, 1, n·frame]
        finally:
            if partial:
                self.mimi.set_exec_mask(torch.ones(self.batch_size, dtype=torch.bool, device=self.device))
        for i in rows:
            frames = pcm[i, 0].reshape(n, self.frame_size)[torch.tensor(keep[i])]
            if len(frames):
                self._out[i].append(frames.reshape(-1))

    def state_dict(self) -> dict[str, Tensor]:
        """Mimi's streaming state (conv buffers, transformer caches), prefixed `mimi.`; flush first."""
        if self.pending:
            raise ValueError("AudioDecoder: flush() before saving its state (frames are still queued)")
        return moshi_states_to_tensors(self.mimi.get_streaming_state(), PREFIX)

    def load_state_dict(self, tensors: dict[str, Tensor], where: str = "generation state") -> None:
        load_moshi_states(self.mimi.get_streaming_state(), tensors, PREFIX, where)
