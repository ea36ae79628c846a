"""Kyutai's model families on moshi's `LMModel` (config.json's `model_type`, as moshi 0.2.13's
loaders read it) and which of them ttt-speech's commands run.

The library patches and streams every family (tests/test_model_families.py: zero gate == the
unpatched model, chunked == one pass, with each family's condition tensors and cross-attention).
The commands (train, eval, generate, serve) score and sample Moshi's audio streams with the LM run
without condition tensors; a checkpoint they would silently misuse is refused from its config.json,
before its weights are fetched or read, with the reason (README, "Model families").
"""
from __future__ import annotations

from typing import Any

FAMILIES = {  # model_type → what the family is (moshi's loaders know these four)
    "moshi": "full-duplex spoken dialogue (Moshi: its own and the user's audio streams, an inner-monologue text)",
    "hibiki": "streaming speech translation (Hibiki: the source speech in, the translated speech and text out)",
    "stt": "streaming speech-to-text (Kyutai STT: audio in, only the text stream predicted)",
    "tts": "streaming text-to-speech (Kyutai TTS: text in, audio out, conditioned on a speaker by cross-attention)",
}


def check_commands_support(model_type: str, lm_kwargs: dict[str, Any] | None, where: str) -> None:
    """Raise a one-line ValueError naming `where` (model.name) unless the commands run this family.

    Args:
        model_type: config.json's model_type ("moshi" when absent, as moshi's loaders read it).
        lm_kwargs: the LM kwargs of config.json (None: moshi's Moshi-7B defaults).
    """
    if model_type not in FAMILIES:
        raise ValueError(f"{where}: model_type {model_type!r} (config.json) is not a family moshi's loaders know "
                         f"({', '.join(FAMILIES)})")
    kwargs = lm_kwargs or {}
    if kwargs.get("dep_q", 8) == 0:
        raise ValueError(f"{where}: this {model_type} model (dep_q = 0) predicts only the text stream; "
                         "ttt-speech's commands score and generate audio streams: not supported (the library "
                         "patches and streams it)")
    fuser = kwargs.get("fuser") or {}
    conditioned = {method: fuser.get(method) for method in ("sum", "cross", "prepend") if fuser.get(method)}
    if kwargs.get("conditioners") or conditioned:
        how = "; ".join(f"{method}: {', '.join(names)}" for method, names in conditioned.items()) or "conditioners"
        names = sorted(kwargs.get("conditioners") or {name for fused in conditioned.values() for name in fused})
        raise ValueError(f"{where}: this {model_type} model is conditioned on {names} ({how}); ttt-speech's "
                         "commands run the LM without condition tensors, so they would score and sample another "
                         "model than the one trained: not supported (the library patches and streams it, its "
                         "condition tensors passed to forward_text)")
