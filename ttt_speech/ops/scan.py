"""Scan over mini-batches (with optional gradient checkpointing) and the chunk ↔ mini-batch layout.

A chunk of T tokens whose rows start at in-mini-batch offsets o_r is laid out on a grid of
N = ceil((max_r o_r + T) / b) mini-batches of b slots: token t of row r goes to slot o_r + t.
Slots before o_r stand for tokens of the current mini-batch already seen in earlier calls (their
gradients live in the carried sums), slots after the row's last token are padding. Padding has
lr = 0, so it contributes nothing; a mini-batch updates W only if its last slot is a real token.
One code path for every chunking: T = 1 decoding, unaligned chunks, whole sequences.

A chunk inside one mini-batch with every row at the same offset o (an eager `LMGen.step`: T = 1)
is laid out on just its own T slots o..o+T−1 (a grid of one "mini-batch" of width T whose τ and
RoPE positions are those of slots o..o+T−1): the same numbers as the padded layout, without
computing b − T padding slots (at width 4096 they were most of a TTT-MLP step's elementwise work).
Under CUDA-graph capture the offsets cannot be read, so a captured step keeps the padded layout.
"""
from typing import NamedTuple

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .inner_models import InnerModel, InnerNorm, MiniBatch


class Grid(NamedTuple):
    """Where a chunk's tokens go: slot `index` [B, T] on a grid of `length` slots, cut into
    mini-batches of `width` slots (b, or T when trimmed); the grid's slot 0 is slot `first` of
    its mini-batch (0 unless trimmed)."""

    index: Tensor
    length: int
    width: int
    first: int

    @property
    def num_minibatches(self) -> int:
        return self.length // self.width

    def complete(self, mini_batch_size: int) -> Tensor:
        """[N, B] bool: mini-batch n ends on a real token of row r (then its step updates W)."""
        last_slot = self.index[:, -1]  # [B]
        if self.width < mini_batch_size:  # one trimmed mini-batch: complete iff it reaches slot b − 1
            return torch.full((1, last_slot.shape[0]), self.first + self.length == mini_batch_size,
                              device=last_slot.device)
        ends = torch.arange(mini_batch_size - 1, self.length, mini_batch_size, device=last_slot.device)
        return ends[:, None] <= last_slot[None, :]


