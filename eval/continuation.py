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

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import Tensor

from ttt_speech import schema
from ttt_speech.data import FRAME_RATE
from ttt_speech.data.audio import silence_codes
from ttt_speech.generate import AudioDecoder, GenerationConfig, GenerationSession
from ttt_speech.generation.loading import check_codec
from ttt_speech.generation.session import check_generable
from ttt_speech.models import load_mimi, load_text_tokenizer
from ttt_speech.progress import progress_bar

from . import continuation_metrics as cm
from .config import GROUND_TRUTH, ContinuationSettings, EvalConfig
from .continuation_report import FILES, ContinuationResult, summarise
from .judges import SPEAKER_MIN_SECONDS, SpeakerEncoder, TextScorer, Transcriber, check_judge
from .plan import EvalModel, EvalPlan, plan_eval
from .streams import LoadedData, load_data

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class Lengths:
    """The probe's lengths in frames (12.5 per second)."""

    prompt: int
    generated: int
    span: int

    @classmethod
    def of(cls, settings: ContinuationSettings) -> "Lengths":
        frames = lambda seconds: max(1, round(seconds * FRAME_RATE))  # noqa: E731
        return cls(frames(settings.prompt_seconds), frames(settings.max_minutes * 60), frames(settings.span_seconds))

    def spans(self, available: int | None = None) -> list[tuple[int, int]]:
        """[start, end) of each span of the generated frames (the last one may be shorter), relative to
        the end of the prompt; `available`: only the first that many frames exist (the ground truth)."""
        total = self.generated if available is None else min(self.generated, available)
        return [(a, min(a + self.span, total)) for a in range(0, total, self.span)]


@dataclass
class Judges:
    """The models that score a span; None where the metric is switched off."""

    asr: Transcriber | None
    speaker: SpeakerEncoder | None
    text: TextScorer | None


@dataclass
class Reference:
    """What each span of one stream is scored against: the prompt's Mimi latents (drift) and speaker
    embedding [D], and the true continuation's transcript per span (None without one)."""

    drift: cm.DriftReference | None
    speaker: Tensor | None
    transcripts: list[list[str] | None]


@dataclass
class Span:
    """One span of one row: its decoded audio [S] (24 kHz), Moshi's audio codes [dep_q, n], text tokens
    [n], and the NLL of its tokens [1 + dep_q, n] (None: not generated, the ground truth)."""

    index: int
    start: int  # frames after the end of the prompt
    pcm: Tensor
    codes: Tensor
    text: Tensor
    nll: Tensor | None


