"""Load LLaMA-Omni / LLaMA-Omni2 checkpoints (local directories) as an `OmniSpeechLM`.

The upstream checkpoints are transformers directories (`config.json` + weight shards) whose
config is a `LlamaConfig` (LLaMA-Omni, model_type `omni_speech_llama` / `omni_speech2s_llama`)
or a `Qwen2Config` (LLaMA-Omni2) with speech fields added, and whose weights hold the LLM
(`model.*`, `lm_head.*`), the projector (`model.speech_projector.linear{1,2}.*`) and, for the
speech-to-speech variants, a speech generator that is not loaded here. The Whisper encoder is
not taken from the checkpoint (upstream rebuilds it from openai-whisper's `large-v3.pt` too):
pass one, e.g. `WhisperModel.from_pretrained("openai/whisper-large-v3").encoder`.
No hub access happens here: download the directory first (`huggingface-cli download ...`).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn

from . import _import  # noqa: F401

from .models import ARCHS
from .speech import SPEECH_TOKEN_INDEX, OmniSpeechLM, SpeechProjector

PROJECTOR_KEY = "speech_projector.linear1.weight"
# speech fields of the Omni configs: not LLM config fields
OMNI_FIELDS = ("model_type", "architectures", "auto_map", "speech_encoder", "speech_encoder_type",
               "speech_projector_type", "speech_encoder_ds_rate", "speech_encoder_hidden_size",
               "speech_generator_type", "ctc_decoder_config", "ctc_upsample_factor", "ctc_loss_weight",
               "unit_vocab_size", "speech_normalize", "tokenizer_model_max_length", "tokenizer_padding_side")


def load_omni_pretrained(model_path: str | Path, speech_encoder: nn.Module | None = None,
                         dtype: torch.dtype = torch.float16, device: str | torch.device = "cpu") -> OmniSpeechLM:
    """A local LLaMA-Omni (Llama) or LLaMA-Omni2 (Qwen2) directory → `OmniSpeechLM` (eval mode).

    The LLM architecture is read from `config.json`'s model_type ("qwen2" in it: Qwen2, else Llama).
    Patch `result.llm` with `patch_llama` afterwards (and `load_ttt` trained TTT weights).
    """
    path = Path(model_path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file}: missing (expected a transformers checkpoint directory)")
    raw = json.loads(config_file.read_text())
    model_cls, config = llm_config(raw)
    llm = model_cls.from_pretrained(path, config=config, dtype=dtype).to(device)
    weights = _projector_weights(path)
    projector = SpeechProjector(
        encoder_dim=int(raw.get("speech_encoder_hidden_size", 1280)), llm_dim=config.hidden_size,
        k=int(raw.get("speech_encoder_ds_rate", 5)), hidden_dim=weights["linear1.weight"].shape[0],
        device=device, dtype=dtype)
    projector.load_state_dict(weights)
    if speech_encoder is not None:
        speech_encoder = speech_encoder.to(device=device, dtype=dtype)
    return OmniSpeechLM(llm, projector, speech_encoder, SPEECH_TOKEN_INDEX).eval()


def llm_config(raw: dict) -> tuple[type, object]:
    """(model class, config) of the LLM a config.json describes: "qwen2" in its model_type selects Qwen2,
    else Llama (LLaMA-Omni's `omni_speech*_llama`); the Omni speech fields are dropped."""
    arch = "qwen2" if "qwen2" in str(raw.get("model_type", "")).lower() else "llama"
    config_cls, model_cls = ARCHS[arch]
    return model_cls, config_cls.from_dict({k: v for k, v in raw.items() if k not in OMNI_FIELDS})


def _projector_weights(path: Path) -> dict[str, Tensor]:
    """`speech_projector.*` tensors of a checkpoint directory (safetensors or .bin shards), keyed
    relative to the projector (`linear1.weight`, …)."""
    from safetensors import safe_open

    found: dict[str, Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            prefix = next((k[:-len("linear1.weight")] for k in f.keys() if k.endswith(PROJECTOR_KEY)), None)
            if prefix is not None:
                found.update({k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)})
    if not found:
        for file in sorted(path.glob("*.bin")):
            state = torch.load(file, map_location="cpu", weights_only=True)
            prefix = next((k[:-len("linear1.weight")] for k in state if k.endswith(PROJECTOR_KEY)), None)
            if prefix is not None:
                found.update({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    if "linear1.weight" not in found:
        raise ValueError(f"{path}: no speech projector weights (*.{PROJECTOR_KEY}) in its weight files")
    return found
