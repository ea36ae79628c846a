"""What evaluation results look like in Weights & Biases (scalars, tables, plots); runs are started
by `ttt_speech.tracking.start_wandb`.

Only imported when wandb is used. Missing values are not logged (wandb would chart them as
numbers); the full report, skipped entries included, is attached as a file.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any


def scalars(report_runs: dict[str, dict]) -> dict[str, float]:
    """Flat {"<run>/<group>/nll@<frame>": value, ...} of every reported number (skipped ones left out)."""
    out: dict[str, float] = {}
    for run, r in report_runs.items():
        speed = r.get("speed") or {}
        for key in ("frames_per_s", "tokens_per_s"):
            if speed.get(key) is not None:
                out[f"{run}/{key}"] = speed[key]
        if (r.get("memory") or {}).get("peak_bytes") is not None:
            out[f"{run}/peak_memory_mib"] = r["memory"]["peak_bytes"] / 2**20
        for group, g in r["groups"].items():
            for p in g.get("positions", []):
                for kind in ("local", "cumulative"):
                    if "nll" in p.get(kind, {}):
                        out[f"{run}/{group}/{kind}_nll@{p['position']}"] = p[kind]["nll"]
            for p in g.get("length_gen", {}).get("points", []):
                if "nll" in p.get("cumulative", {}):
                    out[f"{run}/{group}/length_gen_ppl@{p['factor']:.2f}x"] = p["cumulative"]["ppl"]
            for key, field in (("slope", "slope"), ("slope_beyond_window", "slope"), ("context_gain", "gain")):
                if field in g.get(key, {}):
                    out[f"{run}/{group}/{key}"] = g[key][field]
    return out


def log_results(run, report_runs: dict[str, dict], images: dict[str, Path], files: list[Path] = ()) -> None:
    """Log summary scalars, the length-generalisation table, the PNG plots and the report files."""
    import wandb

    values = scalars(report_runs)
    run.summary.update(values)
    payload: dict[str, Any] = {name: wandb.Image(str(path)) for name, path in images.items()}
    rows = []
    for name, r in report_runs.items():
        for group, g in r["groups"].items():
            for p in g.get("length_gen", {}).get("points", []):
                if "nll" in p.get("cumulative", {}):
                    rows.append([name, group, p["length"], p["factor"], p["cumulative"]["nll"], p["cumulative"]["ppl"]])
    if rows:
        payload["length_gen"] = wandb.Table(columns=["run", "group", "length", "factor", "nll", "ppl"], data=rows)
    run.log(payload)
    for path in files:
        run.save(str(path), base_path=str(Path(path).parent), policy="now")
