#!/usr/bin/env python
"""Memory per rank: DDP vs FSDP (`distributed: fsdp`) at 1 and 2 ranks, measured; Moshi-7B computed.

Measured: real training runs (`ttt-speech train`, 2 steps, torchrun on gloo for 2 ranks) of a
Moshi-architecture model small enough for a CPU; each run writes memory.json (the bytes every
rank holds of parameters, gradients and AdamW state, and its peak resident memory) after its
first step. Printed: those per rank, and the ratio of gradients + optimizer state to 1 rank
(FSDP's goal <= 0.6 at 2 ranks, DDP ~1).

Computed (--moshi-7b): GiB per GPU of weights + gradients + AdamW state for Moshi-7B's real
architecture (moshi's kwargs, built on the meta device: nothing allocated) patched as
configs/moshi_7b_ttt.yaml, for each `trainable` setting, DDP vs FSDP on 1 / 8 / 16 GPUs — the
table of docs/training.md. --llama: the same for Qwen2.5-7B-Instruct (LLaMA-Omni2's LLM) patched as
configs/qwen2_5_7b_ttt.yaml — the table of docs/llama_omni.md.

    .venv/bin/python scripts/bench_memory.py                # measured (about 2 minutes on 2 cores)
    .venv/bin/python scripts/bench_memory.py --moshi-7b     # only the computed table (seconds)
    .venv/bin/python scripts/bench_memory.py --llama        # only Qwen2.5-7B's computed table (seconds)
    .venv/bin/python scripts/bench_memory.py --out runs/bench/memory.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from bench_ttt import write_results
from ttt_speech.data.synthetic import SynthConfig, write_corpus
from ttt_speech_apps.finetune.config import load_train_config
from ttt_speech_apps.finetune.memory import MOSHI_FINETUNE_PUBLISHED_GB, llama_counts, memory_table, moshi_7b_counts

ROOT = Path(__file__).resolve().parent.parent
# big enough that parameters, not the interpreter, dominate what the counts cover (~24 M parameters)
MODEL = {"name": "tiny", "device": "cpu", "tiny": {"dim": 512, "num_layers": 4, "num_heads": 8, "card": 256,
                                                   "text_card": 512, "context": 32, "depformer_dim": 256,
                                                   "depformer_num_layers": 2}}
RUNS = [("single", 1), ("ddp", 2), ("fsdp", 2)]


def run(root: Path, corpus: dict, trainable: str, strategy: str, world: int) -> dict:
    out = root / f"{trainable}-{strategy}-{world}"
    config = {"model": MODEL, "ttt": {"layer_type": "linear", "mini_batch_size": 8, "gate_init": 0.5},
              "data": {"train_manifest": str(corpus["train"]), "window_frames": 16, "batch_size": 2},
              "trainable": trainable, "distributed": "fsdp" if strategy == "fsdp" else "ddp",
              "optim": {"lr": 1e-4, "schedule": "constant"}, "steps": 2, "log_every": 1,
              "output_dir": str(out), "wandb": {"mode": "disabled"}}
    path = root / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = str(Path(sys.executable).parent / "ttt-speech")
    cmd = [cli, "train", str(path), "--quiet"]
    if world > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world), "--master-port",
               str(29400 + os.getpid() % 500), "--no-python", *cmd]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1",
                                                                     "WANDB_MODE": "disabled"})
    if done.returncode != 0:
        sys.exit(f"bench_memory: {' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    return json.loads((out / "memory.json").read_text())


def measured(trainables: list[str]) -> dict:
    mib = lambda b: f"{b / 2**20:8.2f}"  # noqa: E731
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        corpus = write_corpus(SynthConfig(recordings=4, frames=40, card=256, eval_recordings=0,
                                          eval_frames=None), root / "corpus")
        for trainable in trainables:
            print(f"\n== trainable: {trainable} (MiB per rank; peak = resident memory of the process)")
            print(f"{'run':>12} {'rank':>4} {'params':>8} {'grads':>8} {'optim':>8} {'peak':>8}  (grads+optim) / 1 rank")
            base = None
            for strategy, world in RUNS:
                report = run(root, corpus, trainable, strategy, world)
                results[f"{trainable}/{strategy}x{world}"] = report
                for r in report["ranks"]:
                    held = r["grads"] + r["optimizer"]
                    base = base or held
                    print(f"{strategy + ' x' + str(world):>12} {r['rank']:>4} {mib(r['params'])} {mib(r['grads'])} "
                          f"{mib(r['optimizer'])} {mib(r['peak'])}  {held / base:.2f}")
    return results


def computed(config_name: str, counts_of, title: str) -> dict:
    """The table of configs/<config_name>.yaml's model (`counts_of`: `moshi_7b_counts` / `llama_counts`)."""
    counts = counts_of(load_train_config(ROOT / "configs" / f"{config_name}.yaml"))
    print(f"\n== {title} patched as configs/{config_name}.yaml: GiB per GPU of weights + gradients + AdamW state "
          "(float32 master copies of trainable weights; no activations)")
    print(memory_table(counts))
    return {c.trainable_setting: vars(c) for c in counts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--moshi-7b", action="store_true", help="only the computed Moshi-7B table")
    parser.add_argument("--llama", action="store_true", help="only the computed Qwen2.5-7B (host llama) table")
    parser.add_argument("--trainable", nargs="+", default=["ttt", "full"], help="trainable settings to measure")
    parser.add_argument("--out", type=Path, help="write the figures as JSON")
    args = parser.parse_args()
    if args.llama:
        write_results(args.out, {"qwen2_5_7b": computed("qwen2_5_7b_ttt", llama_counts,
                                                        "Qwen2.5-7B-Instruct (its config.json on the meta device)")})
        return
    results = {"moshi_7b": computed("moshi_7b_ttt", moshi_7b_counts, "Moshi-7B (moshi's kwargs on the meta device)")}
    print("moshi-finetune's published peak per GPU (LoRA, with activations): "
          + ", ".join(f"{n}xH100 {gb} GB" for n, gb in MOSHI_FINETUNE_PUBLISHED_GB.items()))
    if not args.moshi_7b:
        results["measured"] = measured(args.trainable)
    write_results(args.out, results)


if __name__ == "__main__":
    main()
