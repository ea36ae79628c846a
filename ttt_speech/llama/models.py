"""Tiny random-init Llama / Qwen2 causal LMs for CPU work and tests (no hub access)."""
from __future__ import annotations

from typing import Any

import torch

from . import _import  # noqa: F401
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

ARCHS = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}

# Llama-3.1-8B's layout (GQA, RMSNorm, SwiGLU, RoPE) with every size shrunk.
TINY_LLM_KWARGS: dict[str, Any] = {
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}


def tiny_llm(arch: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any):
    """A randomly initialised `LlamaForCausalLM` ("llama") or `Qwen2ForCausalLM` ("qwen2"), in eval
    mode: width 64, 4 layers, 4 heads (2 key/value heads), vocabulary 128 unless overridden."""
    if arch not in ARCHS:
        raise ValueError(f"arch: expected one of {sorted(ARCHS)}, got {arch!r}")
    config_cls, model_cls = ARCHS[arch]
    config = config_cls(**{**TINY_LLM_KWARGS, **overrides})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
        if arch == "qwen2":  # Qwen2 has q/k/v biases, zero at init: make them matter
            with torch.no_grad():
                for layer in model.model.layers:
                    for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                        proj.bias.normal_(std=0.02)
    return model.to(dtype).eval()


def tiny_omni(arch: str = "llama", seed: int = 0, n_mels: int = 16, mel_frames: int = 40, encoder_dim: int = 32,
              k: int = 2, projector_dim: int = 64, **llm_overrides: Any):
    """A randomly initialised LLaMA-Omni-style speech LM: a 1-layer transformers `WhisperEncoder`
    (n_mels log-mel bins, mel_frames frames → mel_frames / 2 features of width encoder_dim),
    a k-frame-stacking projector and `tiny_llm(arch)`. Real sizes: 128 mels, 3000 frames, 1280, k = 5."""
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    from .speech import OmniSpeechLM, SpeechProjector

    if mel_frames % 2:
        raise ValueError(f"mel_frames: Whisper's encoder halves the frame rate, expected an even number, got {mel_frames}")
    llm = tiny_llm(arch, seed=seed, **llm_overrides)
    whisper = WhisperConfig(num_mel_bins=n_mels, d_model=encoder_dim, encoder_layers=1, encoder_attention_heads=2,
                            encoder_ffn_dim=2 * encoder_dim, decoder_layers=1, decoder_attention_heads=2,
                            max_source_positions=mel_frames // 2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        encoder = WhisperEncoder(whisper).eval()
        projector = SpeechProjector(encoder_dim, llm.config.hidden_size, k=k, hidden_dim=projector_dim)
    return OmniSpeechLM(llm, projector, encoder).eval()


def check_tiny_llm_kwargs(overrides: dict[str, Any]) -> None:
    """`model.tiny` of a tiny-llama / tiny-qwen2 model: known config fields, positive integers."""
    unknown = sorted(set(overrides) - set(TINY_LLM_KWARGS))
    if unknown:
        raise ValueError(f"model.tiny: unknown kwarg(s) {unknown}; allowed: {sorted(TINY_LLM_KWARGS)}")
    for key, value in overrides.items():
        least = 0 if key.endswith("_id") else 1  # token ids start at 0
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"model.tiny.{key}: expected an integer >= {least}, got {value!r}")
    kwargs = {**TINY_LLM_KWARGS, **overrides}
    if kwargs["hidden_size"] % kwargs["num_attention_heads"] or kwargs["num_attention_heads"] % kwargs["num_key_value_heads"]:
        raise ValueError("model.tiny: hidden_size must be a multiple of num_attention_heads, and that of "
                         "num_key_value_heads")


# Qwen2.5-7B-Instruct's config.json (hub revision of 2024-09; LLaMA-Omni2-7B's LLM has the same layout):
# the architecture `scripts/bench_memory.py --llama` builds on the meta device without a download.
QWEN2_5_7B_INSTRUCT = "Qwen/Qwen2.5-7B-Instruct"
QWEN2_5_7B_KWARGS: dict[str, Any] = {
    "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
    "num_attention_heads": 28, "num_key_value_heads": 4, "max_position_embeddings": 32768, "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "bos_token_id": 151643, "eos_token_id": 151645,
}


def qwen2_5_7b(dtype: torch.dtype = torch.bfloat16):
    """Qwen2.5-7B-Instruct's architecture on the meta device (nothing allocated or read)."""
    with torch.device("meta"):
        return Qwen2ForCausalLM(Qwen2Config(**QWEN2_5_7B_KWARGS)).to(dtype).eval()
