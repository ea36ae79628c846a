"""Staged training (`stages:` in the training config, docs/training.md): stages run back to back, each
from the last one's weights with a fresh optimizer, schedule and data rows; a staged run equals the
same stages run as separate runs, each resumed from the last; a stop at a boundary resumes exactly."""
import json
from pathlib import Path

import pytest
import torch

from train_utils import make_corpus, read_trainable, write_config
from ttt_speech_apps.finetune.cli import main as train_main
from ttt_speech_apps.finetune.config import load_train_config

ROOT = Path(__file__).resolve().parents[1]
# three stages of growing windows (12 -> 24 -> 36 frames: 1, 2, 3 TTT mini-batches of 4 ... x3), rows 2, 2, 1
STAGES = [{"name": "short", "steps": 3, "window_frames": 12, "batch_size": 2, "lr": 1e-3},
          {"name": "middle", "steps": 2, "window_frames": 24, "batch_size": 2, "lr": 5e-4},
          {"name": "long", "steps": 2, "window_frames": 36, "batch_size": 1, "lr": 2e-4, "schedule": "cosine"}]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("stages"), recordings=6, frames=60)


def staged(root, corpus, stages=STAGES, **overrides):
    return write_config(root, corpus, stages=stages, steps=sum(s["steps"] for s in stages),
                        output_dir=str(root / "run"), **overrides)


def rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_three_stages_in_one_run(tmp_path, corpus):
    """The stage is on every metrics row and in memory.json; each stage's learning rate is its own
    (a fresh schedule); a checkpoint at each boundary survives rotation; length generalisation per stage
    against its own window; the export records the stages."""
    path = staged(tmp_path, corpus, keep_checkpoints=1, checkpoint_every=1, length_gen={"num_lengths": 2},
                  **{"data.eval_manifest": str(corpus["eval"])})
    assert train_main([str(path), "--quiet"]) == 0
    run = tmp_path / "run"
    logged = rows(run)
    assert [r["stage"] for r in logged if "loss" in r] == ["short"] * 3 + ["middle"] * 2 + ["long"] * 2
    lrs = {r["stage"]: r["lr"] for r in logged if "lr" in r}
    assert lrs["short"] == pytest.approx(1e-3) and lrs["middle"] == pytest.approx(5e-4)
    assert lrs["long"] < 2e-4  # cosine: below its peak at its last step
    kept = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert kept == ["step_000003", "step_000005", "step_000007"]  # the boundaries, and the newest
    assert set(json.loads((run / "memory.json").read_text())["stages"]) == {"short", "middle", "long"}
    for stage, window in (("short", 12), ("middle", 24), ("long", 36)):
        report = json.loads((run / "length_gen" / stage / "length_gen.json").read_text())
        assert report["trained"]["train_window"] == window, stage
    stages = json.loads((run / "length_gen" / "stages.json").read_text())  # the context extending, side by side
    assert [(s, r["train_window"]) for s, r in stages.items()] == [("short", 12), ("middle", 24), ("long", 36)]
    table = (run / "length_gen" / "stages.md").read_text()
    assert "| short | 12 |" in table and "| long | 36 |" in table
    assert (run / "length_gen" / "stages.png").read_bytes()[:4] == b"\x89PNG"
    model = json.loads((run / "export" / "model.json").read_text())
    assert [s["name"] for s in model["provenance"]["stages"]] == ["short", "middle", "long"]
    assert (run / "loss.png").is_file()


