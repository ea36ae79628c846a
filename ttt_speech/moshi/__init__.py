"""Moshi host adapter: TTT layers inside `moshi.models.lm.LMModel`'s temporal transformer."""
from .patch import patch_moshi, ttt_modules
from .streaming import MoshiTTT, TTTHybridTransformerLayer, load_ttt_stream_state, ttt_stream_state
from .teacher_forcing import teacher_forced_logits

__all__ = ["patch_moshi", "ttt_modules", "MoshiTTT", "TTTHybridTransformerLayer",
           "ttt_stream_state", "load_ttt_stream_state", "teacher_forced_logits"]
