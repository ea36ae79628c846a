"""Counting kernel launches on a CPU: what a GPU would launch for the same code.

On a GPU every aten op that computes is one kernel launch (plus ~10 µs of Python and dispatch),
whatever its size, so the number of ops sets a floor under a layer's time that no GPU can lower.
`LaunchCounter` counts the ops a `TorchDispatchMode` sees, leaving out those that launch nothing
(views, reshapes, `empty*`, `resolve_*`, `detach`) and `.item()`'s read; a Triton kernel wrapped as
a custom operator (`custom_ops`) is one op, as it is one launch. Host syncs are not counted: on a
CPU `.tolist()` reads memory without an op to see.
"""
from __future__ import annotations

from collections import Counter
from typing import Any

# torch 2.13.0: TorchDispatchMode lives in a private module (the documented way to see every aten
# op), and an op's schema name is its private `_schema`; both used only here.
from torch.utils._python_dispatch import TorchDispatchMode

# ops that are not views by their schema yet launch nothing: allocations, metadata, aliases
NO_LAUNCH = frozenset({
    "aten::empty", "aten::empty_like", "aten::empty_strided", "aten::new_empty", "aten::new_empty_strided",
    "aten::_unsafe_view", "aten::resolve_conj", "aten::resolve_neg", "aten::detach", "aten::alias",
    "aten::lift_fresh", "aten::set_", "aten::_has_compatible_shallow_copy_type", "aten::_local_scalar_dense",
    "aten::promote_types", "aten::result_type",
})


class LaunchCounter(TorchDispatchMode):
    """`with LaunchCounter() as n: ...` → n.launches (ops that launch a kernel), n.by_op (per op name)."""

    def __init__(self) -> None:
        super().__init__()
        self.by_op: Counter[str] = Counter()

    @property
    def launches(self) -> int:
        return sum(self.by_op.values())

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        name = func._schema.name  # torch 2.13.0: "aten::mm", "ttt_speech::linear_scan", …
        if not func.is_view and name not in NO_LAUNCH:
            self.by_op[name] += 1
        return func(*args, **(kwargs or {}))
