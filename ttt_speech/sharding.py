"""Fully sharded data parallel (FSDP2, `fully_shard`) for TTT-patched models (docs/training.md §5,
docs/architecture.md §9).

    mesh = init_device_mesh("cuda", (world,))
    shard(root, layers, mesh)                    # one unit per layer, each TTT branch nested in its layer's
    with unsharded(ttt_units(root)):             # TTT parameters as plain tensors outside forward
        carry = TTTCarry(lm, rows)
    bytes_per_rank(params)                        # what this rank holds of them

Units: every TTT branch (`TTTSite.inserted`) is a unit nested inside its host layer's unit, every
host layer is a unit, and `root` holds the rest (embeddings, output heads). The TTT branch is its
own unit so that the TTT parameters can be gathered alone where they are read outside a forward
(a fresh stream's initial fast weights, ‖W − W₀‖), not with the whole layer.

Precision: parameters are gathered in the dtype they are stored in (compute precision is the
training's autocast, exactly as without sharding) and gradients are reduced in float32.

Every private torch FSDP name the project uses is in this module, read from torch 2.13.
"""
from __future__ import annotations

import weakref
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterable, Iterator, Sequence

import torch
from torch import Tensor, nn

from .handle import TTTModel

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh


_RESHARDS: "weakref.WeakKeyDictionary[nn.Module, bool]" = weakref.WeakKeyDictionary()  # as `shard` set it


def _unimplemented_deepcopy(*args, **kwargs):
    raise AssertionError("FSDP modules cannot be deep-copied; use their state dict")


def allow_fully_shard(cls: type) -> None:
    """Make `fully_shard` able to take modules of class `cls` (a no-op where it already can).

    `fully_shard` switches a module's class to `type("FSDP" + name, (FSDPModule, cls))`. Python
    refuses that switch ("object layout differs") when the layout of `cls` is rooted in a slotted
    base: moshi's `StreamingModule(abc.ABC, nn.Module, Generic)` has `abc.ABC` (`__slots__ = ()`)
    where the new class has `object`. The class registered here starts with a shim
    `(slotted base, FSDPModule)`, so that its layout is rooted where `cls`'s is; its method order
    is that of `fully_shard`'s class for every name that matters (FSDPModule's methods, e.g.
    `_apply`, come before `nn.Module`'s, and `cls` is at the index FSDPModule expects). Each
    candidate is checked by switching the class of a bare instance, as `fully_shard` will.
    """
    # torch 2.13: fully_shard looks the class up in `cls_to_fsdp_cls` (returned by
    # `get_cls_to_fsdp_cls`, in the `__all__` of this private module) before building its own, and
    # `FSDPModule.__new__` constructs `cls.__mro__[FSDPModule._orig_cls_mro_index]` (2).
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.fsdp._fully_shard._fully_shard import get_cls_to_fsdp_cls

    registry = get_cls_to_fsdp_cls()
    if cls in registry or _assignable(cls, type(f"FSDP{cls.__name__}", (FSDPModule, cls), {})):
        return
    for slotted in [base for base in cls.__mro__ if "__slots__" in vars(base) and base is not object]:
        shim = type(f"FSDPShim{slotted.__name__}", (slotted, FSDPModule), {"__module__": __name__})
        candidate = type(f"FSDP{cls.__name__}", (shim, cls),
                         {"__module__": __name__, "__deepcopy__": _unimplemented_deepcopy})
        if _assignable(cls, candidate) and _fsdp_methods_first(candidate, FSDPModule, cls):
            registry[cls] = candidate
            return
    raise TypeError(f"fully_shard cannot take {cls.__name__} modules (its layout refuses FSDP's class switch)")


def _fsdp_methods_first(candidate: type, fsdp: type, cls: type) -> bool:
    """Whether `candidate` finds FSDPModule's methods where `(FSDPModule, cls)` would, and `cls` at
    the MRO index FSDPModule.__new__ reads."""
    mro = candidate.__mro__
    index = mro.index(fsdp)
    before = set().union(*(vars(c) for c in mro[1:index]))
    own = {n for n, v in vars(fsdp).items() if callable(v) and not n.startswith("__")}
    return not own & before and mro[fsdp._orig_cls_mro_index] is cls


def _assignable(old: type, new: type) -> bool:
    """Whether an instance of `old` may have its class switched to `new` (Python's layout rule)."""
    try:
        probe = object.__new__(old)
        probe.__class__ = new
    except TypeError:
        return False
    return True


def ttt_units(model: nn.Module) -> list[nn.Module]:
    """The modules that hold TTT's parameters (each patched layer's `inserted`); [] without TTT."""
    handle = TTTModel.find(model)
    return [] if handle is None else [site.inserted for site in handle.sites]


def shard(root: nn.Module, layers: Sequence[nn.Module], mesh: "DeviceMesh",
          reduce_dtype: torch.dtype = torch.float32) -> None:
    """`fully_shard` `root` in place: TTT branches, then `layers`, then `root` (see the module doc).

    Every parameter of `root` is then a DTensor sharded on dim 0 across `mesh`; inside a unit's
    forward its parameters are plain gathered tensors.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=None, reduce_dtype=reduce_dtype)
    for module in [*ttt_units(root), *layers, root]:
        allow_fully_shard(type(module))
        # the root is gathered for the whole step anyway (it runs first and last)
        reshard = module is not root
        fully_shard(module, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard)
        _RESHARDS[module] = reshard


def fsdp_modules(modules: Iterable[nn.Module]) -> list[nn.Module]:
    """The FSDP units among `modules`."""
    from torch.distributed.fsdp import FSDPModule

    return [m for m in modules if isinstance(m, FSDPModule)]


@contextmanager
def unsharded(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Inside: the parameters of the FSDP units among `modules` are gathered plain tensors, and
    stay so through forwards (for reads outside a forward: initial TTT states, their resets,
    statistics). Collective: every rank enters it, with the same modules. Modules that are not
    FSDP units (no sharding, DDP) are left as they are."""
    units = fsdp_modules(modules)
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.set_reshard_after_forward(_RESHARDS.get(unit, True), recurse=False)
            unit.reshard()


def is_sharded(model: nn.Module) -> bool:
    """Whether `model` (or a module in it) is an FSDP unit."""
    return bool(fsdp_modules(model.modules()))


def full_tensor(t: Tensor) -> Tensor:
    """The whole tensor of a DTensor (collective: every rank calls it), `t` itself otherwise."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def local_tensor(t: Tensor) -> Tensor:
    """This rank's shard of a DTensor, `t` itself otherwise."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def bytes_per_rank(tensors: Iterable[Tensor | None]) -> int:
    """Bytes this rank holds of `tensors` (its shards for DTensors; None counts 0)."""
    return sum(local_tensor(t).numel() * t.element_size() for t in tensors if t is not None)
