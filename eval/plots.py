"""PNG plots of an evaluation report (matplotlib, Agg backend), written atomically.

Each function takes the JSON-ready report pieces (see `report.py`), so plots can be redrawn from
a saved report.json.
"""
from __future__ import annotations

from pathlib import Path

from ttt_speech.data import FRAME_RATE
from ttt_speech.figures import pyplot, run_colours, save_figure


LOG_X_FROM = 100  # frames: streams at least this long are drawn on a log-x axis (positions span decades)
MAX_LAYER_LEGEND = 8  # more TTT layers than this are coloured along a colour bar instead of a legend
MODE_STYLE = {"chunked": "-", "native": "--"}


def _style(run_name: str, colours: dict[str, str]) -> dict:
    model, _, mode = run_name.partition("/")
    return {"color": colours[model], "ls": MODE_STYLE.get(mode, "-")}


def _markers(ax, markers: dict, log_x: bool = False) -> None:
    """Vertical lines at the training window and the attention context (in frames)."""
    shift = 1 if log_x else 0  # log-x axes plot frame t at t + 1
    if markers.get("train_window"):
        ax.axvline(markers["train_window"] + shift, color="k", ls="--", lw=1, label="training window")
    if markers.get("attention_context"):
        ax.axvline(markers["attention_context"] + shift, color="gray", ls=":", lw=1, label="attention context")


def _position_axis(ax, longest: int, log_x: bool, frames: bool = True, time: bool = True) -> None:
    """x axis in frames (log when positions span decades; `frames`: labelled) and, with `time`,
    seconds or minutes on a second axis along the top."""
    if log_x:
        ax.set_xscale("log")
        ax.set_xlim(1, longest + 1)
    if frames:
        ax.set_xlabel(f"position (frames{' + 1' if log_x else ''}, {FRAME_RATE:g} per second)")
    if time:
        unit, per = ("minutes", 60 * FRAME_RATE) if longest >= 120 * FRAME_RATE else ("seconds", FRAME_RATE)
        second = ax.secondary_xaxis("top", functions=(lambda f: f / per, lambda m: m * per))
        second.set_xlabel(unit, fontsize=8)
        second.tick_params(labelsize=7)
        if log_x:  # plain numbers (0.1, 1, 10), not 10^k, and no labelled minor ticks
            from matplotlib import ticker

            second.xaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
            second.xaxis.set_minor_formatter(ticker.NullFormatter())


def _x(bins: list[dict], log_x: bool) -> list[float]:
    """Bin centres: geometric (in frame + 1) on log axes, arithmetic on linear ones."""
    if log_x:
        return [((b["start"] + 1) * b["stop"]) ** 0.5 for b in bins]
    return [(b["start"] + b["stop"]) / 2 for b in bins]


def _footnotes(fig, notes: list[str]) -> None:
    if notes:
        fig.text(0.01, 0, "\n".join(notes), fontsize=7.5, va="top", ha="left")


