"""torchrun with 2 processes on gloo gives the losses of one process on the same global batch:
DDP, and FSDP (sharded, `distributed: fsdp`) for every trainable setting, with exact resume."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from train_utils import make_corpus, write_config
from ttt_speech_apps.finetune.cli import main as train_main

# DDP averages per-rank gradients; with the loss normalised by the global token weight that is the
# single-process gradient up to float32 summation order.
TOLERANCE = 1e-4
# FSDP: the same, reduce-scattered in float32 (the bar: 1e-5 relative)
FSDP_TOLERANCE = 1e-5

E2E_META = {"ttt": {"layer_type": "e2e_mlp", "mini_batch_size": 4, "gate_init": 0.5}, "trainable": "e2e-meta"}
TTT_CLI = str(Path(sys.executable).parent / "ttt-speech")


def torchrun(config: Path, *args: str, nproc: int = 2, wait: bool = True, extra: tuple[str, ...] = ()):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), *extra,
           "--no-python", TTT_CLI, "train", str(config), *args, "--quiet"]
    if "--nnodes" not in extra:
        cmd[3:3] = ["--master-port", str(29500 + (os.getpid() + hash(str(config))) % 1000)]
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                start_new_session=True)
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def losses(run: Path) -> dict[int, float]:
    """step → loss (the last line of each step: a resumed run repeats the steps after its checkpoint)."""
    return {row["step"]: row["loss"] for row in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def assert_close(a: dict, b: dict, tolerance: float) -> float:
    assert a and set(a) == set(b), (a, b)
    assert len(set(a.values())) == len(a), "losses do not move: the comparison would prove nothing"
    diff = max(abs(a[k] - b[k]) / abs(a[k]) for k in a)
    assert diff <= tolerance, (a, b)
    return diff


@pytest.mark.parametrize("flavour", [{}, E2E_META], ids=["ttt-linear", "e2e-meta"])
def test_torchrun_two_processes_matches_single_process(tmp_path, flavour):
    """E2E meta-training too: its inner `autograd.grad` runs inside DDP's forward."""
    corpus = make_corpus(tmp_path, recordings=6, frames=30)
    single = write_config(tmp_path / "single", corpus, steps=3, output_dir=str(tmp_path / "single" / "run"),
                          **{"data.batch_size": 4}, **flavour)
    assert train_main([str(single), "--quiet"]) == 0
    multi = write_config(tmp_path / "multi", corpus, steps=3, output_dir=str(tmp_path / "multi" / "run"),
                         **{"data.batch_size": 4}, **flavour)
    out = torchrun(multi)
    assert out.stdout.count("done:") == 1, out.stdout  # rank 0 only reports
    diff = assert_close(losses(tmp_path / "single" / "run"), losses(tmp_path / "multi" / "run"), TOLERANCE)
    print(f"2-process vs 1-process losses: max relative diff {diff:.2e}")
    assert (tmp_path / "multi" / "run" / "export" / "model.json").is_file()


BF16 = {"precision": "bf16", "model.dtype": "bfloat16"}


@pytest.mark.parametrize("trainable, extra, tolerance", [
    ("ttt", {}, FSDP_TOLERANCE),
    ("ttt+lora", {"gradient_checkpointing": True}, FSDP_TOLERANCE),
    ("full", {}, FSDP_TOLERANCE),
    # a bf16 model: frozen bf16 weights beside float32 master copies in one unit; bf16 compute, whose
    # rounding differs with the reduction order, bounds the agreement
    ("ttt+lora", BF16, 1e-3),
], ids=["ttt", "ttt+lora-checkpointing", "full", "ttt+lora-bf16"])
def test_fsdp_two_processes_match_single_process(tmp_path, trainable, extra, tolerance):
    """Sharded training: the losses and the export of one process; each rank holds half of the
    trainable parameters, gradients and optimizer state."""
    corpus = make_corpus(tmp_path, recordings=6, frames=30)
    common = {"data.batch_size": 4, "trainable": trainable, "steps": 5, "ttt.gate_init": 1.0, "optim.lr": 3e-3,
              **extra}
    single = write_config(tmp_path / "single", corpus, **common)
    # in a process of its own: earlier runs in this process (bf16, E2E) leave it computing later runs
    # differently (a separate issue)
    torchrun(single, nproc=1)
    sharded = write_config(tmp_path / "fsdp", corpus, distributed="fsdp", **common)
    out = torchrun(sharded)
    assert out.stdout.count("done:") == 1 and out.stdout.count("outputs in") == 1, out.stdout
    a, b = tmp_path / "single" / "run", tmp_path / "fsdp" / "run"
    diff = assert_close(losses(a), losses(b), tolerance)
    print(f"FSDP 2-process vs 1-process losses ({trainable}, {extra}): max relative diff {diff:.2e}")
    exported = ["ttt.safetensors"] + {"ttt+lora": ["lora.safetensors"], "full": ["model.safetensors"]}.get(trainable, [])
    lr, steps = common["optim.lr"], common["steps"]
    for name in exported:
        mine, theirs = load_file(str(a / "export" / name)), load_file(str(b / "export" / name))
        assert set(mine) == set(theirs), name
        assert all(mine[k].dtype == theirs[k].dtype for k in mine)
        diff = torch.cat([(mine[k].double() - theirs[k].double()).abs().flatten() for k in mine])
        # AdamW normalises every step: a weight whose gradients are near zero (summed in another order)
        # may move by up to lr per step either way; all the others agree closely
        assert float(diff.max()) <= 2 * lr * steps, name
        close = 1e-6 if tolerance == FSDP_TOLERANCE else 1e-2
        assert float((diff > close).double().mean()) < 0.02, (name, float((diff > close).double().mean()))
    memory = json.loads((b / "memory.json").read_text())
    assert memory["strategy"] == "fsdp" and memory["world"] == 2
    one = json.loads((a / "memory.json").read_text())["ranks"][0]
    for rank in memory["ranks"]:  # FSDP pads each parameter's shards to equal length: about half
        assert rank["optimizer"] + rank["grads"] <= 0.6 * (one["optimizer"] + one["grads"]), (rank, one)
        assert rank["params"] <= 0.6 * one["params"]