def test_staged_run_equals_the_stages_as_separate_resumed_runs(tmp_path, corpus):
    """One run of three stages == a run of the first stage, resumed with two stages, resumed with all
    three (each resume starts at a boundary): the same weights bit for bit, the same losses."""
    measured = {"length_gen": {"num_lengths": 2}, "data.eval_manifest": str(corpus["eval"]), "eval_every": 2}
    one = staged(tmp_path / "one", corpus, **measured)
    assert train_main([str(one), "--quiet"]) == 0
    parts = tmp_path / "parts"
    for n in (1, 2, 3):
        path = staged(parts, corpus, stages=STAGES[:n], **measured)
        resume = ["--resume", str(parts / "run")] if n > 1 else []
        assert train_main([str(path), "--quiet", *resume]) == 0
    a, b = read_trainable(tmp_path / "one" / "run" / "checkpoints" / "step_000007"), \
        read_trainable(parts / "run" / "checkpoints" / "step_000007")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    first = read_trainable(tmp_path / "one" / "run" / "checkpoints" / "step_000003")
    assert any(not torch.equal(first[k], a[k]) for k in a)  # the later stages moved the weights
    losses = lambda run: [r["loss"] for r in rows(run) if "loss" in r]  # noqa: E731
    assert losses(tmp_path / "one" / "run") == losses(parts / "run")
    evaluated = [(r["step"], r["stage"]) for r in rows(tmp_path / "one" / "run") if "eval_loss" in r]
    assert evaluated == [(2, "short"), (4, "middle"), (6, "long"), (7, "long")]  # eval rows carry the stage too


def test_a_stop_at_a_boundary_and_mid_stage_resumes_exactly(tmp_path, corpus, monkeypatch):
    """A stop requested during the last step of stage 1 (the boundary) and one mid-stage 2: each
    --resume continues to the same weights as the uninterrupted run."""
    from ttt_speech_apps.finetune import stop as stop_module

    one = staged(tmp_path / "one", corpus)
    assert train_main([str(one), "--quiet"]) == 0
    reference = read_trainable(tmp_path / "one" / "run" / "checkpoints" / "step_000007")
    for stop_after in (3, 4):
        root = tmp_path / f"stop{stop_after}"
        path = staged(root, corpus)
        calls = {"n": 0}

        def requested(self, env, stop_after=stop_after):
            calls["n"] += 1  # asked once per step (and once more at a stage's end)
            return calls["n"] == stop_after

        with monkeypatch.context() as m:
            m.setattr(stop_module.StopRequest, "requested", requested)
            assert train_main([str(path), "--quiet"]) != 0
        assert train_main([str(path), "--quiet", "--resume", str(root / "run")]) == 0
        resumed = read_trainable(root / "run" / "checkpoints" / "step_000007")
        assert all(torch.equal(reference[k], resumed[k]) for k in reference), stop_after


def test_stages_are_validated_before_step_1(tmp_path, corpus, capsys):
    bad = [{"name": "a", "steps": 2}, {"name": "b", "steps": 2, "batch_size": 7}]
    path = staged(tmp_path, corpus, stages=bad)
    assert train_main([str(path), "--quiet"]) == 2
    assert "stages[1] (b): data.batch_size: 7 rows but the manifest lists only 4" in capsys.readouterr().err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    with pytest.raises(ValueError, match="steps: expected the stages' total, 4"):
        load_train_config(staged(tmp_path, corpus, stages=bad[:1] + [{"name": "b", "steps": 2}]), ["steps=5"])
    with pytest.raises(ValueError, match="stages: expected stages of distinct names"):
        load_train_config(staged(tmp_path, corpus, stages=[bad[0], bad[0]]))
    e2e = {"ttt.layer_type": "e2e_mlp", "trainable": "e2e-meta"}
    with pytest.raises(ValueError, match=r"stages\[1\] \(b\): data.window_frames"):
        load_train_config(staged(tmp_path, corpus, stages=[bad[0], {"name": "b", "steps": 1, "window_frames": 6}],
                                 **e2e))


def test_a_resume_may_change_only_the_stages_that_did_not_run(tmp_path, corpus, capsys):
    path = staged(tmp_path, corpus, stages=STAGES[:1])
    assert train_main([str(path), "--quiet"]) == 0
    changed = [{**STAGES[0], "lr": 2e-3}, STAGES[1]]
    again = staged(tmp_path, corpus, stages=changed)
    assert train_main([str(again), "--quiet", "--resume", str(tmp_path / "run")]) == 2
    assert "stages[0] (short) ran before step 3: optim.lr: 0.001 in the checkpoint, 0.002 now" in \
        capsys.readouterr().err
    # the run's own schedule spelled out in the stage that ran is no change; the next stage is new
    spelled = [{**STAGES[0], "schedule": "constant"}, STAGES[1]]
    assert train_main([str(staged(tmp_path, corpus, stages=spelled)), "--quiet", "--resume", str(tmp_path / "run")]) == 0
    assert [r["stage"] for r in rows(tmp_path / "run") if "loss" in r] == ["short"] * 3 + ["middle"] * 2


