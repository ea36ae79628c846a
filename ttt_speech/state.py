"""`TTTState`: the streaming state of one TTT layer (docs/architecture.md §3-4), a plain container of tensors."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class TTTState:
    """Everything a TTT layer carries from one chunk to the next, per batch row.

    weights: fast weights at the start of the current mini-batch, each [B, H, ...], float32
        (float64 for a float64 layer) whatever the model dtype.
    grads: λ-weighted gradient sums (A, a) of the tokens of the current mini-batch seen so far.
    offset: [B] int64, how many tokens of the current mini-batch were seen (0 ≤ offset < b); it
        also gives the RoPE position and τ index of the next token.
    names: names of the fast weights, in order ("W1", "b1", …), used to save / load.
    """

    weights: tuple[Tensor, ...]
    grads: tuple[Tensor, ...]
    offset: Tensor
    names: tuple[str, ...]

    @property
    def batch_size(self) -> int:
        return self.offset.shape[0]

    def where(self, mask: Tensor, other: "TTTState") -> "TTTState":
        """Rows of `self` where mask [B] is true, rows of `other` elsewhere."""
        def pick(a: Tensor, b: Tensor) -> Tensor:
            return torch.where(mask.view(-1, *([1] * (a.dim() - 1))), a, b)

        return TTTState(
            tuple(pick(a, b) for a, b in zip(self.weights, other.weights)),
            tuple(pick(a, b) for a, b in zip(self.grads, other.grads)),
            pick(self.offset, other.offset),
            self.names,
        )

    def detach(self) -> "TTTState":
        """Same values, cut from the autograd graph (truncated BPTT between training windows)."""
        return TTTState(
            tuple(w.detach() for w in self.weights),
            tuple(g.detach() for g in self.grads),
            self.offset.detach(),
            self.names,
        )

    def clone(self) -> "TTTState":
        """A copy that owns its memory (the initial state is a broadcast view of the parameters)."""
        return TTTState(tuple(w.clone() for w in self.weights), tuple(g.clone() for g in self.grads),
                        self.offset.clone(), self.names)

    def copy_(self, other: "TTTState") -> None:
        """Overwrite this state's tensors in place with `other`'s values."""
        for dst, src in zip((*self.weights, *self.grads, self.offset), (*other.weights, *other.grads, other.offset)):
            dst.copy_(src)

    def tensors(self) -> tuple[Tensor, ...]:
        return (*self.weights, *self.grads, self.offset)

    def to_tensors(self) -> dict[str, Tensor]:
        """Flat name → tensor mapping (for safetensors), copied."""
        out = {name: w for name, w in zip(self.names, self.weights)}
        out.update({f"grad_{name}": g for name, g in zip(self.names, self.grads)})
        out["offset"] = self.offset
        return {k: v.detach().clone() for k, v in out.items()}  # a snapshot, not views of live buffers

    def load_tensors(self, tensors: dict[str, Tensor], where: str = "state") -> "TTTState":
        """A state of the same layout as `self` holding `tensors` (as written by `to_tensors`)."""
        expected = set(self.to_tensors())
        if set(tensors) != expected:
            raise ValueError(f"{where}: expected tensors {sorted(expected)}, got {sorted(tensors)}")

        def take(name: str, like: Tensor) -> Tensor:
            t = tensors[name]
            if t.shape != like.shape:
                raise ValueError(f"{where}: {name} has shape {tuple(t.shape)}, expected {tuple(like.shape)}")
            return t.to(device=like.device, dtype=like.dtype)

        return TTTState(
            tuple(take(n, w) for n, w in zip(self.names, self.weights)),
            tuple(take(f"grad_{n}", g) for n, g in zip(self.names, self.grads)),
            take("offset", self.offset),
            self.names,
        )
