"""`ttt-speech eval continuation`: does a model stay coherent over minutes of speech it generates?

Teacher-forced NLL always feeds the ground truth back; long generations drift into gibberish in
ways it cannot see. So each model of the plan continues the first `prompt_seconds` of each stream
(forced as Moshi's own stream, as `ttt-speech generate` does) for `max_minutes`, with the same
sampling settings and seeds, streams side by side in one LMGen batch. What it generates is decoded
and scored span by span (`span_seconds`), never held whole:

- drift: Mimi-latent k-NN distance of the span to the prompt, over the prompt's own spread
  (`continuation_metrics.drift`, the idea of Kyutai's tts_longeval);
- speaker similarity to the prompt (WavLM speaker verification);
- a Whisper transcript, then GenPPL under a text LM, Auto-BLEU and distinct-2 (slamkit's
  repetition measures), WER against the book's transcript when the data has one, and WER
  against the model's own text stream (does the audio say what the model writes);
- the model's own NLL of what it generated (recorded while sampling), and the fractions of
  silent audio frames and text padding tokens.

The book's true continuation is scored the same way as a row named "ground_truth".
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import Tensor

from ttt_speech.data import FRAME_RATE
from ttt_speech.data.audio import silence_codes
from ttt_speech.data.layout import text_padding_ids
from ttt_speech.generate import AudioDecoder, GenerationDiverged, GenerationSession, SamplingConfig
from ttt_speech.generation.loading import check_codec
from ttt_speech.generation.session import check_generable
from ttt_speech.models import load_mimi, load_text_tokenizer
from ttt_speech.progress import progress_bar

from .config import GROUND_TRUTH, ContinuationSettings, EvalConfig
from .continuation_report import FILES, ContinuationResult, summarise
from .continuation_scorer import Judges, Reference, Scorer, Span
from .judges import check_judge
from .plan import EvalModel, EvalPlan, plan_eval
from .streams import LoadedData, load_data

logger = logging.getLogger(__name__)


def frames_of(seconds: float) -> int:
    """Frames of `seconds` (12.5 per second), rounded up as `GenerationConfig.num_frames` is; at least 1."""
    return max(1, math.ceil(seconds * FRAME_RATE - 1e-9))


@dataclass(frozen=True)
class Lengths:
    """The probe's lengths in frames."""

    prompt: int
    generated: int
    span: int

    @classmethod
    def of(cls, settings: ContinuationSettings) -> "Lengths":
        return cls(frames_of(settings.prompt_seconds), frames_of(settings.max_minutes * 60),
                   frames_of(settings.span_seconds))

    def spans(self, available: int | None = None) -> list[tuple[int, int]]:
        """[start, end) of each span of the generated frames (the last one may be shorter), relative to
        the end of the prompt; `available`: only the first that many frames exist (the ground truth)."""
        total = self.generated if available is None else min(self.generated, available)
        return [(a, min(a + self.span, total)) for a in range(0, total, self.span)]


# ---------------------------------------------------------------- data


@dataclass
class ContinuationData:
    """The streams, their prompts [K, P] and references, the scorer, and the ground truth's spans."""

    loaded: LoadedData
    prompts: list[Tensor]
    references: list[Reference]
    scorer: Scorer
    silence: Tensor
    truth: dict[str, list[dict]] = field(default_factory=dict)

    @property
    def ids(self) -> list[str]:
        return [s.book.id for s in self.loaded.streams]


def decode_spans(mimi, codes: Tensor, bounds: list[tuple[int, int]]) -> Iterator[Tensor]:
    """Audio codes [n_q, T] decoded in one Mimi stream, yielded per [start, end) of `bounds` (in order,
    contiguous: each span decoded with what came before as context), float32 [S] on the CPU. Close the
    generator (`contextlib.closing`) to leave Mimi's streaming state when not every span is read."""
    from moshi.utils.compile import no_cuda_graph

    device = next(mimi.parameters()).device
    with torch.no_grad(), mimi.streaming(1), no_cuda_graph():
        for a, b in bounds:
            yield mimi.decode(codes[None, :mimi.num_codebooks, a:b].to(device))[0, 0].float().cpu()


