"""What long training jobs meet: a folder holding another run, a second run at once, resumes with
changed settings or damaged checkpoints, bad data found late, interrupts, runaway fast weights.
Each fault is one line naming the field or file, exit 2 (130 for an interrupt), and leaves another
run's outputs untouched."""
import json
import logging
import signal
import subprocess
import sys
import time

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from train_utils import make_corpus, write_config
from ttt_speech.data.codes import Recording, save_codes
from ttt_speech_apps.finetune import monitor as monitor_module
from ttt_speech_apps.finetune.cli import main as train_main
from ttt_speech_apps.finetune.run_folder import claim
from ttt_speech_apps.finetune.stop import StopRequest


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


def metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def steps_logged(run):
    return [m["step"] for m in metrics(run)]


def untimed(row):
    return {k: v for k, v in row.items() if k != "tokens_per_s"}


def one_error_line(capsys, *needles):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


def snapshot(run):
    return {p.relative_to(run): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file() and p.name != ".lock"}


# ---- one run per folder ----------------------------------------------------------------------

def test_a_folder_holding_another_run_is_refused_unless_resumed_or_overwritten(tmp_path, corpus, capsys):
    config = write_config(tmp_path, corpus, steps=2)
    assert train_main([str(config), "--quiet"]) == 0
    run = tmp_path / "run"
    before = snapshot(run)
    assert before and any(str(p).startswith("checkpoints") for p in before)
    capsys.readouterr()
    assert train_main([str(config), "--quiet", "seed=1"]) == 2
    one_error_line(capsys, "output_dir", "holds another run", "--resume", "--overwrite")
    assert snapshot(run) == before  # the old run is untouched
    # options after the overrides are taken too (`CONFIG k=v --flag`)
    assert train_main([str(config), "seed=1", "--overwrite", "--quiet"]) == 0
    assert steps_logged(run) == [1, 2] and snapshot(run) != before


def test_a_second_run_at_once_fails_at_once(tmp_path, corpus, capsys):
    config = write_config(tmp_path, corpus, steps=2)
    folder = claim(tmp_path / "run", None, overwrite=False)  # another run holds the folder
    try:
        assert train_main([str(config), "--quiet"]) == 2
        one_error_line(capsys, "is in use by another run", "pid")
    finally:
        folder.release()
    assert not (tmp_path / "run").exists()  # the first "run" wrote nothing: its empty folder goes
    assert train_main([str(config), "--quiet"]) == 0


def test_leftovers_of_a_killed_run_are_cleaned_and_redone_steps_not_logged_twice(tmp_path, corpus):
    config = write_config(tmp_path, corpus, steps=4, checkpoint_every=2, keep_checkpoints=5)
    assert train_main([str(config), "--quiet"]) == 0
    run = tmp_path / "run"
    full = (run / "metrics.jsonl").read_text()
    # a kill -9 while step 4's checkpoint was being written: its temporary folder, no step_000004
    import shutil
    shutil.move(run / "checkpoints" / "step_000004", run / "checkpoints" / ".step_000004.x1y2")
    assert train_main([str(config), "--resume", str(run), "--quiet"]) == 0
    assert not list((run / "checkpoints").glob(".step_*"))
    assert steps_logged(run) == [1, 2, 3, 4]  # steps 3-4 re-done once, not appended again
    # and exactly as before (bit-for-bit resume), timings apart
    assert [untimed(m) for m in metrics(run)] == [untimed(json.loads(line)) for line in full.splitlines()]


# ---- resume --------------------------------------------------------------------------------

def test_resume_refuses_changes_that_break_exactness_and_applies_allowed_ones(tmp_path, corpus, capsys):
    config = write_config(tmp_path, corpus, steps=2)
    run = tmp_path / "run"
    assert train_main([str(config), "--quiet"]) == 0
    for override, field in (("data.batch_size=1", "data.batch_size: 2 in the checkpoint, 1 now"),
                            ("optim.lr=1", "optim.lr: 0.001 in the checkpoint, 1.0 now"),
                            ("model.tiny.dim=32", "model.tiny.dim: 64 in the checkpoint, 32 now")):
        capsys.readouterr()
        assert train_main([str(config), override, "steps=3", "--resume", str(run), "--quiet"]) == 2, override
        one_error_line(capsys, field, "exact resume")
    assert train_main([str(config), "steps=3", "log_every=1", "--resume", str(run), "--quiet"]) == 0
    recorded = (run / "checkpoints" / "step_000003" / "config.yaml").read_text()
    assert "steps: 3" in recorded and steps_logged(run) == [1, 2, 3]


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, corpus, capsys, caplog):
    config = write_config(tmp_path, corpus, steps=4, checkpoint_every=2)
    run = tmp_path / "run"
    assert train_main([str(config), "--quiet"]) == 0
    state = run / "checkpoints" / "step_000004" / "train_state.pt"
    state.write_bytes(state.read_bytes()[:100])  # truncated (a full disk)
    capsys.readouterr()
    assert train_main([str(config), "--resume", str(run / "checkpoints" / "step_000004"), "--quiet"]) == 2
    one_error_line(capsys, "step_000004/train_state.pt is damaged")
    with caplog.at_level(logging.WARNING, logger="finetune"):
        assert train_main([str(config), "steps=5", "--resume", str(run), "--overwrite", "--quiet"]) == 0
    assert "skipping a damaged checkpoint" in caplog.text and "step_000002" in caplog.text
    assert steps_logged(run) == [1, 2, 3, 4, 5]
    weights = run / "checkpoints" / "step_000005" / "trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    capsys.readouterr()
    assert train_main([str(config), "steps=6", "--resume", str(weights.parent), "--quiet"]) == 2
    one_error_line(capsys, "trainable.safetensors is damaged")