def plot_curves(runs: dict[str, dict], group_labels: dict[str, str], markers: dict, path: str | Path,
                differences: dict[str, dict[str, dict]] | None = None, notes: list[str] = (),
                labels: dict[str, str] | None = None) -> Path:
    """NLL against position, one column per group (only `group_labels`' groups), one line per run with
    the spread across streams as a band (25-75 %); with `differences` ({model: {mode: baseline_difference}})
    a second row shows model − baseline with ±1 standard error across streams.

    labels: legend name of each run (default: its name); notes: footnotes (subsets, groups left out)."""
    plt = pyplot()
    groups = list(group_labels)
    labels = labels or {n: n for n in runs}
    colours = run_colours(list(runs))
    longest = max((b["stop"] for r in runs.values() for g in groups for b in r["groups"][g]["curve"]), default=0)
    log_x = longest >= LOG_X_FROM
    key = "curve_log" if log_x else "curve"
    rows = 2 if differences else 1
    fig, axes = plt.subplots(rows, len(groups), figsize=(4.6 * len(groups) + 0.6, 3.4 * rows + 0.4), squeeze=False,
                             sharex=True, layout="constrained")
    for col, group in enumerate(groups):
        ax = axes[0, col]
        for run_name, run in runs.items():
            curve = run["groups"][group].get(key) or run["groups"][group]["curve"]
            if not curve:
                continue
            x = _x(curve, log_x)
            ax.plot(x, [b["nll"] for b in curve], lw=1.4, label=labels[run_name], **_style(run_name, colours))
            band = [b for b in curve if "q25" in b]
            if band:
                ax.fill_between(_x(band, log_x), [b["q25"] for b in band], [b["q75"] for b in band],
                                color=colours[run_name.split("/")[0]], alpha=0.12, lw=0)
        _markers(ax, markers, log_x)
        ax.set_title(group_labels[group], fontsize=10)
        ax.grid(alpha=0.3, which="both" if log_x else "major")
        _position_axis(ax, longest, log_x, frames=rows == 1)
        if col == 0:
            ax.set_ylabel("NLL (nats per token)")
        if differences:
            ax = axes[1, col]
            for model, per_mode in differences.items():
                for mode, diff in per_mode.items():
                    bins = diff["curve"].get(group, [])
                    if not bins:
                        continue
                    name = f"{model}/{mode}"
                    ax.plot(_x(bins, log_x), [b["diff"] for b in bins], lw=1.4, label=f"{labels.get(name, name)} − baseline",
                            **_style(name, colours))
                    band = [b for b in bins if "se" in b]
                    if band:
                        ax.fill_between(_x(band, log_x), [b["diff"] - b["se"] for b in band],
                                        [b["diff"] + b["se"] for b in band], color=colours[model], alpha=0.15, lw=0)
            ax.axhline(0, color="k", lw=0.8)
            _markers(ax, markers, log_x)
            ax.grid(alpha=0.3, which="both" if log_x else "major")
            _position_axis(ax, longest, log_x, time=False)
            if col == 0:
                ax.set_ylabel("Δ NLL vs baseline (nats)\nnegative: better")
    handles = {}
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    fig.legend(handles.values(), handles.keys(), loc="outside right upper", fontsize=8)
    band = ("bands: 25-75 % of the streams' bin means" +
            ("; Δ: ±1 standard error across streams" if differences else ""))
    fig.suptitle(f"Teacher-forced NLL vs position ({'log-spaced bins' if log_x else 'binned'})", fontsize=11)
    _footnotes(fig, [band, *notes])
    return save_figure(fig, path)


def plot_length_gen(points: dict[str, dict[str, list[dict]]], group_labels: dict[str, str], train_window: int,
                    path: str | Path, labels: dict[str, str] | None = None, notes: list[str] = (),
                    unit: str = "frames") -> Path:
    """Perplexity (cumulative over [0, L)) against L / training window; lengths no stream reaches are absent.

    points[run][group]: the entries of `metrics.length_points`; only `group_labels`' groups are drawn.
    unit: what a position is ("tokens" for a text LM's streams)."""
    plt = pyplot()
    from matplotlib import ticker

    groups = list(group_labels)
    labels = labels or {n: n for n in points}
    colours = run_colours(list(points))
    max_factor = max((p["factor"] for per_group in points.values() for ps in per_group.values() for p in ps), default=10)
    fig, axes = plt.subplots(1, len(groups), figsize=(4.4 * len(groups) + 0.6, 3.9), squeeze=False,
                             layout="constrained")
    for ax, group in zip(axes[0], groups):
        drops: dict[float, int] = {}
        for run_name, per_group in points.items():
            ok = [p for p in per_group.get(group, []) if "ppl" in p.get("cumulative", {})]
            if ok:
                ax.plot([p["factor"] for p in ok], [p["cumulative"]["ppl"] for p in ok], marker="o", ms=3,
                        label=labels[run_name], **_style(run_name, colours))
                for prev, p in zip(ok, ok[1:]):
                    if p["cumulative"]["n_streams"] != prev["cumulative"]["n_streams"]:
                        drops[p["factor"]] = p["cumulative"]["n_streams"]
        # each point is a mean over the streams at least L long: where that set shrinks, a jump is a change
        # of streams, not of context
        for factor, n in sorted(drops.items()):
            ax.axvline(factor, color="0.55", ls="-.", lw=0.8)
            ax.text(factor, 1.0, f" {n} stream{'s' * (n != 1)}", transform=ax.get_xaxis_transform(), fontsize=7,
                    color="0.35", va="top", ha="left")
        ax.axvline(1.0, color="k", ls="--", lw=1, label="training window")
        ax.set_xscale("log")
        ax.set_xticks([t for t in (0.5, 1, 2, 5, 10, 20, 50) if t <= max_factor * 1.01] or [1])
        ax.xaxis.set_major_formatter(ticker.FormatStrFormatter("%gx"))
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_xlabel(f"evaluation length / training window ({train_window} {unit})")
        ax.set_title(group_labels[group], fontsize=10)
        ax.grid(alpha=0.3, which="both")
    axes[0, 0].set_ylabel(f"perplexity of the first L {unit}")
    handles, names = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside right upper", fontsize=8)
    fig.suptitle("Length generalisation (one stateful pass per stream)", fontsize=11)
    _footnotes(fig, [f"each point: mean over the streams at least L {unit} long", *notes])
    return save_figure(fig, path)


