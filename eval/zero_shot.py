"""`ttt-speech eval zero-shot`: did TTT cost the model its short-context skills?

The spoken-LM zero-shot suite (sWUGGY, sBLIMP, spoken and topic StoryCloze, SALMon), scored by
likelihood alone: for each pair of recordings the model should give the real one (`positive`) a
lower NLL than the fake one (`negative`). Each recording is scored from a fresh stream (empty KV
cache, initial TTT state: no memory across items), chunked mode, on the first codebook or on every
audio codebook, its score the mean (or sum) of those tokens' NLL. Accuracy over pairs (a tie counts
half, so that swapping the columns turns accuracy a into 1 − a exactly), with a Wilson 95 %
interval; each model against the baseline on the same pairs with an exact McNemar test.
"""
from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import Tensor

from ttt_speech.data import FRAME_RATE
from ttt_speech.data.audio import write_wav
from ttt_speech.data.cache import CodesCache
from ttt_speech.data.layout import moshi_streams
from ttt_speech.figures import pyplot, save_figure
from ttt_speech.models import load_mimi
from ttt_speech.progress import progress_bar

from .config import EvalConfig, ZeroShotSettings
from .nll import batched_nll
from .plan import EvalModel, EvalPlan, plan_eval
from .report import model_line, report_header, table
from .writers import OutputFiles, ReportResult
from .zero_shot_data import TASKS, PairSet, ZeroShotTask, check_available, read_pairs

MIMI_SAMPLE_RATE = 24000  # Mimi's input rate (moshi's loaders.SAMPLE_RATE): the pairs are resampled to it
Z95 = 1.959964  # the normal quantile of a two-sided 95 % interval
# published accuracies (%) on Mimi-token models, as the anchors report them: Moshi (speech only), slamkit's table
ANCHORS = {"sblimp": 58.9, "sstorycloze": 58.7, "tstorycloze": 81.8}
ANCHOR_SOURCE = "Moshi (speech only), slamkit's table"


# ---------------------------------------------------------------- statistics


