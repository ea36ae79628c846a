"""Low-rank adapters on a host model's linear layers (moshi's `LoRALinear`, so names match moshi).

`add_lora` wraps every `nn.Linear` of the selected modules; TTT modules are never wrapped (their
parameters are trained directly). B starts at zero, so a freshly adapted model equals the base.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor, nn


def add_lora(root: nn.Module, rank: int, scale: float, skip: Iterable[nn.Module] = ()) -> int:
    """Wrap every `nn.Linear` under `root` (except inside `skip`) with a LoRA adapter.

    Returns the number of wrapped layers. rank ≥ 1; the update is scale · B·A with B = 0 at start.
    """
    from moshi.modules.lora import LoRALinear

    if rank < 1:
        raise ValueError(f"lora.rank: expected an integer >= 1, got {rank}")
    skipped = {id(m) for m in skip}
    count = 0

    def visit(module: nn.Module) -> None:
        nonlocal count
        for name, child in module.named_children():
            if id(child) in skipped or isinstance(child, LoRALinear):
                continue
            if type(child) is nn.Linear and child.bias is None:
                w = child.weight
                lora = LoRALinear(child.in_features, child.out_features, rank, scale, device=w.device, dtype=w.dtype)
                lora.frozen_W = child
                nn.init.kaiming_uniform_(lora.lora_A.weight, a=5 ** 0.5)
                nn.init.zeros_(lora.lora_B.weight)
                setattr(module, name, lora)
                count += 1
            else:
                visit(child)

    visit(root)
    return count


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The LoRA parameters (`…lora_A.weight`, `…lora_B.weight`) of `model`."""
    return {n: p for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n}


def load_lora(model: nn.Module, tensors: dict[str, Tensor], where: str) -> None:
    expected = lora_state_dict(model)
    if set(expected) != set(tensors):
        missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        raise ValueError(f"{where}: LoRA weights do not match the model (missing {missing[:3]}, unexpected {extra[:3]})")
    with torch.no_grad():
        for name, p in expected.items():
            p.copy_(tensors[name])