def plot_fast_weights(traces: dict[str, dict], markers: dict, path: str | Path) -> Path:
    """‖W_t − W_0‖ per TTT layer along the longest stream of each run (one panel per run)."""
    plt = pyplot()
    from matplotlib import cm, colors

    longest = max((t["positions"][-1] for t in traces.values() if t["positions"]), default=0)
    log_x = longest >= LOG_X_FROM
    fig, axes = plt.subplots(len(traces), 1, figsize=(8.5, 2.9 * len(traces) + 0.5), squeeze=False, sharex=True,
                             layout="constrained")
    for i, (ax, (run_name, trace)) in enumerate(zip(axes[:, 0], traces.items())):
        layers = trace["layers"]
        many = len(layers) > MAX_LAYER_LEGEND
        norm = colors.Normalize(min(lay["layer"] for lay in layers), max(lay["layer"] for lay in layers))
        for lay in layers:
            ax.plot([p + 1 if log_x else p for p in trace["positions"]], lay["distance"], lw=1.2,
                    color=cm.viridis(norm(lay["layer"])) if many else None, label=f"layer {lay['layer']}")
        _markers(ax, markers, log_x)
        ax.set_title(f"{run_name} on {Path(trace['stream']).name}", fontsize=9, loc="left")
        ax.set_ylabel("‖W_t − W_0‖")
        ax.grid(alpha=0.3)
        _position_axis(ax, longest, log_x, frames=i == len(traces) - 1, time=i == 0)
        if log_x and trace["positions"]:  # traces start after the first chunk: start the axis there (or at a mark)
            first = min([trace["positions"][0], *(m for m in markers.values() if m)])
            ax.set_xlim(first + 1, longest + 1)
        if many:
            fig.colorbar(cm.ScalarMappable(norm=norm, cmap="viridis"), ax=ax, label="layer", pad=0.01)
        else:
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.suptitle("Distance of the TTT fast weights from their initial values", fontsize=11)
    return save_figure(fig, path)


def plot_inner_loop(grid: dict[str, dict], runs: dict[str, dict], group_labels: dict[str, str], markers: dict,
                    path: str | Path, labels: dict[str, str] | None = None) -> Path:
    """The inner-loop grid in one figure: NLL against position per shown group (top row, one line per
    run of `grid`, legend with each run's b and base_lr) and ‖W_t − W_0‖ (mean over layers, longest
    traced stream) against position (bottom row)."""
    plt = pyplot()
    groups = list(group_labels)
    labels = labels or {n: n for n in grid}
    names = list(grid)
    colours = run_colours(names)
    longest = max((b["stop"] for n in names for g in groups for b in runs[n]["groups"][g]["curve"]), default=0)
    log_x = longest >= LOG_X_FROM
    key = "curve_log" if log_x else "curve"
    fig, axes = plt.subplots(2, len(groups), figsize=(4.6 * len(groups) + 2.8, 6.6), squeeze=False, sharex=True,
                             layout="constrained")
    legend = {n: f"{labels[n]} (b={grid[n]['mini_batch_size']}, lr {grid[n]['base_lr']:.3g})" for n in names}
    for col, group in enumerate(groups):
        ax = axes[0, col]
        for n in names:
            curve = runs[n]["groups"][group].get(key) or runs[n]["groups"][group]["curve"]
            if curve:
                ax.plot(_x(curve, log_x), [b["nll"] for b in curve], lw=1.4, label=legend[n], **_style(n, colours))
        _markers(ax, markers, log_x)
        ax.set_title(group_labels[group], fontsize=10)
        ax.grid(alpha=0.3, which="both" if log_x else "major")
        _position_axis(ax, longest, log_x, frames=False)
        if col == 0:
            ax.set_ylabel("NLL (nats per token)")
        ax = axes[1, col]
        if col == 0:
            for n in names:
                traces = [t for t in runs[n]["fast_weights"] or [] if t["positions"]]
                if not traces:
                    continue
                trace = max(traces, key=lambda t: t["positions"][-1])
                mean = [sum(values) / len(values) for values in zip(*(lay["distance"] for lay in trace["layers"]))]
                ax.plot([p + 1 if log_x else p for p in trace["positions"]], mean, lw=1.4, label=legend[n],
                        **_style(n, colours))
            ax.set_ylabel("‖W_t − W_0‖ (mean over layers)")
            ax.grid(alpha=0.3, which="both" if log_x else "major")
            _position_axis(ax, longest, log_x, time=False)
        else:
            ax.axis("off")
    axes[0, -1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.suptitle("Inner-loop grid: the trained TTT model under other inner loops, same streams", fontsize=11)
    return save_figure(fig, path)
