"""`eval continuation`'s result: the metrics it reports, their summaries across streams (per span, per
quantile of the generated time, over all of it, each model − the baseline) and their renderers
(continuation.json / .md, one plot per metric, wandb scalars)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ttt_speech import schema
from ttt_speech.data import FRAME_RATE
from ttt_speech.figures import pyplot, save_figure

from . import continuation_metrics as cm
from .config import GROUND_TRUTH
from .continuation_metrics import METRICS, RATIOS
from .report import model_line, report_header, table
from .writers import OutputFiles, ReportResult


FILES = OutputFiles("continuation.json", "continuation.md",
                    {name: f"continuation_{name}.png" for name in METRICS})


# ---------------------------------------------------------------- summaries


def stream_value(records: list[dict], metric: str) -> float | None:
    """One stream's `metric` over the spans `records`: their mean, or for a rate (`RATIOS`: WER) the summed
    edits over the summed words; None when no span has it."""
    if metric in RATIOS:
        edits, words = RATIOS[metric]
        counted = [(r[edits], r[words]) for r in records if r.get(edits) is not None]
        total = sum(w for _, w in counted)
        return sum(e for e, _ in counted) / total if total else None
    values = [r[metric] for r in records if r.get(metric) is not None]
    return float(np.mean(values)) if values else None


def over_streams(spans: dict[str, list[dict]], metric: str, pick=lambda records: records) -> dict | None:
    """The spread across streams of each stream's value of `metric` over the spans `pick` keeps."""
    return cm.spread([stream_value(pick(records), metric) for records in spans.values()])


def summarise_model(spans: dict[str, list[dict]], quantiles: list[float], bounds: list[tuple[int, int]]) -> dict:
    """One model's summaries of every metric: per span (`bounds`: each one's frames), per quantile of the
    generated time, and overall."""
    groups = cm.quantile_groups(bounds, quantiles)
    out = {}
    for metric in METRICS:
        out[metric] = {
            "per_span": [over_streams(spans, metric, lambda r, i=i: r[i:i + 1]) for i in range(len(bounds))],
            "quantiles": [over_streams(spans, metric, lambda r, a=a, b=b: r[a:b]) if b > a else None
                          for a, b in groups],
            "overall": over_streams(spans, metric)}
    return out


def versus_baseline(spans: dict[str, dict[str, list[dict]]]) -> dict:
    """Each model − the baseline, paired by stream: the spread of the per-stream differences of the means."""
    if "baseline" not in spans:
        return {}
    base = spans["baseline"]
    out = {}
    for name, per_stream in spans.items():
        if name in ("baseline", GROUND_TRUTH):
            continue
        out[name] = {}
        for metric in METRICS:
            pairs = [(stream_value(per_stream[s], metric), stream_value(base[s], metric)) for s in per_stream]
            out[name][metric] = cm.spread([a - b for a, b in pairs if a is not None and b is not None])
    return out


def summarise(config, plan, lengths, data, described: dict, spans: dict, diverged: dict) -> dict:
    """continuation.json's document (`diverged`: {model: {stream: the error}} of the rows whose generation
    stopped at non-finite logits)."""
    s = config.continuation
    bounds = lengths.spans()
    measured = {m: any(r.get(m) is not None for per in spans.values() for rs in per.values() for r in rs)
                for m in METRICS}
    return {**report_header("continuation", "Long-form continuation: what each model generates, span by span",
                            config, plan.base.torch_device()),
            "lengths": {"prompt_frames": lengths.prompt, "generated_frames": lengths.generated,
                        "span_frames": lengths.span, "spans": len(bounds), "quantiles": list(s.quantiles),
                        "span_centres_s": [(a + b) / 2 / FRAME_RATE for a, b in bounds]},
            "metrics": {m: {"label": v.label, "better": v.better, "measures": v.measures, "measured": measured[m]}
                        for m, v in METRICS.items()},
            "judges": {"asr": s.asr_model, "speaker": s.speaker_model, "text": s.text_model,
                       "sampling": schema.to_dict(s.sampling)},
            "models": described, "data": data.loaded.to_dict(),
            "summary": {name: summarise_model(per, list(s.quantiles), bounds) for name, per in spans.items()},
            "vs_baseline": versus_baseline(spans), "diverged": diverged, "spans": spans, "plots": {}}


# ---------------------------------------------------------------- rendering


def _cell(entry: dict | None) -> str:
    if entry is None:
        return "—"
    return f"{entry['mean']:.3g} ± {entry['std']:.2g}" if entry["n"] > 1 else f"{entry['mean']:.3g}"


def _quantile_labels(quantiles: list[float]) -> list[str]:
    edges = [0.0] + list(quantiles)
    return [f"{100 * a:.0f}–{100 * b:.0f} %" for a, b in zip(edges, edges[1:])]


