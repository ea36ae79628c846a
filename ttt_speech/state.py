"""`TTTState`: the streaming state of one TTT layer (docs/architecture.md §3-4), a plain container of tensors."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Iterator

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
    packed: each tensor of weights (and of grads) holds two named parts, a weight and its bias
        joined as [W; b] [B, H, i+1, o] (the bias is the last row): the layout the inner loop
        computes in (`ops.inner_models`), so a chunk needs no re-layout of the state.
        `named_weights` and `to_tensors` give the parts by name either way.
    """

    weights: tuple[Tensor, ...]
    grads: tuple[Tensor, ...]
    offset: Tensor
    names: tuple[str, ...]
    packed: bool = False

    @property
    def batch_size(self) -> int:
        return self.offset.shape[0]

    def map(self, fn: Callable[[Tensor], Tensor], *others: "TTTState") -> "TTTState":
        """A state of the same layout with fn(t, *others' t) applied to every tensor."""
        def each(field: str) -> tuple[Tensor, ...]:
            return tuple(fn(*ts) for ts in zip(getattr(self, field), *(getattr(o, field) for o in others)))

        return replace(self, weights=each("weights"), grads=each("grads"),
                       offset=fn(self.offset, *(o.offset for o in others)))

    def where(self, mask: Tensor, other: "TTTState") -> "TTTState":
        """Rows of `self` where mask [B] is true, rows of `other` elsewhere."""
        return self.map(lambda a, b: torch.where(mask.view(-1, *([1] * (a.dim() - 1))), a, b), other)

    def detach(self) -> "TTTState":
        """Same values, cut from the autograd graph (truncated BPTT between training windows)."""
        return self.map(Tensor.detach)

    def clone(self) -> "TTTState":
        """A copy that owns its memory (the initial state is a broadcast view of the parameters)."""
        return self.map(Tensor.clone)

    def copy_(self, other: "TTTState") -> None:
        """Overwrite this state's tensors in place with `other`'s values."""
        for dst, src in zip(self.tensors(), other.tensors()):
            dst.copy_(src)

    def tensors(self) -> tuple[Tensor, ...]:
        return (*self.weights, *self.grads, self.offset)

    def _parts(self, tensors: tuple[Tensor, ...]) -> Iterator[Tensor]:
        for t in tensors:
            if self.packed:
                yield from (t[..., :-1, :], t[..., -1:, :])
            else:
                yield t

    def named_weights(self) -> Iterator[tuple[str, Tensor]]:
        """(name, fast weight [B, H, ...]) in `names` order (views of the packed tensors)."""
        return zip(self.names, self._parts(self.weights))

    def to_tensors(self) -> dict[str, Tensor]:
        """Flat name → tensor mapping (for safetensors), copied."""
        out = dict(self.named_weights())
        out.update({f"grad_{name}": g for name, g in zip(self.names, self._parts(self.grads))})
        out["offset"] = self.offset
        return {k: v.detach().clone() for k, v in out.items()}  # a snapshot, not views of live buffers

    def load_tensors(self, tensors: dict[str, Tensor], where: str = "state") -> "TTTState":
        """A state of the same layout as `self` holding `tensors` (as written by `to_tensors`)."""
        mine = self.to_tensors()
        if set(tensors) != set(mine):
            raise ValueError(f"{where}: expected tensors {sorted(mine)}, got {sorted(tensors)}")

        def take(name: str, like: Tensor) -> Tensor:
            t = tensors[name]
            if t.shape != like.shape:
                raise ValueError(f"{where}: {name} has shape {tuple(t.shape)}, expected {tuple(like.shape)}")
            return t.to(device=like.device, dtype=like.dtype)

        def join(names: list[str]) -> tuple[Tensor, ...]:
            parts = [take(n, mine[n]) for n in names]
            if not self.packed:
                return tuple(parts)
            return tuple(torch.cat(pair, dim=-2) for pair in zip(parts[::2], parts[1::2]))

        grad_names = [f"grad_{n}" for n in self.names] if self.grads else []  # E2E states carry no sums
        return replace(self, weights=join(list(self.names)), grads=join(grad_names),
                       offset=take("offset", self.offset))
