"""`TTTModel`: one handle on a host model with TTT layers in it (docs/architecture.md §5).

    handle = TTTModel.of(lm)           # ValueError when lm has no TTT layers; TTTModel.find(lm): None
    handle.config, handle.report       # the TTTConfig and PatchReport of the patch
    handle.sites                       # one TTTSite per patched layer: layer index, module, core
    with lm.streaming(1):
        tensors = handle.stream_state()            # the live TTT state as named tensors ...
        handle.load_stream_state(tensors)          # ... and back (one path for every app)
    handle.fast_weight_stats(states)   # ‖W‖, ‖W − W₀‖ per layer (ttt_speech.stats)
    with handle.inner_loop(InnerLoopOverride(mini_batch_size=1, scale="keep_per_token")) as online:
        ...                            # the same layers run online GD (ttt_speech.inner_loop)

The patch functions (`patch_moshi`, `patch_llama`, all through `ttt_speech.host.patch_host`)
record the patch on the model; everything else asks this handle instead of the host.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn

from . import inner_loop
from .config import TTTConfig
from .modules import GatedTTTBranch, TTTModule
from .report import PatchReport
from .state import TTTState
from .stats import FastWeightStats, fast_weight_stats, initial_norm

_RECORD = "_ttt_patch"  # the one attribute a patch sets on its host model (read here only)


@dataclass(frozen=True)
class PatchRecord:
    host: str  # the HostSpec's name
    config: TTTConfig
    report: PatchReport


@dataclass(frozen=True)
class TTTSite:
    """One patched host layer.

    layer_index: the host layer; name: module path of `ttt` in the model (the prefix of its
    stream-state tensors); ttt: the host's `TTTModule`; inserted: what the patch added to the layer
    (the `GatedTTTBranch` in hybrid mode, `ttt` itself in replace mode): its parameters are TTT's.
    """

    layer_index: int
    name: str
    ttt: TTTModule
    inserted: nn.Module

    @property
    def core(self) -> nn.Module:
        """The host-independent TTT core: a `TTTLayer`, or an `E2EMLP` for e2e_mlp."""
        return self.ttt.layer


class TTTModel:
    """The TTT layers of one patched host model, and every question about them."""

    def __init__(self, model: nn.Module, record: PatchRecord) -> None:
        self.model = model
        self.host: str = record.host  # the HostSpec's name
        self.config: TTTConfig = record.config
        self.report: PatchReport = record.report

    # ---------------------------------------------------------------- finding the patch

    @classmethod
    def attach(cls, model: nn.Module, host: str, config: TTTConfig, report: PatchReport) -> "TTTModel":
        """Record a finished patch on `model` (called by `ttt_speech.host.patch_host`)."""
        setattr(model, _RECORD, PatchRecord(host, config, report))
        return cls.of(model)

    @classmethod
    def find(cls, model: nn.Module, inside: bool = True) -> "TTTModel | None":
        """The handle of a patched model, or (`inside`) of the patched module inside `model` (e.g. an
        `OmniSpeechLM` whose `.llm` was patched, a DDP wrapper); None for a model without TTT layers.
        `inside=False` looks at `model` alone, in O(1): for per-chunk calls on a model that is either
        patched itself or not at all (a scan of Moshi-7B's 773 modules costs ~0.6 ms)."""
        for module in model.modules() if inside else (model,):  # `model` itself first
            record = module.__dict__.get(_RECORD)  # not getattr: nn.Module's fallback raises per miss
            if isinstance(record, PatchRecord):
                return cls(module, record)
        return None

    @classmethod
    def of(cls, model: nn.Module, where: str = "the model") -> "TTTModel":
        """The handle of a patched model; ValueError naming `where` for a model without TTT layers."""
        handle = cls.find(model)
        if handle is None:
            raise ValueError(f"{where} has no TTT layers (patch it with patch_moshi / patch_llama first)")
        return handle

    # ---------------------------------------------------------------- what the patch is

    @property
    def has_e2e(self) -> bool:
        """E2E layers (`layer_type: e2e_mlp`): updated by the model's own loss, chunked mode only."""
        return self.config.is_e2e

    @cached_property
    def sites(self) -> list[TTTSite]:
        """One `TTTSite` per patched layer, in layer order."""
        branches = {id(m.ttt): m for m in self.model.modules() if isinstance(m, GatedTTTBranch)}
        found = [(n, m) for n, m in self.model.named_modules() if isinstance(m, TTTModule)]
        layers = self.report.layers
        if len(found) != len(layers):
            raise RuntimeError(f"the model holds {len(found)} TTT modules, its patch put {len(layers)} "
                               "(was it patched twice or were modules replaced?)")
        return [TTTSite(i, name, m, branches.get(id(m), m)) for i, (name, m) in zip(layers, found)]

    def named_parameters(self) -> dict[str, nn.Parameter]:
        """The TTT parameters (everything the patch added), keyed by their names in the model."""
        owned = {id(p) for site in self.sites for p in site.inserted.parameters()}
        return {n: p for n, p in self.model.named_parameters() if id(p) in owned}

    @contextlib.contextmanager
    def inner_loop(self, override: inner_loop.InnerLoopOverride, where: str = "inner_loop") -> Iterator["TTTModel"]:
        """Inside the block the TTT layers run `override` (another b, inner learning rate: see
        `ttt_speech.inner_loop`); yields the handle of the overridden model, whose `config` is the
        nominal overridden one (`layer_base_lr`: each layer's own). Restored exactly on exit; start
        streams inside the block (a state's layout follows b)."""
        record = self.model.__dict__[_RECORD]
        with inner_loop.apply([site.core for site in self.sites], override, self.config, where):
            setattr(self.model, _RECORD, replace(record, config=override.resolve(self.config, where)))
            try:
                yield TTTModel(self.model, self.model.__dict__[_RECORD])
            finally:
                setattr(self.model, _RECORD, record)

    @property
    def layer_base_lr(self) -> dict[int, float]:
        """Each patched layer's inner base_lr (host layer index): the config's, unless an
        `inner_loop` override compensated it per layer."""
        return {site.layer_index: site.core.config.base_lr for site in self.sites}

    # ---------------------------------------------------------------- live state

    def live_states(self) -> list[TTTState]:
        """Per site, the running stream's TTT state (hosts whose modules hold it: moshi, streaming)."""
        return [site.ttt.live_state() for site in self.sites]

    def set_live_states(self, states: Sequence[TTTState]) -> None:
        for site, state in zip(self.sites, states, strict=True):
            site.ttt.set_live_state(state)

    def states_to_tensors(self, states: Sequence[TTTState]) -> dict[str, Tensor]:
        """Per-site states → flat `<site name>.<tensor>` copies (for safetensors)."""
        return {f"{site.name}.{k}": v for site, state in zip(self.sites, states, strict=True)
                for k, v in state.to_tensors().items()}

    def tensors_to_states(self, tensors: dict[str, Tensor], like: Sequence[TTTState],
                          where: str = "TTT state") -> list[TTTState]:
        """What `states_to_tensors` wrote → states of the layout of `like` (one per site)."""
        prefixes = tuple(f"{site.name}." for site in self.sites)
        stray = sorted(k for k in tensors if not k.startswith(prefixes))
        if stray:
            raise ValueError(f"{where}: tensors for no TTT layer of this model: {stray[:5]}")
        out = []
        for site, state in zip(self.sites, like, strict=True):
            own = {k[len(site.name) + 1:]: v for k, v in tensors.items() if k.startswith(f"{site.name}.")}
            out.append(state.load_tensors(own, where=f"{where} ({site.name})"))
        return out

    def stream_state(self) -> dict[str, Tensor]:
        """The running stream's TTT state, flat (`states_to_tensors` of `live_states`)."""
        return self.states_to_tensors(self.live_states())

    def load_stream_state(self, tensors: dict[str, Tensor], where: str = "stream state") -> None:
        """Restore what `stream_state` returned into a running stream of the same batch size."""
        self.set_live_states(self.tensors_to_states(tensors, self.live_states(), where))

    # ---------------------------------------------------------------- statistics

    def initial_norms(self) -> dict[int, float]:
        """‖W₀‖ of each patched layer (host layer index), the norm of `fast_weight_stats`."""
        return {site.layer_index: initial_norm(site.core) for site in self.sites}

    def fast_weight_stats(self, states: Sequence[TTTState],
                          eta: dict[int, float] | None = None) -> dict[int, FastWeightStats]:
        """Per patched layer (host layer index): ‖W‖ and ‖W − W₀‖ of `states` (one per site), and the
        mean inner learning rate from `eta` {layer index: η} where given."""
        eta = eta or {}
        with torch.no_grad():
            return {site.layer_index: fast_weight_stats(site.core, state, eta.get(site.layer_index))
                    for site, state in zip(self.sites, states, strict=True)}


def inference_context(model: nn.Module) -> contextlib.AbstractContextManager:
    """The grad mode to run `model` in without training: `torch.inference_mode()`, except for models
    with E2E layers, whose test-time update differentiates the model's own loss (`torch.no_grad()`;
    the update enables grad locally, which inference mode forbids)."""
    handle = TTTModel.find(model)
    return torch.no_grad() if handle is not None and handle.has_e2e else torch.inference_mode()
