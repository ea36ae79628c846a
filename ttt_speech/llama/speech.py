"""A thin LLaMA-Omni-style speech front end around a (TTT-patched) HF causal LM.

LLaMA-Omni (ictnlp/LLaMA-Omni, `omni_speech/model/omni_speech_arch.py`) feeds speech to its LLM as
embeddings: a Whisper encoder turns a log-mel spectrogram into 50 Hz features, a projector stacks
k = 5 consecutive frames and maps them to the LLM width (10 Hz), and the result replaces the
placeholder token `<speech>` (id -200 in `input_ids`) in the token embeddings. LLaMA-Omni2 does
the same in front of a Qwen2. The upstream packages pin transformers 4.43 and do not import on
5.x; this module re-implements the speech-in path only (no speech generator / vocoder), with the
projector's parameter names kept so upstream checkpoints load (see `pretrained.py`).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from . import _import  # noqa: F401
from .compat import cache_kwargs

SPEECH_TOKEN_INDEX = -200  # LLaMA-Omni's `<speech>` placeholder id in input_ids (omni_speech/constants.py)


def speech_prompt_ids(tokenizer: Any, prompt: str, placeholder: str = "<speech>",
                      add_special_tokens: bool = True) -> list[int]:
    """Token ids of a text prompt with `placeholder` marking where speech goes (→ SPEECH_TOKEN_INDEX),
    as LLaMA-Omni's `tokenizer_speech_token` does. `add_special_tokens` applies to the start of the
    prompt only (set it False for a prompt from `apply_chat_template`, which has its BOS already)."""
    first, *rest = prompt.split(placeholder)
    ids = list(tokenizer(first, add_special_tokens=add_special_tokens)["input_ids"])
    for chunk in rest:
        ids += [SPEECH_TOKEN_INDEX, *tokenizer(chunk, add_special_tokens=False)["input_ids"]]
    return ids


class SpeechProjector(nn.Module):
    """LLaMA-Omni's `EncoderProjectorConcat`: features [B, T, D] → [B, T // k, C].

    Stacks k consecutive frames (trailing T mod k frames are dropped), then Linear(k·D → hidden)
    → ReLU → Linear(hidden → C). Parameter names (`linear1`, `linear2`) match upstream.
    """

    def __init__(self, encoder_dim: int, llm_dim: int, k: int = 5, hidden_dim: int = 2048,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if k < 1:
            raise ValueError(f"k: expected a positive frame-stacking rate, got {k}")
        self.k = k
        self.encoder_dim = encoder_dim
        self.linear1 = nn.Linear(encoder_dim * k, hidden_dim, device=device, dtype=dtype)
        self.relu = nn.ReLU()
        self.linear2 = nn.Linear(hidden_dim, llm_dim, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        B, T, D = x.shape
        if D != self.encoder_dim:
            raise ValueError(f"speech features: expected width {self.encoder_dim}, got {D}")
        n = T // self.k
        x = x[:, :n * self.k].reshape(B, n, D * self.k)
        return self.linear2(self.relu(self.linear1(x)))


class OmniSpeechLM(nn.Module):
    """Speech-in LM: `speech_encoder` → `projector` → spliced into `llm`'s input embeddings.

    llm: a `LlamaForCausalLM` / `Qwen2ForCausalLM`, patched with TTT or not.
    speech_encoder: maps log-mel [B, n_mels, frames] to features [B, frames / 2, D] (a transformers
        `WhisperEncoder`, or openai-whisper's `.encoder`); None: callers pass encoder features.
    Speech segments are matched to the `speech_token_index` placeholders of `input_ids` in reading
    order (row by row, left to right), one segment per placeholder.
    """

    def __init__(self, llm: nn.Module, projector: SpeechProjector, speech_encoder: nn.Module | None = None,
                 speech_token_index: int = SPEECH_TOKEN_INDEX) -> None:
        super().__init__()
        self.llm = llm
        self.projector = projector
        self.speech_encoder = speech_encoder
        self.speech_token_index = speech_token_index

    def encode_speech(self, speech: Tensor, speech_lengths: Tensor | None = None) -> list[Tensor]:
        """speech [S, frames, n_mels] (log-mel, as LLaMA-Omni's loader gives it) or, without an
        encoder, features [S, T, D]; speech_lengths [S] valid frames (default: all) →
        one [n_i, C] LLM-input segment per utterance (n_i = valid encoder frames // k)."""
        lengths = speech_lengths if speech_lengths is not None else \
            torch.full((speech.shape[0],), speech.shape[1], dtype=torch.long, device=speech.device)
        if self.speech_encoder is not None:
            out = self.speech_encoder(speech.transpose(1, 2))
            features = getattr(out, "last_hidden_state", out)  # transformers output or a plain tensor
            lengths = (lengths + 1) // 2  # Whisper's stride-2 convolution
        else:
            features = speech
        projected = self.projector(features.to(self.projector.linear1.weight.dtype))
        lengths = (lengths // self.projector.k).clamp(max=projected.shape[1]).tolist()
        return [projected[i, :n] for i, n in enumerate(lengths)]

    def embed(self, input_ids: Tensor, speech_features: list[Tensor] | None = None,
              attention_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """input_ids [B, L] with placeholders → (inputs_embeds [B, L', C], attention_mask [B, L']),
        every placeholder replaced by its speech segment, rows left-padded to a common length
        (what `generate` expects). `attention_mask` [B, L] drops padding of `input_ids` first."""
        speech_features = list(speech_features or [])
        embed_tokens = self.llm.get_input_embeddings()
        placeholders = int((input_ids == self.speech_token_index).sum())
        if placeholders != len(speech_features):
            raise ValueError(f"speech: {len(speech_features)} speech segment(s) for {placeholders} "
                             f"placeholder(s) {self.speech_token_index} in input_ids")
        segments = iter(speech_features)
        rows = []
        for b in range(input_ids.shape[0]):
            ids = input_ids[b] if attention_mask is None else input_ids[b][attention_mask[b].bool()]
            is_speech = ids == self.speech_token_index
            text = embed_tokens(ids.masked_fill(is_speech, 0))  # placeholders get a dummy id, replaced below
            pieces, start = [], 0
            for pos in is_speech.nonzero().flatten().tolist():
                pieces += [text[start:pos], next(segments).to(text.dtype)]
                start = pos + 1
            rows.append(torch.cat(pieces + [text[start:]]))
        width = max(r.shape[0] for r in rows)
        embeds = rows[0].new_zeros(len(rows), width, rows[0].shape[1])
        mask = torch.zeros(len(rows), width, dtype=torch.long, device=embeds.device)
        for b, r in enumerate(rows):
            if r.shape[0]:
                embeds[b, width - r.shape[0]:] = r
                mask[b, width - r.shape[0]:] = 1
        return embeds, mask

    def prepare_inputs(self, input_ids: Tensor, speech: Tensor | None = None, speech_lengths: Tensor | None = None,
                       speech_features: list[Tensor] | None = None,
                       attention_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Encode `speech` (or take precomputed `speech_features`) and splice: → (embeds, mask)."""
        if speech is not None and speech_features is not None:
            raise ValueError("speech: pass either speech or speech_features, not both")
        if speech is not None:
            speech_features = self.encode_speech(speech, speech_lengths)
        return self.embed(input_ids, speech_features, attention_mask)

    def forward(self, input_ids: Tensor, speech: Tensor | None = None, speech_lengths: Tensor | None = None,
                speech_features: list[Tensor] | None = None, attention_mask: Tensor | None = None,
                **kwargs: Any):
        """The LLM's forward on the spliced embeddings (kwargs: `cache`, `labels`, …; labels must
        then be given for the spliced positions). The cache may come as `cache` or `past_key_values`
        on any transformers 5.x: it is passed on under the installed name."""
        embeds, mask = self.prepare_inputs(input_ids, speech, speech_lengths, speech_features, attention_mask)
        return self.llm(inputs_embeds=embeds, attention_mask=mask, **cache_kwargs(kwargs))

    @torch.no_grad()
    def generate(self, input_ids: Tensor, speech: Tensor | None = None, speech_lengths: Tensor | None = None,
                 speech_features: list[Tensor] | None = None, attention_mask: Tensor | None = None,
                 **kwargs: Any):
        """`llm.generate` on the spliced embeddings; returns the new tokens only (as transformers
        does for `inputs_embeds`). Next turn: pass the whole history (ids with placeholders, all
        speech segments so far) and the same `cache` (`cache=` or `past_key_values=`, as `forward`):
        the cached prefix is skipped."""
        embeds, mask = self.prepare_inputs(input_ids, speech, speech_lengths, speech_features, attention_mask)
        return self.llm.generate(inputs_embeds=embeds, attention_mask=mask, **cache_kwargs(kwargs))