# ---------------------------------------------------------------- generation


def generate_spans(model: EvalModel, prompts: list[Tensor], sampling: SamplingConfig, data: ContinuationData,
                   lengths: Lengths, progress=lambda n: None) -> Iterator[list[Span]]:
    """Continue `prompts` ([K, P] each, all P frames) side by side for lengths.generated frames; yields
    each span of every row as soon as it is generated and decoded (nothing else is kept). Close the
    generator (`contextlib.closing`) to leave the LM's and Mimi's streaming states early."""
    mimi = data.scorer.mimi
    with GenerationSession(model.lm, len(prompts), sampling, data.silence, score=True) as session, \
            AudioDecoder(mimi, len(prompts)) as decoder:
        frames: list = []
        bounds = lengths.spans()
        index = 0
        for frame in session.run(prompts, lengths.generated):
            decoder.push(frame)
            if not frame.generated.any():
                continue
            assert frame.generated.all(), "prompts of one length: every row generates from the same step"
            frames.append(frame)
            progress(1)
            start, end = bounds[index]
            if len(frames) == end - start:
                yield _spans(frames, decoder.pull(flush=True), index, start)
                frames, index = [], index + 1


def _spans(frames: list, pcm: list[Tensor], index: int, start: int) -> list[Span]:
    """The frames of span `index` (Frame objects, every row emitted) → one `Span` per row."""
    codes = torch.stack([f.audio for f in frames], dim=-1)  # [B, dep_q, n]
    text = torch.stack([f.text for f in frames], dim=-1)  # [B, n]
    nll = torch.stack([f.nll for f in frames], dim=-1)  # [B, 1 + dep_q, n]
    return [Span(index, start, pcm[i], codes[i], text[i], nll[i]) for i in range(codes.shape[0])]


# ---------------------------------------------------------------- the probe


