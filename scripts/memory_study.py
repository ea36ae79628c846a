#!/usr/bin/env python
"""The memory study of docs/e2e.md: four models trained alike, then `ttt-speech eval memory`.

The demo's corpus and recipe (configs/demo.yaml): a tiny random-init Moshi-architecture model
(dim 64, 2 layers, attention context 8) trained for `--steps` steps four times, side by side
(one CPU thread each): the baseline (no TTT), TTT-Linear and TTT-MLP (hybrid, every layer) and
TTT-E2E (e2e_mlp in the last quarter of layers, `trainable: e2e-meta`). Then the memory test on
the held-out recordings: NLL of each recording's first `--segment` frames before and after
test-time training on them (docs/evaluation.md, "Memory test").

    .venv/bin/python scripts/memory_study.py                       # ~16 minutes on 2 CPU cores
    .venv/bin/python scripts/memory_study.py --steps 20 --output-dir runs/memory_smoke   # a smoke run
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import yaml

from ttt_speech import schema
from ttt_speech.files import write_text_atomic
from ttt_speech.data.synthetic import write_corpus
from ttt_speech_apps.demo.config import load_demo_config
from ttt_speech_apps.demo.run import train_side_by_side
from ttt_speech_apps.eval.config import DataConfig
from ttt_speech_apps.eval.memory_probe import Memory, MemoryConfig, MemoryModel
from ttt_speech_apps.eval.pipeline import evaluate
from ttt_speech_apps.finetune.config import TrainConfig

FLAVOURS = {  # name → overrides of the demo's `train` section
    "baseline": ["ttt=null"],
    "ttt-linear": [],
    "ttt-mlp": ["ttt.layer_type=mlp", "ttt.base_lr=null"],
    "e2e": ["ttt.layer_type=e2e_mlp", "ttt.base_lr=null", "ttt.layers=null", "trainable=e2e-meta"],
}


def train_config(recipe: dict, name: str, out: Path, steps: int, manifest: Path) -> TrainConfig:
    data = schema.apply_overrides(copy.deepcopy(recipe), [
        *FLAVOURS[name], f"steps={steps}", f"output_dir={out / name}", f"data.train_manifest={manifest}",
        "data.eval_manifest=null"])
    return schema.from_dict(TrainConfig, data, f"train ({name})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo.yaml", help="demo config giving the corpus and recipe")
    parser.add_argument("--output-dir", type=Path, default=Path("runs/memory"), help="folder of everything written")
    parser.add_argument("--steps", type=int, default=1000, help="training steps per model (default 1000)")
    parser.add_argument("--segment", type=int, default=256, help="segment frames S (default 256)")
    parser.add_argument("--seed", type=int, default=0, help="corpus, data-order and init seed")
    args = parser.parse_args()
    demo = load_demo_config(args.config, [f"corpus.seed={args.seed}", f"train.seed={args.seed}",
                                          f"train.model.seed={args.seed}"])
    out = args.output_dir
    start = time.perf_counter()
    files = write_corpus(demo.corpus, out / "corpus")
    recipe = schema.to_dict(demo.train)
    runs = {name: train_config(recipe, name, out, args.steps, files["train"]) for name in FLAVOURS}
    paths = {}
    for name, run in runs.items():
        paths[name] = out / f"{name}.yaml"
        write_text_atomic(paths[name], yaml.safe_dump(schema.to_dict(run), sort_keys=False))
    seconds = train_side_by_side(paths, runs, progress=True)
    print("training: " + ", ".join(f"{n} {s / 60:.1f} min" for n, s in seconds.items()))
    config = MemoryConfig(models=[MemoryModel(name, runs[name].output_dir / "export") for name in FLAVOURS],
                          data=DataConfig(manifest=files["eval"]), segment_frames=args.segment,
                          output_dir=out / "eval")
    result, written = evaluate(Memory(config))
    print("\n".join(result.summary_lines()))
    print("wrote " + ", ".join(str(p) for p in written.values()) + f" ({(time.perf_counter() - start) / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
