"""The one place that knows which transformers 5.x release is installed.

transformers 5.24 renamed the cache keyword of every forward (attention, decoder layer, model,
causal LM, `generate`) and the cache field of the outputs from `past_key_values` to `cache`;
5.23 only knows `past_key_values`. On 5.24 the old name still works but warns (FutureWarning)
and, passed next to the new one, is dropped, so our code must call transformers with the
installed name. Our own forwards accept either name.
"""
from __future__ import annotations

import inspect
from dataclasses import fields
from typing import Any

from . import _import  # noqa: F401
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

# the signature behind `deprecate_kwarg`'s wrapper (functools.wraps sets __wrapped__)
CACHE_KWARG = "cache" if "cache" in inspect.signature(LlamaDecoderLayer.forward).parameters else "past_key_values"
# the outputs' field (`out.cache` / `out.past_key_values`); renamed in the same release
CACHE_FIELD = "cache" if "cache" in {f.name for f in fields(BaseModelOutputWithPast)} else "past_key_values"


def pick_cache(cache: Any = None, past_key_values: Any = None) -> Any:
    """The cache a caller passed under either name (None if neither)."""
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("cache: got two different caches (as `cache` and as `past_key_values`), pass one")
    return cache if cache is not None else past_key_values


def cache_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """`kwargs` with a cache given as `cache` or `past_key_values` moved to the installed name."""
    out = dict(kwargs)
    cache = pick_cache(out.pop("cache", None), out.pop("past_key_values", None))
    if cache is not None:
        out[CACHE_KWARG] = cache
    return out
