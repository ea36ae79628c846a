"""Long-context metrics from per-position NLL (docs/evaluation.md), never averaging over missing data.

Inputs are `StreamNLL`s ([K, T] NLL with a mask, K = 1 + dep_q). Streams are split into groups:
`text` (row 0), `cb1` (Moshi's first, semantic, audio codebook) and `cb2-N` (the acoustic
codebooks 2..dep_q, averaged per position over the codebooks that have a prediction there).

Every aggregate is a mean over the (stream, frame) entries that exist; an aggregate with no data
is returned as {"skipped": reason}, never as a number. Perplexity = exp(mean NLL in nats).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from .nll import StreamNLL


def groups(num_rows: int) -> dict[str, list[int]]:
    """Group name → rows of the [K, T] NLL (K = 1 + dep_q)."""
    out = {"text": [0], "cb1": [1]}
    if num_rows > 2:
        out[f"cb2-{num_rows - 1}"] = list(range(2, num_rows))
    return out


GROUP_LABELS = {"text": "text", "cb1": "audio codebook 1 (semantic)", "tokens": "text tokens (host llama)"}


def shown_groups(groups: dict[str, dict], left_out: dict[str, str]) -> dict[str, str]:
    """{group: label} of the `groups` (a run's or result's "groups") not in `left_out`
    (`uninformative_groups`): what reports, plots and trackers show."""
    return {g: v["label"] for g, v in groups.items() if g not in left_out}


def uninformative_groups(streams: Sequence[torch.Tensor], num_rows: int) -> dict[str, str]:
    """Groups whose targets are one repeated value in every stream, {group: why}: their NLL measures
    nothing (near 0 nats once a model learns the constant), so reports leave them out and say why.

    streams: codes [K', T] in Moshi's layout (text row 0, the predicted audio rows 1..num_rows-1)."""
    out = {}
    if all(codes[0].unique().numel() <= 1 for codes in streams):
        out["text"] = "the text stream is one repeated token (padding: no transcripts)"
    if all(codes[k].unique().numel() <= 1 for codes in streams for k in range(1, num_rows)):
        out.update({g: "every audio codebook is constant (a codec that carries no information)"
                    for g in groups(num_rows) if g != "text"})
    return out


def group_label(name: str) -> str:
    return GROUP_LABELS.get(name, f"audio codebooks {name[2:].replace('-', '–')} (acoustic)")


def group_series(result: StreamNLL) -> dict[str, np.ndarray]:
    """Per-position NLL of each group: [T] float64, NaN where the group has no prediction."""
    return series_by_group(result.nll, result.mask)


def series_by_group(nll: torch.Tensor, mask: torch.Tensor,
                    rows_by_group: dict[str, list[int]] | None = None) -> dict[str, np.ndarray]:
    """`group_series` of a [K, T] NLL and its mask (e.g. read back from per_position.safetensors).

    rows_by_group: group name → rows averaged per position (default: `groups(K)`)."""
    nll = nll.double().numpy()
    mask = mask.bool().numpy()
    out = {}
    for name, rows in (rows_by_group or groups(nll.shape[0])).items():
        values = np.where(mask[rows], nll[rows], 0.0).sum(0)
        count = mask[rows].sum(0)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[name] = np.where(count > 0, values / np.maximum(count, 1), np.nan)
    return out


def _mean(series: Sequence[np.ndarray], lo: int, hi: int) -> tuple[float, int]:
    """Token-weighted mean over frames [lo, hi) of several streams' series (NaN = missing)."""
    total, count = 0.0, 0
    for s in series:
        part = s[lo:hi]
        ok = ~np.isnan(part)
        total += float(part[ok].sum())
        count += int(ok.sum())
    return (total / count if count else math.nan), count


def _entry(nll: float, n_tokens: int, n_streams: int, **extra) -> dict:
    if n_tokens == 0 or not math.isfinite(nll):
        return {"skipped": "no scored frames in range", **extra}
    return {"nll": nll, "ppl": math.exp(min(nll, 700.0)), "n_streams": n_streams,
            "n_tokens": n_tokens, **extra}


def range_nll(series: Sequence[np.ndarray], lo: int, hi: int) -> dict:
    """Mean NLL over frames [lo, hi) of the streams that reach frame lo (token-weighted)."""
    reaching = [s for s in series if len(s) > lo]
    return _entry(*_mean(reaching, lo, hi), len(reaching), start=lo, stop=hi)


def linear_edges(longest: int, bin_frames: int) -> list[int]:
    """Bin edges (frames) 0, bin_frames, 2 bin_frames, ..., longest."""
    return list(range(0, longest, bin_frames)) + [longest] if longest else []


def log_edges(longest: int, per_decade: int = 8) -> list[int]:
    """Bin edges (frames) at 10^(i / per_decade) - 1, cut at `longest`: single frames at the start, wide
    bins late (for log-x curves, where 8- and 32-frame marks show). The grid does not depend on
    `longest`, so runs of different lengths share their bins."""
    if not longest:
        return []
    top = math.ceil(math.log10(longest + 1) * per_decade)
    inner = {round(10 ** (i / per_decade)) - 1 for i in range(top + 1)}
    return sorted({e for e in inner if e < longest} | {longest})


def _bin_mean(s: np.ndarray, lo: int, hi: int) -> float | None:
    part = s[lo:hi]
    ok = ~np.isnan(part)
    return float(part[ok].mean()) if ok.any() else None


def binned(series: Sequence[np.ndarray], edges: Sequence[int]) -> list[dict]:
    """Mean NLL per bin [edges[i], edges[i+1]), over the streams that reach the bin (token-weighted),
    with the spread across streams: q25/q75 of the per-stream bin means (with 2+ streams)."""
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        reaching = [s for s in series if len(s) > lo]
        nll, n = _mean(reaching, lo, hi)
        if not n:
            continue
        entry = {"start": lo, "stop": hi, "nll": nll, "n_streams": len(reaching), "n_tokens": n}
        means = [m for s in reaching if (m := _bin_mean(s, lo, hi)) is not None]
        if len(means) >= 2:
            entry["q25"], entry["q75"] = (float(q) for q in np.percentile(means, [25, 75]))
        out.append(entry)
    return out


def binned_curve(series: Sequence[np.ndarray], bin_frames: int) -> list[dict]:
    """`binned` over bins of `bin_frames` frames."""
    return binned(series, linear_edges(max((len(s) for s in series), default=0), bin_frames))


def log_binned_curve(series: Sequence[np.ndarray], per_decade: int = 8) -> list[dict]:
    """`binned` over `log_edges` bins."""
    return binned(series, log_edges(max((len(s) for s in series), default=0), per_decade))


def paired_difference(a: Sequence[np.ndarray], b: Sequence[np.ndarray], edges: Sequence[int]) -> list[dict]:
    """Per bin: mean over streams of (bin mean of a − of b), the same streams in both, and its standard
    error across streams (with 2+ streams): whether a model beats another beyond stream-to-stream noise."""
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        diffs = [ma - mb for sa, sb in zip(a, b)
                 if (ma := _bin_mean(sa, lo, hi)) is not None and (mb := _bin_mean(sb, lo, hi)) is not None]
        if not diffs:
            continue
        entry = {"start": lo, "stop": hi, "diff": float(np.mean(diffs)), "n_streams": len(diffs)}
        if len(diffs) >= 2:
            entry["se"] = float(np.std(diffs, ddof=1) / math.sqrt(len(diffs)))
        out.append(entry)
    return out


def at_positions(series: Sequence[np.ndarray], positions: Sequence[int], window: int) -> list[dict]:
    """NLL / perplexity at each position P, over the streams at least P frames long.

    local: mean over [P − window, P); cumulative: mean over [0, P) (= the perplexity of a stream of
    length P evaluated in one stateful pass). Positions no stream reaches are skipped.
    """
    longest = max((len(s) for s in series), default=0)
    out = []
    for p in positions:
        reaching = [s for s in series if len(s) >= p]
        if not reaching:
            out.append({"position": p, "skipped": f"no stream reaches {p} frames (longest: {longest})"})
            continue
        lo = max(0, p - window)
        out.append({"position": p,
                    "local": _entry(*_mean(reaching, lo, p), len(reaching), window=[lo, p]),
                    "cumulative": _entry(*_mean(reaching, 0, p), len(reaching))})
    return out


def log_slope(series: Sequence[np.ndarray], bin_frames: int, start: int = 0) -> dict:
    """Mean over streams of the least-squares slope of binned NLL against ln(frame), bins from `start`.

    Negative = NLL keeps falling as context grows. In nats per e-fold of position (× ln 2 per
    doubling). A stream needs at least 3 bins with data after `start`.
    """
    slopes = []
    for s in series:
        xs, ys = [], []
        for lo in range(start, len(s), bin_frames):
            part = s[lo:lo + bin_frames]
            ok = ~np.isnan(part)
            if ok.any():
                xs.append(math.log(lo + (len(part) + 1) / 2))
                ys.append(float(part[ok].mean()))
        if len(xs) >= 3:
            slopes.append(float(np.polyfit(xs, ys, 1)[0]))
    if not slopes:
        return {"skipped": f"no stream has 3 bins of {bin_frames} frames from frame {start}"}
    mean = float(np.mean(slopes))
    return {"slope": mean, "per_doubling": mean * math.log(2), "from_frame": start, "n_streams": len(slopes)}


def context_gain(series: Sequence[np.ndarray], window: int) -> dict:
    """Mean over streams of (mean NLL of the first `window` frames − of the last `window` frames).

    Positive = the model predicts better late in a stream. Streams shorter than 2 × window are left
    out (counted)."""
    gains, early_all, late_all = [], [], []
    for s in series:
        if len(s) < 2 * window:
            continue
        early, n_early = _mean([s], 0, window)
        late, n_late = _mean([s], len(s) - window, len(s))
        if n_early and n_late:
            gains.append(early - late)
            early_all.append(early)
            late_all.append(late)
    if not gains:
        return {"skipped": f"no stream is {2 * window} frames long (2 x gain_window)"}
    return {"gain": float(np.mean(gains)), "early_nll": float(np.mean(early_all)),
            "late_nll": float(np.mean(late_all)), "window": window, "n_streams": len(gains),
            "n_too_short": len(series) - len(gains)}


def evaluation_lengths(train_window: int, num: int = 20, min_factor: float = 0.5, max_factor: float = 10.0) -> list[int]:
    """`num` lengths (frames) geometrically spaced from min_factor to max_factor × train_window."""
    if num == 1:
        factors = [min_factor]
    else:
        factors = np.geomspace(min_factor, max_factor, num).tolist()
    lengths = [max(1, round(f * train_window)) for f in factors]
    return sorted(set(lengths))


def length_points(series: Sequence[np.ndarray], lengths: Sequence[int], train_window: int, window: int) -> list[dict]:
    """Perplexity at evaluation lengths L: cumulative over [0, L) (stateful, one pass) and local
    (the last `window` frames before L), over the streams at least L frames long; else skipped."""
    out = []
    for entry in at_positions(series, lengths, window):
        entry = {"length": entry.pop("position"), **entry}
        entry["factor"] = entry["length"] / train_window
        out.append(entry)
    return out


def mode_difference(a: StreamNLL, b: StreamNLL) -> dict:
    """Per-position NLL difference of two modes on the frames both scored (a common prefix).

    The modes must score the same positions; only where one run stops earlier (native_max_frames)
    may its last frames lack the predictions of the delayed codebooks.
    """
    T = min(a.frames, b.frames)
    mask_a, mask_b = a.mask[:, :T], b.mask[:, :T]
    short = a.mask if a.frames == T else b.mask
    tail = torch.zeros_like(mask_a)
    for k in range(short.shape[0]):  # the trailing frames a delayed codebook of the shorter run cannot score
        scored = short[k].nonzero()
        tail[k, (int(scored[-1]) + 1 if len(scored) else 0):] = True
    if bool(((mask_a ^ mask_b) & ~tail).any()):
        raise ValueError("the two modes scored different positions (masks differ): the evaluator is broken")
    both = mask_a & mask_b
    diff = (a.nll[:, :T] - b.nll[:, :T]).abs()
    out = {"frames": T, "max_abs": float(diff[both].max()), "mean_abs": float(diff[both].double().mean()),
           "n_tokens": int(both.sum()), "nll_a": float(a.nll[:, :T][both].double().mean()),
           "nll_b": float(b.nll[:, :T][both].double().mean())}
    for name, rows in groups(a.nll.shape[0]).items():
        d = diff[rows][both[rows]]
        out[name] = {"max_abs": float(d.max()), "mean_abs": float(d.double().mean()), "n_tokens": int(d.numel()),
                     "nll_a": float(a.nll[rows, :T][both[rows]].double().mean()),
                     "nll_b": float(b.nll[rows, :T][both[rows]].double().mean())}
    return out


LENGTH_FACTORS = (1.0, 5.0, 10.0)  # the original training system's figures: ppl at 1x, 5x, 10x the window


def length_figures(points: list[dict], factors: Sequence[float] = LENGTH_FACTORS) -> dict:
    """The original training system's length figures from `length_points`, over the reached points
    (those with a cumulative perplexity): perplexity at each factor × the training window, the
    degradation ratio (max / min perplexity) and the best (lowest-perplexity) length.

    A factor on the grid (to 1e-9 relative) takes that point's perplexity. Between two reached points,
    ln(ppl) is interpolated linearly in ln(factor) (the grid is geometric and perplexity curves are
    near-linear in log-log). Never extrapolated: a factor past the last reached point is "not reached",
    one before the first is "below the shortest evaluated length"."""
    reached = sorted((p for p in points if "ppl" in p.get("cumulative", {})), key=lambda p: p["factor"])
    ppl = [p["cumulative"]["ppl"] for p in reached]
    ppl_at = {}
    for f in factors:
        on = [p for p in reached if abs(p["factor"] - f) <= 1e-9 * f]
        pair = next(((a, b) for a, b in zip(reached, reached[1:]) if a["factor"] < f < b["factor"]), None)
        if on:
            entry = {"ppl": on[0]["cumulative"]["ppl"], "interpolated": False}
        elif pair:
            a, b = pair
            ya, yb = math.log(a["cumulative"]["ppl"]), math.log(b["cumulative"]["ppl"])
            t = math.log(f / a["factor"]) / math.log(b["factor"] / a["factor"])
            entry = {"ppl": math.exp(ya + t * (yb - ya)), "interpolated": True, "between": [a["length"], b["length"]]}
        elif reached and f < reached[0]["factor"]:
            entry = {"skipped": f"below the shortest evaluated length {reached[0]['factor']:.3g}x"}
        elif reached:
            last = reached[-1]
            entry = {"skipped": f"not reached: the longest evaluated length some stream reaches is "
                                f"{last['factor']:.3g}x ({last['length']:,} frames)"}
        else:
            entry = {"skipped": "not reached: no evaluated length was reached"}
        ppl_at[f"{f:g}x"] = {"factor": f, **entry}
    ratio = max(ppl) / min(ppl) if len(ppl) >= 2 else {"skipped": f"{len(ppl)} reached length(s): a ratio needs 2"}
    best = min(reached, key=lambda p: p["cumulative"]["ppl"], default=None)
    return {"ppl_at": ppl_at, "degradation_ratio": ratio,
            "best": {"length": best["length"], "factor": best["factor"], "ppl": best["cumulative"]["ppl"]}
            if best else {"skipped": "no evaluated length was reached"}}