@dataclass
class Scorer:
    """Scores spans: the judges, Mimi (latents), the text tokenizer (None: the text stream cannot be
    read) and the ids of the text stream's padding tokens."""

    judges: Judges
    mimi: torch.nn.Module
    tokenizer: object | None
    padding_ids: tuple[int, ...]
    settings: ContinuationSettings

    def score(self, spans: list[Span], references: list[Reference]) -> list[dict]:
        """One record per span (rows of one batch, side by side): its time, transcript and every metric
        (None where it is switched off or cannot be measured)."""
        pcm = [s.pcm for s in spans]
        sr = self.mimi.sample_rate
        transcripts = self.judges.asr.transcribe(pcm, sr) if self.judges.asr else [None] * len(spans)
        ppl = self.judges.text.nll(transcripts) if self.judges.text else [None] * len(spans)
        voices = None  # WavLM's x-vector needs SPEAKER_MIN_SECONDS (a book's or generation's last span may be short)
        if self.judges.speaker and min(p.numel() for p in pcm) >= SPEAKER_MIN_SECONDS * sr:
            voices = self.judges.speaker.embed(pcm, sr)
        records = []
        for i, (span, ref, said) in enumerate(zip(spans, references, transcripts)):
            words = None if said is None else cm.normalize_words(said)
            own_text = self.text_of(span.text)
            record = {"start_s": span.start / FRAME_RATE, "seconds": span.codes.shape[1] / FRAME_RATE,
                      "transcript": said, "text_stream": own_text,
                      "drift": self.drift(ref, span.codes),
                      "speaker_similarity": None if voices is None else cm.cosine_similarity(voices[i], ref.speaker),
                      "gen_ppl": _perplexity(ppl[i]),
                      "auto_bleu": None if words is None else cm.auto_bleu(words),
                      "distinct_2": None if words is None else cm.distinct_n(words, 2),
                      "wer": _wer(words, ref.transcripts[span.index] if span.index < len(ref.transcripts) else None),
                      "wer_text_stream": _wer(words, None if own_text is None else cm.normalize_words(own_text)),
                      "silent_fraction": cm.silent_fraction(span.pcm, sr, self.mimi.frame_size, self.settings.silence_db),
                      "text_padding": cm.token_fraction(span.text, self.padding_ids),
                      **_own_nll(span.nll)}
            records.append(record)
        return records

    def drift(self, ref: Reference, codes: Tensor) -> float | None:
        return None if ref.drift is None else cm.drift(ref.drift, self.latents(codes))

    def latents(self, codes: Tensor) -> Tensor:
        """Mimi's (quantised) latents of audio codes [dep_q, n]: [n, D] float32 on the CPU."""
        device = next(self.mimi.parameters()).device
        with torch.no_grad():
            latents = self.mimi.decode_latent(codes[None, :self.mimi.num_codebooks].to(device))  # [1, D, n]
        return latents[0].T.float().cpu()

    def text_of(self, tokens: Tensor) -> str | None:
        """The words of a text stream [n] (padding dropped); None without a tokenizer or any word."""
        if self.tokenizer is None:
            return None
        ids = [int(t) for t in tokens if int(t) not in self.padding_ids]
        return self.tokenizer.decode(ids) if ids else None


def _perplexity(scored: tuple[float, int] | None) -> float | None:
    """exp(mean NLL) of a transcript's (NLL sum, tokens); None for no token."""
    if scored is None or scored[1] == 0:
        return None
    return math.exp(scored[0] / scored[1])


def _wer(words: list[str] | None, reference: list[str] | None) -> float | None:
    if words is None or not reference:
        return None
    return cm.word_errors(words, reference).rate


def _own_nll(nll: Tensor | None) -> dict[str, float | None]:
    """The mean NLL of a generated span's text tokens and of its audio tokens (nll [1 + dep_q, n])."""
    if nll is None:
        return {"nll_text": None, "nll_audio": None}
    mean = lambda x: float(x[torch.isfinite(x)].double().mean()) if torch.isfinite(x).any() else None  # noqa: E731
    return {"nll_text": mean(nll[0]), "nll_audio": mean(nll[1:])}


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


def load_judges(settings: ContinuationSettings, device: torch.device) -> Judges:
    dtype = getattr(torch, settings.judge_dtype)
    return Judges(
        Transcriber(settings.asr_model, device, dtype, settings.asr_language, settings.asr_max_tokens)
        if settings.asr_model else None,
        SpeakerEncoder(settings.speaker_model, device, dtype) if settings.speaker_model else None,
        TextScorer(settings.text_model, device, dtype) if settings.text_model else None)


def decode_spans(mimi, codes: Tensor, bounds: list[tuple[int, int]]) -> Iterator[Tensor]:
    """Audio codes [n_q, T] decoded in one Mimi stream, yielded per [start, end) of `bounds` (in order,
    contiguous: each span decoded with what came before as context), float32 [S] on the CPU."""
    from moshi.utils.compile import no_cuda_graph

    device = next(mimi.parameters()).device
    with torch.no_grad(), mimi.streaming(1), no_cuda_graph():
        for a, b in bounds:
            yield mimi.decode(codes[None, :mimi.num_codebooks, a:b].to(device))[0, 0].float().cpu()


