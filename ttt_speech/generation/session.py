"""A live generation stream: prompts forced frame by frame, continuations sampled, through `LMGen.step`.

Timeline of one batch row (moshi's delays: text and codebook 0 at delay 0, codebooks 1-7 at 1).
At LMGen offset o (steps this row has executed), one `step` samples the text token of frame o and
audio codebook k of frame o − delay_k, reads the user stream's frame o − 1 (moshi takes the user
stream one frame later than training does, docs/architecture.md §8), and returns the complete frame
o − max_delay. A prompt occupies frames [F0, F1) of a row: while a token of the prompt is due it is
forced instead of sampled (per row and per codebook, so the frame where the prompt ends is part
forced, part sampled, as in training); the user stream gets the prompt's user codes, and the
codec's silence codes outside prompts.

Rows with prompts of different lengths are aligned at their *ends*: a row with a shorter prompt
waits (moshi's exec mask: its state is untouched) so that all rows start their continuation on the
same step. The sampling noise of a step is drawn for the whole batch from the session's own
`torch.Generator` (none for a greedy stream); with the state saved and restored (see
`state_dict`), a resumed stream is the same as one that never stopped.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import Tensor

from ..moshi import _import  # noqa: F401
from moshi.models.lm import LMGen, LMModel

from ..config import TTTConfig
from ..handle import TTTModel
from ..moshi.internals import (StreamingHooks, lmgen_offsets, load_moshi_states, moshi_states_to_tensors,
                               reset_depformer_graph)
from .config import GenerationConfig, SamplingConfig
from .contexts import OwnsContexts
from .sampling import sample_tokens
from .state import model_fingerprint


def check_generable(ttt: TTTConfig | None) -> None:
    """Refuse a model patched with `ttt` that `LMGen.step` cannot run (E2E layers); None: no TTT."""
    if ttt is not None and ttt.is_e2e:
        raise ValueError("generation: e2e_mlp models cannot run LMGen.step (their update differentiates the "
                         "model's loss over whole mini-batches); score them with `ttt-speech eval` (chunked)")


class GenerationDiverged(RuntimeError):
    """The model's logits became NaN or infinite during generation: the input was valid, the model
    diverged (e.g. broken weights, or overflow in a low-precision dtype). Nothing sampled from such
    logits means anything, so the run stops at the first step that shows them."""

    def __init__(self, step: int | None, stream_step: int, where: list[tuple[int, str]]) -> None:
        self.step, self.stream_step, self.where = step, stream_step, where  # step: of the run (None: a live step)
        places = ", ".join(f"row {row} ({stream})" for row, stream in where)
        at = f"step {step} of this run (step {stream_step} of the stream)" if step is not None else \
            f"step {stream_step} of the stream"
        super().__init__(f"the model diverged: non-finite logits (NaN or inf) at {at} in {places}")


@dataclass
class Frame:
    """What one `LMGen.step` of the session emitted, for each of the B rows."""

    step: int           # steps of this session's stream so far, this one included
    index: Tensor       # [B] frame number in the row's stream (-1: nothing emitted)
    text: Tensor        # [B] text token (-1 where nothing was emitted)
    audio: Tensor       # [B, dep_q] Moshi's audio codes (-1 where nothing was emitted)
    emitted: Tensor     # [B] bool: the row emitted a frame at this step
    prompt: Tensor      # [B] bool: that frame came from a prompt (forced, not sampled)
    # [B, 1 + dep_q] the NLL (nats) of each token of the frame (text, then Moshi's codebooks) under the
    # model's distribution at temperature 1, before top-k / top-p; NaN where the token had no logits (a
    # step whose audio was all forced, a row with nothing emitted, frames begun before a resume).
    # None unless the session scores (`GenerationSession(score=True)`)
    nll: Tensor | None = None

    @property
    def generated(self) -> Tensor:
        """[B] bool: the row emitted a sampled frame."""
        return self.emitted & ~self.prompt


@dataclass
class _Forcing:
    """The tokens forced at one step (prompt tokens due), per row: text [B], audio [B, dep_q], masks alike."""

    text: Tensor
    text_mask: Tensor
    audio: Tensor
    audio_mask: Tensor

    @classmethod
    def none(cls, batch_size: int, dep_q: int) -> "_Forcing":
        return cls(torch.zeros(batch_size, dtype=torch.long), torch.zeros(batch_size, dtype=torch.bool),
                   torch.zeros(batch_size, dep_q, dtype=torch.long), torch.zeros(batch_size, dep_q, dtype=torch.bool))


class SamplingLMGen(StreamingHooks, LMGen):
    """moshi's `LMGen` with this package's sampler (temperature, top-k, top-p, explicit noise) and
    per-row, per-codebook forcing of prompt tokens.

    moshi samples greedily here (`use_sampling=False`); the text token is chosen in the
    `on_text_logits_hook` (the logits are overwritten with a one-hot of the choice, which moshi's
    argmax then takes) and the audio tokens in `depformer_step`. Noise and forced tokens live in
    buffers of the streaming state, filled before each step, so CUDA graphs can replay them.
    Where the sampler sees logits it also records whether they are finite, per row, in
    `state.finite` [B, 1 + dep_q] (text, then each codebook): a device buffer, so the check costs
    no host sync inside the step (and works inside a captured CUDA graph); the session reads it.
    With `score`, it records the NLL of each chosen token the same way, in `state.nll`.
    """

    def __init__(self, lm_model: LMModel, settings: SamplingConfig, score: bool = False) -> None:
        super().__init__(lm_model, use_sampling=False, on_text_logits_hook=self._choose_text,
                         support_out_of_sync=True)
        self.settings = settings
        self.score = score

    def new_streaming_state(self, batch_size: int):
        state = super().new_streaming_state(batch_size)
        lm, device = self.lm_model, self.lm_model.device
        # plain attributes, not dataclass fields: per-step inputs, not state to save
        state.force_text = torch.zeros(batch_size, dtype=torch.long, device=device)
        state.force_text_mask = torch.zeros(batch_size, dtype=torch.bool, device=device)
        state.force_audio = torch.zeros(batch_size, lm.dep_q, dtype=torch.long, device=device)
        state.force_audio_mask = torch.zeros(batch_size, lm.dep_q, dtype=torch.bool, device=device)
        state.noise_text = torch.ones(batch_size, lm.text_card, device=device)
        state.noise_audio = torch.ones(lm.dep_q, batch_size, lm.card, device=device)
        state.finite = torch.ones(batch_size, 1 + lm.dep_q, dtype=torch.bool, device=device)
        state.nll = torch.full((batch_size, 1 + lm.dep_q), float("nan"), device=device)
        return state

    def _choose_text(self, text_logits: Tensor) -> None:
        state, s = self.streaming_state, self.settings
        logits = text_logits[:, 0, 0]
        state.finite[:, 0] = torch.isfinite(logits).all(dim=-1)
        token = sample_tokens(logits, s.text_temperature, s.text_top_k, s.text_top_p, state.noise_text)
        token = torch.where(state.force_text_mask, state.force_text, token)
        if self.score:
            state.nll[:, 0] = _token_nll(logits, token)
        text_logits.zero_().scatter_(-1, token.view(-1, 1, 1, 1), 1.0)

    def depformer_step(self, text_token: Tensor, transformer_out: Tensor) -> Tensor:
        state, s, lm = self.streaming_state, self.settings, self.lm_model
        assert lm.depformer is not None and self.cfg_coef == 1.0
        prev, tokens, finite = text_token, [], []
        with lm.depformer.streaming(text_token.shape[0]):
            for cb in range(lm.dep_q):
                logits = lm.forward_depformer(cb, prev[:, None, None], transformer_out)[:, 0, 0]
                finite.append(torch.isfinite(logits).all(dim=-1))
                token = sample_tokens(logits, s.temperature, s.top_k, s.top_p, state.noise_audio[cb])
                token = torch.where(state.force_audio_mask[:, cb], state.force_audio[:, cb], token)
                if self.score:
                    state.nll[:, 1 + cb] = _token_nll(logits, token)
                tokens.append(token)
                prev = token
        state.finite[:, 1:] = torch.stack(finite, dim=1)
        return torch.stack(tokens, dim=1)


def _token_nll(logits: Tensor, token: Tensor) -> Tensor:
    """[B] −log p(token) under softmax(logits [B, card]) in float32: the model's own distribution,
    whatever the sampler's temperature or top-k."""
    return -torch.log_softmax(logits.float(), dim=-1).gather(-1, token[:, None])[:, 0]


