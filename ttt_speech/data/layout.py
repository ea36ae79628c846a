"""A recording's codes laid out as Moshi's streams: text, Moshi's audio, the user's audio.

Moshi predicts its own audio stream, so the recording (or a stereo file's left channel) goes
there; the user stream gets the right channel, or the codes of silence for mono recordings; the
text stream gets the aligned transcript tokens, or padding when there is none (docs/architecture.md §8).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .codes import Recording


def text_padding_ids(lm) -> tuple[int, int]:
    """The text stream's tokens that carry no word: padding and end-of-padding (moshi's ids)."""
    return lm.text_padding_token_id, lm.end_of_text_padding_id


def moshi_streams(lm, recording: Recording, where: str = "recording") -> Tensor:
    """Recording → codes [lm.num_codebooks, T] ready for `LMModel.forward` / teacher forcing."""
    codes = recording.codes
    T = codes.shape[1]
    n_own, n_user = lm.dep_q, lm.n_q - lm.dep_q
    if codes.shape[0] < 8 or n_own > 8 or n_user > 8:
        raise ValueError(f"{where}: model wants {n_own}+{n_user} audio streams; codes have {codes.shape[0]} rows")
    own = codes[:n_own]
    if codes.shape[0] == 16:
        user = codes[8:8 + n_user]
    elif recording.silence is not None:
        user = recording.silence[:n_user, None].expand(n_user, T)
    else:
        raise ValueError(f"{where}: mono codes without 'silence' codes for the user stream")
    text = recording.text if recording.text is not None else torch.full((T,), lm.text_padding_token_id)
    out = torch.cat([text[None].long(), own.long(), user.long()], dim=0)
    hi = out[1:].max().item() if T else 0
    if hi >= lm.card:
        raise ValueError(f"{where}: audio code {hi} is out of range for a model with card {lm.card}")
    if T and out[0].max().item() >= lm.text_card:
        raise ValueError(f"{where}: text token {out[0].max().item()} is out of range for text_card {lm.text_card}")
    return out
