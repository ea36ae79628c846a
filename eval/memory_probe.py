"""`ttt-speech eval memory`: does a model remember a segment once test-time training has seen it?

For each model and each held-out stream, S = the stream's first `segment_frames` frames (codes
[K, S], Moshi's layout) is scored teacher-forced, chunked mode, three times:

- **pre**: S in a fresh stream (empty KV cache, initial TTT state);
- **post**: S again in a *new* fresh stream (empty KV cache, so attention cannot copy from the
  first occurrence) that starts from the TTT state the pre pass ended with (a
  `TTTModel.stream_state` snapshot, loaded with `load_stream_state`): only the fast weights carry
  the first occurrence. A model without TTT layers has nothing to carry, so its post pass is a
  fresh pass again: post == pre;
- **post_in_context**: the second occurrence of S in one stream [S; S] (attention and TTT state
  both live): what a user streaming a repeated segment sees.

Δ = post − pre per group (text, codebook 1, codebooks 2..8, all audio): negative = remembered.
The `Memory` probe writes memory.json, memory.md and memory.png into the output folder.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ttt_speech import schema
from ttt_speech.config import TTTConfig, resolve_chunk_size
from ttt_speech.data import FRAME_RATE
from ttt_speech.figures import pyplot, save_figure
from ttt_speech.models import ModelConfig, check_family
from ttt_speech.progress import progress_bar
from ttt_speech.schema import check, doc
from ttt_speech.tracking import WandbConfig

from . import metrics
from .books import Skipped, Stream
from .config import DataConfig, check_model_source
from .nll import StreamNLL, chunked_nll
from .plan import EvalModel, EvalPlan, PlannedModel, open_export, plan_chunk
from .report import model_line, report_header, table
from .streams import load_data
from .writers import OutputFiles, ReportResult


PASSES = ("pre", "post", "post_in_context")
PASS_LABELS = {"pre": "pre", "post": "post", "post_in_context": "in context"}


# ---------------------------------------------------------------- config


@dataclass
class MemoryModel:
    """One model of the memory test (an entry of `models`)."""

    name: str = doc(help="the model's label in the report; unique")
    export: Path | None = doc(None, "a fine-tuning export folder (`ttt-speech train`'s <output_dir>/export), with "
                                    "or without TTT layers; null: the base model `model`")
    ttt: TTTConfig | None = doc(None, "patch the base model with fresh, untrained TTT layers (TTTConfig fields, "
                                      "seeded by model.seed): for smoke tests; not together with export")

    def __post_init__(self) -> None:
        check(bool(self.name.strip()), "name", "a non-empty string", self.name)
        check_model_source(self.export, self.ttt)


@dataclass
class MemoryConfig:
    """`ttt-speech eval memory` configuration."""

    models: list[MemoryModel] = doc(help="the models to test, a list of {name, export, ttt} (MemoryModel fields); "
                                         "an entry with neither export nor ttt is the base model")
    model: ModelConfig | None = doc(None, "the base model (ModelConfig fields); null: the first export's base "
                                          "model, or the tiny random-init model without exports")
    data: DataConfig = doc(factory=DataConfig, help="")
    segment_frames: int = doc(256, f"S = the first segment_frames frames of each stream ({FRAME_RATE:g} per second; "
                                   "data.max_frames is set to it); shorter streams are skipped")
    chunk_size: int | None = doc(None, "frames per chunk (chunked mode); null: 4 x each model's TTT mini-batch size "
                                       "(64 without TTT); E2E models need multiples of their mini-batch size")
    output_dir: Path = doc("runs/memory/eval", "folder for memory.json, memory.md and memory.png")
    wandb: WandbConfig = doc(factory=WandbConfig, help="")

    def __post_init__(self) -> None:
        self.output_dir = Path(self.output_dir)
        check(len(self.models) >= 1, "models", "a list of at least one {name: ...}", self.models)
        names = [m.name for m in self.models]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"models: duplicate name(s) {duplicates}; every model needs its own name")
        check(self.segment_frames >= 1, "segment_frames", "an integer >= 1", self.segment_frames)
        check(self.data.root is not None or self.data.manifest is not None, "data",
              "manifest (a JSONL of code or audio files) or root (a LibriLight tree)", None)
        for m in self.models:  # exports are checked by `plan_memory` (reading them is I/O)
            resolve_chunk_size(self.chunk_size, m.ttt, "chunk_size")


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> MemoryConfig:
    """MemoryConfig from a YAML file plus `key.sub=value` overrides (errors name the file and field)."""
    return schema.load_config(MemoryConfig, path, list(overrides), "config")


def plan_memory(config: MemoryConfig) -> EvalPlan:
    """Every model of the test, planned (exports read for their configs only): a bad chunk_size or an
    unreadable export fails in seconds, not after the first models were scored. The base model (for
    the streams and for entries without an export) is `model`, else the first export's, else the tiny
    default."""
    exports = [None if m.export is None else open_export(m.export, f"models[{i}].export")
               for i, m in enumerate(config.models)]
    base = config.model or next((e.model_config for e in exports if e is not None), None) or ModelConfig()
    check_family(base)
    planned = []
    for i, (entry, export) in enumerate(zip(config.models, exports)):
        ttt = export.ttt_config if export is not None else entry.ttt
        planned.append(PlannedModel(entry.name, f"models[{i}]", export, config.model if export is not None else base,
                                    entry.ttt, ttt, plan_chunk(config.chunk_size, ttt, "chunk_size"), ("chunked",)))
    return EvalPlan(planned, base, dataclasses.replace(config.data, max_frames=config.segment_frames))


# ---------------------------------------------------------------- scoring


@dataclass
class MemoryProbe:
    """One model's three scorings of one segment S (each a `StreamNLL` with nll/mask [K, S])."""

    pre: StreamNLL
    post: StreamNLL
    post_in_context: StreamNLL
    carried: bool  # a TTT state was carried from the first occurrence into the post pass

    @property
    def post_equals_pre(self) -> bool:
        """Bit-identical NLL at every scored position (what a model without TTT layers must give)."""
        return torch.equal(self.pre.mask, self.post.mask) and torch.equal(
            self.pre.nll[self.pre.mask], self.post.nll[self.post.mask])


