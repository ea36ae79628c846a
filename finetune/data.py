"""Persistent-state batching (docs/architecture.md §9): each batch row reads one recording in consecutive windows.

Rows are global (`data.batch_size` of them across all ranks) and independent of the number of
processes: in epoch e, row g reads recordings order_e[g], order_e[g + G], … (order_e a seeded
permutation), one window per step, and moves to its next recording when one ends (its TTT
state is reset there). Each rank materialises only its own rows, so the data a row sees is the
same whether it runs on 1 or N processes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from ttt_speech.data.manifest import ManifestEntry


@dataclass
class Batch:
    """codes [B, K, W] (frames past a recording's end are `zero_token_id`: no input, no loss);
    new_recording [B] bool (the row starts a recording: reset its TTT state);
    where: (recording index, first frame) per row, for logs and tests."""

    codes: Tensor
    new_recording: Tensor
    where: list[tuple[int, int]]


@dataclass
class RowPosition:
    epoch: int = 0
    slot: int = 0  # index into this row's recordings of the epoch
    frame: int = 0  # first frame of the next window


def check_rows(global_batch: int, recordings: int, world: int) -> None:
    """The rows of a global batch split over the ranks, and each has recordings of its own."""
    if global_batch % world:
        raise ValueError(f"data.batch_size: {global_batch} rows do not split evenly over {world} processes")
    if global_batch > recordings:
        raise ValueError(f"data.batch_size: {global_batch} rows but the manifest lists only {recordings} "
                         f"recordings (each row reads its own recordings)")


class WindowBatcher:
    """Consecutive windows of recordings for this rank's rows. `load(i)` → codes [K, T] of entry i."""

    def __init__(self, entries: list[ManifestEntry], load: Callable[[int], Tensor], global_batch: int,
                 window: int, rank: int = 0, world: int = 1, seed: int = 0, shuffle: bool = True,
                 persistent: bool = True, pad_id: int = -1) -> None:
        check_rows(global_batch, len(entries), world)
        self.entries, self.load = entries, load
        self.global_batch, self.window, self.seed, self.shuffle = global_batch, window, seed, shuffle
        self.persistent, self.pad_id = persistent, pad_id
        per_rank = global_batch // world
        self.rows = list(range(rank * per_rank, (rank + 1) * per_rank))
        self.positions = {g: RowPosition() for g in self.rows}
        self._loaded: dict[int, tuple[int, Tensor]] = {}

    def _order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(len(self.entries)))
        g = torch.Generator().manual_seed(self.seed * 7919 + epoch)
        return torch.randperm(len(self.entries), generator=g).tolist()

    def _recording(self, row: int, pos: RowPosition) -> tuple[int, Tensor]:
        mine = self._order(pos.epoch)[row::self.global_batch]
        index = mine[pos.slot]
        cached = self._loaded.get(row)
        if cached is None or cached[0] != index:
            cached = (index, self.load(index))
            self._loaded[row] = cached
        return cached

    def next(self) -> Batch:
        windows, new, where = [], [], []
        for row in self.rows:
            pos = self.positions[row]
            index, codes = self._recording(row, pos)
            start = pos.frame
            chunk = codes[:, start:start + self.window]
            if chunk.shape[1] < self.window:
                pad = torch.full((codes.shape[0], self.window - chunk.shape[1]), self.pad_id, dtype=chunk.dtype)
                chunk = torch.cat([chunk, pad], dim=1)
            windows.append(chunk)
            new.append(start == 0 or not self.persistent)
            where.append((index, start))
            pos.frame += self.window
            if pos.frame >= codes.shape[1]:
                pos.frame = 0
                pos.slot += 1
                if pos.slot >= len(self._order(pos.epoch)[row::self.global_batch]):
                    pos.epoch, pos.slot = pos.epoch + 1, 0
        return Batch(torch.stack(windows), torch.tensor(new), where)

    def state_dict(self) -> dict[int, dict[str, int]]:
        return {g: vars(p).copy() for g, p in self.positions.items()}

    def load_state_dict(self, state: dict[int, dict[str, int]]) -> None:
        for g in self.rows:
            if g not in state:
                raise ValueError(f"checkpoint: no data position for row {g} (was the global batch size changed?)")
            self.positions[g] = RowPosition(**state[g])
