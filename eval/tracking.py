"""What evaluation results look like in Weights & Biases (scalars, tables, plots); runs are started
by `ttt_speech.tracking.start_wandb`.

Only imported when wandb is used. Missing values are not logged (wandb would chart them as
numbers); the full report, skipped entries included, is attached as a file.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence


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
        if (r.get("memory") or {}).get("peak_bytes"):
            out[f"{key}/peak_memory_mib"] = r["memory"]["peak_bytes"] / 2**20
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


def log_results(run, report_runs: dict[str, dict], images: dict[str, Path], files: Sequence[Path] = (),
                prefix: str = "eval", left_out: Sequence[str] = ()) -> None:
    """Log the summary scalars, the PNG plots (`<prefix>/plots/<name>`), the length-generalisation
    table (`<prefix>/tables/length_gen`: a table never shares a key with an image) and the report files."""
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