def probe_segment(lm, segment: Tensor, chunk_size: int, where: str = "segment") -> MemoryProbe:
    """Score segment [K, S] pre, post (fresh stream + the TTT state left by pre) and post_in_context
    (second half of one stream [S; S]); see the module docstring."""
    first = chunked_nll(lm, segment, chunk_size, where=f"{where} (pre)", return_state=True)
    post = chunked_nll(lm, segment, chunk_size, where=f"{where} (post)", initial_state=first.state)
    twice = chunked_nll(lm, torch.cat([segment, segment], dim=1), chunk_size, where=f"{where} (in context)")
    S = segment.shape[1]
    # the delays lose the same positions at the end of [S; S] as at the end of S: the masks agree
    second = dataclasses.replace(twice, nll=twice.nll[:, S:], mask=twice.mask[:, S:])
    return MemoryProbe(dataclasses.replace(first, state=None), post, second, carried=bool(first.state))


def memory_groups(num_rows: int) -> dict[str, list[int]]:
    """The evaluator's groups (`metrics.groups`: text, cb1, cb2-N) plus "audio": every audio row."""
    return {**metrics.groups(num_rows), "audio": list(range(1, num_rows))}


def group_label(name: str, num_rows: int) -> str:
    return f"all audio codebooks (1–{num_rows - 1})" if name == "audio" else metrics.group_label(name)


def _difference(a: dict, b: dict) -> float | dict:
    if "nll" in a and "nll" in b:
        return a["nll"] - b["nll"]
    return {"skipped": "no scored frames in one of the passes"}


