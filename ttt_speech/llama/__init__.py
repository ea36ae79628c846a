"""HF Llama / Qwen2 host adapter (LLaMA-Omni's and LLaMA-Omni2's LLMs): TTT layers in transformers
decoders, their state in the generation cache, a LLaMA-Omni-style speech front end, a state monitor.

Needs the `omni` extra (transformers 5.x): `pip install 'ttt-speech[omni]'`.
"""
from .cache import TTTCache, TTTPlan, TTTSlot
from .compat import CACHE_KWARG
from .models import tiny_llm, tiny_omni
from .modules import LlamaTTT, LlamaTTTAttention, checkpoint_layers
from .monitor import TTTMonitor, plot_monitor, read_monitor
from .patch import SPEC, patch_llama
from .pretrained import load_omni_pretrained
from .speech import SPEECH_TOKEN_INDEX, OmniSpeechLM, SpeechProjector, speech_prompt_ids

__all__ = ["patch_llama", "SPEC", "TTTCache", "TTTPlan", "TTTSlot", "checkpoint_layers", "CACHE_KWARG", "LlamaTTT", "LlamaTTTAttention",
           "OmniSpeechLM", "SpeechProjector", "SPEECH_TOKEN_INDEX", "speech_prompt_ids", "load_omni_pretrained",
           "TTTMonitor", "plot_monitor", "read_monitor", "tiny_llm", "tiny_omni"]
