"""`ttt-speech demo`: the whole mission on a CPU in minutes (orchestration only).

1. write the synthetic long-context corpus (`ttt_speech.data.synthetic`);
2. fine-tune the TTT model and the baseline (the same recipe with `ttt: null`) with persistent
   state, side by side (the training app, one process and one CPU thread each);
3. evaluate both on held-out streams far longer than the training window, in chunked and native
   (`LMGen.step`) modes (the `eval.librilight.LibriLight` probe with `baseline_export`);
4. run the audio path on the LibriVox fixture (real speech → Mimi → both modes) when available;
5. print one comparison table and write demo.md / demo.json next to the evaluation's report.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import yaml

from ttt_speech import schema
from ttt_speech.files import writable_dir, write_text_atomic
from ttt_speech.tracking import WandbConfig
from ttt_speech_apps.eval.config import DataConfig, EvalConfig
from ttt_speech_apps.finetune.config import TrainConfig
from ttt_speech_apps.finetune.plots import LOSS_PLOT, plot_loss, read_history

from .config import DemoConfig
from .summary import audio_summary, comparison, render_markdown, render_terminal

MARKER = ".ttt-speech-demo"
PARTS = ("corpus", "ttt", "baseline", "eval", "audio", "cache")


def prepare_output(out: Path) -> None:
    """A fresh demo folder: refuse a non-empty folder the demo did not make; clear an old demo's parts."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"output_dir: {out} is a file, expected a folder")
    if out.exists() and any(out.iterdir()) and not (out / MARKER).exists():
        raise ValueError(f"output_dir: {out} exists and is not a demo folder (no {MARKER}); choose another")
    for part in PARTS:
        if (out / part).exists():
            shutil.rmtree(out / part)
    writable_dir(out, "output_dir")
    (out / MARKER).write_text("made by `ttt-speech demo`; its subfolders are replaced on the next run\n")


def train_configs(config: DemoConfig, train_manifest: Path, eval_manifest: Path) -> dict[str, TrainConfig]:
    """The TTT run and the baseline run: the same `train` section, the baseline with `ttt: null`; both
    report a held-out loss on the corpus's held-out recordings (`eval_every`, `eval_frames`)."""
    out = config.output_dir
    data = replace(config.train.data, train_manifest=train_manifest, eval_manifest=eval_manifest)
    ttt = replace(config.train, data=data, output_dir=out / "ttt")
    base = schema.to_dict(replace(ttt, output_dir=out / "baseline"))
    base["ttt"] = None
    return {"ttt": ttt, "baseline": schema.from_dict(TrainConfig, base, "train (baseline)")}


def _steps_done(run_dir: Path) -> int:
    """The last logged step of a training run in progress (its last line may be half-written)."""
    rows = read_history(run_dir)
    return rows[-1]["step"] if rows else 0


def train_side_by_side(configs: dict[str, Path], runs: dict[str, TrainConfig], progress: bool) -> dict[str, float]:
    """`python -m ttt_speech_apps.finetune` per config, in parallel, one CPU thread each; returns
    seconds per run."""
    from ttt_speech.progress import progress_bar

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    procs, logs, bars, start = {}, {}, {}, time.perf_counter()
    seconds: dict[str, float] = {}
    try:
        for i, (name, path) in enumerate(configs.items()):
            run_dir = runs[name].output_dir
            run_dir.mkdir(parents=True, exist_ok=True)
            logs[name] = open(run_dir / "train.log", "w")
            procs[name] = subprocess.Popen([sys.executable, "-m", "ttt_speech_apps.finetune", str(path), "--quiet"],
                                           stdout=logs[name], stderr=subprocess.STDOUT, env=env)
            bars[name] = progress_bar(total=runs[name].steps, desc=f"train {name:8s}", unit="step", position=i,
                                      enabled=progress)
        while len(seconds) < len(procs):
            time.sleep(0.5)
            for name, proc in procs.items():
                if name in seconds:
                    continue
                done = _steps_done(runs[name].output_dir)
                bars[name].update(done - bars[name].n)
                code = proc.poll()
                if code is None:
                    continue
                seconds[name] = time.perf_counter() - start
                if code != 0:
                    log = runs[name].output_dir / "train.log"
                    tail = log.read_text().strip().splitlines()[-1:] or ["(empty log)"]
                    raise RuntimeError(f"training the {name} model failed (exit {code}): {tail[0]} [see {log}]")
                bars[name].update(runs[name].steps - bars[name].n)
    finally:
        for name, proc in procs.items():
            if proc.poll() is None:
                proc.terminate()
                proc.wait()
            logs[name].close()
        for bar in bars.values():
            bar.close()
    return seconds


def train_one_after_the_other(runs: dict[str, TrainConfig], progress: bool) -> dict[str, float]:
    from ttt_speech_apps.finetune.train import train

    seconds = {}
    for name, run in runs.items():
        start = time.perf_counter()
        train(run, progress=progress)
        seconds[name] = time.perf_counter() - start
    return seconds