def test_the_shipped_tiny_staged_config(tmp_path):
    """configs/tiny_stages.yaml as shipped, on a small synthetic corpus and 2 steps a stage: three stages
    of growing windows, the stage in the log (a line per stage), metrics.jsonl and loss.png."""
    import os
    import subprocess
    import sys

    import yaml

    corpus = make_corpus(tmp_path, recordings=40, frames=130)
    config = yaml.safe_load((ROOT / "configs" / "tiny_stages.yaml").read_text())
    for stage in config["stages"]:
        stage["steps"] = 2
    config.update(steps=6, log_every=1, output_dir=str(tmp_path / "run"), length_gen=None)
    config["data"].update(train_manifest=str(corpus["train"]), eval_manifest=str(corpus["eval"]))
    config["model"]["device"] = "cpu"
    path = tmp_path / "tiny_stages.yaml"
    path.write_text(yaml.safe_dump(config))
    done = subprocess.run([sys.executable, "-m", "ttt_speech_apps.finetune", str(path), "--quiet"],
                          capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "disabled"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "1. short: steps 1-2, window 32 frames" in done.stderr and "3. long: steps 5-6, window 128 frames" in done.stderr
    assert "[middle] step 4/6" in done.stderr
    assert [r["stage"] for r in rows(tmp_path / "run") if "loss" in r] == ["short"] * 2 + ["middle"] * 2 + ["long"] * 2
    assert (tmp_path / "run" / "loss.png").is_file()


def test_a_stage_that_diverges_on_its_first_step_keeps_the_boundary_checkpoint(tmp_path, corpus, monkeypatch):
    """Step 4, the first of stage 2, gives a NaN loss: the checkpoint of step 3 stays the boundary one
    (stage 1's optimizer and rows, not overwritten by stage 2's), and --resume from it runs on to the
    uninterrupted run's weights."""
    from ttt_speech_apps.finetune.hosts import MoshiHost

    fewer_rows = [STAGES[0], {**STAGES[1], "batch_size": 1}]  # stage 2's rows could not fill stage 1's batcher
    one = staged(tmp_path / "one", corpus, stages=fewer_rows)
    assert train_main([str(one), "--quiet"]) == 0
    real, calls = MoshiHost.summarize, {"n": 0}

    def nan_at_step_4(host, sums):
        calls["n"] += 1
        values = real(host, sums)
        return {**values, "loss": float("nan")} if calls["n"] == 4 else values

    path = staged(tmp_path / "bad", corpus, stages=fewer_rows)
    with monkeypatch.context() as m:
        m.setattr(MoshiHost, "summarize", nan_at_step_4)
        assert train_main([str(path), "--quiet"]) == 1
    boundary = tmp_path / "bad" / "run" / "checkpoints" / "step_000003"
    state = torch.load(boundary / "train_state.pt", weights_only=False)
    assert len(state["data"]) == 2 and state["step"] == 3
    assert train_main([str(path), "--quiet", "--resume", str(tmp_path / "bad" / "run")]) == 0
    reference = read_trainable(tmp_path / "one" / "run" / "checkpoints" / "step_000005")
    resumed = read_trainable(tmp_path / "bad" / "run" / "checkpoints" / "step_000005")
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)


def test_a_window_longer_than_every_recording_is_refused_before_step_1(tmp_path, corpus, capsys):
    path = staged(tmp_path, corpus, stages=[STAGES[0], {"name": "huge", "steps": 1, "window_frames": 64}])
    assert train_main([str(path), "--quiet"]) == 2
    assert "stages[1] (huge): data.window_frames: 64 frames is longer than every recording" in capsys.readouterr().err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
