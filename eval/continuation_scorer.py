"""Scoring one span of a continuation (`eval continuation`): its audio, codes, text and token NLL
against the stream's reference (the prompt's latents and voice, the book's transcript), through the
judges (Whisper, WavLM, a text LM: `judges.py`) and the pure metrics of `continuation_metrics.py`."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ttt_speech.data import FRAME_RATE

from . import continuation_metrics as cm
from .config import ContinuationSettings
from .judges import SpeakerEncoder, TextScorer, Transcriber

logger = logging.getLogger(__name__)


@dataclass
class Judges:
    """The models that score a span; None where no measured metric needs one."""

    asr: Transcriber | None
    speaker: SpeakerEncoder | None
    text: TextScorer | None

    @classmethod
    def load(cls, settings: ContinuationSettings, device: torch.device) -> "Judges":
        dtype = getattr(torch, settings.judge_dtype)
        asr, speaker, text = (settings.judge(f) for f in ("asr_model", "speaker_model", "text_model"))
        return cls(Transcriber(asr, device, dtype, settings.asr_language, settings.asr_max_tokens) if asr else None,
                   SpeakerEncoder(speaker, device, dtype) if speaker else None,
                   TextScorer(text, device, dtype) if text else None)


@dataclass
class Reference:
    """What each span of one stream is scored against: the prompt's Mimi latents (drift) and speaker
    embedding [D], and the book's transcript (words) per span (None without one)."""

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
        """One record per span (rows of one batch side by side, spans of one length): its time, transcript,
        the model's text, and every measured metric (None where it cannot be measured: no reference, no
        word, a non-finite value)."""
        pcm = [s.pcm for s in spans]
        sr = self.mimi.sample_rate
        said = self.judges.asr.transcribe(pcm, sr) if self.judges.asr else [None] * len(spans)
        scored = self.judges.text.nll(said) if self.judges.text else [None] * len(spans)
        voices = None  # WavLM's x-vector needs SPEAKER_MIN_SECONDS (a book's or generation's last span may be short)
        if self.judges.speaker and pcm[0].numel() >= cm.SPEAKER_MIN_SECONDS * sr:
            voices = self.judges.speaker.embed(pcm, sr)
        records = []
        for i, (span, ref) in enumerate(zip(spans, references)):
            words = None if said[i] is None else cm.normalize_words(said[i])
            own_text = self.text_of(span.text)
            book = ref.transcripts[span.index] if span.index < len(ref.transcripts) else None
            values = {
                "drift": self.drift(ref, span.codes),
                "speaker_similarity": None if voices is None or ref.speaker is None else
                cm.cosine_similarity(voices[i], ref.speaker),
                "gen_ppl": _perplexity(scored[i]),
                "auto_bleu": None if words is None else cm.auto_bleu(words),
                "distinct_2": None if words is None else cm.distinct_n(words, 2),
                **_word_errors("wer", words, book),
                **_word_errors("wer_text_stream", words, None if own_text is None else cm.normalize_words(own_text)),
                "silent_fraction": cm.silent_fraction(span.pcm, self.mimi.frame_size, self.settings.silence_db),
                "text_padding": cm.token_fraction(span.text, self.padding_ids),
                **_own_nll(span.nll)}
            records.append({"start_s": span.start / FRAME_RATE, "seconds": span.codes.shape[1] / FRAME_RATE,
                            "transcript": said[i], "text_stream": own_text, **self.measured(values)})
        return records

    def measured(self, values: dict) -> dict:
        """The values of the measured metrics (and their counts), each finite or None: a NaN or inf (a
        judge in a low-precision dtype) is not a number the report can hold."""
        keep = {m for m in cm.METRICS if self.settings.measures(m)}
        keep |= {c for m, counts in cm.RATIOS.items() if m in keep for c in counts}
        return {k: (v if v is None or math.isfinite(v) else None) for k, v in values.items() if k in keep}

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

    def reference(self, stream: Tensor, prompt_pcm: Tensor, prompt: int, spans: list[tuple[int, int]],
                  where: str) -> Reference:
        """The stream's `Reference`: the latents and voice of its first `prompt` frames (`prompt_pcm`
        decoded), its transcript per span of what follows (`spans`: frames after the prompt)."""
        drift = None
        if self.settings.measures("drift"):
            try:
                drift = cm.drift_reference(self.latents(stream[1:, :prompt]), self.settings.drift_k)
            except ValueError as e:  # a constant prompt (e.g. silence) has no spread to measure drift against
                logger.warning("%s: no drift for this stream (%s)", where, e)
        speaker = self.judges.speaker.embed([prompt_pcm], self.mimi.sample_rate)[0] if self.judges.speaker else None
        transcripts = []
        for a, b in spans:
            text = self.text_of(stream[0, prompt + a:prompt + b])
            transcripts.append(cm.normalize_words(text) if text else None)
        return Reference(drift, speaker, transcripts)


def _perplexity(scored: tuple[float, int] | None) -> float | None:
    """exp(mean NLL) of a transcript's (NLL sum, tokens); None for no token (inf past float range)."""
    if scored is None or scored[1] == 0:
        return None
    mean = scored[0] / scored[1]
    return math.exp(mean) if mean < 700 else math.inf


def _word_errors(key: str, words: list[str] | None, reference: list[str] | None) -> dict:
    """`key` (the span's rate) and its counts (`key`_edits, `key`_words: summed over spans for a corpus
    rate); None without a transcript or a reference."""
    if words is None or not reference:
        return {key: None, f"{key}_edits": None, f"{key}_words": None}
    errors = cm.word_errors(words, reference)
    return {key: errors.rate, f"{key}_edits": errors.edits, f"{key}_words": errors.reference_words}


def _own_nll(nll: Tensor | None) -> dict[str, float | None]:
    """The mean NLL of a generated span's text tokens and of its audio tokens (nll [1 + dep_q, n])."""
    if nll is None:
        return {"nll_text": None, "nll_audio": None}

    def mean(x: Tensor) -> float | None:
        finite = x[torch.isfinite(x)]
        return float(finite.double().mean()) if finite.numel() else None

    return {"nll_text": mean(nll[0]), "nll_audio": mean(nll[1:])}