def eval_config(config: DemoConfig, eval_manifest: Path) -> EvalConfig:
    out = config.output_dir
    return EvalConfig(model=None, export=out / "ttt" / "export", baseline_export=out / "baseline" / "export",
                      data=DataConfig(manifest=eval_manifest, max_frames=config.eval_max_frames,
                                      codes_cache=out / "cache"),
                      eval=config.eval, output_dir=out / "eval", wandb=WandbConfig(mode="disabled"))


def audio_check(config: DemoConfig, progress: bool) -> dict:
    """Real LibriVox speech through the random-init Mimi and both evaluation modes (fresh TTT layers):
    the audio path works and the modes agree; the NLLs themselves mean nothing (random model)."""
    from ttt_speech.models import ModelConfig
    from ttt_speech_apps.eval import fixture
    from ttt_speech_apps.eval.librilight import LibriLight
    from ttt_speech_apps.eval.pipeline import evaluate

    if not config.audio.enabled:
        return {"skipped": "audio.enabled is false"}
    if not fixture.SOURCE.is_dir():
        return {"skipped": f"{fixture.SOURCE} not found (apt-get install pocketsphinx-testdata)"}
    out = config.output_dir / "audio"
    info = fixture.make_fixture(out / "librilight", synthetic_books=1, synthetic_seconds=config.audio.synthetic_seconds,
                                chapters=2, corrupt=True)
    model = config.train.model
    tiny = {k: v for k, v in model.tiny.items() if k != "card"}  # Mimi's own codebook size (2048)
    settings = replace(config.eval, native_max_frames=config.audio.native_max_frames, native_max_streams=None,
                       positions=[config.audio.max_frames], baseline=False, train_window=None)
    evaluation = EvalConfig(model=ModelConfig(name="tiny", tiny=tiny, seed=model.seed, device=model.device),
                            ttt=config.train.ttt,
                            data=DataConfig(root=out / "librilight", max_frames=config.audio.max_frames,
                                            codes_cache=config.output_dir / "cache"),
                            eval=settings, output_dir=out, wandb=WandbConfig(mode="disabled"))
    result, paths = evaluate(LibriLight(evaluation), progress=progress)
    return {"fixture": info, "report": result.report, "paths": {k: str(v) for k, v in paths.items()}}


def run_demo(config: DemoConfig, progress: bool = True, say: Callable[[str], None] = print) -> dict:
    """The whole demo; returns the summary written to demo.json."""
    from ttt_speech.data.synthetic import write_corpus
    from ttt_speech_apps.eval.librilight import LibriLight
    from ttt_speech_apps.eval.pipeline import evaluate

    out = config.output_dir
    prepare_output(out)
    timings, start = {}, time.perf_counter()

    say(f"[1/4] synthetic corpus: {config.corpus.recordings:,} recordings -> {out / 'corpus'}")
    t = time.perf_counter()
    files = write_corpus(config.corpus, out / "corpus", progress=progress)
    timings["corpus"] = time.perf_counter() - t

    runs = train_configs(config, files["train"], files["eval"])
    paths = {}
    for name, run in runs.items():
        paths[name] = out / f"{name}.yaml"
        write_text_atomic(paths[name], yaml.safe_dump(schema.to_dict(run), sort_keys=False))
    how = "side by side, one CPU thread each" if config.parallel else "one after the other"
    say(f"[2/4] fine-tuning the TTT model and the baseline ({config.train.steps} steps each, {how}; "
        f"configs {paths['ttt']}, {paths['baseline']})")
    t = time.perf_counter()
    train_seconds = (train_side_by_side(paths, runs, progress) if config.parallel
                     else train_one_after_the_other(runs, progress))
    timings["training"] = time.perf_counter() - t
    loss_plot = plot_loss({name: read_history(run.output_dir) for name, run in runs.items()}, out / LOSS_PLOT,
                          "Training loss: TTT vs baseline (the same recipe without TTT)")

    evaluation = eval_config(config, files["eval"])
    write_text_atomic(out / "eval.yaml", yaml.safe_dump(schema.to_dict(evaluation), sort_keys=False))
    say(f"[3/4] evaluating both on {config.corpus.eval_recordings} held-out streams of up to "
        f"{config.eval_max_frames:,} frames ({config.eval.mode} mode; config {out / 'eval.yaml'})")
    t = time.perf_counter()
    result, eval_paths = evaluate(LibriLight(evaluation), progress=progress)
    report = result.report
    timings["evaluation"] = time.perf_counter() - t

    say("[4/4] audio path: LibriVox fixture -> Mimi codes -> chunked and native modes")
    t = time.perf_counter()
    audio = audio_check(config, progress)
    timings["audio"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - start

    summary = comparison(report, config, {**eval_paths, "loss": loss_plot}, train_seconds, timings,
                         audio_summary(audio))
    summary["files"] = {"demo.md": str(out / "demo.md"), "demo.json": str(out / "demo.json"),
                        **{k: str(v) for k, v in eval_paths.items()}, **({"loss": str(loss_plot)} if loss_plot else {}),
                        "ttt run": str(out / "ttt"), "baseline run": str(out / "baseline")}
    write_text_atomic(out / "demo.md", render_markdown(summary))
    write_text_atomic(out / "demo.json", json.dumps(summary, indent=1, allow_nan=False) + "\n")
    say("")
    say(render_terminal(summary))
    return summary
