"""The model a training run trains: the base LM (Moshi, or a Llama / Qwen2 for host llama) with its TTT
layers and LoRA adapters, exactly the configured parameters trainable (float32 master copies of them
under bf16)."""
from __future__ import annotations

import torch
from torch import nn

from ttt_speech.export import TRAINS_EVERYTHING
from ttt_speech.handle import TTTModel
from ttt_speech.lora import add_lora
from ttt_speech.models import load_lm

from .config import TrainConfig
from .hosts import host_of


def build_model(config: TrainConfig, device: torch.device) -> nn.Module:
    """Base LM (+ TTT layers, + LoRA) with exactly the configured parameters trainable."""
    return prepare_model(load_lm(config.model, device=device), config)


def prepare_model(lm: nn.Module, config: TrainConfig) -> nn.Module:
    """`lm` (in place) with config's TTT layers and LoRA added and exactly the configured
    parameters trainable, in training mode."""
    torch.manual_seed(config.seed)  # the new layers' initialisation depends on the seed only
    host = host_of(config)
    handle = None
    if config.ttt is not None:
        host.patch(lm, config.ttt)
        handle = TTTModel.of(lm)
    if config.uses_lora:
        skip = [site.inserted for site in handle.sites] if handle is not None else []
        add_lora(lm, config.lora.rank, config.lora.scale, skip=skip)
    ttt_params = set(handle.named_parameters()) if handle is not None else set()
    layers = config.trainable in ("ttt", "ttt+lora", "e2e-meta+lora")
    for name, p in lm.named_parameters():
        p.requires_grad_(config.trainable in TRAINS_EVERYTHING
                         or (config.uses_lora and (".lora_A." in name or ".lora_B." in name))
                         or (layers and name in ttt_params))
    if config.precision == "bf16":  # undone for the export: `master_to_model_dtype`
        # float32 master weights: AdamW's updates (lr x ~1e-3 of a weight) vanish below bf16's
        # resolution (2^-8 of it); the compute is bf16 under autocast. Frozen weights keep their dtype.
        for p in lm.parameters():
            if p.requires_grad and p.is_floating_point() and p.element_size() < 4:
                p.data = p.data.float()
    if config.gradient_checkpointing:
        host.checkpoint_layers(lm)
    return lm.train()


def master_to_model_dtype(lm: nn.Module, config: TrainConfig) -> nn.Module:
    """`lm` (in place) with the float32 master copies of `prepare_model` cast back to the model's
    dtype: what an export holds (the dtype of the base checkpoint, half the bytes of float32)."""
    dtype = config.model.torch_dtype()
    if config.precision == "bf16":
        for p in lm.parameters():
            if p.requires_grad and p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)
    return lm