def summarize(probes: Sequence[MemoryProbe], stream_ids: Sequence[str]) -> dict:
    """One model's JSON-ready result: per group the mean NLL of each pass over all streams
    (token-weighted, `metrics.range_nll`), Δ = post − pre, Δ in context; per-stream values."""
    if not probes:
        raise ValueError("summarize: no streams were probed")
    K, S = probes[0].pre.nll.shape
    rows = memory_groups(K)
    series = {p: [metrics.series_by_group(getattr(x, p).nll, getattr(x, p).mask, rows) for x in probes]
              for p in PASSES}
    groups = {}
    for g in rows:
        entry = {"label": group_label(g, K)}
        entry.update({p: metrics.range_nll([s[g] for s in series[p]], 0, S) for p in PASSES})
        entry["delta"] = _difference(entry["post"], entry["pre"])
        entry["delta_in_context"] = _difference(entry["post_in_context"], entry["pre"])
        groups[g] = entry
    streams = []
    for i, (sid, probe) in enumerate(zip(stream_ids, probes)):
        row: dict = {"id": sid, "frames": probe.pre.frames}
        for p in PASSES:
            row[p] = {g: metrics.range_nll([series[p][i][g]], 0, S).get("nll") for g in rows}
        row["delta"] = {g: None if row["pre"][g] is None or row["post"][g] is None else row["post"][g] - row["pre"][g]
                        for g in rows}
        both = probe.pre.mask & probe.post.mask
        row["max_abs_post_minus_pre"] = float((probe.post.nll[both] - probe.pre.nll[both]).abs().max()) \
            if both.any() else None
        streams.append(row)
    seconds = sum(getattr(x, p).seconds for x in probes for p in PASSES)
    return {"groups": groups, "streams": streams, "carried_state": any(x.carried for x in probes),
            "post_equals_pre": all(x.post_equals_pre for x in probes), "seconds": seconds}


def remembered(result: dict, group: str = "cb1") -> str:
    """The one-line verdict of a model: "post < pre on codebook 1: yes/no (...)"."""
    g = result["groups"][group]
    head = f"post < pre on {'codebook 1' if group == 'cb1' else g['label']}"
    if not result["carried_state"]:
        same = "post = pre exactly" if result["post_equals_pre"] else "yet post differs from pre (nondeterminism?)"
        return f"{head}: no (no TTT layers, no state to carry: {same})"
    if not isinstance(g["delta"], float):
        return f"{head}: unknown (no scored frames)"
    return f"{head}: {'yes' if g['delta'] < 0 else 'no'} (Δ {g['delta']:+.4f} nats)"


# ---------------------------------------------------------------- the probe


@dataclass
class Segments:
    """The streams at least segment_frames long (read up to that length), and report.json's account of
    them and of what was left out, and why."""

    streams: list[Stream]
    account: dict


