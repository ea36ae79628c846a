"""torchrun with 2 processes on gloo gives the losses of one process on the same global batch."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from train_utils import make_corpus, write_config
from ttt_speech_apps.finetune.cli import main as train_main

# DDP averages per-rank gradients; with the loss normalised by the global token weight that is the
# single-process gradient up to float32 summation order.
TOLERANCE = 1e-4


E2E_META = {"ttt": {"layer_type": "e2e_mlp", "mini_batch_size": 4, "gate_init": 0.5}, "trainable": "e2e-meta"}


@pytest.mark.parametrize("flavour", [{}, E2E_META], ids=["ttt-linear", "e2e-meta"])
def test_torchrun_two_processes_matches_single_process(tmp_path, flavour):
    """E2E meta-training too: its inner `autograd.grad` runs inside DDP's forward."""
    corpus = make_corpus(tmp_path, recordings=6, frames=30)
    single = write_config(tmp_path / "single", corpus, steps=3, output_dir=str(tmp_path / "single" / "run"),
                          **{"data.batch_size": 4}, **flavour)
    assert train_main([str(single), "--quiet"]) == 0
    multi = write_config(tmp_path / "multi", corpus, steps=3, output_dir=str(tmp_path / "multi" / "run"),
                         **{"data.batch_size": 4}, **flavour)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                          str(29500 + os.getpid() % 1000), "--no-python", str(Path(sys.executable).parent / "ttt-speech"), "train", str(multi),
                          "--quiet"], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]

    def losses(run):
        return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]

    a, b = losses(tmp_path / "single" / "run"), losses(tmp_path / "multi" / "run")
    assert len(a) == len(b) == 3
    diff = max(abs(x - y) for x, y in zip(a, b))
    print(f"2-process vs 1-process losses: max abs diff {diff:.2e}")
    assert diff <= TOLERANCE * max(a), (a, b)
    assert (tmp_path / "multi" / "run" / "export" / "model.json").is_file()