def test_a_sharded_checkpoint_resumes_exactly_and_a_lost_shard_file_is_damage(tmp_path, corpus, capsys, caplog):
    """checkpoint_format: sharded in one process (the format FSDP writes): 4 steps == 2 + resume + 2;
    a shard file the index names gone (a copy that lost a rank's file) is a damaged checkpoint."""
    whole = write_config(tmp_path / "whole", corpus, steps=4)
    assert train_main([str(whole), "--quiet"]) == 0
    config = write_config(tmp_path, corpus, steps=2, checkpoint_every=1, checkpoint_format="sharded")
    run = tmp_path / "run"
    assert train_main([str(config), "--quiet"]) == 0
    assert (run / "checkpoints" / "step_000002" / "sharded" / ".metadata").is_file()
    assert not (run / "checkpoints" / "step_000002" / "trainable.safetensors").exists()
    shards = list((run / "checkpoints" / "step_000002" / "sharded").glob("*.distcp"))
    assert shards
    capsys.readouterr()
    for damage, words in ((lambda f: f.write_bytes(f.read_bytes()[:-8]), "is truncated"), (Path.unlink, "is missing")):
        damage(shards[0])
        assert train_main([str(config), "steps=4", "--resume", str(shards[0].parent.parent), "--quiet"]) == 2
        one_error_line(capsys, f"{shards[0].name} {words}")
    with caplog.at_level(logging.WARNING, logger="finetune"):  # the run folder: back to step 1's checkpoint
        assert train_main([str(config), "steps=4", "--resume", str(run), "--overwrite", "--quiet"]) == 0
    assert "skipping a damaged checkpoint" in caplog.text
    assert [m["loss"] for m in metrics(run)] == [m["loss"] for m in metrics(tmp_path / "whole" / "run")]


def test_a_checkpoint_that_cannot_be_written_is_one_line_and_leaves_no_folder(tmp_path, corpus, capsys, monkeypatch):
    """torch.distributed.checkpoint reports a full disk as a CheckpointException (a BaseException)."""
    import errno

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    def full_disk(*args, **kwargs):
        raise CheckpointException("save", {0: OSError(errno.ENOSPC, "No space left on device")})

    monkeypatch.setattr(dcp, "save", full_disk)
    config = write_config(tmp_path, corpus, steps=2, checkpoint_every=1, checkpoint_format="sharded")
    capsys.readouterr()
    assert train_main([str(config), "--quiet"]) == 2
    one_error_line(capsys, "cannot write", "No space left on device")
    assert list((tmp_path / "run" / "checkpoints").iterdir()) == []


def test_resuming_an_older_checkpoint_into_its_own_folder_is_refused(tmp_path, corpus, capsys):
    config = write_config(tmp_path, corpus, steps=4, checkpoint_every=2)
    run = tmp_path / "run"
    assert train_main([str(config), "--quiet"]) == 0
    capsys.readouterr()
    assert train_main([str(config), "--resume", str(run / "checkpoints" / "step_000002"), "--quiet"]) == 2
    one_error_line(capsys, "not the newest checkpoint", "step_000004")


# ---- data checked before step 1 -----------------------------------------------------------

def test_a_bad_file_anywhere_in_the_manifest_fails_before_the_first_step(tmp_path, corpus, capsys):
    lines = []
    for line in corpus["train"].read_text().splitlines():  # absolute paths: the manifest moves
        entry = json.loads(line)
        lines.append(json.dumps({**entry, "path": str((corpus["train"].parent / entry["path"]).resolve())}))
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    manifest = tmp_path / "train.jsonl"
    manifest.write_text("\n".join(lines + [json.dumps({"path": str(empty), "duration": 3.0})]) + "\n")
    config = write_config(tmp_path, corpus, steps=2, **{"data.train_manifest": str(manifest)})
    assert train_main([str(config), "--quiet"]) == 2
    one_error_line(capsys, "data.train_manifest", "empty.safetensors")
    assert not (tmp_path / "run").exists()
    wide = tmp_path / "wide.safetensors"  # a code the tiny model (card 64) does not have
    save_codes(wide, Recording(torch.full((16, 20), 1000), source="synthetic:0:0"))
    manifest.write_text("\n".join(lines + [json.dumps({"path": str(wide), "duration": 1.6})]) + "\n")
    assert train_main([str(config), "--quiet"]) == 2
    one_error_line(capsys, "wide.safetensors", "out of range")


# ---- interrupts ------------------------------------------------------------------------------

