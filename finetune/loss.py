"""Moshi's training loss (text + audio streams; first codebook weighted as in moshi-finetune).

The loss is returned as weighted sums and weights so that data-parallel ranks can normalise by
the *global* weight: the gradients DDP averages are then exactly those of one process on the
whole batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ttt_speech.moshi.loss import masked_ce, real_targets


@dataclass
class LossTerms:
    """Weighted sums and their weights (0-dim tensors); `ratio` gives the means."""

    text_sum: Tensor
    text_weight: Tensor
    audio_sum: Tensor
    audio_weight: Tensor
    cb1_sum: Tensor
    cb1_count: Tensor

    def stacked(self) -> Tensor:
        return torch.stack([self.text_sum, self.text_weight, self.audio_sum, self.audio_weight,
                            self.cb1_sum, self.cb1_count]).detach().float()


def loss_terms(text_logits: Tensor, audio_logits: Tensor, targets: Tensor, text_card: int, card: int,
               audio_offset: int, text_padding_id: int, first_codebook_weight: float,
               text_padding_weight: float) -> LossTerms:
    """Cross-entropy of every real target, in the *delayed* domain of the stream.

    text_logits [B, 1, W, text_card], audio_logits [B, dep_q, W, card], targets [B, K, W]: a window
    of the once-delayed stream (`delayed_streams`). Targets that are the initial token (the delay
    pattern's padding) or `zero_token_id` (past a recording's end) carry no loss.
    """
    dep_q = audio_logits.shape[1]
    audio_targets = targets[:, audio_offset:audio_offset + dep_q]
    audio_mask = real_targets(audio_targets, card)
    ce = masked_ce(audio_logits, audio_targets, audio_mask)  # [B, dep_q, W]
    w = torch.ones(dep_q, device=ce.device, dtype=ce.dtype)
    w[0] = first_codebook_weight
    audio_w = audio_mask * w[None, :, None]
    text_targets = targets[:, :1]
    text_mask = real_targets(text_targets, text_card)
    text_ce = masked_ce(text_logits, text_targets, text_mask)
    text_w = text_mask * torch.where(text_targets == text_padding_id, text_padding_weight, 1.0)
    return LossTerms((text_ce * text_w).sum(), text_w.sum(), (ce * audio_w).sum(), audio_w.sum(),
                     (ce[:, 0] * audio_mask[:, 0]).sum(), audio_mask[:, 0].sum().to(ce.dtype))


def total_loss(terms: LossTerms, global_weights: Tensor | None = None, world: int = 1) -> Tensor:
    """text + audio loss to backpropagate. With data parallelism pass the all-reduced
    `stacked()` weights and the world size: each rank's loss is scaled so that DDP's gradient
    average equals the gradient of the global mean."""
    tw, aw = (terms.text_weight, terms.audio_weight) if global_weights is None else (
        global_weights[1] / world, global_weights[3] / world)
    return terms.text_sum / tw.clamp_min(1e-8) + terms.audio_sum / aw.clamp_min(1e-8)


def summarize(stacked: Tensor) -> dict[str, float]:
    """All-reduced `stacked()` sums → the logged means."""
    ts, tw, as_, aw, cs, cc = stacked.tolist()
    text, audio = ts / max(tw, 1e-8), as_ / max(aw, 1e-8)
    return {"loss": text + audio, "text_loss": text, "audio_loss": audio, "cb1_loss": cs / max(cc, 1e-8)}