def slot_index(offset: Tensor, length: int, mini_batch_size: int, trim: bool = True) -> Grid:
    """The grid of a chunk of `length` tokens whose rows are at offsets `offset` [B].

    trim: lay a chunk inside one mini-batch, all rows at one offset, on its own slots only (see
    above); False always pads to whole mini-batches (the general layout, kept for tests).
    """
    b = mini_batch_size
    if offset.is_cuda and torch.cuda.is_current_stream_capturing():
        low, high = 0, b - 1  # no host sync inside a CUDA graph: size for the worst case
    elif offset.numel():
        low, high = (int(v) for v in torch.stack(torch.aminmax(offset)).tolist())
    else:
        low = high = 0
    steps = torch.arange(length, device=offset.device)
    if trim and low == high and (low > 0 or length < b) and high + length <= b:
        return Grid(steps.expand(offset.shape[0], length), length, length, high)
    grid = -(-(high + length) // b) * b
    return Grid(offset[:, None] + steps, grid, b, 0)


def to_grid(x: Tensor, index: Tensor, grid: int) -> Tensor:
    """Scatter tokens x [B, T, ...] onto their slots → [B, L, ...], zeros elsewhere.

    A chunk that fills the grid (T = L) can only start at offset 0: the identity, no copy.
    """
    if x.shape[1] == grid:
        return x
    idx = index.view(*index.shape, *([1] * (x.dim() - 2))).expand_as(x)
    return x.new_zeros(x.shape[0], grid, *x.shape[2:]).scatter(1, idx, x)


def from_grid(y: Tensor, index: Tensor) -> Tensor:
    """Gather the tokens back from their slots: y [B, L, ...] → [B, T, ...] (identity if T = L)."""
    if y.shape[1] == index.shape[1]:
        return y
    idx = index.view(*index.shape, *([1] * (y.dim() - 2))).expand(*index.shape, *y.shape[2:])
    return y.gather(1, idx)


def completeness(complete: Tensor) -> list[Tensor | bool]:
    """Per mini-batch: True / False when every / no row is complete, else the [R] mask.

    complete [N, R]. Plain bools let the step skip the masked update, which saves many small ops
    on CPU; on an accelerator that would cost a host sync per call, so the masks are kept there.
    """
    if complete.device.type != "cpu":
        return list(complete.unbind(0))
    every, some = complete.all(1).tolist(), complete.any(1).tolist()
    return [True if e else (c if s else False) for e, s, c in zip(every, some, complete.unbind(0))]


def scan_minibatches(
    model: InnerModel,
    weights: tuple[Tensor, ...],
    grads: tuple[Tensor, ...],
    inputs: MiniBatch,
    tau: Tensor,
    norm: InnerNorm,
    checkpoint_group_size: int = 0,
    in_place: bool = False,
) -> tuple[Tensor, tuple[Tensor, ...], tuple[Tensor, ...]]:
    """Run `model.step` over the N mini-batches of `inputs` in order, carrying (weights, grads),
    then `model.outputs` once per group of mini-batches.

    inputs: every field with a leading dim N (see `inner_models.prepare`); complete [N, R].
    checkpoint_group_size: G > 0 wraps every G consecutive mini-batches in activation
    checkpointing when autograd is recording (a true group size, unlike the reference's).
    in_place: update `weights` and `grads` in place (and return them): inference only, the
    tensors must be the caller's to overwrite (a streaming state's own buffers).
    Returns outputs z̄ [N, R, w, d] (w: the grid's mini-batch width) and the final (weights, grads).
    """
    if in_place and torch.is_grad_enabled():
        raise ValueError("scan_minibatches: in_place needs autograd off (torch.no_grad / inference_mode)")
    n_mb = inputs.kq.shape[0]
    n_w = len(weights)
    fields = [t.unbind(0) for t in inputs[:-1]]  # one autograd node per field, not one per slice
    mbs = [MiniBatch(*f, c) for *f, c in zip(*fields, completeness(inputs.complete))]

    def run(start: int, stop: int, *state: Tensor) -> tuple[Tensor, ...]:
        ws, gs = tuple(state[:n_w]), tuple(state[n_w:])
        saved = []
        for m in range(start, stop):
            # Prior sums can only be non-zero for the first mini-batch of a chunk: any later
            # mini-batch holding real tokens follows a complete one, whose step reset them.
            s, ws, gs = model.step(ws, gs, mbs[m], tau, norm, with_prior=(m == 0), in_place=in_place)
            saved.append(s)
        causal = inputs.causal[start:stop].flatten(0, 1)  # [n·R, b, b]
        saved_rows = tuple(t[0] if len(t) == 1 else torch.cat(t) for t in zip(*saved))  # each [n·R, b, ·]
        out = model.outputs(saved_rows, causal, tau)
        return (out.unflatten(0, (stop - start, -1)), *ws, *gs)

    use_checkpoint = checkpoint_group_size > 0 and torch.is_grad_enabled()
    group = checkpoint_group_size if use_checkpoint else n_mb
    state = (*weights, *grads)
    outs = []
    for start in range(0, n_mb, group):
        stop = min(start + group, n_mb)
        if use_checkpoint:
            res = checkpoint(run, start, stop, *state, use_reentrant=False)
        else:
            res = run(start, stop, *state)
        outs.append(res[0])
        state = res[1:]
    return torch.cat(outs) if len(outs) > 1 else outs[0], tuple(state[:n_w]), tuple(state[n_w:])