class Memory:
    """The probe: each model in turn (one in memory at a time), every segment scored three times."""

    kind = "memory"
    files = OutputFiles("memory.json", "memory.md", {"memory": "memory.png"})

    def __init__(self, config: MemoryConfig):
        self.config = config

    def plan(self) -> EvalPlan:
        return plan_memory(self.config)

    def load(self, plan: EvalPlan, lm: torch.nn.Module, progress: bool) -> Segments:
        loaded = load_data(plan.data, lm, plan.base, progress)
        S = self.config.segment_frames
        kept = [s for s in loaded.streams if s.frames >= S]
        short = [Skipped(s.book.id, f"{s.frames} frames < segment_frames {S}") for s in loaded.streams if s.frames < S]
        left_out = loaded.left_out_books + short
        if not kept:
            longest = max(s.frames for s in loaded.streams)
            raise ValueError(f"segment_frames: {S} frames is longer than every stream (longest: {longest} frames); "
                             f"lower segment_frames")
        data = {"streams": [{"id": s.book.id, "segment_frames": S} for s in kept],
                "left_out": [s.to_dict() for s in left_out],
                "skipped_files": [s.to_dict() for s in loaded.skipped_files],
                "counts": {"streams": len(kept), "left_out": len(left_out), "files_skipped": len(loaded.skipped_files)}}
        return Segments(kept, data)

    def run(self, plan: EvalPlan, models: Iterator[EvalModel], data: Segments, progress: bool) -> "MemoryResult":
        streams, account = data.streams, data.account
        S = self.config.segment_frames
        results, described = {}, {}
        device = plan.base.torch_device()
        with progress_bar(total=len(plan.models) * len(streams), desc="memory test", unit="stream",
                          enabled=progress) as bar:
            for model in models:
                probes = []
                for stream in streams:
                    bar.set_postfix_str(model.name, refresh=False)
                    probes.append(probe_segment(model.lm, stream.codes[:, :S], model.plan.chunk_size,
                                                where=f"{model.name}: {stream.book.id}"))
                    bar.update(1)
                results[model.name] = summarize(probes, [s.book.id for s in streams])
                described[model.name] = {**model.describe(), "chunk_size": model.plan.chunk_size}
                del model, probes  # one model at a time (`build_models` drops its own reference too)
        return MemoryResult({
            **report_header("memory", "Memory test: NLL of a segment before and after test-time training on it",
                            self.config, device),
            "segment_frames": S,
            "groups": {g: v["label"] for g, v in next(iter(results.values()))["groups"].items()},
            "models": described, "data": account, "results": results, "plots": {}})


# ---------------------------------------------------------------- outputs


def _nll(entry) -> str:
    return f"{entry['nll']:.4f}" if isinstance(entry, dict) and "nll" in entry else "skipped"


def _signed(value) -> str:
    return f"{value:+.4f}" if isinstance(value, float) else "skipped"


def markdown(report: dict) -> str:
    """memory.md: what was measured, the model × group table, one verdict per model, the plot."""
    S, results = report["segment_frames"], report["results"]
    n = report["data"]["counts"]["streams"]
    out = [f"# {report['title']}", "",
           (f"Created {report['created']} on {report['environment']['device']} (torch "
            f"{report['environment']['torch']}). S = the first {S:,} frames ({S / FRAME_RATE:.1f} s) of each of {n} "
            "stream(s); teacher-forced NLL in nats per token, chunked mode, mean over all streams."), "",
           "- **pre**: S in a fresh stream (empty KV cache, initial TTT state).",
           ("- **post**: S again in a new fresh stream (empty KV cache: attention cannot copy) that starts from the "
            "TTT state left by the pre pass. A model without TTT layers carries nothing: post = pre."),
           "- **in context**: the second S of one stream [S; S] (attention and TTT state both live).",
           "- Δ = post − pre, Δ in context = in context − pre (negative: the model remembers).", ""]
    rows = [[name, g["label"], _nll(g["pre"]), _nll(g["post"]), _signed(g["delta"]), _nll(g["post_in_context"]),
             _signed(g["delta_in_context"])] for name, r in results.items() for g in r["groups"].values()]
    out += table(["model", "group", "pre", "post", "Δ post − pre", "in context", "Δ in context − pre"], rows)
    out.append("")
    out += [f"- **{name}**: {remembered(r)}." for name, r in results.items()] + [""]
    if report.get("plots"):
        out += [f"![{k}]({v})" for k, v in report["plots"].items()] + [""]
    out += ["## Models", ""] + [model_line(name, m) for name, m in report["models"].items()]
    out += ["", "## Left out", ""]
    left = report["data"]["left_out"] + report["data"]["skipped_files"]
    out += [f"- `{s['path']}`: {s['reason']}" for s in left] or ["Nothing."]
    return "\n".join(out) + "\n"


