"""The plan of an evaluation: what is scored, built once from the config before any model or data
is loaded (docs/architecture.md §12), then the models it names, built one at a time.

Every eval command plans the same way: a `PlannedModel` per model or inner-loop variant says where
its weights come from (an export, fresh TTT layers on the base model, or the base model itself),
the TTT config it is scored with, its chunk size and its modes. Everything a plan can refuse (a
chunk an E2E model cannot take, native mode for E2E layers, a variant without a TTT model, exports
of another codec) is refused while planning, in seconds, not after hours of scoring.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace
from typing import Iterator

import torch

from ttt_speech import patch_moshi, schema
from ttt_speech.config import TTTConfig, resolve_chunk_size
from ttt_speech.export import Export
from ttt_speech.handle import TTTModel
from ttt_speech.models import ModelConfig, check_family, load_lm, stream_shape
from ttt_speech.moshi import attention_context

from .config import DataConfig, EvalConfig, EvalSettings, InnerLoopVariant

MODES = ("chunked", "native")


@dataclass(frozen=True)
class PlannedModel:
    """One model of a plan, before anything is loaded.

    Its weights: `export` (trained; `base` replaces the export's own base model when set), else the
    base model `base` with fresh TTT layers `fresh_ttt` (seeded by base.seed), else `base` as it is.
    An inner-loop variant (`variant`: its name in eval.inner_loop) is the model `name`'s own weights
    run with another inner loop (`inner_loop`)."""

    name: str
    where: str  # the config entry it comes from, named by errors about it (e.g. "compare.mlp")
    export: Export | None
    base: ModelConfig | None
    fresh_ttt: TTTConfig | None
    ttt: TTTConfig | None  # as scored: a variant's is the overridden config; None: no TTT layers
    chunk_size: int  # frames per call in chunked mode
    modes: tuple[str, ...]
    variant: str | None = None
    inner_loop: InnerLoopVariant | None = None

    @property
    def label(self) -> str:
        """How reports name it: "ttt", "baseline", a compare name, or "ttt@online" for a variant."""
        return f"{self.name}@{self.variant}" if self.variant else self.name


@dataclass(frozen=True)
class EvalPlan:
    """What one evaluation scores, and on what data."""

    models: list[PlannedModel]
    base: ModelConfig  # reads the streams (codec, layout) and says the device
    data: DataConfig


def plan_chunk(requested: int | None, ttt: TTTConfig | None, where: str, modes: tuple[str, ...] = ("chunked",),
               mode_where: str = "eval.mode: 'native'", align: bool = False) -> int:
    """The one chunk-planning rule of the evaluator: `resolve_chunk_size` (`where`: the chunk-size
    setting errors name), plus what the modes and a variant's `align` ask for. Refuses native mode
    for E2E layers (`mode_where`: the setting that asks for it) and an unaligned chunk under `align`."""
    if ttt is not None and ttt.is_e2e and "native" in modes:
        raise ValueError(f"{mode_where} includes native (LMGen.step), which e2e_mlp models cannot run: "
                         "their update differentiates the model's loss over a whole mini-batch; use eval.mode=chunked")
    chunk = resolve_chunk_size(requested, ttt, where)
    if align and chunk % ttt.mini_batch_size:
        raise ValueError(f"{where}: align is set and {chunk} frames is not a multiple of the mini-batch size "
                         f"{ttt.mini_batch_size}")
    return chunk


def open_export(source, where: str) -> Export:
    """`Export.open`, its errors naming the config entry `where`."""
    try:
        export = Export.open(source)
        export.model_config, export.ttt_config  # read now, so that their errors name `where` too
    except (OSError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from None
    if export.model_config.is_llama:
        raise ValueError(f"{where}: {source} is an export of a Llama / Qwen2 model (model.host llama); the evaluator "
                         "scores Moshi models (host llama's held-out loss and length-gen: `ttt-speech train`)")
    return export


def plan_eval(config: EvalConfig, modes: tuple[str, ...] | None = None) -> EvalPlan:
    """The plan of `eval librilight` (modes: eval.mode's) or `eval length-gen` (modes=("chunked",)):
    "ttt" (an export, or the base model with fresh layers), its inner-loop variants, the `compare`
    exports, and "baseline" (a baseline export, or the base model) when asked for or when there is
    nothing else to score."""
    settings = config.eval
    forced = modes is not None  # the command runs these modes only: a variant's own modes do not apply
    modes = modes or (MODES if settings.mode == "both" else (settings.mode,))
    asked = f"eval.mode: {settings.mode!r}"
    export = open_export(config.export, "export") if config.export is not None else None
    base = config.model or (export.model_config if export else ModelConfig())
    check_family(base)
    planned = []
    if export is not None or config.ttt is not None:
        ttt = export.ttt_config if export else config.ttt
        planned.append(PlannedModel("ttt", "export" if export else "ttt", export, config.model if export else base,
                                    config.ttt, ttt,
                                    plan_chunk(settings.chunk_size, ttt, "eval.chunk_size", modes, asked), modes))
    for name, variant in settings.inner_loop.items():
        planned.append(_plan_variant(planned, name, variant, settings, modes if forced else None))
    for name, source in config.compare.items():
        other = open_export(source, f"compare.{name}")
        if other.model_config.codec_id() != base.codec_id():
            raise ValueError(f"compare.{name}: {source} was trained on {other.model_config.codec_id()} codes, the "
                             f"streams are encoded with {base.codec_id()}; compare models of one codec")
        planned.append(PlannedModel(name, f"compare.{name}", other, None, None, other.ttt_config,
                                    plan_chunk(settings.chunk_size, other.ttt_config, "eval.chunk_size", modes, asked),
                                    modes))
    no_ttt_chunk = plan_chunk(settings.chunk_size, None, "eval.chunk_size")
    if config.baseline_export is not None:
        other = open_export(config.baseline_export, "baseline_export")
        if other.has_ttt:
            raise ValueError(f"baseline_export: {config.baseline_export} has TTT layers (expected a model trained "
                             "with ttt: null)")
        planned.append(PlannedModel("baseline", "baseline_export", other, None, None, None, no_ttt_chunk, modes))
    elif not planned or settings.baseline:
        planned.append(PlannedModel("baseline", "eval.baseline", None, base, None, None, no_ttt_chunk, modes))
    return EvalPlan(planned, base, config.data)


def _plan_variant(planned: list[PlannedModel], name: str, variant: InnerLoopVariant, settings: EvalSettings,
                  forced: tuple[str, ...] | None) -> PlannedModel:
    """`eval.inner_loop.NAME`: the "ttt" model under another inner loop (its own chunk, and its own
    modes unless the command `forced` some)."""
    where = f"eval.inner_loop.{name}"
    trained = planned[0] if planned and planned[0].name == "ttt" else None
    if trained is None or trained.ttt is None:
        raise ValueError(f"{where}: inner-loop variants need the TTT model (set export, or ttt for fresh layers)")
    ttt = variant.resolve(trained.ttt, where)
    own = forced or tuple(variant.modes) or trained.modes
    # e2e_mlp layers never get here (`resolve` refuses them), so native mode needs no check of its own
    chunk = plan_chunk(variant.chunk_size if variant.chunk_size is not None else settings.chunk_size, ttt,
                       f"{where}.chunk_size", align=variant.align)
    return replace(trained, where=where, ttt=ttt, chunk_size=chunk, modes=own, variant=name, inner_loop=variant)


# ---------------------------------------------------------------- building


@dataclass
class EvalModel:
    """A planned model, built: its LM (a variant shares the trained model's) and TTT handle."""

    plan: PlannedModel
    lm: torch.nn.Module
    source: str  # where its weights come from, as the report says it
    ttt: TTTModel | None = field(init=False)  # the handle on its TTT layers (None without)

    def __post_init__(self) -> None:
        self.ttt = TTTModel.find(self.lm)

    @property
    def name(self) -> str:
        return self.plan.label

    @contextlib.contextmanager
    def scoring(self) -> Iterator[TTTModel | None]:
        """The block it is scored in: a variant's TTT layers run its inner loop there (restored after)."""
        if self.plan.inner_loop is None:
            yield self.ttt
            return
        with self.ttt.inner_loop(self.plan.inner_loop, self.plan.where) as handle:
            yield handle

    def describe(self) -> dict:
        """What the report says of it (report.json `models`)."""
        out = {"source": self.source, "ttt": self.ttt.report.to_dict() if self.ttt else None,
               "params": sum(p.numel() for p in self.lm.parameters()), "attention_context": attention_context(self.lm)}
        if self.plan.inner_loop is not None:
            with self.scoring() as handle:
                out["inner_loop"] = {**schema.to_dict(self.plan.inner_loop),
                                     "trained_mini_batch_size": self.ttt.config.mini_batch_size,
                                     "trained_base_lr": self.ttt.config.base_lr,
                                     "effective_mini_batch_size": handle.config.mini_batch_size,
                                     "effective_base_lr": handle.config.base_lr,
                                     "layer_base_lr": {str(k): v for k, v in handle.layer_base_lr.items()}}
        return out


def build_model(planned: PlannedModel, device: torch.device) -> EvalModel:
    """The LM of one planned model (not a variant: `build_models` gives those their model's LM)."""
    if planned.export is not None:
        lm, base = planned.export.load(device=device, model=planned.base)
        tail = "" if planned.ttt is not None else ", no TTT"
        return EvalModel(planned, lm, f"export {planned.export.label} (base {base.name}{tail})")
    lm = load_lm(planned.base, device=device)
    if planned.fresh_ttt is None:
        return EvalModel(planned, lm, f"{planned.base.name} (no TTT)")
    with torch.random.fork_rng(devices=[]):  # the fresh TTT layers are seeded like the tiny model
        torch.manual_seed(planned.base.seed)
        patch_moshi(lm, planned.fresh_ttt)
    return EvalModel(planned, lm, f"{planned.base.name} + fresh (untrained) TTT layers")


def build_models(plan: EvalPlan, device: torch.device | None = None) -> Iterator[EvalModel]:
    """The plan's models in order, built one at a time: this generator drops its model before it
    builds the next, so a caller that drops each too holds one in memory (four 7B models would not
    fit side by side); a variant reuses the LM of the model before it."""
    device = device or plan.base.torch_device()
    last = None
    for planned in plan.models:
        if planned.variant is not None:
            yield EvalModel(planned, last.lm, f"{last.source}, inner loop '{planned.variant}'")
            continue
        last = None
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the previous model's memory, back before the next one loads
        last = build_model(planned, device)
        yield last


def check_streams(plan: EvalPlan) -> None:
    """Every planned model reads the streams the first one reads (codebooks, audio streams, card, text
    card: `models.stream_shape`, from configs alone), before any is built: a model of another layout
    is refused in seconds, not after the ones before it were scored."""
    first = None
    for planned in plan.models:
        config = planned.base or planned.export.model_config
        shape = stream_shape(config)
        if first is None:
            first = (planned.label, shape)
        elif shape != first[1]:
            raise ValueError(f"{planned.where}: its streams (codebooks, audio streams, card, text card) {shape} "
                             f"differ from {first[0]}'s {first[1]}; compare models that read the same streams")
