"""Watch the TTT state of a patched Llama / Qwen2 model evolve: per layer and call, ‖W‖, ‖W − W₀‖
and the mean inner learning rate, written to a CSV that `plot_monitor` turns into a PNG.

    with TTTMonitor(model, "ttt_state.csv"):
        model.generate(ids, cache=cache, ...)      # one row per TTT layer per forward
                                                   # (transformers 5.23: past_key_values=cache)
    plot_monitor("ttt_state.csv", "ttt_state.png")
    # or: python -m ttt_speech.llama.monitor ttt_state.csv ttt_state.png

Columns: call (forward calls of that layer since the monitor started), layer (decoder layer
index), tokens (tokens the layer has seen in the conversation, i.e. since the cache was made or
reset), w_norm and w_delta (‖W‖ and ‖W − W₀‖ as `ttt_speech.stats` defines them: the Frobenius
norm over all the layer's fast weights, W₀ the initial ones; mean over batch rows), eta_mean
(mean over the call's real tokens, heads and rows of the per-token inner learning rate
λ = base_lr·sigmoid(θ·x + c)/d; token i of a mini-batch steps by τ_i·λ_j).
The fast weights are those at the start of the current mini-batch: W moves every b tokens.
Each row costs a host sync: monitoring is for analysis runs, not for serving.
"""
from __future__ import annotations

import csv
import math
import sys
from pathlib import Path
from typing import Any

from torch import nn

from ..handle import TTTModel
from ..stats import fast_weight_stats
from .cache import TTTCache
from .compat import pick_cache
from .modules import LlamaTTT

FIELDS = ("call", "layer", "tokens", "w_norm", "w_delta", "eta_mean")


class TTTMonitor:
    """Forward hooks on every TTT layer of `model` that append a row per call to `path` (CSV).

    Rows are also kept in `rows` (dicts). Only calls that run with a cache are recorded (the
    patched model always has one unless `use_cache` is off). Use as a context manager or call
    `close()` to remove the hooks and close the file.
    """

    def __init__(self, model: nn.Module, path: str | Path | None = None) -> None:
        self.modules = [site.ttt for site in TTTModel.of(model, "TTTMonitor: the model").sites]
        self.rows: list[dict[str, Any]] = []
        self._calls = {m.layer_idx: 0 for m in self.modules}
        self._file = None
        self._writer = None
        if path is not None:
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = path.open("w", newline="")
            self._writer = csv.DictWriter(self._file, fieldnames=FIELDS)
            self._writer.writeheader()
        self._handles = [m.register_forward_hook(self._record, with_kwargs=True) for m in self.modules]

    def _record(self, module: LlamaTTT, args: tuple, kwargs: dict, output: Any) -> None:
        cache = pick_cache(kwargs.get("cache"), kwargs.get("past_key_values"))
        if not isinstance(cache, TTTCache):
            return
        x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        slot = cache.ttt_slots[module.layer_idx]
        self._calls[module.layer_idx] += 1
        stats = fast_weight_stats(module.layer, slot.state, module.layer.mean_inner_lr(x.detach(), cache.token_mask))
        row = {"call": self._calls[module.layer_idx], "layer": module.layer_idx, "tokens": slot.seen, **stats.to_dict()}
        self.rows.append(row)
        if self._writer is not None:
            self._writer.writerow(row)

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> "TTTMonitor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_monitor(path: str | Path) -> dict[int, dict[str, list[float]]]:
    """A monitor CSV → {layer: {column: values in file order}}."""
    path = Path(path)
    try:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            missing = set(FIELDS) - set(reader.fieldnames or ())
            if missing:
                raise ValueError(f"{path}: not a TTT monitor CSV (missing columns {sorted(missing)})")
            out: dict[int, dict[str, list[float]]] = {}
            for row in reader:
                series = out.setdefault(int(row["layer"]), {k: [] for k in FIELDS if k != "layer"})
                for k in series:
                    series[k].append(float(row[k]))
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e.strerror})") from None
    return out


def plot_monitor(csv_path: str | Path, png_path: str | Path) -> Path:
    """Plot ‖W‖, ‖W − W₀‖ and mean η against tokens seen, one line per layer, into `png_path`.
    A conversation reset shows as tokens falling back; non-finite values are left out, not drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = read_monitor(csv_path)
    if not data:
        raise ValueError(f"{csv_path}: no rows to plot")
    panels = (("w_norm", "‖W‖"), ("w_delta", "‖W − W₀‖"), ("eta_mean", "mean inner lr η"))
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 8), sharex=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (key, label) in zip(axes, panels):
        for n, (layer, series) in enumerate(sorted(data.items())):
            for i, segment in enumerate(_conversations(series["tokens"], series[key])):
                if segment:
                    ax.plot(*zip(*segment), marker=".", linewidth=1, color=colors[n % len(colors)],
                            label=f"layer {layer}" if i == 0 else None)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="small", ncol=4)
    axes[-1].set_xlabel("tokens seen in the conversation")
    fig.suptitle("TTT fast-weight state")
    fig.tight_layout()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return png_path


def _conversations(tokens: list[float], values: list[float]) -> list[list[tuple[float, float]]]:
    """(tokens, value) points split where tokens fall back (a reset: a new conversation), finite only."""
    out: list[list[tuple[float, float]]] = [[]]
    last = -math.inf
    for t, v in zip(tokens, values):
        if t < last:
            out.append([])
        last = t
        if math.isfinite(v):
            out[-1].append((t, v))
    return out


def main(argv: list[str] | None = None) -> int:
    """`python -m ttt_speech.llama.monitor CSV PNG`: plot a monitor CSV."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] in ("-h", "--help"):
        print("usage: python -m ttt_speech.llama.monitor MONITOR_CSV OUTPUT_PNG", file=sys.stderr)
        return 2
    try:
        print(plot_monitor(argv[0], argv[1]))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