def plot_memory(report: dict, path: str | Path, groups: Sequence[str] = ("cb1", "audio")) -> Path:
    """Grouped bars per model: mean NLL pre / post / in context, one panel per group."""
    plt = pyplot()
    names = list(report["results"])
    fig, axes = plt.subplots(1, len(groups), figsize=(max(4.5, 1.4 * len(names) + 1.5) * len(groups), 3.8),
                             squeeze=False, layout="constrained")
    x = np.arange(len(names))
    width = 0.8 / len(PASSES)
    for ax, group in zip(axes[0], groups):
        shown = []
        for j, p in enumerate(PASSES):
            values = [report["results"][n]["groups"][group][p].get("nll", math.nan) for n in names]
            ax.bar(x + (j - (len(PASSES) - 1) / 2) * width, values, width, label=PASS_LABELS[p])
            shown += [v for v in values if math.isfinite(v)]
        for i, n in enumerate(names):  # Δ post − pre above each model's bars
            delta = report["results"][n]["groups"][group]["delta"]
            if isinstance(delta, float):
                ax.annotate(f"post − pre {delta:+.3f}", (x[i], 1), xycoords=("data", "axes fraction"), ha="center",
                            va="bottom", fontsize=8)
        if shown:  # NLL differences are small next to the NLL itself: zoom in (the axis does not start at 0)
            lo, hi = min(shown), max(shown)
            pad = max(hi - lo, 1e-3)
            ax.set_ylim(max(0.0, lo - 1.5 * pad), hi + 0.5 * pad)
        ax.set_xticks(x, names)
        ax.set_ylabel("mean NLL (nats)")
        ax.set_title(report["groups"][group], fontsize=10, pad=16)
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(f"Memory test: first {report['segment_frames']} frames, before (pre) and after (post) TTT on them")
    return save_figure(fig, path)


def summary_lines(report: dict) -> list[str]:
    """The terminal summary: codebook 1 and all-audio NLL pre / post / Δ / in context per model."""
    groups = ("cb1", "audio")
    head = f"{'model':<14}" + "".join(f" | {report['groups'][g][:30]:<36}" for g in groups)
    sub = f"{'':<14}" + "".join(f" | {'pre':>8} {'post':>8} {'Δ':>8} {'in ctx':>8}" for _ in groups)
    lines = [(f"memory test: first {report['segment_frames']} frames of {report['data']['counts']['streams']} "
              "stream(s), NLL in nats per token (chunked, teacher forced)"), head, sub]
    for name, r in report["results"].items():
        cells = ""
        for g in groups:
            e = r["groups"][g]
            cells += (f" | {_nll(e['pre']):>8} {_nll(e['post']):>8} {_signed(e['delta']):>8} "
                      f"{_nll(e['post_in_context']):>8}")
        lines.append(f"{name[:14]:<14}{cells}")
    lines += [f"{name}: {remembered(r)}" for name, r in report["results"].items()]
    return lines


def scalars(report: dict) -> dict[str, float]:
    """Flat {"memory/<model>/<group>/<pass>_nll": value, ".../delta", ".../delta_in_context"} of a memory
    report (passes without scored frames are not logged)."""
    out: dict[str, float] = {}
    for model, r in report["results"].items():
        for group, g in r["groups"].items():
            key = f"memory/{model}/{group}"
            out.update({f"{key}/{name}_nll": g[name]["nll"] for name in PASSES if "nll" in g[name]})
            out.update({f"{key}/{name}": g[name] for name in ("delta", "delta_in_context")
                        if isinstance(g[name], float)})
    return out


@dataclass
class MemoryResult(ReportResult):
    """memory.json's document, and its renderers."""

    wandb_prefix: str = field(default="memory", init=False)

    def markdown(self) -> str:
        return markdown(self.report)

    def summary_lines(self) -> list[str]:
        return summary_lines(self.report)

    def scalars(self) -> dict[str, float]:
        return scalars(self.report)

    def figures(self, output_dir: Path, files: dict[str, str]) -> dict[str, Path]:
        path = plot_memory(self.report, output_dir / files["memory"])
        self.report["plots"] = {"memory": path.name}
        return {"memory": path}
