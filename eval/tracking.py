"""What evaluation results look like in Weights & Biases (scalars, tables, plots); runs are started
by `ttt_speech.tracking.start_wandb`.

Only imported when wandb is used. Missing values are not logged (wandb would chart them as
numbers); the full report, skipped entries included, is attached as a file.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Sequence

from .memory import informative_peaks

logger = logging.getLogger(__name__)


def scalars(report_runs: dict[str, dict], prefix: str = "eval", left_out: Sequence[str] = ()) -> dict[str, float]:
    """Flat {"<prefix>/<run>/<group>/<kind>_nll@<frame>": value, ...} of every reported number (skipped
    ones and the `left_out` groups, which carry no information, are not logged)."""
    out: dict[str, float] = {}
    for run, r in report_runs.items():
        key = f"{prefix}/{run}"
        speed = r.get("speed") or {}
        for name in ("frames_per_s", "tokens_per_s"):
            if speed.get(name) is not None:
                out[f"{key}/{name}"] = speed[name]
        memory = r.get("memory") or {}
        if informative_peaks([memory.get("peak_bytes")], memory.get("kind", "")):  # as the report shows it
            out[f"{key}/peak_memory_mib"] = memory["peak_bytes"] / 2**20
        for group, g in r["groups"].items():
            if group in left_out:
                continue
            for p in g.get("positions", []):
                for kind in ("local", "cumulative"):
                    if "nll" in p.get(kind, {}):
                        out[f"{key}/{group}/{kind}_nll@{p['position']}"] = p[kind]["nll"]
            for p in g.get("length_gen", {}).get("points", []):
                if "nll" in p.get("cumulative", {}):
                    out[f"{key}/{group}/ppl@{p['factor']:.2f}x"] = p["cumulative"]["ppl"]
            for name, field in (("slope", "slope"), ("slope_beyond_window", "slope"), ("context_gain", "gain")):
                if field in g.get(name, {}):
                    out[f"{key}/{group}/{name}"] = g[name][field]
    return out


def memory_scalars(report: dict) -> dict[str, float]:
    """Flat {"memory/<model>/<group>/<pass>_nll": value, ".../delta", ".../delta_in_context"} of a memory
    report (passes without scored frames are not logged)."""
    out: dict[str, float] = {}
    for model, r in report["results"].items():
        for group, g in r["groups"].items():
            key = f"memory/{model}/{group}"
            for name in ("pre", "post", "post_in_context"):
                if "nll" in g[name]:
                    out[f"{key}/{name}_nll"] = g[name]["nll"]
            for name in ("delta", "delta_in_context"):
                if isinstance(g[name], float):
                    out[f"{key}/{name}"] = g[name]
    return out


def log_memory(run, report: dict, paths: dict[str, Path]) -> None:
    """`eval memory`'s summary scalars, its plot (`memory/plots/memory`) and memory.json / .md; a
    failure is a warning."""
    def log() -> None:
        import wandb

        run.summary.update(memory_scalars(report))
        if "png" in paths:
            run.log({"memory/plots/memory": wandb.Image(str(paths["png"]))})
        for path in (paths["json"], paths["markdown"]):
            run.save(str(path), base_path=str(Path(path).parent), policy="now")

    _warn_on_failure(log)


def log_results(run, report_runs: dict[str, dict], images: dict[str, Path], files: Sequence[Path] = (),
                prefix: str = "eval", left_out: Sequence[str] = ()) -> None:
    """Log the summary scalars, the PNG plots (`<prefix>/plots/<name>`), the length-generalisation
    table (`<prefix>/tables/length_gen`: a table never shares a key with an image) and the report
    files; a failure is a warning (the reports are on disk already)."""
    _warn_on_failure(lambda: _log_results(run, report_runs, images, files, prefix, left_out))


def _warn_on_failure(log: Callable[[], None]) -> None:
    """`log()`; a failure is a warning: a tracker must not fail an evaluation whose reports are on disk."""
    try:
        log()
    except Exception as e:  # noqa: BLE001 - see the docstring
        logger.warning("wandb failed to log the results (%s); they are in the output folder",
                       str(e).splitlines()[0] if str(e) else e)


def _log_results(run, report_runs: dict[str, dict], images: dict[str, Path], files: Sequence[Path], prefix: str,
                 left_out: Sequence[str]) -> None:
    import wandb

    run.summary.update(scalars(report_runs, prefix, left_out))
    payload: dict[str, Any] = {f"{prefix}/plots/{name}": wandb.Image(str(path)) for name, path in images.items()}
    rows = []
    for name, r in report_runs.items():
        for group, g in r["groups"].items():
            if group in left_out:
                continue
            for p in g.get("length_gen", {}).get("points", []):
                if "nll" in p.get("cumulative", {}):
                    rows.append([name, group, p["length"], p["factor"], p["cumulative"]["nll"], p["cumulative"]["ppl"],
                                 p["cumulative"]["n_streams"]])
    if rows:
        payload[f"{prefix}/tables/length_gen"] = wandb.Table(
            columns=["run", "group", "length", "factor", "nll", "ppl", "streams"], data=rows)
    run.log(payload)
    for path in files:
        run.save(str(path), base_path=str(Path(path).parent), policy="now")