@dataclass
class ContinuationResult(ReportResult):
    """continuation.json's document, and its renderers."""

    wandb_prefix: str = field(default="continuation", init=False)

    def measured(self) -> list[str]:
        return [m for m, v in self.report["metrics"].items() if v["measured"]]

    def markdown(self) -> str:
        r = self.report
        models, n = list(r["summary"]), r["lengths"]
        out = [f"# {r['title']}", "",
               f"Created {r['created']} on {r['environment']['device']} (torch {r['environment']['torch']}). Each "
               f"model continued the first {n['prompt_frames'] / FRAME_RATE:g} s of each stream for "
               f"{n['generated_frames'] / FRAME_RATE / 60:g} min; every {n['span_frames'] / FRAME_RATE:g} s span scored. "
               "Mean ± std across streams of each stream's mean; `ground_truth` is the book's own continuation.", "",
               "## Over the whole generation", ""]
        rows = [[f"{METRICS[m].label}" + (f" ({METRICS[m].better} is better)" if METRICS[m].better else ""),
                 *(_cell(r["summary"][name][m]["overall"]) for name in models)] for m in self.measured()]
        out += table(["metric", *models], rows) + [""]
        out += self._diverged() + self._over_time() + self._versus()
        out += [f"![{k}]({v})" for k, v in r["plots"].items()]
        out += ["", "## Metrics", ""] + [f"- **{METRICS[m].label}** (`{m}`): {METRICS[m].measures}"
                                         + ("" if r["metrics"][m]["measured"] else " — not measured in this run")
                                         for m in METRICS]
        out += ["", "## Models", ""] + [model_line(name, m) for name, m in r["models"].items()]
        d = r["data"]["counts"]
        out += ["", "## Data", "", f"{d['streams']} streams, {d['frames']:,} frames; {d['books_left_out']} left out "
                                   f"(e.g. shorter than the prompt), {d['files_skipped']} files skipped."]
        return "\n".join(out) + "\n"

    def _over_time(self) -> list[str]:
        r = self.report
        labels = _quantile_labels(r["lengths"]["quantiles"])
        out = ["## Over time", "", "Per quantile of the generated time (tts_longeval's): mean ± std across streams.", ""]
        for m in self.measured():
            out += [f"### {METRICS[m].label}", ""]
            out += table(["model", *labels], [[name, *(_cell(e) for e in s[m]["quantiles"])]
                                              for name, s in r["summary"].items()]) + [""]
        return out

    def _diverged(self) -> list[str]:
        lines = [f"- **{name}** on `{stream}`: {error}" for name, per in self.report["diverged"].items()
                 for stream, error in per.items()]
        return ["## Diverged", "", "Generation stopped at non-finite logits; the spans before it are scored, the "
                                   "later ones missing.", ""] + lines + [""] if lines else []

    def _versus(self) -> list[str]:
        vs = self.report["vs_baseline"]
        if not vs:
            return []
        rows = [[name, METRICS[m].label, _cell(per[m])] for name, per in vs.items() for m in self.measured()]
        return ["## Model − baseline", "", "Paired by stream: the mean ± std of the per-stream differences.", ""] + \
            table(["model", "metric", "difference"], rows) + [""]

    def summary_lines(self) -> list[str]:
        r = self.report
        lines = []
        for m in self.measured():
            cells = ", ".join(f"{name} {_cell(s[m]['overall'])}" for name, s in r["summary"].items())
            lines.append(f"{METRICS[m].label}: {cells}")
        lines += [f"{name} diverged on {len(per)} stream(s), e.g. {next(iter(per))}: see the report"
                  for name, per in r["diverged"].items()]
        return lines

    def scalars(self) -> dict[str, float]:
        out = {}
        quantiles = self.report["lengths"]["quantiles"]
        for name, per_metric in self.report["summary"].items():
            for m, s in per_metric.items():
                if s["overall"] is not None:
                    out[f"continuation/{name}/{m}/mean"] = s["overall"]["mean"]
                out.update({f"continuation/{name}/{m}/q{q:g}": e["mean"]
                            for q, e in zip(quantiles, s["quantiles"]) if e is not None})
        for name, per_metric in self.report["vs_baseline"].items():
            out.update({f"continuation/{name}/{m}/minus_baseline": e["mean"]
                        for m, e in per_metric.items() if e is not None})
        return out

    def figures(self, output_dir: Path, files: dict[str, str]) -> dict[str, Path]:
        """One figure per measured metric against time: each model's mean across streams, a band from
        the lowest to the highest stream; the ground truth dashed."""
        r = self.report
        centres = r["lengths"]["span_centres_s"]
        # minutes for real runs, seconds for short ones
        unit, per = ("minutes", 60) if r["lengths"]["generated_frames"] / FRAME_RATE >= 120 else ("seconds", 1)
        paths = {}
        plt = pyplot()
        for m in self.measured():
            fig, ax = plt.subplots(figsize=(6.4, 3.6), layout="constrained")
            for name, s in r["summary"].items():
                points = [(t, e) for t, e in zip(centres, s[m]["per_span"]) if e is not None]
                if not points:
                    continue
                t = np.asarray([p / per for p, _ in points])
                mean = np.asarray([e["mean"] for _, e in points])
                style = {"color": "k", "ls": "--"} if name == GROUND_TRUTH else {}
                line, = ax.plot(t, mean, marker="o", ms=3, label=name, **style)
                ax.fill_between(t, [e["min"] for _, e in points], [e["max"] for _, e in points],
                                color=line.get_color(), alpha=0.15, lw=0)
            ax.set_xlabel(f"{unit} after the prompt (span centre)")
            better = f" ({METRICS[m].better} is better)" if METRICS[m].better else ""
            ax.set_ylabel(METRICS[m].label)
            ax.set_title(f"{METRICS[m].label}{better}: mean across streams, band = min–max", fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
            paths[m] = save_figure(fig, output_dir / files[m])
        r["plots"] = {m: p.name for m, p in paths.items()}
        return paths