def test_fsdp_kill_and_resume_continue_loss_for_loss(tmp_path):
    """kill -9 of a sharded run after a checkpoint, then --resume on 2 ranks: the losses of an
    uninterrupted run."""
    corpus = make_corpus(tmp_path, recordings=6, frames=30)
    common = {"data.batch_size": 4, "trainable": "ttt+lora", "ttt.gate_init": 1.0, "optim.lr": 3e-3,
              "distributed": "fsdp"}
    killed = write_config(tmp_path / "killed", corpus, steps=400, checkpoint_every=2, keep_checkpoints=400, **common)
    run = tmp_path / "killed" / "run"
    proc = torchrun(killed, wait=False)
    deadline = time.time() + 300
    while not list((run / "checkpoints").glob("step_*")) if (run / "checkpoints").is_dir() else True:
        assert proc.poll() is None and time.time() < deadline, \
            proc.communicate()[1][-3000:] if proc.poll() is not None else "timeout"
        time.sleep(0.05)
    # torchrun's workers are not in its process group: kill every process of this run
    subprocess.run(["pkill", "-9", "-f", str(killed)], check=False)
    proc.wait()
    assert proc.returncode != 0
    saved = max(int(p.name.split("_")[1]) for p in (run / "checkpoints").glob("step_*"))
    print(f"killed after the checkpoint of step {saved}")
    assert saved < 400, "the run ended before it was killed"
    end = saved + 3
    reference = write_config(tmp_path / "ref", corpus, steps=end, **common)  # constant lr: steps do not matter
    torchrun(reference)
    torchrun(killed, f"steps={end}", "--resume", str(run))
    ref = losses(tmp_path / "ref" / "run")
    resumed = losses(run)
    after = {k: ref[k] for k in range(saved + 1, end + 1)}
    assert_close(after, {k: resumed[k] for k in after}, FSDP_TOLERANCE)
    # Resume onto another world size runs but is not bit-exact yet (3.4e-4 at the second resumed
    # step, 2 ranks -> 1): docs/training.md §5.


def test_two_nodes_on_localhost_rendezvous(tmp_path):
    """torchrun --nnodes 2 (one process per node) through a c10d rendezvous on localhost: the
    multi-node command of docs/training.md, with both "nodes" on this machine."""
    corpus = make_corpus(tmp_path, recordings=6, frames=30)
    config = write_config(tmp_path / "nodes", corpus, steps=2, distributed="fsdp", **{"data.batch_size": 4})
    endpoint = f"localhost:{29000 + os.getpid() % 400}"
    nodes = [torchrun(config, nproc=1, wait=False, extra=("--nnodes", "2", "--node-rank", str(i), "--rdzv-backend",
                                                          "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "ttt"))
             for i in range(2)]
    outs = [node.communicate(timeout=600) for node in nodes]
    assert all(node.returncode == 0 for node in nodes), [err[-2000:] for _, err in outs]
    assert sum(out.count("done:") for out, _ in outs) == 1
    assert json.loads((tmp_path / "nodes" / "run" / "memory.json").read_text())["world"] == 2


def test_moshi_7b_on_the_meta_device_reports_its_counts_without_allocating(tmp_path):
    """Moshi-7B's real architecture patched per configs/moshi_7b_ttt.yaml, on the meta device: the
    counts of docs/training.md's memory table, in seconds and without materialising 8.8 B parameters."""
    import torch

    from ttt_speech.moshi import moshi_7b_lm
    from ttt_speech_apps.finetune.config import load_train_config
    from ttt_speech_apps.finetune.memory import count, memory_table, moshi_7b_counts
    from ttt_speech_apps.finetune.model import prepare_model

    config = load_train_config("configs/moshi_7b_ttt.yaml")
    start = time.perf_counter()
    with torch.device("meta"):
        lm = prepare_model(moshi_7b_lm(), config)
    assert all(p.is_meta for p in lm.parameters())
    counts = count(lm, "ttt")
    assert round(counts.total_params / 1e9, 2) == 8.77 and round(counts.trainable_params / 1e9, 2) == 1.08
    assert counts.param_bytes == (counts.total_params - counts.trainable_params) * 2 + counts.trainable_params * 4
    assert time.perf_counter() - start < 30
    table = memory_table(moshi_7b_counts(config))
    assert table in Path("docs/training.md").read_text(), f"docs/training.md: update the memory table:\n{table}"


def test_fsdp_builds_other_ranks_on_the_meta_device_and_refuses_e2e(tmp_path):
    from ttt_speech_apps.finetune.config import load_train_config
    from ttt_speech_apps.finetune.distributed import Dist, build_device

    assert build_device(Dist(rank=1, world=2), "fsdp").type == "meta"
    assert build_device(Dist(rank=0, world=2), "fsdp").type == "cpu"
    assert build_device(Dist(rank=1, world=2), "ddp").type == "cpu"
    corpus = make_corpus(tmp_path, recordings=4, frames=20)
    path = write_config(tmp_path, corpus, distributed="fsdp", **E2E_META)
    with pytest.raises(ValueError, match="distributed: 'fsdp' does not take e2e_mlp layers"):
        load_train_config(path)
