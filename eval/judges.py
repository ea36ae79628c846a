"""The judges of `ttt-speech eval continuation`: external models that score generated audio.

- `Transcriber`: Whisper ASR, audio → text (for GenPPL and word counts);
- `SpeakerEncoder`: WavLM speaker verification, audio → unit x-vectors (speaker similarity);
- `TextScorer`: a causal text LM, text → summed NLL (GenPPL of the transcripts).

Each is loaded with `transformers` from a hub repo id (resolved in the local Hugging Face cache,
HF_HUB_CACHE) or from a local folder, never from the network (`local_files_only`): a cluster without
network would otherwise wait on the hub for every file. `check_judge` says at plan time, without
loading anything, whether a judge is there. scripts/make_local_judges.py writes tiny random stand-ins.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor

from ttt_speech.data.audio import resample

from .continuation_metrics import SPEAKER_MIN_SECONDS

WHISPER_SECONDS = 30  # Whisper's window: longer audio is cut in pieces of at most this
# a piece whose peak |sample| is below this (-80 dBFS) is silent: "", not transcribed (Whisper hallucinates on silence)
SILENCE_PEAK = 1e-4
TEXT_BATCH = 8  # texts per forward of the text LM: its logits are [batch, tokens, vocab] (Qwen2.5: 151,936)
# the weight files `from_pretrained` reads, alone or as an index naming shards
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
T = TypeVar("T")


# ---------------------------------------------------------------- is the judge there?


def check_judge(source: str | Path, where: str) -> None:
    """Refuse, in one line (ValueError), a judge that is neither a local folder holding a config.json and
    its weights nor a hub repo whose snapshot is complete in the local HF cache. Reads file names only: no
    weights, no network. `where` is the config field naming the judge (e.g. "continuation.asr_model")."""
    from huggingface_hub import constants

    off = f"or switch the metric off with `{where}=null`"
    path = Path(source).expanduser()
    if path.is_dir():
        problem = _missing_files(path)
        if problem:
            raise ValueError(f"{where}: the judge folder {path} {problem}; point {where} at a model folder (as "
                             f"`hf download <id> --local-dir DIR` writes it) {off}")
        return
    problem = _cache_problem(str(source))
    if problem == "invalid":
        raise ValueError(f"{where}: the judge {source} is neither a folder nor a hub repo id; point {where} at a "
                         f"folder holding its config.json {off}")
    if problem:
        raise ValueError(f"{where}: the judge {source} is no folder and {problem} the local Hugging Face cache "
                         f"{constants.HF_HUB_CACHE} (nothing is downloaded at run time): get it with "
                         f"`hf download {source}` where there is network, point {where} at a folder holding its "
                         f"config.json, {off}")


def _cache_problem(repo_id: str) -> str | None:
    """What keeps `repo_id` from loading out of the local hub cache, phrased to go before "the local Hugging
    Face cache"; "invalid" for a name that is no repo id; None when its snapshot is complete. Offline."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        snapshot = Path(snapshot_download(repo_id, local_files_only=True))
    except HFValidationError:  # "/abs/missing", "runs/x/../asr": not a folder, and no repo has that name
        return "invalid"
    except LocalEntryNotFoundError as e:
        # huggingface_hub 2.x tells an interrupted download from the tree listing it cached (a subclass)
        return "has an incomplete snapshot in" if type(e).__name__ == "IncompleteSnapshotError" else "is not in"
    missing = _missing_files(snapshot)
    return f"has a snapshot that {missing} in" if missing else None


def _missing_files(folder: Path) -> str | None:
    """What `folder` lacks to be loaded by `from_pretrained` (config.json, weights, shards, link targets), or None."""
    if not (folder / "config.json").is_file():
        return "has no config.json"
    dangling = sorted(p.name for p in folder.iterdir() if p.is_symlink() and not p.exists())
    if dangling:  # a hub snapshot whose blobs were removed
        return f"has files whose cached content is gone: {', '.join(dangling)}"
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return None
        index = folder / f"{name}.index.json"
        if index.is_file():
            shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
            missing = [s for s in shards if not (folder / s).is_file()]
            return f"misses weight shards {', '.join(missing)} of {index.name}" if missing else None
    return f"has no weights ({' or '.join(WEIGHT_FILES)}, or an index of shards)"


def _read_json(path: Path) -> dict:
    import json

    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # an unreadable index names no shard: from_pretrained says what is wrong with it


