"""`PatchReport`: what a patch function changed in a host model, printable and serialisable."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class PatchReport:
    host: str  # "moshi", "llama", …
    mode: str  # "replace" | "hybrid"
    layer_type: str  # "linear" | "mlp" | "e2e_mlp"
    layers: list[int]  # patched host-layer indices
    depth: int  # host layers in total
    width: int
    num_heads: int
    head_dim: int
    mini_batch_size: int
    params_per_layer: int  # TTT parameters added per patched layer
    params_added: int
    params_removed: int  # attention parameters dropped ("replace" mode)
    params_before: int
    params_after: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        rows = [
            ("host", self.host),
            ("mode", self.mode),
            ("TTT layer", f"{self.layer_type}, b={self.mini_batch_size}, " + (
                "an MLP beside the feed-forward block" if self.layer_type == "e2e_mlp"
                else f"{self.num_heads} heads x {self.head_dim}")),
            ("patched layers", f"{_ranges(self.layers)} ({len(self.layers)} of {self.depth})"),
            ("TTT params", f"{self.params_added:,} ({self.params_per_layer:,} per layer)"),
            ("attention params removed", f"{self.params_removed:,}"),
            ("total params", f"{self.params_before:,} -> {self.params_after:,}"),
        ]
        w = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)


def _ranges(indices: list[int]) -> str:
    """[0, 1, 2, 5] → '0-2, 5'."""
    out, start = [], None
    for i, v in enumerate(indices):
        if start is None:
            start = v
        if i + 1 == len(indices) or indices[i + 1] != v + 1:
            out.append(str(start) if start == v else f"{start}-{v}")
            start = None
    return ", ".join(out)
