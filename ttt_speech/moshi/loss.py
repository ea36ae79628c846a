"""Masked cross-entropy of moshi's delayed streams (shared by the training loss and the E2E update)."""
from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F


def real_targets(targets: Tensor, card: int) -> Tensor:
    """Which targets are real codes: not the delay pattern's initial token, not `zero_token_id`."""
    return (targets >= 0) & (targets < card)


def masked_ce(logits: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
    """logits [B, S, T, V], targets [B, S, T] → CE [B, S, T], 0 where mask is false; at least float32
    (float64 logits stay float64: exact tests of the E2E gradients)."""
    safe_logits = logits.to(torch.promote_types(logits.dtype, torch.float32)).masked_fill(~mask[..., None], 0.0)
    safe_targets = targets.masked_fill(~mask, 0)
    ce = F.cross_entropy(safe_logits.flatten(0, 2), safe_targets.flatten(), reduction="none")
    return ce.view_as(targets) * mask
