"""Token sampling: temperature, top-k and top-p (nucleus) in one pure function.

moshi's `sample_token` draws from the global RNG and applies top-p *or* top-k, never both. Here
the randomness is an argument: `noise` holds Exp(1) variates, one per candidate, and the token is
`argmax(p / noise)` (the exponential race, the same trick moshi's `multinomial` uses), which is
an exact draw from the filtered distribution p. So a sample is a deterministic function of
(logits, settings, noise): the caller owns the random stream (its state can be saved and resumed),
and under CUDA graphs the noise is just an input buffer.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

_TINY = 1e-30  # Exp(1) draws of exactly 0 would divide by zero (0/0 for filtered tokens)


def sample_tokens(logits: Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0,
                  noise: Tensor | None = None) -> Tensor:
    """logits [..., V] → tokens [...] (int64).

    temperature 0 is greedy (argmax, `noise` unused). Otherwise the distribution is
    softmax(logits / temperature), restricted to the `top_k` most likely tokens (0 = all), then to
    the smallest set of most likely tokens whose probability reaches `top_p` (1 = all; the most
    likely token is always kept), renormalised, and sampled with `noise` (Exp(1) variates,
    same shape as logits).
    """
    check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(dim=-1)
    if noise is None or noise.shape != logits.shape:
        raise ValueError(f"sample_tokens: noise must have the logits' shape {tuple(logits.shape)}, "
                         f"got {None if noise is None else tuple(noise.shape)}")
    scores = logits.float() / temperature
    vocab = scores.shape[-1]
    if 0 < top_k < vocab:
        keep = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, scores.topk(top_k, dim=-1).indices, True)
        scores = scores.masked_fill(~keep, -math.inf)
    probs = torch.softmax(scores, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # probability of the better tokens
        drop_sorted = mass_before >= top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
    return (probs / noise.float().clamp_min(_TINY)).argmax(dim=-1)


def check_sampling(temperature: Any, top_k: Any, top_p: Any, names: tuple[str, str, str] =
                   ("temperature", "top_k", "top_p")) -> None:
    """One-line ValueError naming the offending setting (`names`) unless all three are valid."""
    check_value(temperature, names[0])
    check_value(top_k, names[1], kind="top_k")
    check_value(top_p, names[2], kind="top_p")


RULES = {
    "temperature": "a number >= 0 (0 = greedy)",
    "top_k": "an integer >= 0 (0 = no top-k filtering)",
    "top_p": "a number in (0, 1] (1 = no nucleus filtering)",
    "duration": "a number of seconds > 0",
}


def check_value(value: Any, name: str, kind: str | None = None) -> None:
    """Validate one setting of kind temperature / top_k / top_p / duration (default: by `name`)."""
    kind = kind or name
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    finite = number and math.isfinite(value)
    ok = {
        "temperature": finite and value >= 0,
        "top_k": isinstance(value, int) and not isinstance(value, bool) and value >= 0,
        "top_p": finite and 0 < value <= 1,
        "duration": finite and value > 0,
    }[kind]
    if not ok:
        raise ValueError(f"{name}: expected {RULES[kind]}, got {value!r}")