class GenerationSession(OwnsContexts):
    """A stream of `batch_size` rows through a (TTT-patched or plain) moshi `LMModel`.

        with GenerationSession(lm, 2, GenerationConfig(seed=1), silence=silence) as session:
            for frame in session.run([prompt_a, prompt_b]):   # prompts: [lm.num_codebooks, P] streams
                ...
            tensors, meta = session.state_dict()              # save, and later in a new session:
            session.load_state_dict(tensors, meta)            # continue exactly where it stopped

    `silence` [n_user] are the codec's codes of silence, the user stream outside prompts.
    `config` may be replaced between runs (e.g. another temperature); the RNG stream continues. A
    `SamplingConfig` (no length) is enough when every `run` says its `num_frames`.
    `score`: each `Frame` carries the NLL of its tokens (`Frame.nll`; a few small ops more per step).
    """

    def __init__(self, lm: LMModel, batch_size: int, config: SamplingConfig | None = None,
                 silence: Tensor | None = None, score: bool = False) -> None:
        if lm.training:
            raise ValueError("generation needs the model in eval mode (call lm.eval())")
        if lm.depformer is None or lm.dep_q < 1:
            raise ValueError("generation needs a model with a depformer (audio output)")
        if batch_size < 1:
            raise ValueError(f"batch size: expected >= 1, got {batch_size}")
        handle = TTTModel.find(lm)
        check_generable(handle.config if handle is not None else None)
        self.lm = lm
        self.ttt = handle  # None for a model without TTT layers
        self.batch_size = batch_size
        self.config = config or GenerationConfig()
        self.n_user = lm.num_codebooks - 1 - lm.dep_q
        if silence is None:
            raise ValueError("silence codes are required (the user stream outside prompts): "
                             "use ttt_speech.data.audio.silence_codes(mimi) or a code file's 'silence'")
        silence = torch.as_tensor(silence).long().reshape(-1)
        if silence.numel() < self.n_user or silence.min() < 0 or silence.max() >= lm.card:
            raise ValueError(f"silence codes: expected >= {self.n_user} codes in [0, {lm.card}), got {silence.tolist()}")
        self.silence = silence[:self.n_user].cpu()
        self.delays = list(lm.delays)
        self.lm_gen = SamplingLMGen(lm, self.config, score)
        self.max_delay = self.lm_gen.max_delay
        # per row, the NLL recorded at its last max_delay + 1 steps: a frame's codebook k was sampled
        # max_delay − delay_k steps before the frame is emitted
        self._nll_steps: list[deque[Tensor]] | None = \
            [deque(maxlen=self.max_delay + 1) for _ in range(batch_size)] if score else None
        self.device = lm.device
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(self.config.seed)
        self.offsets = [0] * batch_size  # LMGen offset (steps executed) of each row
        self.steps = 0
        self.runs = 0
        self._exec: list[bool] | None = None
        super().__init__()
        self._stack.enter_context(self.lm_gen.streaming(batch_size))

    # ------------------------------------------------------------------ generation
    def plan(self, prompt_frames: Sequence[int], num_frames: int) -> list[int]:
        """Steps each row executes in a run with prompts of these lengths and `num_frames` after them.

        A row emits frame f at its step f + max_delay. With a prompt, the run ends with the
        `num_frames`-th frame after the prompt; without one, after `num_frames` more frames.
        """
        steps = []
        for o, p in zip(self.offsets, prompt_frames):
            emitted = max(0, o - self.max_delay)
            last = (o + p if p else emitted) + num_frames - 1
            steps.append(last + self.max_delay + 1 - o)
        return steps

    def run(self, prompts: Sequence[Tensor | None] | None = None, num_frames: int | None = None) -> Iterator[Frame]:
        """Force each row's prompt (streams [lm.num_codebooks, P], or None), then sample
        `num_frames` (default: config.num_frames) more frames; yields one `Frame` per step.

        A resumed stream first emits the frames it had begun (max_delay of them) before a new prompt.
        Raises `GenerationDiverged` at the first step whose logits (of a running row) are not finite.
        """
        B, lm = self.batch_size, self.lm
        prompts = list(prompts) if prompts is not None else [None] * B
        if len(prompts) != B:
            raise ValueError(f"prompts: expected {B} (one per row of the stream), got {len(prompts)}")
        prompts = [self._check_prompt(p, i) for i, p in enumerate(prompts)]
        if num_frames is None and not isinstance(self.config, GenerationConfig):
            raise ValueError("num_frames: required when the session's config has no length (a SamplingConfig)")
        n = self.config.num_frames if num_frames is None else num_frames
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"num_frames: expected an integer >= 1, got {n!r}")
        lengths = [0 if p is None else p.shape[1] for p in prompts]
        steps = self.plan(lengths, n)
        total = max(steps)
        start = [total - s for s in steps]
        first = list(self.offsets)  # prompt i occupies frames [first[i], first[i] + lengths[i])
        self.lm_gen.settings = self.config
        reset_depformer_graph(self.lm_gen)  # sampling settings are Python constants inside a captured CUDA graph
        d_text, d_audio = self.delays[0], self.delays[1:1 + lm.dep_q]
        for g in range(total):
            run_row = [g >= s for s in start]
            user = self.silence[None].repeat(B, 1)
            force = _Forcing.none(B, lm.dep_q)
            for i, p in enumerate(prompts):
                if p is None or not run_row[i]:
                    continue
                rel = self.offsets[i] - first[i]  # frame o of the row, relative to its prompt
                if 0 <= rel - 1 < lengths[i]:
                    user[i] = p[1 + lm.dep_q:, rel - 1]
                if self.config.prompt_text == "force" and 0 <= rel - d_text < lengths[i]:
                    force.text[i], force.text_mask[i] = p[0, rel - d_text], True
                for k, d in enumerate(d_audio):
                    if 0 <= rel - d < lengths[i]:
                        force.audio[i, k], force.audio_mask[i, k] = p[1 + k, rel - d], True
            yield self._advance(run_row, user, force, list(zip(first, lengths)), g + 1)
        self.runs += 1

    def step(self, user: Tensor) -> Frame:
        """One live step of every row: `user` [B, n_user] is the user stream's newest frame (codes of
        the user's audio, as moshi's server passes each encoded frame to `LMGen.step`); nothing is
        forced, everything sampled. Raises `GenerationDiverged` on non-finite logits."""
        user = torch.as_tensor(user)
        if user.shape != (self.batch_size, self.n_user):
            raise ValueError(f"user codes: expected [{self.batch_size}, {self.n_user}] (batch, user codebooks), "
                             f"got {list(user.shape)}")
        user = user.long().cpu()
        if user.min() < 0 or user.max() >= self.lm.card:
            raise ValueError(f"user codes: expected values in [0, {self.lm.card}), got {user.min()}..{user.max()}")
        self.lm_gen.settings = self.config
        no_prompt = [(0, 0)] * self.batch_size
        return self._advance([True] * self.batch_size, user, _Forcing.none(self.batch_size, self.lm.dep_q), no_prompt,
                             None)

    def _advance(self, run_row: list[bool], user: Tensor, force: _Forcing, spans: list[tuple[int, int]],
                 run_step: int | None) -> Frame:
        """One `LMGen.step` of the rows in `run_row`: user codes [B, n_user], the tokens to force, and
        each row's prompt span (first frame, length) to label its emitted frame; `run_step` counts the
        steps of the current run (for the divergence error; None: a live step)."""
        B = self.batch_size
        state = self.lm_gen.streaming_state
        state.force_text.copy_(force.text)
        state.force_text_mask.copy_(force.text_mask)
        state.force_audio.copy_(force.audio)
        state.force_audio_mask.copy_(force.audio_mask)
        if self.config.text_temperature > 0:  # greedy streams draw no noise
            state.noise_text.exponential_(generator=self.generator)
        if self.config.temperature > 0:
            state.noise_audio.exponential_(generator=self.generator)
        if run_row != self._exec:
            self.lm_gen.set_exec_mask(torch.tensor(run_row, device=self.device))
            self._exec = run_row
        # every running row fully forced: skip the depformer (same tokens, less work)
        replace = None
        if all(force.audio_mask[i].all() for i in range(B) if run_row[i]):
            replace = force.audio[:, :, None].to(self.device)
            state.finite[:, 1:] = True  # no audio logits this step
            if self.lm_gen.score:
                state.nll[:, 1:] = float("nan")
        out = self.lm_gen.step(user[:, :, None].to(self.device), replace).cpu()[:, :, 0]
        finite = state.finite.cpu()  # out's copy has synchronised already: this one waits for nothing
        self.steps += 1
        index = torch.full((B,), -1, dtype=torch.long)
        emitted = torch.zeros(B, dtype=torch.bool)
        is_prompt = torch.zeros(B, dtype=torch.bool)
        for i in range(B):
            if not run_row[i]:
                continue
            frame = self.offsets[i] - self.max_delay
            self.offsets[i] += 1
            if frame >= 0:
                index[i], emitted[i] = frame, True
                first, length = spans[i]
                is_prompt[i] = 0 <= frame - first < length
        out[~emitted] = -1
        nll = None if self._nll_steps is None else self._frame_nll(state.nll.to("cpu", copy=True), run_row, emitted)
        bad = ~finite & torch.tensor(run_row)[:, None]  # a waiting row's logits are not sampled
        if bad.any():
            col = bad.int().argmax(dim=1).tolist()  # per row, its first stream with bad logits
            raise GenerationDiverged(run_step, self.steps, [
                (i, "text" if col[i] == 0 else f"audio codebook {col[i] - 1}")
                for i in range(B) if bad[i].any()])
        return Frame(self.steps, index, out[:, 0].clone(), out[:, 1:].clone(), emitted, is_prompt, nll)

    def _frame_nll(self, step_nll: Tensor, run_row: list[bool], emitted: Tensor) -> Tensor:
        """[B, 1 + dep_q] the NLL of the tokens of the frames emitted at this step, from the NLL of
        the tokens sampled at this step and the max_delay before it (`step_nll` [B, 1 + dep_q], a
        copy: the state's buffer is overwritten by the next step)."""
        out = torch.full_like(step_nll, float("nan"))
        columns = torch.arange(step_nll.shape[1])
        back = self.max_delay - torch.tensor(self.delays[:step_nll.shape[1]])  # steps before this one that sampled it
        for i, history in enumerate(self._nll_steps):
            if not run_row[i]:
                continue
            history.append(step_nll[i])
            if emitted[i]:
                at = len(history) - 1 - back  # [1 + dep_q] rows of the history, oldest first
                picked = torch.stack(tuple(history))[at.clamp(min=0), columns]
                out[i] = torch.where(at >= 0, picked, out[i])  # a shorter history after a resume: NaN there
        return out

    def _check_prompt(self, prompt: Tensor | None, i: int) -> Tensor | None:
        if prompt is None:
            return None
        lm = self.lm
        prompt = torch.as_tensor(prompt)
        if prompt.dim() != 2 or prompt.shape[0] != lm.num_codebooks:
            raise ValueError(f"prompt {i}: expected streams [{lm.num_codebooks}, T] (text, Moshi's audio, "
                             f"the user's audio; see ttt_speech.data.layout.moshi_streams), got {tuple(prompt.shape)}")
        if prompt.shape[1] == 0:
            return None
        prompt = prompt.long().cpu()
        if prompt.min() < 0 or prompt[0].max() >= lm.text_card or prompt[1:].max() >= lm.card:
            raise ValueError(f"prompt {i}: tokens out of range (text < {lm.text_card}, audio < {lm.card})")
        return prompt

    # ------------------------------------------------------------------ state
    def state_dict(self) -> tuple[dict[str, Tensor], dict]:
        """Everything the stream needs to continue: (tensors, JSON-ready metadata).

        Tensors: LMGen's state (token cache, offsets, exec mask), every streaming module of the LM
        (attention KV caches and offsets, layer counters), the TTT state of every TTT layer, the
        silence codes and the sampling RNG state. The depformer restarts at every step: nothing to keep.
        """
        tensors = moshi_states_to_tensors({"": self.lm_gen.streaming_state}, "gen.")
        tensors.update(moshi_states_to_tensors(self.lm.get_streaming_state(), "lm."))
        if self.ttt is not None:
            tensors.update({f"ttt.{k}": v.cpu() for k, v in self.ttt.stream_state().items()})
        tensors["session.silence"] = self.silence.clone()
        tensors["session.offsets"] = torch.tensor(self.offsets, dtype=torch.int64)
        tensors["session.rng"] = self.generator.get_state().cpu()
        meta = {"batch_size": self.batch_size, "steps": self.steps, "runs": self.runs,
                "seed": self.config.seed, "rng_device": self.generator.device.type,
                "model": model_fingerprint(self.lm),
                "ttt": None if self.ttt is None else self.ttt.config.to_dict()}
        return tensors, meta

    def load_state_dict(self, tensors: dict[str, Tensor], meta: dict, where: str = "generation state") -> None:
        """Continue the stream saved by `state_dict` (same model, same batch size)."""
        if meta.get("batch_size") != self.batch_size:
            raise ValueError(f"{where}: saved with {meta.get('batch_size')} stream(s), this session has {self.batch_size}")
        if meta.get("model") != model_fingerprint(self.lm):
            raise ValueError(f"{where}: saved from a different model (weights, TTT layers or dtype differ)")
        if meta.get("rng_device") != self.generator.device.type:
            raise ValueError(f"{where}: the sampling RNG was saved on {meta.get('rng_device')}; it cannot "
                             f"continue on {self.generator.device.type} (resume on the same kind of device)")
        load_moshi_states({"": self.lm_gen.streaming_state}, tensors, "gen.", where)
        load_moshi_states(self.lm.get_streaming_state(), tensors, "lm.", where)
        ttt = {k[4:]: v for k, v in tensors.items() if k.startswith("ttt.")}
        if self.ttt is not None:
            self.ttt.load_stream_state(ttt, where)
        elif ttt:
            raise ValueError(f"{where}: has TTT state but the model has no TTT layers")
        for key in ("session.silence", "session.offsets", "session.rng"):
            if key not in tensors:
                raise ValueError(f"{where}: missing {key}")
        self.silence = tensors["session.silence"].long().cpu()
        self.offsets = [int(o) for o in tensors["session.offsets"]]
        if self.offsets != lmgen_offsets(self.lm_gen):
            raise ValueError(f"{where}: inconsistent offsets")
        self.generator.set_state(tensors["session.rng"])
        self.steps, self.runs = int(meta.get("steps", 0)), int(meta.get("runs", 0))
        self._exec = None
        if self._nll_steps is not None:
            for history in self._nll_steps:
                history.clear()
