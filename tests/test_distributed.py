"""torchrun with 2 processes on gloo gives the losses of one process on the same global batch:
DDP, and FSDP (sharded, `distributed: fsdp`) for every trainable setting, with exact resume."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from train_utils import make_corpus, read_trainable, write_config
from ttt_speech_apps.finetune.cli import main as train_main

# DDP averages per-rank gradients; with the loss normalised by the global token weight that is the
# single-process gradient up to float32 summation order.
TOLERANCE = 1e-4
# FSDP: the same, reduce-scattered in float32 (the bar: 1e-5 relative)
FSDP_TOLERANCE = 1e-5

E2E_META = {"ttt": {"layer_type": "e2e_mlp", "mini_batch_size": 4, "gate_init": 0.5}, "trainable": "e2e-meta"}
TTT_CLI = str(Path(sys.executable).parent / "ttt-speech")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(config: Path, *args: str, nproc: int = 2, wait: bool = True, extra: tuple[str, ...] = ()):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), *extra,
           "--no-python", TTT_CLI, "train", str(config), *args, "--quiet"]
    if "--nnodes" not in extra:
        cmd[3:3] = ["--master-port", str(free_port())]  # a port of its own: one just closed may linger
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                start_new_session=True)
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, "\n".join(  # the workers' own errors, not only torchrun's summary of them
        line for line in out.stderr.splitlines() if "Error" in line or "ttt-speech" in line)[-3000:]
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


# Resume onto another world size changes only the order of float32 sums (1e-7 here)
RESUME_TOLERANCE = 1e-6


def _killed_after_a_checkpoint(config: Path, run: Path, nproc: int) -> int:
    """Start a long run of `config`, kill -9 every process of it after its first checkpoint appears;
    the step of its newest complete checkpoint."""
    proc = torchrun(config, nproc=nproc, wait=False)
    deadline = time.time() + 300
    while not list((run / "checkpoints").glob("step_*")) if (run / "checkpoints").is_dir() else True:
        assert proc.poll() is None and time.time() < deadline, \
            proc.communicate()[1][-3000:] if proc.poll() is not None else "timeout"
        time.sleep(0.05)
    # torchrun's workers are not in its process group: kill every process of this run
    subprocess.run(["pkill", "-9", "-f", str(config)], check=False)
    proc.wait()
    assert proc.returncode != 0
    saved = max(int(p.name.split("_")[1]) for p in (run / "checkpoints").glob("step_*"))
    assert saved < 400, "the run ended before it was killed"
    return saved


@pytest.mark.parametrize("strategy, written, onto", [
    ("fsdp", "sharded", ((2, "fsdp"), (2, "ddp"), (1, "fsdp"), (4, "fsdp"))),
    ("ddp", "consolidated", ((1, "ddp"), (2, "fsdp"))),
    ("fsdp", "consolidated", ((1, "fsdp"),)),
], ids=["fsdp-sharded", "ddp", "fsdp-consolidated"])
def test_kill_and_resume_onto_any_world_size_continues_loss_for_loss(tmp_path, strategy, written, onto):
    """kill -9 of a 2-rank run after a mid-run checkpoint, then --resume of that checkpoint onto 1, 2
    or 4 ranks (the strategy of the run, or the other one): the losses of an uninterrupted run."""
    corpus = make_corpus(tmp_path, recordings=8, frames=30)
    common = {"data.batch_size": 4, "trainable": "ttt+lora", "ttt.gate_init": 1.0, "optim.lr": 3e-3,
              "distributed": strategy}
    killed = write_config(tmp_path / "killed", corpus, steps=400, checkpoint_every=2, keep_checkpoints=400,
                          checkpoint_format=written, **common)
    run = tmp_path / "killed" / "run"
    saved = _killed_after_a_checkpoint(killed, run, nproc=2)
    checkpoint = run / "checkpoints" / f"step_{saved:06d}"
    assert (checkpoint / ("sharded" if written == "sharded" else "trainable.safetensors")).exists()
    print(f"killed after the checkpoint of step {saved}")
    end = saved + 3
    reference = write_config(tmp_path / "ref", corpus, steps=end, **common)  # constant lr: steps do not matter
    torchrun(reference)
    ref = losses(tmp_path / "ref" / "run")
    after = {k: ref[k] for k in range(saved + 1, end + 1)}
    for nproc, resumed_strategy in onto:
        folder = tmp_path / f"onto{nproc}-{resumed_strategy}"
        shutil.copytree(checkpoint, folder / "run" / "checkpoints" / checkpoint.name)
        torchrun(killed, f"steps={end}", f"output_dir={folder / 'run'}", f"distributed={resumed_strategy}",
                 "--resume", str(folder / "run"), nproc=nproc)
        diff = assert_close(after, losses(folder / "run"), RESUME_TOLERANCE)
        print(f"{written} checkpoint of 2 {strategy} ranks resumed on {nproc} {resumed_strategy}: "
              f"max relative loss difference {diff:.1e}")


def test_a_one_process_checkpoint_resumes_sharded_onto_two_ranks(tmp_path):
    """The other direction: a mid-run checkpoint of one process, resumed under FSDP on 2 ranks
    (writing sharded checkpoints from then on, asynchronously), and that run's sharded checkpoint
    resumed by one process again; W₀ stays bit-identical through steps that restart no row."""
    corpus = make_corpus(tmp_path, recordings=8, frames=40)  # windows of 12: rows restart at steps 1, 5, 9
    common = {"data.batch_size": 4, "trainable": "ttt+lora", "ttt.gate_init": 1.0, "optim.lr": 3e-3,
              "checkpoint_every": 1, "keep_checkpoints": 20}
    reference = write_config(tmp_path / "ref", corpus, steps=8, **common)
    torchrun(reference, nproc=1)
    ref = losses(tmp_path / "ref" / "run")
    one = tmp_path / "ref" / "run" / "checkpoints"
    two = write_config(tmp_path / "two", corpus, steps=6, distributed="fsdp", async_checkpoint=True, **common)
    shutil.copytree(one / "step_000002", tmp_path / "two" / "run" / "checkpoints" / "step_000002")
    torchrun(two, "--resume", str(tmp_path / "two" / "run"))
    assert_close({k: ref[k] for k in range(3, 7)}, losses(tmp_path / "two" / "run"), RESUME_TOLERANCE)
    sharded = tmp_path / "two" / "run" / "checkpoints"
    assert (sharded / "step_000004" / "sharded" / ".metadata").is_file()
    weights = {s: read_trainable(sharded / f"step_{s:06d}") for s in (2, 3, 4, 5)}
    initial = [n for n in weights[2] if n.rsplit(".", 1)[-1] in ("W1", "b1")]
    assert initial and all(torch.equal(weights[s][n], weights[2][n]) for s in (3, 4) for n in initial)
    assert not any(torch.equal(weights[5][n], weights[4][n]) for n in initial)  # step 5 restarts: W₀ moves
    back = write_config(tmp_path / "back", corpus, steps=8, **common)
    shutil.copytree(sharded / "step_000005", tmp_path / "back" / "run" / "checkpoints" / "step_000005")
    torchrun(back, "--resume", str(tmp_path / "back" / "run"), nproc=1)
    assert_close({k: ref[k] for k in range(6, 9)}, losses(tmp_path / "back" / "run"), RESUME_TOLERANCE)


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


def test_nproc_per_node_stops_on_sigterm_with_exit_130_and_a_checkpoint(tmp_path):
    """`ttt-speech train CFG --nproc-per-node 2`: a SIGTERM to the launcher stops both ranks after the
    same step with a checkpoint, exit 130 and one line (torchrun itself: exit 1 and a traceback); a
    failure inside the ranks is their exit code and their one line."""
    corpus = make_corpus(tmp_path, recordings=6, frames=30)
    config = write_config(tmp_path, corpus, steps=400, distributed="fsdp", **{"data.batch_size": 4})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.Popen([TTT_CLI, "train", str(config), "--nproc-per-node", "2", "--quiet"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    start = time.time()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    print(f"SIGTERM to exit: {time.time() - start:.1f} s")
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and err.count("stopped by SIGTERM after step") == 1, err[-3000:]
    saved = list((tmp_path / "run" / "checkpoints").glob("step_*"))
    assert len(saved) == 1 and (saved[0] / "sharded" / ".metadata").is_file()
    # a failure in the ranks (3 rows do not split over 2 of them): their exit code, their line
    out = subprocess.run([TTT_CLI, "train", str(config), "data.batch_size=3", f"output_dir={tmp_path / 'odd'}",
                          "--nproc-per-node", "2", "--quiet"], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert "do not split evenly over 2 processes" in out.stderr


def test_a_staged_run_on_two_fsdp_ranks_matches_one_process(tmp_path):
    """Three stages (rows 2, 2, 4; windows 12, 24, 12) under torchrun on 2 FSDP ranks: the same losses as one
    process, each stage's length generalisation written at its end (the weights gathered by every rank)."""
    corpus = make_corpus(tmp_path, recordings=8, frames=30)
    stages = [{"name": "a", "steps": 2, "window_frames": 12, "batch_size": 2},
              {"name": "b", "steps": 2, "window_frames": 24, "batch_size": 2, "lr": 5e-4},
              {"name": "c", "steps": 1, "window_frames": 12, "batch_size": 4}]
    common = {"stages": stages, "steps": 5, "length_gen": {"num_lengths": 2},
              "data.eval_manifest": str(corpus["eval"]), "distributed": "fsdp"}
    single = write_config(tmp_path / "single", corpus, output_dir=str(tmp_path / "single" / "run"), **common)
    assert train_main([str(single), "--quiet"]) == 0
    multi = write_config(tmp_path / "multi", corpus, output_dir=str(tmp_path / "multi" / "run"), **common)
    torchrun(multi)
    train_losses = lambda run: {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text()  # noqa: E731
                                                                     .splitlines()) if "loss" in r}
    assert_close(train_losses(tmp_path / "single" / "run"), train_losses(tmp_path / "multi" / "run"), FSDP_TOLERANCE)
    for stage in ("a", "b", "c"):
        assert (tmp_path / "multi" / "run" / "length_gen" / stage / "length_gen.json").is_file(), stage