class Continuation:
    """The probe: every model continues every stream; every span scored."""

    kind = "continuation"
    files = FILES

    def __init__(self, config: EvalConfig):
        self.config = config
        self.settings: ContinuationSettings = config.continuation
        self.lengths = Lengths.of(self.settings)

    def plan(self) -> EvalPlan:
        plan = plan_eval(self.config, modes=("chunked",))
        for planned in plan.models:
            try:
                check_generable(planned.ttt)
            except ValueError as e:
                raise ValueError(f"{planned.where}: {e}") from None
        judges = [(f, self.settings.judge(f)) for f in ("asr_model", "speaker_model", "text_model")]
        if any(source for _, source in judges):
            _require_transformers()
        for field_name, source in judges:
            if source is not None:  # a missing model is one line before anything loads
                check_judge(source, f"continuation.{field_name}")
        return plan

    def load(self, plan: EvalPlan, lm: torch.nn.Module, progress: bool) -> ContinuationData:
        device = plan.base.torch_device()
        mimi = load_mimi(plan.base, device)
        check_codec(lm, mimi, " (eval continuation decodes what it generates with Mimi)")
        data_config = dataclasses.replace(plan.data, max_frames=self.lengths.prompt + self.lengths.generated,
                                          min_frames=max(plan.data.min_frames, self.lengths.prompt))
        try:
            loaded = load_data(data_config, lm, plan.base, progress)
        except ValueError as e:
            if not str(e).startswith("data: no stream left"):
                raise
            raise ValueError(f"{e}; a stream needs the {self.lengths.prompt} frames of continuation.prompt_seconds "
                             f"({self.settings.prompt_seconds:g} s)") from None
        scorer = Scorer(Judges.load(self.settings, device), mimi, load_text_tokenizer(plan.base),
                        text_padding_ids(lm), self.settings)
        data = ContinuationData(loaded, [s.codes[:, :self.lengths.prompt] for s in loaded.streams], [], scorer,
                                silence_codes(mimi))
        with progress_bar(loaded.streams, desc="ground truth", unit="stream", enabled=progress) as bar:
            for stream in bar:
                data.truth[stream.book.id], reference = self.score_truth(scorer, stream.codes, stream.book.id)
                data.references.append(reference)
        return data

    def score_truth(self, scorer: Scorer, stream: Tensor, where: str) -> tuple[list[dict], Reference]:
        """The book's own continuation scored span by span (as much of it as the stream holds), and the
        stream's `Reference` (the prompt decoded in the same Mimi stream)."""
        P = self.lengths.prompt
        bounds = self.lengths.spans(stream.shape[1] - P)
        own = stream[1:1 + scorer.mimi.num_codebooks]
        records = []
        with contextlib.closing(decode_spans(scorer.mimi, own, [(0, P)] + [(P + a, P + b) for a, b in bounds])) as pcm:
            reference = scorer.reference(stream, next(pcm), P, bounds, where)
            for index, ((a, b), audio) in enumerate(zip(bounds, pcm)):
                span = Span(index, a, audio, own[:, P + a:P + b], stream[0, P + a:P + b], None)
                records += scorer.score([span], [reference])
        return records, reference

    def run(self, plan: EvalPlan, models: Iterator[EvalModel], data: ContinuationData,
            progress: bool) -> ContinuationResult:
        spans: dict[str, dict[str, list[dict]]] = {GROUND_TRUTH: data.truth}
        described, diverged = {}, {}
        n, batch_size = len(data.prompts), self.settings.batch_size
        with progress_bar(total=len(plan.models) * n * self.lengths.generated, desc="continuation", unit="frame",
                          enabled=progress) as bar:
            for model in models:
                described[model.name] = model.describe()
                spans[model.name] = {i: [] for i in data.ids}
                bar.set_postfix_str(model.name, refresh=False)
                with torch.no_grad(), model.scoring():
                    for batch, first in enumerate(range(0, n, batch_size)):
                        rows = list(range(first, min(first + batch_size, n)))
                        error = self.continue_rows(model, rows, batch, data, spans[model.name],
                                                   lambda k: bar.update(k * len(rows)))
                        if error is not None:
                            diverged.setdefault(model.name, {}).update({data.ids[i]: error for i in rows})
                del model  # one model at a time (`build_models` drops its own reference too)
        return ContinuationResult(summarise(self.config, plan, self.lengths, data, described, spans, diverged))

    def continue_rows(self, model: EvalModel, rows: list[int], batch: int, data: ContinuationData,
                      out: dict[str, list[dict]], progress) -> str | None:
        """Generate and score the streams `rows` side by side; batch k samples with seed + k (every model
        the same seeds: a model's rows differ from another's by the model, not the noise). A model that
        diverges (non-finite logits) ends these rows where it did: the error, the spans before it kept."""
        sampling = dataclasses.replace(self.settings.sampling, seed=self.settings.sampling.seed + batch)
        references = [data.references[i] for i in rows]
        prompts = [data.prompts[i] for i in rows]
        try:
            with contextlib.closing(generate_spans(model, prompts, sampling, data, self.lengths, progress)) as made:
                for spans in made:
                    for i, record in zip(rows, data.scorer.score(spans, references)):
                        out[data.ids[i]].append(record)
        except GenerationDiverged as e:
            logger.warning("%s diverged on %s: %s; their later spans are not scored", model.name,
                           ", ".join(data.ids[i] for i in rows), e)
            return str(e)
        return None


def _require_transformers() -> None:
    """The judges load through `transformers` (the `omni` extra): one line, not an ImportError, without it."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise ValueError("continuation: the ASR, speaker and text judges need `transformers` (pip install "
                         "'ttt-speech[omni]'), or set continuation.asr_model, speaker_model and text_model to "
                         "null") from None