def _load(what: str, source: str | Path, from_pretrained: Callable[..., T], **kwargs) -> T:
    """from_pretrained(source, **kwargs) from local files only (the hub cache or a folder); a foreseeable
    failure (a missing or unreadable file, a folder holding another kind of model) as one line naming it."""
    folder = Path(source).expanduser()
    name = str(folder) if folder.is_dir() else str(source)  # "~/judges/asr" is a folder, "org/name" a repo id
    try:
        return from_pretrained(name, local_files_only=True, **kwargs)
    except (OSError, ValueError) as e:  # transformers: OSError for files, ValueError for unknown configs
        detail = " ".join(str(e).split())[:300] or type(e).__name__  # one line, however many transformers wrote
        raise ValueError(f"cannot load the {what} judge {source}: {detail}") from None


def _mono(wave: Tensor, rate: int, to_rate: int) -> Tensor:
    """A mono waveform [S] as float32 [S'] on the CPU at `to_rate` (S' = round(S · to_rate / rate))."""
    if wave.dim() != 1:
        raise ValueError(f"a judge takes mono waveforms [S], got shape {tuple(wave.shape)}")
    wave = wave.detach().float().cpu()
    if rate == to_rate or wave.numel() == 0:
        return wave
    return torch.from_numpy(resample(wave.numpy()[None], rate, to_rate)[0].copy())


# ---------------------------------------------------------------- the judges


class Transcriber:
    """Whisper ASR (WhisperForConditionalGeneration + its processor) from a hub id or local folder."""

    def __init__(self, source: str | Path, device: torch.device, dtype: torch.dtype = torch.float32,
                 language: str | None = "en", max_new_tokens: int = 440):
        """language: forced ("en": English transcription of any speech), or None for Whisper's detection.
        max_new_tokens: per 30 s piece; Whisper's decoder holds 448 positions, 4 taken by the prompt."""
        from transformers import AutoProcessor, WhisperForConditionalGeneration

        self.processor = _load("ASR", source, AutoProcessor.from_pretrained)
        if not hasattr(self.processor, "feature_extractor") or not hasattr(self.processor, "batch_decode"):
            raise ValueError(f"cannot load the ASR judge {source}: its processor ({type(self.processor).__name__}) "
                             "is not Whisper's (a feature extractor and a tokenizer)")
        model = _load("ASR", source, WhisperForConditionalGeneration.from_pretrained, dtype=dtype)
        self.model = model.to(device).eval()
        self.device, self.dtype = torch.device(device), dtype
        self.language, self.max_new_tokens = language, max_new_tokens
        self.sample_rate: int = self.processor.feature_extractor.sampling_rate

    @torch.no_grad()
    def transcribe(self, pcm: list[Tensor], sample_rate: int) -> list[str]:
        """One transcript per mono float waveform [S] at `sample_rate`. Longer than 30 s: cut in 30 s pieces,
        whose transcripts are joined with a space. Every piece of every waveform goes in one generate()
        call; an empty or silent piece (peak < SILENCE_PEAK) is not transcribed ("")."""
        size = WHISPER_SECONDS * self.sample_rate
        pieces: list[Tensor] = []
        owners: list[int] = []
        for i, wave in enumerate(pcm):
            wave = _mono(wave, sample_rate, self.sample_rate)
            for piece in wave.split(size):
                if piece.numel() and piece.abs().max() >= SILENCE_PEAK:
                    pieces.append(piece)
                    owners.append(i)
        parts: list[list[str]] = [[] for _ in pcm]
        for owner, text in zip(owners, self._generate(pieces) if pieces else []):
            if text:
                parts[owner].append(text)
        return [" ".join(p) for p in parts]

    def _generate(self, pieces: list[Tensor]) -> list[str]:
        """Transcripts of waveforms [S ≤ 30 s] at self.sample_rate, one batch: log-mel features [B, mels, 3000]
        (padded to 30 s, as Whisper was trained), greedy decoding, special tokens dropped."""
        features = self.processor.feature_extractor([p.numpy() for p in pieces], sampling_rate=self.sample_rate,
                                                    return_tensors="pt", return_attention_mask=True)
        # `language` forces the language token (no detection); the task token is always "transcribe"
        # (multilingual Whisper would otherwise be free to translate)
        forced = {"language": self.language} if self.language is not None else {}
        # Whisper's generate takes max_length as new tokens after its prompt (<|startoftranscript|><|en|>...);
        # max_new_tokens would do the same, with a warning on every call that the checkpoint's max_length (448)
        # is set too (transformers 5.25.0)
        ids = self.model.generate(features.input_features.to(self.device, self.dtype),
                                  attention_mask=features.attention_mask.to(self.device),
                                  task="transcribe", max_length=self.max_new_tokens, **forced)
        return [text.strip() for text in self.processor.batch_decode(ids, skip_special_tokens=True)]


