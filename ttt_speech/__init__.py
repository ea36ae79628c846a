"""ttt-speech: Test-Time-Training layers for speech language models.

    from ttt_speech import TTTConfig, patch_moshi
    report = patch_moshi(lm, TTTConfig(layer_type="linear", layers="last:0.5", mode="hybrid"))
    ttt = TTTModel.of(lm)        # the handle: config, report, layers, stream state, statistics

Importing this package is cheap: torch and moshi load on first use of what needs them.
"""
from importlib import import_module
from typing import Any

from .config import TTTConfig

__version__ = "0.1.0"

_LAZY = {
    "TTTModel": "ttt_speech.handle",
    "TTTLayer": "ttt_speech.layer",
    "TTTState": "ttt_speech.state",
    "PatchReport": "ttt_speech.report",
    "patch_moshi": "ttt_speech.moshi",
    "patch_llama": "ttt_speech.llama",
    "save_ttt": "ttt_speech.checkpoint",
    "load_ttt": "ttt_speech.checkpoint",
    "ttt_state_dict": "ttt_speech.checkpoint",
    "tiny_moshi_lm": "ttt_speech.models",
}

__all__ = ["TTTConfig", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ttt_speech' has no attribute {name!r}")