def test_ctrl_c_saves_a_checkpoint_exits_130_and_the_resume_is_exact(tmp_path, corpus, capsys, monkeypatch):
    whole = write_config(tmp_path / "whole", corpus, steps=5)
    assert train_main([str(whole), "--quiet"]) == 0
    config = write_config(tmp_path / "cut", corpus, steps=5)
    log = monitor_module.Monitor.log

    def ctrl_c_at_step_2(self, step, metrics, stats=None, stage=None):
        log(self, step, metrics, stats, stage)
        if step == 2:
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(monitor_module.Monitor, "log", ctrl_c_at_step_2)
    capsys.readouterr()
    # the handler in place before (Python's default, or SIG_IGN under nohup / a background job)
    handler_before = signal.getsignal(signal.SIGINT)
    assert train_main([str(config), "--quiet"]) == 130
    one_error_line(capsys, "stopped by Ctrl-C after step 2", "--resume")
    run = tmp_path / "cut" / "run"
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_000002"]
    assert signal.getsignal(signal.SIGINT) is handler_before  # handlers restored
    monkeypatch.undo()
    assert train_main([str(config), "--resume", str(run), "--quiet"]) == 0
    a = load_file(str(tmp_path / "whole" / "run" / "checkpoints" / "step_000005" / "trainable.safetensors"))
    b = load_file(str(run / "checkpoints" / "step_000005" / "trainable.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_second_ctrl_c_stops_at_once():
    with StopRequest() as stop:
        signal.raise_signal(signal.SIGINT)
        assert stop.reason == "Ctrl-C"
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)


@pytest.mark.slow
def test_sigint_to_a_real_process(tmp_path, corpus):
    """The command as a user runs it: SIGINT from outside, exit 130 with one line, a checkpoint."""
    config = write_config(tmp_path, corpus, steps=100000)
    proc = subprocess.Popen([sys.executable, "-m", "ttt_speech_apps.finetune", str(config), "--quiet"],
                            stderr=subprocess.PIPE, text=True)
    run = tmp_path / "run"
    deadline = time.time() + 120
    while time.time() < deadline and not ((run / "metrics.jsonl").is_file() and steps_logged(run)):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "stopped by Ctrl-C" in err and "Traceback" not in err
    assert list((run / "checkpoints").glob("step_*"))


# ---- numbers that should alarm --------------------------------------------------------------

def test_runaway_fast_weights_are_warned_once(tmp_path, corpus, caplog):
    config = write_config(tmp_path, corpus, steps=3, **{"ttt.base_lr": 1e6})
    with caplog.at_level(logging.WARNING, logger="finetune"):
        assert train_main([str(config), "--quiet"]) == 0
    warnings = [r for r in caplog.records if "x their initial norm" in r.getMessage()]
    assert len(warnings) == 1 and "base_lr" in caplog.text
    caplog.clear()
    sane = write_config(tmp_path / "sane", corpus, steps=3)
    with caplog.at_level(logging.WARNING, logger="finetune"):
        assert train_main([str(sane), "--quiet"]) == 0
    assert "x their initial norm" not in caplog.text


def test_the_runaway_rule_and_the_evaluator_trace():
    from ttt_speech.stats import runaway
    from ttt_speech_apps.eval.fast_weights import FastWeightTrace

    grown = runaway({0: 5.0, 1: 11.0, 2: float("nan")}, {0: 1.0, 1: 1.0, 2: 1.0})
    assert set(grown) == {1, 2} and grown[1] == 11.0
    trace = FastWeightTrace([0, 2], [1.0, 2.0], positions=[16, 32], distances=[[0.5, 0.7], [3.0, 25.0]])
    assert trace.runaway() == {2: 12.5}


# ---- bad input: one line naming the field or file, nothing written ---------------------------
# (values that would reach torch unchecked: test_finetune.py's test_bad_config_is_one_line_error_exit_2_nothing_written)

@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_device_the_machine_lacks_is_named(tmp_path, corpus, capsys):
    config = write_config(tmp_path, corpus)
    assert train_main([str(config), "model.device=cuda", "--quiet"]) == 2
    one_error_line(capsys, "model.device: 'cuda' requested, but this machine has no CUDA device")


def test_files_are_named_for_what_they_are(tmp_path, corpus, capsys):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert train_main([str(empty)]) == 2
    one_error_line(capsys, "empty.yaml: the file is empty")
    assert train_main([str(tmp_path)]) == 2
    one_error_line(capsys, "is a directory, expected a YAML config file")
    config = write_config(tmp_path, corpus, **{"data.train_manifest": str(tmp_path)})
    assert train_main([str(config), "--quiet"]) == 2
    one_error_line(capsys, "data.train_manifest", "is a directory, expected a JSONL manifest file")


def test_ctrl_c_in_any_command_is_one_line_and_exit_130(tmp_path, capsys, monkeypatch):
    from ttt_speech import checkpoint
    from ttt_speech.cli import main

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "read_saved_ttt", interrupted)
    assert main(["inspect", str(tmp_path)]) == 130
    assert capsys.readouterr().err.strip() == "ttt-speech inspect: interrupted"