def wilson_interval(correct: float, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion correct / n (95 % by default)."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar_p(only_a: int, only_b: int) -> float:
    """Exact two-sided McNemar test: the probability, under "a and b are equally good", of a split of
    the discordant pairs at least as uneven as (only_a, only_b) (a binomial test at 1/2)."""
    n = only_a + only_b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(only_a, only_b) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


# ---------------------------------------------------------------- data


@dataclass
class TaskData:
    """One task's pairs as Moshi's streams ([K, T] each), and what was left out."""

    task: ZeroShotTask
    tokens: str  # "cb1" or "audio": the rows a recording is scored on
    ids: list[str]
    positive: list[Tensor]
    negative: list[Tensor]
    skipped: list[tuple[str, str]]
    total: int
    source: str


def scored_rows(lm, tokens: str) -> list[int]:
    """The rows of the [K, T] NLL a recording is scored on: codebook 1, or every audio codebook."""
    return [1] if tokens == "cb1" else list(range(1, 1 + lm.dep_q))


def encode_pairs(pairs: PairSet, cache: CodesCache, lm, tokens: str, progress: bool) -> TaskData:
    """Every recording of `pairs` as Mimi codes (through the cache: written as a WAV, keyed by its
    content) laid out as Moshi's own stream, the user's silent. A pair with a recording too short for
    every scored codebook to have a token (its delay + 1 frames) is skipped, with its reason."""
    data = TaskData(pairs.task, tokens, [], [], [], [], pairs.total, pairs.source)
    min_frames = 1 + max(lm.delays[row] for row in scored_rows(lm, tokens))
    with tempfile.TemporaryDirectory() as tmp, progress_bar(total=len(pairs), desc=f"encoding {pairs.task.name}",
                                                             unit="pair", enabled=progress) as bar:
        for pair in pairs:  # decoded one at a time: only the codes are kept
            bar.update(1)
            laid_out = []
            for side, pcm in (("positive", pair.positive), ("negative", pair.negative)):
                path = Path(tmp) / f"{side}.wav"
                write_wav(path, torch.from_numpy(np.ascontiguousarray(pcm))[None], MIMI_SAMPLE_RATE)
                laid_out.append(moshi_streams(lm, cache.get(path), where=f"{pair.id} ({side})"))
            short = min(codes.shape[1] for codes in laid_out)
            if short < min_frames:
                data.skipped.append((pair.id, f"a recording of {short} frame(s): too short to score (at least "
                                              f"{min_frames}, {min_frames / FRAME_RATE:.2f} s)"))
                continue
            data.ids.append(pair.id)
            data.positive.append(laid_out[0])
            data.negative.append(laid_out[1])
    data.skipped = list(pairs.skipped) + data.skipped
    return data


# ---------------------------------------------------------------- scoring


def score_task(model: EvalModel, data: TaskData, reduction: str, batch_size: int,
               progress=lambda n: None) -> dict[str, list[float]]:
    """Each pair's NLL of its positive and its negative recording under `model` (inside its
    scoring()): every recording from a fresh stream, `batch_size` of them per call (`batched_nll`),
    sorted by length so that little of a call is padding; the mean or sum over the scored tokens."""
    rows = scored_rows(model.lm, data.tokens)
    recordings = [(side, i, codes) for side, sides in (("positive", data.positive), ("negative", data.negative))
                  for i, codes in enumerate(sides)]
    recordings.sort(key=lambda r: r[2].shape[1])
    out = {"positive": [math.nan] * len(data.ids), "negative": [math.nan] * len(data.ids)}
    for start in range(0, len(recordings), batch_size):
        batch = recordings[start:start + batch_size]
        first = ", ".join(f"{data.ids[i]} {side}" for side, i, _ in batch[:2])
        scored = batched_nll(model.lm, [codes for _, _, codes in batch], model.plan.chunk_size,
                             where=f"{model.name}: {data.task.name} ({first}, ...)")
        for (side, i, _), (nll, mask) in zip(batch, scored):
            values = nll[rows][mask[rows]].double()
            assert values.numel(), f"{data.ids[i]}: no scored token"  # `encode_pairs` skips recordings too short
            out[side][i] = float(values.mean() if reduction == "mean" else values.sum())
        progress(len(batch))
    return out


def outcomes(nll: dict[str, list[float]]) -> np.ndarray:
    """Per pair: 1 when the positive recording is likelier (lower NLL), 0 when the negative is, ½ on a tie."""
    pos, neg = np.asarray(nll["positive"]), np.asarray(nll["negative"])
    return np.where(pos < neg, 1.0, np.where(pos > neg, 0.0, 0.5))


def task_result(nll: dict[str, list[float]]) -> dict:
    """Accuracy (ties count half), its Wilson 95 % interval, and the mean NLL of each side (None
    where every pair was skipped)."""
    won = outcomes(nll)
    n = len(won)
    return {"accuracy": float(won.mean()) if n else None,
            "ci95": list(wilson_interval(float(won.sum()), n)) if n else None, "pairs": n, "correct": float(won.sum()),
            "ties": int((won == 0.5).sum()), "mean_nll_positive": float(np.mean(nll["positive"])) if n else None,
            "mean_nll_negative": float(np.mean(nll["negative"])) if n else None}


def versus(nll: dict[str, list[float]], base_nll: dict[str, list[float]], ids: list[str]) -> dict:
    """A model against the baseline on the same pairs: the accuracy difference, the pairs only one of
    them gets right (and their ids), the exact McNemar p-value on those. A pair either of them ties
    (equal NLL on both sides: not seen with float NLL) counts in the difference, not in the test."""
    a, b = outcomes(nll), outcomes(base_nll)
    only_model = [i for i, (x, y) in enumerate(zip(a, b)) if x == 1 and y == 0]
    only_base = [i for i, (x, y) in enumerate(zip(a, b)) if x == 0 and y == 1]
    return {"difference": float(a.mean() - b.mean()) if len(a) else None, "model_only": len(only_model),
            "baseline_only": len(only_base), "p_value": mcnemar_p(len(only_model), len(only_base)),
            "model_only_ids": [ids[i] for i in only_model], "baseline_only_ids": [ids[i] for i in only_base]}


# ---------------------------------------------------------------- the probe


FILES = OutputFiles("zero_shot.json", "zero_shot.md", {"zero_shot": "zero_shot.png"})


class ZeroShot:
    """The probe: every pair of every task scored by every planned model."""

    kind = "zero-shot"
    files = FILES

    def __init__(self, config: EvalConfig):
        self.config = config
        self.settings: ZeroShotSettings = config.zero_shot

    def plan(self) -> EvalPlan:
        plan = plan_eval(self.config, modes=("chunked",))
        for name in self.settings.tasks:  # a missing dataset is one line before any model loads
            check_available(TASKS[name], self.settings.path, f"zero_shot.tasks.{name}")
        return plan

    def tokens(self, task: ZeroShotTask) -> str:
        return task.tokens if self.settings.tokens == "auto" else self.settings.tokens

    def load(self, plan: EvalPlan, lm: torch.nn.Module, progress: bool) -> list[TaskData]:
        cache = CodesCache(self.config.data.codes_cache, plan.base.codec_id(),
                           lambda: load_mimi(plan.base, plan.base.torch_device()))
        s = self.settings
        return [encode_pairs(read_pairs(TASKS[name], s.path, MIMI_SAMPLE_RATE, s.max_pairs, s.seed), cache, lm,
                             self.tokens(TASKS[name]), progress) for name in s.tasks]

    def run(self, plan: EvalPlan, models: Iterator[EvalModel], data: list[TaskData],
            progress: bool) -> ZeroShotResult:
        nll: dict[str, dict[str, dict[str, list[float]]]] = {}
        described = {}
        with progress_bar(total=len(plan.models) * sum(2 * len(d.ids) for d in data), desc="zero-shot",
                          unit="recording", enabled=progress) as bar:
            for model in models:
                described[model.name] = {**model.describe(), "chunk_size": model.plan.chunk_size}
                with torch.no_grad(), model.scoring():
                    nll[model.name] = {}
                    for task in data:
                        bar.set_postfix_str(f"{model.name}: {task.task.name}", refresh=False)
                        nll[model.name][task.task.name] = score_task(model, task, self.settings.reduction,
                                                                     self.settings.batch_size, bar.update)
                del model  # one model at a time (`build_models` drops its own reference too)
        return ZeroShotResult(self.summarise(plan, described, data, nll))

    def summarise(self, plan: EvalPlan, described: dict, data: list[TaskData], nll: dict) -> dict:
        """zero_shot.json's document: per task its data, per model and task the accuracy, per model
        and task the comparison with the baseline (when there is one)."""
        tasks = {d.task.name: {"hub_id": d.task.hub_id, "config": d.task.config, "source": d.source,
                               "tokens": d.tokens, "reduction": self.settings.reduction, "pairs": len(d.ids),
                               "rows": d.total, "skipped": [{"id": i, "reason": r} for i, r in d.skipped],
                               "anchor": ANCHORS.get(d.task.name)} for d in data}
        results = {m: {t: task_result(v) for t, v in per_task.items()} for m, per_task in nll.items()}
        vs = {m: {d.task.name: versus(nll[m][d.task.name], nll["baseline"][d.task.name], d.ids) for d in data}
              for m in nll if m != "baseline" and "baseline" in nll}
        per_pair = {d.task.name: {"ids": d.ids, "nll": {m: nll[m][d.task.name] for m in nll}} for d in data}
        return {**report_header("zero-shot", "Zero-shot suite: pairs of recordings scored by likelihood",
                                self.config, plan.base.torch_device()),
                "anchors": {"source": ANCHOR_SOURCE, "accuracy_percent": ANCHORS},
                "tasks": tasks, "models": described, "results": results, "vs_baseline": vs, "per_pair": per_pair,
                "plots": {}}


# ---------------------------------------------------------------- rendering


def _percent(entry: dict) -> str:
    if entry["accuracy"] is None:
        return "no pairs"
    lo, hi = entry["ci95"]
    return f"{100 * entry['accuracy']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"


def _points(difference: float | None) -> str:
    return "—" if difference is None else f"{100 * difference:+.1f}"


@dataclass
class ZeroShotResult(ReportResult):
    """zero_shot.json's document, and its renderers."""

    wandb_prefix: str = field(default="zero_shot", init=False)

    def markdown(self) -> str:
        r = self.report
        models, tasks = list(r["results"]), list(r["tasks"])
        out = [f"# {r['title']}", "",
               f"Created {r['created']} on {r['environment']['device']} (torch {r['environment']['torch']}). Each "
               "recording scored from a fresh stream (no memory across items), chunked mode; a pair counts as right "
               "when its positive recording has the lower NLL (a tie counts half). Accuracy in %, Wilson 95 % "
               "interval in brackets; 50 % is chance.", ""]
        rows = [[t, r["tasks"][t]["tokens"], r["tasks"][t]["reduction"], str(r["tasks"][t]["pairs"]),
                 *(_percent(r["results"][m][t]) for m in models),
                 f"{r['tasks'][t]['anchor']:.1f}" if r["tasks"][t]["anchor"] is not None else "—"] for t in tasks]
        out += table(["task", "tokens", "NLL", "pairs", *models, "published"], rows)
        out += ["", f"published: {r['anchors']['source']}.", ""]
        if r["vs_baseline"]:
            out += ["## Model − baseline", "",
                    "The same pairs: the accuracy difference (points), the pairs only one of the two gets right, "
                    "and the exact McNemar p-value.", ""]
            out += table(["model", "task", "Δ accuracy", "only the model", "only the baseline", "p"],
                         [[m, t, _points(v["difference"]), str(v["model_only"]), str(v["baseline_only"]),
                           f"{v['p_value']:.3g}"] for m, per_task in r["vs_baseline"].items()
                          for t, v in per_task.items()]) + [""]
        out += [f"![{k}]({v})" for k, v in r["plots"].items()] + ([""] if r["plots"] else [])
        out += ["## Models", ""] + [model_line(name, m) for name, m in r["models"].items()]
        skipped = [f"- `{s['id']}`: {s['reason']}" for t in tasks for s in r["tasks"][t]["skipped"]]
        out += ["", "## Data", ""] + [f"- {t}: {d['pairs']} of {d['rows']} pairs from {d['source']}"
                                      for t, d in r["tasks"].items()]
        return "\n".join(out + ["", "## Left out", ""] + (skipped or ["Nothing."])) + "\n"

    def summary_lines(self) -> list[str]:
        r = self.report
        lines = []
        for t, d in r["tasks"].items():
            cells = ", ".join(f"{m} {_percent(per_task[t])}" for m, per_task in r["results"].items())
            lines.append(f"{t} ({d['pairs']} pairs, {d['tokens']}, {d['reduction']} NLL): {cells}"
                         + (f"; skipped {len(d['skipped'])}" if d["skipped"] else ""))
            lines += [f"  {m} − baseline: {_points(v[t]['difference'])} points (p = {v[t]['p_value']:.3g})"
                      for m, v in r["vs_baseline"].items()]
        return lines

    def scalars(self) -> dict[str, float]:
        out = {}
        for m, per_task in self.report["results"].items():
            for t, e in per_task.items():
                if e["accuracy"] is not None:
                    key = f"zero_shot/{m}/{t}"
                    out.update({f"{key}/accuracy": e["accuracy"], f"{key}/ci95_low": e["ci95"][0],
                                f"{key}/ci95_high": e["ci95"][1]})
        for m, per_task in self.report["vs_baseline"].items():
            for t, v in per_task.items():
                if v["difference"] is not None:
                    out.update({f"zero_shot/{m}/{t}/minus_baseline": v["difference"],
                                f"zero_shot/{m}/{t}/p_value": v["p_value"]})
        return out

    def figures(self, output_dir: Path, files: dict[str, str]) -> dict[str, Path]:
        """Accuracy per task, one bar per model with its 95 % interval, chance marked."""
        r = self.report
        models, tasks = list(r["results"]), list(r["tasks"])
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(tasks) * max(1, len(models)) * 0.6 + 2), 3.8),
                               layout="constrained")
        x = np.arange(len(tasks))
        width = 0.8 / len(models)
        for j, m in enumerate(models):
            scored = [(i, r["results"][m][t]) for i, t in enumerate(tasks)
                      if r["results"][m][t]["accuracy"] is not None]
            acc = [100 * e["accuracy"] for _, e in scored]
            err = [[a - 100 * e["ci95"][0] for a, (_, e) in zip(acc, scored)],
                   [100 * e["ci95"][1] - a for a, (_, e) in zip(acc, scored)]]
            ax.bar([x[i] + (j - (len(models) - 1) / 2) * width for i, _ in scored], acc, width, yerr=err, capsize=3,
                   label=m)
        anchored = [(i, r["tasks"][t]["anchor"]) for i, t in enumerate(tasks) if r["tasks"][t]["anchor"] is not None]
        if anchored:
            ax.scatter([i for i, _ in anchored], [a for _, a in anchored], marker="D", color="k", s=18, zorder=3,
                       label=f"published ({ANCHOR_SOURCE})")
        ax.axhline(50, color="k", ls="--", lw=1, label="chance")
        ax.set_xticks(x, tasks, rotation=30, ha="right")
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(0, 100)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title("Zero-shot suite: accuracy per task (95 % Wilson intervals)", fontsize=10)
        path = save_figure(fig, output_dir / files["zero_shot"])
        r["plots"] = {"zero_shot": path.name}
        return {"zero_shot": path}