class SpeakerEncoder:
    """WavLM speaker verification (WavLMForXVector + feature extractor)."""

    def __init__(self, source: str | Path, device: torch.device, dtype: torch.dtype = torch.float32):
        from transformers import AutoFeatureExtractor, WavLMForXVector

        self.feature_extractor = _load("speaker", source, AutoFeatureExtractor.from_pretrained)
        model = _load("speaker", source, WavLMForXVector.from_pretrained, dtype=dtype)
        self.model = model.to(device).eval()
        self.device, self.dtype = torch.device(device), dtype
        self.sample_rate: int = self.feature_extractor.sampling_rate

    @torch.no_grad()
    def embed(self, pcm: list[Tensor], sample_rate: int) -> Tensor:
        """[B, D] float32 on the CPU: L2-normalised x-vectors, one per mono waveform [S] at `sample_rate`
        (each at least SPEAKER_MIN_SECONDS). Waveforms of equal length share a forward; an embedding never
        depends on the others: WavLM-base's feature encoder group-normalises over time, padding included,
        so a padded batch (with its attention mask) would move a short recording's embedding."""
        waves = [_mono(w, sample_rate, self.sample_rate) for w in pcm]
        for i, wave in enumerate(waves):
            if wave.numel() < SPEAKER_MIN_SECONDS * self.sample_rate:
                raise ValueError(f"speaker embedding of waveform {i}: {wave.numel() / self.sample_rate:.2f} s, "
                                 f"shorter than {SPEAKER_MIN_SECONDS} s")
        out = torch.zeros(len(waves), self.model.config.xvector_output_dim)
        for length in sorted({w.numel() for w in waves}):
            rows = [i for i, w in enumerate(waves) if w.numel() == length]
            inputs = self.feature_extractor([waves[i].numpy() for i in rows], sampling_rate=self.sample_rate,
                                            return_tensors="pt", return_attention_mask=True)
            with warnings.catch_warnings():  # torch's, on the mask types transformers' WavLM attention passes
                warnings.filterwarnings("ignore", "Support for mismatched key_padding_mask", UserWarning)
                embeddings = self.model(input_values=inputs.input_values.to(self.device, self.dtype),
                                        attention_mask=inputs.attention_mask.to(self.device)).embeddings
            out[rows] = F.normalize(embeddings.float(), dim=-1).cpu()
        return out


class TextScorer:
    """A causal text LM (AutoModelForCausalLM + AutoTokenizer) scoring transcripts: GenPPL."""

    def __init__(self, source: str | Path, device: torch.device, dtype: torch.dtype = torch.float32):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = _load("text LM", source, AutoTokenizer.from_pretrained)
        model = _load("text LM", source, AutoModelForCausalLM.from_pretrained, dtype=dtype)
        self.model = model.to(device).eval()
        self.device = torch.device(device)
        # the first context token: BOS, or EOS for tokenizers without one (Qwen2.5's), as a document boundary
        start = self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.tokenizer.eos_token_id
        if start is None:
            raise ValueError(f"cannot load the text LM judge {source}: its tokenizer has neither BOS nor EOS token")
        self.start: int = start
        self.pad: int = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else start

    @torch.no_grad()
    def nll(self, texts: list[str]) -> list[tuple[float, int]]:
        """Per text: (sum of the NLL in nats of its tokens, number of tokens scored). Each text is scored alone
        after the start token, so every one of its tokens is scored; an empty text gives (0.0, 0). Batches of
        TEXT_BATCH, right-padded: a text's positions and the tokens it attends to are those it has alone."""
        ids = [self.tokenizer(text, add_special_tokens=False).input_ids for text in texts]
        scores = [(0.0, 0)] * len(texts)
        todo = [i for i, tokens in enumerate(ids) if tokens]
        for start in range(0, len(todo), TEXT_BATCH):
            rows = todo[start:start + TEXT_BATCH]
            for i, score in zip(rows, self._score([[self.start, *ids[i]] for i in rows])):
                scores[i] = score
        return scores

    def _score(self, sequences: list[list[int]]) -> list[tuple[float, int]]:
        """(summed NLL of tokens 1.., their count) of each token sequence (start token first), one forward."""
        length = max(len(s) for s in sequences)
        tokens = torch.full((len(sequences), length), self.pad, dtype=torch.long)
        mask = torch.zeros_like(tokens)
        for row, sequence in enumerate(sequences):
            tokens[row, :len(sequence)] = torch.tensor(sequence)
            mask[row, :len(sequence)] = 1
        tokens, mask = tokens.to(self.device), mask.to(self.device)
        logits = self.model(input_ids=tokens, attention_mask=mask).logits[:, :-1]  # [B, L-1, V]: predicts tokens 1..
        nll = F.cross_entropy(logits.float().transpose(1, 2), tokens[:, 1:], reduction="none")  # [B, L-1]
        nll = (nll.double() * mask[:, 1:]).sum(1)
        return [(float(n), len(s) - 1) for n, s in zip(nll.cpu(), sequences)]
