"""`EvalConfig`: the YAML config of `ttt-speech eval librilight` and `ttt-speech eval length-gen`
(and its `DataConfig` / `LengthGenConfig`, reused by `eval memory` and the training config); what
the config asks for becomes a plan in `plan.py`.

Loaded with the shared schema (`ttt_speech.schema`): unknown keys and wrong types are one-line
errors naming the field; `key.sub=value` overrides come from the command line. Every field is
documented here (`doc(default, help)`) and in configs/eval_*.yaml.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ttt_speech.config import TTTConfig
from ttt_speech.generation.config import SamplingConfig
from ttt_speech.inner_loop import InnerLoopOverride
from ttt_speech.data import CODES_CACHE
from ttt_speech.models import ModelConfig
from ttt_speech.schema import check, doc
from ttt_speech.schema import load_config as load_config_file
from ttt_speech.tracking import WandbConfig

from .continuation_metrics import METRICS, SPEAKER_MIN_SECONDS
from .zero_shot_data import TASKS

# `eval continuation`'s default judges (docs/evaluation.md §11)
DEFAULT_ASR = "openai/whisper-large-v3"
DEFAULT_SPEAKER = "microsoft/wavlm-base-plus-sv"
DEFAULT_TEXT_LM = "Qwen/Qwen2.5-0.5B"
GROUND_TRUTH = "ground_truth"  # `eval continuation`'s row of the book's own continuation
RESERVED_NAMES = ("ttt", "baseline", GROUND_TRUTH)  # the models named by `export`/`ttt`, the baseline, the book


@dataclass
class DataConfig:
    """Which streams to evaluate: LibriLight books (audio) or a manifest of code/audio files."""

    root: Path | None = doc(None, "LibriLight root: <root>/<split>/<speaker>/<book>/*.flac, one .json per file")
    splits: list[str] = doc(factory=list, help="split folders under root to read, e.g. [small]; empty: every folder")
    manifest: Path | None = doc(None, "instead of root: a JSONL manifest ({\"path\": ...} per line), one stream per "
                                      "entry, audio (encoded through the cache) or code files (.safetensors)")
    codes_cache: Path = doc(CODES_CACHE, "on-disk cache of Mimi codes, keyed by file content and codec identity")
    max_frames: int = doc(24000, "frames per stream (12.5 per second: 24000 = 32 min); a book's chapters are "
                                 "concatenated in order up to this length")
    min_frames: int = doc(1, "streams shorter than this (after loading) are skipped and reported")
    max_books: int | None = doc(None, "evaluate at most this many streams (after filtering, sorted by id); null: all")
    min_files: int = doc(1, "LibriLight: books with fewer readable audio files are skipped")
    min_duration: float = doc(0.0, "LibriLight: books with less readable audio (seconds) are skipped")
    min_snr: float | None = doc(None, "LibriLight: skip books whose duration-weighted mean SNR (json 'snr') is below "
                                      "this, or unknown; null: no SNR filter")
    genres: list[str] = doc(factory=list, help="LibriLight: keep only books with one of these genres (json "
                                               "book_meta.genre or meta_genre, case-insensitive); empty: all")
    exclude_genres: list[str] = doc(factory=list, help="LibriLight: skip books with any of these genres")
    exclude_dramatic: bool = doc(True, "LibriLight: skip books flagged 'Dramatic Readings' (several voices)")

    def __post_init__(self) -> None:
        if self.root is not None and self.manifest is not None:
            raise ValueError("set either root (LibriLight tree) or manifest, not both")
        check(self.max_frames >= 1, "max_frames", "an integer >= 1", self.max_frames)
        check(self.min_frames >= 1, "min_frames", "an integer >= 1", self.min_frames)
        check(self.max_books is None or self.max_books >= 1, "max_books", "null or an integer >= 1",
              self.max_books)
        check(self.min_files >= 1, "min_files", "an integer >= 1", self.min_files)
        check(self.min_duration >= 0, "min_duration", "a number of seconds >= 0", self.min_duration)


@dataclass
class LengthGenConfig:
    """Evaluation lengths for length generalisation: geometric from min_factor to max_factor × the
    training window (eval.train_window; in a training config, data.window_frames)."""

    num_lengths: int = doc(20, "number of evaluation lengths")
    min_factor: float = doc(0.5, "shortest length, as a multiple of the training window")
    max_factor: float = doc(10.0, "longest length, as a multiple of the training window")

    def __post_init__(self) -> None:
        check(self.num_lengths >= 1, "num_lengths", "an integer >= 1", self.num_lengths)
        check(0 < self.min_factor <= self.max_factor, "min_factor",
              f"a number in (0, max_factor={self.max_factor}]", self.min_factor)


@dataclass
class InnerLoopVariant(InnerLoopOverride):
    """One variant of the inner loop of the model under evaluation (`eval.inner_loop.NAME`): the TTT
    layers run another b / base_lr (`ttt_speech.inner_loop`), scored as run "ttt@NAME/<mode>"."""

    chunk_size: int | None = doc(None, "frames per chunk in chunked mode; null: eval.chunk_size, else 4 x this "
                                       "variant's mini-batch size")
    align: bool = doc(False, "require chunk_size to be a multiple of this variant's mini-batch size (aligned "
                             "chunks: no padding slots)")
    modes: list[Literal["chunked", "native"]] = doc(factory=list, help="the modes this variant is scored in; "
                                                                       "empty: eval.mode's")

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.chunk_size is None or self.chunk_size >= 1, "chunk_size", "null or an integer >= 1",
              self.chunk_size)
        check(len(set(self.modes)) == len(self.modes), "modes", "distinct modes", self.modes)


@dataclass
class EvalSettings:
    """How to evaluate and what to report."""

    mode: Literal["chunked", "native", "both"] = doc(
        "chunked", "chunked: LMModel chunks of the once-delayed stream (fast); native: one frame per LMGen.step "
                   "with the ground truth forced (moshi's inference path); both: run both and compare")
    baseline: bool = doc(False, "also evaluate the same model without TTT layers (the base model)")
    chunk_size: int | None = doc(None, "frames per chunk in chunked mode; null: 4 x the TTT mini-batch size "
                                       "(64 without TTT). Multiples of the mini-batch size avoid padding slots; "
                                       "E2E models need them")
    native_max_frames: int | None = doc(None, "native mode scores only the first N frames of each stream "
                                              "(it runs one frame per call); null: the whole stream")
    native_max_streams: int | None = doc(None, "native mode scores only the first N streams; null: all of them")
    train_window: int | None = doc(None, "the fine-tuning window in frames: marked on the curves; the length-"
                                         "generalisation points are multiples of it (null: not reported)")
    bin_frames: int = doc(250, "frames per bin of the NLL-vs-position curves (250 = 20 s)")
    positions: list[int] = doc(factory=lambda: [8000, 16000, 24000],
                               help="positions (frames) at which NLL / perplexity are reported")
    position_window: int = doc(500, "NLL 'at' position P = mean over frames [P - window, P) (local); the "
                                    "cumulative mean over [0, P) is reported too")
    gain_window: int = doc(1000, "context gain = mean NLL of a stream's first window minus its last window")
    length_gen: LengthGenConfig = doc(factory=LengthGenConfig, help="")
    inner_loop: dict[str, InnerLoopVariant] = doc(
        factory=dict, help="a grid of inner-loop variants of the TTT model, {name: {mini_batch_size, base_lr, scale, "
                           "offsets, chunk_size, align, modes}}, each scored beside the trained one on the same "
                           "streams, e.g. {online: {mini_batch_size: 1, scale: keep_per_token}} (docs/evaluation.md)")

    def __post_init__(self) -> None:
        check(self.chunk_size is None or self.chunk_size >= 1, "chunk_size", "null or an integer >= 1",
              self.chunk_size)
        check(self.native_max_frames is None or self.native_max_frames >= 1, "native_max_frames",
              "null or an integer >= 1", self.native_max_frames)
        check(self.native_max_streams is None or self.native_max_streams >= 1, "native_max_streams",
              "null or an integer >= 1", self.native_max_streams)
        check(self.train_window is None or self.train_window >= 1, "train_window", "null or an integer >= 1",
              self.train_window)
        for name in ("bin_frames", "position_window", "gain_window"):
            check(getattr(self, name) >= 1, name, "an integer >= 1", getattr(self, name))
        for i, p in enumerate(self.positions):
            check(p >= 1, f"positions[{i}]", "an integer >= 1", p)
        self.positions = sorted(set(self.positions))
        for name in self.inner_loop:
            check(bool(name) and "/" not in name and "@" not in name and name.strip() == name, f"inner_loop.{name}",
                  "a name without '/' or '@'", name)


@dataclass
class ZeroShotSettings:
    """`eval zero-shot`: the spoken-LM zero-shot suite (docs/evaluation.md §10), each pair of recordings
    scored by likelihood alone, every recording from a fresh stream."""

    tasks: list[str] = doc(factory=lambda: list(TASKS), help="the tasks to score: swuggy, sblimp, sstorycloze, "
                                                            "tstorycloze and SALMon's salmon_* (all by default)")
    path: Path | None = doc(None, "a local folder with one dataset per task, <path>/<task> (written by "
                                  "`datasets`' save_to_disk); null: each task's hub dataset from the local HF cache")
    tokens: Literal["auto", "cb1", "audio"] = doc("auto", "tokens a recording is scored on: cb1 (the first, semantic "
                                                          "codebook), audio (every audio codebook), auto: the "
                                                          "published choice per task (cb1; SALMon: audio)")
    reduction: Literal["mean", "sum"] = doc("mean", "a recording's score: the mean (the published choice) or the sum "
                                                    "of its tokens' NLL")
    max_pairs: int | None = doc(None, "score at most this many pairs per task (a seeded random subset); null: all")
    batch_size: int = doc(16, "recordings scored per call, from fresh streams side by side (sorted by length, padded "
                              "to the longest of the call; the scores equal one at a time's); lower it if memory "
                              "runs out")
    seed: int = doc(0, "seed of the max_pairs subset")

    def __post_init__(self) -> None:
        check(len(self.tasks) >= 1 and len(set(self.tasks)) == len(self.tasks), "tasks",
              "a list of distinct task names", self.tasks)
        for i, name in enumerate(self.tasks):
            check(name in TASKS, f"tasks[{i}]", f"one of {list(TASKS)}", name)
        check(self.max_pairs is None or self.max_pairs >= 1, "max_pairs", "null or an integer >= 1", self.max_pairs)
        check(self.batch_size >= 1, "batch_size", "an integer >= 1", self.batch_size)


@dataclass
class ContinuationSettings:
    """`eval continuation`: each model continues the first prompt_seconds of each stream for max_minutes,
    and every span of what it generated is scored against the prompt (docs/evaluation.md §11)."""

    prompt_seconds: float = doc(30.0, "seconds of each stream the models continue (forced as Moshi's own stream, "
                                      "as `ttt-speech generate` does); streams shorter than this are left out")
    max_minutes: float = doc(10.0, "minutes generated per stream (the ground truth: as much of the book as follows)")
    span_seconds: float = doc(30.0, "seconds per scored span (Whisper reads 30 s at a time)")
    quantiles: list[float] = doc(factory=lambda: [0.25, 0.5, 0.75, 1.0],
                                 help="the generated time is also summarised per quantile (tts_longeval's: the "
                                      "first 25 %, 25-50 %, ...): increasing fractions in (0, 1] ending at 1")
    batch_size: int = doc(8, "streams generated side by side (rows of one LMGen batch); lower it if memory runs out")
    sampling: SamplingConfig = doc(factory=SamplingConfig, help="sampling settings, the same for every model and "
                                                                "seed (`ttt-speech generate`'s)")
    metrics: list[str] = doc(factory=lambda: list(METRICS), help="the metrics measured (all by default): drift, "
                                                                  "speaker_similarity, gen_ppl, auto_bleu, distinct_2, "
                                                                  "wer, wer_text_stream, nll_text, nll_audio, "
                                                                  "silent_fraction, text_padding")
    asr_model: str | None = doc(DEFAULT_ASR, "Whisper (hub id or local folder) transcribing each span: GenPPL, "
                                             "Auto-BLEU, distinct-2, WER; null: every transcript metric off")
    asr_language: str | None = doc("en", "the language Whisper transcribes in; null: Whisper detects it")
    asr_max_tokens: int = doc(440, "tokens Whisper may write per 30 s of audio (its limit: 448 with its 4 prompt "
                                   "tokens)")
    speaker_model: str | None = doc(DEFAULT_SPEAKER, "WavLM speaker-verification model (hub id or local folder): "
                                                     "speaker similarity of each span to the prompt; null: off")
    text_model: str | None = doc(DEFAULT_TEXT_LM, "causal text LM (hub id or local folder) scoring the transcripts: "
                                                  "GenPPL; null: off")
    drift_k: int = doc(5, "neighbours of the drift's k-NN distance (tts_longeval's 5)")
    silence_db: float = doc(-45.0, "a Mimi frame (80 ms) of decoded audio quieter than this (RMS, dBFS) is silent")
    judge_dtype: Literal["float32", "bfloat16", "float16"] = doc("float32", "dtype of the ASR, speaker and text models")

    def __post_init__(self) -> None:
        for name, unit in (("prompt_seconds", "seconds"), ("max_minutes", "minutes"), ("span_seconds", "seconds")):
            value = getattr(self, name)
            check(0 < value < math.inf, name, f"a finite number of {unit} > 0", value)
        check(len(self.quantiles) >= 1 and all(0 < q <= 1 for q in self.quantiles) and self.quantiles[-1] == 1
              and all(a < b for a, b in zip(self.quantiles, self.quantiles[1:])), "quantiles",
              "increasing fractions in (0, 1] ending at 1", self.quantiles)
        check(self.batch_size >= 1, "batch_size", "an integer >= 1", self.batch_size)
        check(self.drift_k >= 1, "drift_k", "an integer >= 1", self.drift_k)
        check(1 <= self.asr_max_tokens <= 444, "asr_max_tokens", "an integer in [1, 444]", self.asr_max_tokens)
        check(len(set(self.metrics)) == len(self.metrics), "metrics", "distinct metric names", self.metrics)
        for i, name in enumerate(self.metrics):
            check(name in METRICS, f"metrics[{i}]", f"one of {list(METRICS)}", name)
        if self.measures("speaker_similarity"):  # the prompt is the reference voice: WavLM needs enough of it
            check(self.prompt_seconds >= SPEAKER_MIN_SECONDS, "prompt_seconds",
                  f"at least {SPEAKER_MIN_SECONDS} s for speaker similarity (or speaker_model: null)",
                  self.prompt_seconds)

    def measures(self, metric: str) -> bool:
        """Whether `metric` is measured: asked for in `metrics`, and every judge it needs set."""
        return metric in self.metrics and all(getattr(self, judge) is not None for judge in METRICS[metric].needs)

    def judge(self, field: str) -> str | None:
        """The judge `field` (asr_model, speaker_model, text_model) when a measured metric needs it, else None."""
        needed = any(field in METRICS[m].needs and self.measures(m) for m in self.metrics)
        return getattr(self, field) if needed else None


@dataclass
class EvalConfig:
    """`ttt-speech eval librilight` / `ttt-speech eval length-gen` configuration."""

    model: ModelConfig | None = doc(None, "the base model (ModelConfig fields); null: the export's base model, "
                                          "or the tiny random-init model without an export")
    export: Path | None = doc(None, "a fine-tuning export folder (model.json + TTT weights) or hub repo id "
                                    "(user/repo[@revision]): the TTT model to evaluate; `model`, when set, "
                                    "replaces its base (e.g. a local copy)")
    ttt: TTTConfig | None = doc(None, "patch the base model with fresh, untrained TTT layers (TTTConfig fields): "
                                      "for smoke tests and demos; use `export` for a trained model")
    baseline_export: Path | None = doc(None, "a fine-tuning export (folder or hub repo id) *without* TTT layers used "
                                             "as the baseline (the same recipe trained with ttt: null); null: the "
                                             "base model itself")
    compare: dict[str, Path] = doc(factory=dict, help="more exports scored side by side with the others, "
                                                      "{name: export folder or hub repo id}, e.g. {ttt-mlp: "
                                                      "runs/mlp/export, e2e: runs/e2e/export}: one column and one "
                                                      "line each; each loads its own base model (model.json), "
                                                      "`model` replaces the base of `export` only")
    data: DataConfig = doc(factory=DataConfig, help="")
    eval: EvalSettings = doc(factory=EvalSettings, help="")
    zero_shot: ZeroShotSettings = doc(factory=ZeroShotSettings, help="")
    continuation: ContinuationSettings = doc(factory=ContinuationSettings, help="")
    output_dir: Path = doc("runs/eval", "folder for report.json, report.md and the PNG plots")
    wandb: WandbConfig = doc(factory=WandbConfig, help="")

    def __post_init__(self) -> None:
        self.output_dir = Path(self.output_dir)
        check_model_source(self.export, self.ttt)
        for name in self.compare:
            check(bool(name) and name not in RESERVED_NAMES and "/" not in name and "@" not in name
                  and name.strip() == name, f"compare.{name}",
                  f"a name other than {list(RESERVED_NAMES)}, without '/' or '@'", name)


def check_model_source(export: Path | None, ttt: TTTConfig | None) -> None:
    """A model under evaluation is a trained export or the base model with fresh TTT layers, not both."""
    if export is not None and ttt is not None:
        raise ValueError("export and ttt: set one (a trained export, or fresh TTT layers), not both")


def load_config(path: str | Path, overrides: list[str] = ()) -> EvalConfig:
    """EvalConfig from a YAML file plus `key.sub=value` overrides (errors name the field and file)."""
    return load_config_file(EvalConfig, path, overrides, "config")
