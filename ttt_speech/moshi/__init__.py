"""Moshi host adapter: TTT layers inside `moshi.models.lm.LMModel`'s temporal transformer.

Every use of moshi's private names lives in `internals.py` (docs/architecture.md §7).
"""
from .internals import AttentionBranchLayer, FeedForwardBranchLayer, attention_context, moshi_7b_lm, widen_kv_caches
from .patch import SPEC, patch_moshi, transformer_layers
from .streaming import MoshiTTT
from .teacher_forcing import teacher_forced_logits

__all__ = ["patch_moshi", "SPEC", "MoshiTTT", "AttentionBranchLayer", "FeedForwardBranchLayer", "attention_context",
           "widen_kv_caches", "teacher_forced_logits", "transformer_layers", "moshi_7b_lm"]