def stream_reference(scorer: Scorer, stream: Tensor, prompt_pcm: Tensor, lengths: Lengths, k: int,
                     where: str) -> Reference:
    """The prompt's latents and voice, and the book's transcript per span of what follows (from the
    stream's text row; None where it has none)."""
    own = stream[1:1 + scorer.mimi.num_codebooks]
    drift = None
    if scorer.settings.drift:
        try:
            drift = cm.drift_reference(scorer.latents(own[:, :lengths.prompt]), k)
        except ValueError as e:  # a constant prompt (e.g. silence) has no spread to measure drift against
            logger.warning("%s: no drift for this stream (%s)", where, e)
    speaker = None
    if scorer.judges.speaker is not None:
        speaker = scorer.judges.speaker.embed([prompt_pcm], scorer.mimi.sample_rate)[0]
    transcripts = []
    for a, b in lengths.spans(stream.shape[1] - lengths.prompt):
        text = scorer.text_of(stream[0, lengths.prompt + a:lengths.prompt + b])
        transcripts.append(cm.normalize_words(text) if text else None)
    return Reference(drift, speaker, transcripts)


# ---------------------------------------------------------------- generation


def generate_spans(model: EvalModel, prompts: list[Tensor], config: GenerationConfig, data: ContinuationData,
                   lengths: Lengths, progress=lambda n: None) -> Iterator[list[Span]]:
    """Continue `prompts` ([K, P] each, all P frames) side by side for lengths.generated frames; yields
    each span of every row as soon as it is generated and decoded (nothing else is kept)."""
    mimi = data.scorer.mimi
    with GenerationSession(model.lm, len(prompts), config, data.silence, score=True) as session, \
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
        s = self.settings
        for where, source in (("asr_model", s.asr_model), ("speaker_model", s.speaker_model),
                              ("text_model", s.text_model)):
            if source is not None:  # a missing model is one line before anything loads
                check_judge(source, f"continuation.{where}")
        return plan

    def load(self, plan: EvalPlan, lm: torch.nn.Module, progress: bool) -> ContinuationData:
        device = plan.base.torch_device()
        mimi = load_mimi(plan.base, device)
        check_codec(lm, mimi, " (eval continuation decodes what it generates with Mimi)")
        data_config = dataclasses.replace(plan.data, max_frames=self.lengths.prompt + self.lengths.generated,
                                          min_frames=max(plan.data.min_frames, self.lengths.prompt))
        loaded = load_data(data_config, lm, plan.base, progress)
        scorer = Scorer(load_judges(self.settings, device), mimi, load_text_tokenizer(plan.base),
                        (lm.text_padding_token_id, lm.end_of_text_padding_id), self.settings)
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
        decoded = decode_spans(scorer.mimi, own, [(0, P)] + [(P + a, P + b) for a, b in bounds])
        reference = stream_reference(scorer, stream, next(decoded), self.lengths, self.settings.drift_k, where)
        records = []
        for index, ((a, b), pcm) in enumerate(zip(bounds, decoded)):
            span = Span(index, a, pcm, own[:, P + a:P + b], stream[0, P + a:P + b], None)
            records += scorer.score([span], [reference])
        return records, reference

    def run(self, plan: EvalPlan, models: Iterator[EvalModel], data: ContinuationData,
            progress: bool) -> ContinuationResult:
        spans: dict[str, dict[str, list[dict]]] = {GROUND_TRUTH: data.truth}
        described = {}
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
                        self.continue_rows(model, rows, batch, data, spans[model.name],
                                           lambda k: bar.update(k * len(rows)))
                del model  # one model at a time (`build_models` drops its own reference too)
        return ContinuationResult(summarise(self.config, plan, self.lengths, data, described, spans))

    def continue_rows(self, model: EvalModel, rows: list[int], batch: int, data: ContinuationData,
                      out: dict[str, list[dict]], progress) -> None:
        """Generate and score the streams `rows` side by side; batch k samples with seed + k (every model
        the same seeds: a model's rows differ from another's by the model, not the noise)."""
        sampling = self.settings.sampling
        config = GenerationConfig(**{**schema.to_dict(sampling), "seed": sampling.seed + batch},
                                  max_duration=self.lengths.generated / FRAME_RATE)
        references = [data.references[i] for i in rows]
        for spans in generate_spans(model, [data.prompts[i] for i in rows], config, data, self.lengths, progress):
            for i, record in zip(rows, data.scorer.score(spans, references)):
                out[data.ids[i]].append(record)

