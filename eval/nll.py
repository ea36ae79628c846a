"""Teacher-forced per-position NLL of one stream, in the two evaluation modes (docs/architecture.md §8).

Both modes score the same thing: for every frame t and every predicted stream k (text, then
Moshi's audio codebooks), −log p(code[k, t] | everything the model may see), in nats. NLL is
computed in the *delayed* layout, right where each logit is produced, against the delayed targets
of `delayed_streams`, and undelayed at the end with the same `undelay_logits` as training. Only
[K, T] floats are kept: the logits of a 24k-frame stream (text_card 32000) would need gigabytes.

- **chunked**: `forward_text` + `forward_depformer_training` per chunk of the once-delayed stream
  inside `lm.streaming(1)` (`teacher_forcing.chunk_logits`).
- **native**: one frame per `LMGen` step, the ground truth forced exactly as moshi's streaming
  inference would have produced it (see `native_step_inputs`): the test that both modes agree is
  the test of the evaluator itself.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from ttt_speech.moshi import _import  # noqa: F401  (clear message when moshi is missing)
from moshi.models.lm import LMGen, LMModel
from ttt_speech.config import resolve_chunk_size
from ttt_speech.handle import TTTModel, inference_context
from ttt_speech.moshi.internals import step_with_transformer_output
from ttt_speech.moshi.teacher_forcing import chunk_logits, delayed_streams, undelay_logits, widen_kv_caches

from .fast_weights import FastWeightTrace
from .memory import PeakMemory


class NonFiniteError(ValueError):
    """A NaN or inf where a real prediction exists: the evaluation stops (never reported as a number)."""


@dataclass
class StreamNLL:
    """Per-position teacher-forced NLL of one stream in one mode.

    nll [K, T] float32 nats, K = 1 + dep_q (row 0 text, rows 1.. Moshi's audio codebooks); NaN
    exactly where `mask` is false. mask [K, T] bool: a prediction exists (the delayed codebooks
    have none for their last `delay` frames; moshi's zero token is never scored).
    """

    nll: Tensor
    mask: Tensor
    mode: str
    seconds: float
    peak_memory: int | None  # bytes above the level at the start (see memory.PeakMemory)
    memory_kind: str
    weights: FastWeightTrace | None  # ‖W_t − W_0‖ per TTT layer at chunk boundaries, None without TTT
    # the TTT stream state at the end (`TTTModel.stream_state`, on the model's device; {} without TTT
    # layers), when asked for with `chunked_nll(..., return_state=True)`; None otherwise
    state: dict[str, Tensor] | None = None

    @property
    def frames(self) -> int:
        return self.nll.shape[1]


def token_nll(logits: Tensor, targets: Tensor) -> Tensor:
    """logits [B, K, S, V], targets [B, K, S] → NLL [B, K, S] float32.

    Targets outside [0, V) (moshi's initial token at the start of a delayed codebook, the zero
    token) have no prediction: NaN there, later masked by the undelay.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    valid = (targets >= 0) & (targets < logits.shape[-1])
    picked = logp.gather(-1, targets.clamp(0, logits.shape[-1] - 1)[..., None])[..., 0]
    return torch.where(valid, -picked, torch.full_like(picked, float("nan")))


def undelay_nll(lm: LMModel, codes: Tensor, text_nll: Tensor, audio_nll: Tensor, where: str) -> tuple[Tensor, Tensor]:
    """Delayed NLL (text [1, 1, T], audio [1, dep_q, T]) → (nll [K, T], mask [K, T]) aligned with codes.

    Fails loudly (NonFiniteError naming the frame and stream) on any NaN/inf at a scored position.
    """
    out = undelay_logits(lm, codes[None], text_nll[..., None], audio_nll[..., None])
    nll = torch.cat([out.text_logits[..., 0], out.logits[..., 0]], dim=1)[0]
    mask = torch.cat([out.text_mask, out.mask], dim=1)[0]
    bad = mask & ~torch.isfinite(nll)
    if bad.any():
        k, t = (int(i) for i in bad.nonzero()[0])
        stream = "text" if k == 0 else f"audio codebook {k}"
        raise NonFiniteError(f"{where}: non-finite NLL ({nll[k, t].item()}) at frame {t}, {stream} "
                             f"({int(bad.sum())} positions in all)")
    return torch.where(mask, nll, torch.full_like(nll, float("nan"))), mask


def _progress(total: int, desc: str, enabled: bool):
    from ttt_speech.progress import progress_bar

    return progress_bar(total=total, desc=desc, unit="frame", enabled=enabled, leave=False)


def _check_codes(lm: LMModel, codes: Tensor, where: str) -> None:
    if codes.dim() != 2 or codes.shape[0] != lm.num_codebooks:
        raise ValueError(f"{where}: expected codes [{lm.num_codebooks}, T], got {tuple(codes.shape)}")
    if codes.shape[1] < 1:
        raise ValueError(f"{where}: empty stream")


def chunked_nll(lm: LMModel, codes: Tensor, chunk_size: int | None = None, *, where: str = "stream",
                progress: bool = False, trace_every: int | None = None,
                initial_state: dict[str, Tensor] | None = None, return_state: bool = False) -> StreamNLL:
    """Chunked mode: codes [K, T] (one stream, Moshi's layout) → `StreamNLL`.

    A fresh `lm.streaming(1)` (empty KV cache and TTT state); chunks of `chunk_size` frames of the
    once-delayed stream (None: the default of `resolve_chunk_size`). ‖W_t − W_0‖ is recorded at
    every multiple of `trace_every` (default: every chunk end; it must be a multiple of
    chunk_size) and at the end.

    initial_state: a TTT stream state (`StreamNLL.state` of an earlier call, `TTTModel.stream_state`)
    loaded before the first chunk: the stream starts with an empty KV cache but with these fast
    weights ({} for a model without TTT layers). return_state: keep the final TTT state in
    `StreamNLL.state`.
    """
    _check_codes(lm, codes, where)
    handle = TTTModel.find(lm)
    chunk_size = resolve_chunk_size(chunk_size, handle.config if handle else None, "eval.chunk_size",
                                    frames=codes.shape[1])
    trace_every = trace_every or chunk_size
    if trace_every % chunk_size:
        raise ValueError(f"trace_every ({trace_every}) must be a multiple of chunk_size ({chunk_size})")
    device = lm.device
    codes = codes.to(device)
    T = codes.shape[1]
    inputs, targets = delayed_streams(lm, codes[None])
    a0, a1 = lm.audio_offset, lm.audio_offset + lm.dep_q
    texts, audios = [], []
    state = None
    with inference_context(lm), PeakMemory(device) as memory, lm.streaming(1), \
            _progress(T, f"{where} (chunked)", progress) as bar:
        widen_kv_caches(lm, chunk_size)  # moshi's ring cache is one chunk too short beyond its context
        if initial_state is not None:
            load_stream_state(handle, initial_state, f"{where}: initial_state")
        trace = FastWeightTrace.attach(lm)
        start_time = time.perf_counter()
        for start in range(0, T, chunk_size):
            stop = min(start + chunk_size, T)
            text, audio = chunk_logits(lm, inputs[:, :, start:stop], targets[:, :, start:stop])
            texts.append(token_nll(text, targets[:, :1, start:stop]))
            audios.append(token_nll(audio, targets[:, a0:a1, start:stop]))
            if trace is not None and (stop % trace_every == 0 or stop == T):
                trace.record(stop)
            bar.update(stop - start)
        _sync(device)
        seconds = time.perf_counter() - start_time
        if return_state:
            state = handle.stream_state() if handle is not None else {}
    nll, mask = undelay_nll(lm, codes, torch.cat(texts, dim=2), torch.cat(audios, dim=2), f"{where} (chunked)")
    return StreamNLL(nll.cpu(), mask.cpu(), "chunked", seconds, memory.peak, memory.kind, trace, state)


def batched_nll(lm: LMModel, streams: list[Tensor], chunk_size: int | None = None, *,
                where: str = "streams") -> list[tuple[Tensor, Tensor]]:
    """Chunked mode for several short streams at once: codes [K, T_i] each → (nll [K, T_i], mask [K, T_i])
    each, as `chunked_nll` gives them one by one (fresh streams: empty KV cache and TTT state per row),
    to float tolerance. The rows are padded at the end to the longest (with their own last frame): the
    model is causal and its rows independent, so a row's first T_i delayed positions, all that its
    NLL reads, see none of the padding (tests/test_eval_nll.py pins it to `chunked_nll`). For many
    recordings (the zero-shot suite), where one call per recording would cost a stream's set-up,
    caches and syncs each."""
    for i, codes in enumerate(streams):
        _check_codes(lm, codes, f"{where}[{i}]")
    handle = TTTModel.find(lm)
    longest = max(codes.shape[1] for codes in streams)
    chunk_size = resolve_chunk_size(chunk_size, handle.config if handle else None, "eval.chunk_size",
                                    frames=longest)
    device = lm.device
    padded = torch.stack([torch.cat([c, c[:, -1:].expand(-1, longest - c.shape[1])], dim=1)
                          for c in streams]).to(device)  # [B, K, T_max]
    inputs, targets = delayed_streams(lm, padded)
    a0, a1 = lm.audio_offset, lm.audio_offset + lm.dep_q
    texts, audios = [], []
    with inference_context(lm), lm.streaming(len(streams)):
        widen_kv_caches(lm, chunk_size)
        for start in range(0, longest, chunk_size):
            stop = min(start + chunk_size, longest)
            text, audio = chunk_logits(lm, inputs[:, :, start:stop], targets[:, :, start:stop])
            texts.append(token_nll(text, targets[:, :1, start:stop]))  # [B, 1, S]
            audios.append(token_nll(audio, targets[:, a0:a1, start:stop]))  # [B, dep_q, S]
    text_nll, audio_nll = torch.cat(texts, dim=2), torch.cat(audios, dim=2)
    out = []
    for i, codes in enumerate(streams):
        T = codes.shape[1]
        nll, mask = undelay_nll(lm, codes.to(device), text_nll[i:i + 1, :, :T], audio_nll[i:i + 1, :, :T],
                                f"{where}[{i}]")
        out.append((nll.cpu(), mask.cpu()))
    return out


def load_stream_state(handle: TTTModel | None, tensors: dict[str, Tensor], where: str) -> None:
    """Load a `StreamNLL.state`: {} is a no-op for a model without TTT layers (`handle` None)."""
    if handle is not None:
        handle.load_stream_state(tensors, where)
    elif tensors:
        raise ValueError(f"{where}: the model has no TTT layers to load a TTT state into")


def native_step_inputs(lm: LMModel, codes: Tensor, targets: Tensor, t: int) -> tuple[Tensor, Tensor, Tensor]:
    """What `LMGen` must be given at step t to see exactly the training inputs (docs/architecture.md §8).

    codes [1, K, T] (undelayed), targets [1, K, T] (delayed, from `delayed_streams`). Returns
    - user [1, n_user, 1]: the user's frame t−1. LMGen writes what it is given at step t into its
      delay cache to be read at step t + delay, where training reads code[t + delay − (delay + 1)]:
      one frame earlier than the step (step 0 is never read: initial token, any value will do);
    - audio [1, dep_q, 1]: Moshi's own codes as the depformer would have produced them at step t,
      i.e. the delayed *targets* of step t (`depformer_replace_tokens`);
    - text [1]: the text token of step t (its delayed target), forced through the logits hook.
    """
    u0 = lm.audio_offset + lm.dep_q
    if t == 0:
        user = torch.full_like(codes[:, u0:, :1], lm.initial_token_id)
    else:
        user = codes[:, u0:, t - 1:t]
    audio = targets[:, lm.audio_offset:lm.audio_offset + lm.dep_q, t:t + 1]
    return user, audio, targets[:, 0, t]


def native_nll(lm: LMModel, codes: Tensor, *, where: str = "stream", progress: bool = False,
               trace_every: int | None = None) -> StreamNLL:
    """Native mode: codes [K, T] → `StreamNLL`, one frame per `LMGen` step with the ground truth forced.

    Text logits are taken (and the text token forced to its target) in `on_text_logits_hook`;
    Moshi's audio is forced with `depformer_replace_tokens`; audio logits come from
    `forward_depformer_training` on the step's own transformer output with the ground-truth
    previous codebooks (what the depformer is trained on). ‖W_t − W_0‖ is recorded at multiples
    of `trace_every` and at the end.
    """
    _check_codes(lm, codes, where)
    device = lm.device
    codes = codes.to(device)[None]
    T = codes.shape[2]
    inputs, targets = delayed_streams(lm, codes)
    a0, a1 = lm.audio_offset, lm.audio_offset + lm.dep_q
    forced: list[Tensor] = []
    texts: list[Tensor] = []

    def force_text(text_logits: Tensor) -> None:
        # text_logits [1, 1, 1, text_card]: score it, then make the (greedy) sampler pick the target.
        target = forced[-1]
        texts.append(token_nll(text_logits, target.view(1, 1, 1)))
        text_logits.fill_(float("-inf"))
        text_logits[0, 0, 0, target] = 0.0

    # support_out_of_sync: the step returns the transformer output from the first step on (by
    # default LMGen returns nothing for the first max_delay steps); the audio logits need it.
    gen = LMGen(lm, use_sampling=False, on_text_logits_hook=force_text, support_out_of_sync=True)
    audios = []
    with inference_context(lm), PeakMemory(device) as memory, gen.streaming(1), \
            _progress(T, f"{where} (native)", progress) as bar:
        trace = FastWeightTrace.attach(lm)
        start_time = time.perf_counter()
        for t in range(T):
            user, audio_forced, text_forced = native_step_inputs(lm, codes, targets, t)
            forced.append(text_forced)
            _, transformer_out = step_with_transformer_output(gen, user, audio_forced)
            logits = lm.forward_depformer_training(targets[:, :, t:t + 1], transformer_out)
            audios.append(token_nll(logits, targets[:, a0:a1, t:t + 1]))
            if trace is not None and trace_every and ((t + 1) % trace_every == 0 or t + 1 == T):
                trace.record(t + 1)
            bar.update(1)
        _sync(device)
        seconds = time.perf_counter() - start_time
    if len(texts) != T:
        raise RuntimeError(f"{where}: the text-logits hook ran {len(texts)} times for {T} steps")
    nll, mask = undelay_nll(lm, codes[0], torch.cat(texts, dim=2), torch.cat(audios, dim=2), f"{where} (native)")
    return StreamNLL(nll.cpu(), mask.cpu(), "native", seconds, memory.peak, memory.kind, trace)


MODES: dict[str, Callable[..., StreamNLL]] = {"chunked": chunked_nll, "native": native_nll}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
