"""The model a live stream runs: an export, or a base model with optional TTT weights patched on
(shared by `ttt-speech generate` and `ttt-speech serve`; the errors name their options)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from ..models import ModelConfig


def check_generation_model(export: str | Path | None, ttt: str | Path | None) -> None:
    """What the model's metadata already refuses, before it is loaded: --ttt with --export, E2E layers."""
    from ..checkpoint import read_saved_ttt
    from ..export import Export
    from .session import check_generable

    if export is not None and ttt is not None:
        raise ValueError("--ttt: not with --export (the export holds its own TTT weights)")
    opened = Export.open(export) if export is not None else None
    saved = read_saved_ttt(ttt) if ttt is not None else None
    if (opened is not None and opened.model_config.is_llama) or (saved is not None and saved.host != "moshi"):
        option = "--export" if opened is not None else "--ttt"
        raise ValueError(f"{option}: {export or ttt} holds TTT layers of a Llama / Qwen2 model (model.host llama): load "
                         "it with transformers and `load_ttt`, and generate with a TTTCache (docs/llama_omni.md)")
    check_generable(opened.ttt_config if opened is not None else saved.config if saved is not None else None)


def load_generation_model(export: str | Path | None = None, model: str = "tiny", ttt: str | Path | None = None,
                          device: str = "auto", dtype: str | None = None):
    """(lm in eval mode, its ModelConfig): the export (`export`: folder or hub repo id) at `device`
    (and `dtype`, default the export's own), else `model` (float32 by default) with the TTT weights
    of the save_ttt folder `ttt` patched on."""
    from ..checkpoint import load_ttt
    from ..models import load_lm

    if export is not None:
        from ..export import Export

        opened = Export.open(export)
        config = dataclasses.replace(opened.model_config, device=device, **({"dtype": dtype} if dtype else {}))
        return opened.load(device=config.torch_device(), model=config)
    config = ModelConfig(name=model, device=device, dtype=dtype or "float32")
    lm = load_lm(config)
    if ttt is not None:
        load_ttt(lm, ttt)
    return lm.eval(), config


def check_codec(lm, mimi, hint: str = "") -> None:
    """An LM that reads or writes audio through Mimi must use Mimi's codes (a model trained on other
    codes, e.g. `ttt-speech train tiny`'s 64, cannot): a one-line ValueError otherwise, `hint` appended."""
    if lm.card != mimi.cardinality:
        raise ValueError(f"the model's {lm.card}-code audio codebooks do not match Mimi's {mimi.cardinality}: "
                         f"it was trained on other codes than Mimi's and cannot talk through Mimi{hint}")
