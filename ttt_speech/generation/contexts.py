"""`OwnsContexts`: the base of the generation objects that enter streaming contexts (LMGen's, Mimi's)
for as long as they live, and leave them on `close()` or at the end of a `with` block."""
from __future__ import annotations

from contextlib import ExitStack
from typing import Self


class OwnsContexts:
    """Holds `self._stack`, the contexts a subclass entered (`self._stack.enter_context(...)`)."""

    def __init__(self) -> None:
        self._stack = ExitStack()

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
