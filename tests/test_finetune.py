"""Fine-tuning: config validation, persistent-state batching, carried TTT state, exact resume."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from train_utils import make_corpus, read_trainable, write_config
from ttt_speech import TTTConfig, TTTModel, patch_moshi, schema, tiny_moshi_lm
from ttt_speech.data.manifest import ManifestEntry
from ttt_speech.export import load_exported_lm
from ttt_speech.moshi.carry import TTTCarry
from ttt_speech.moshi.teacher_forcing import chunk_logits, delayed_streams
from ttt_speech_apps.finetune.config import TrainConfig, load_train_config
from ttt_speech_apps.finetune.data import WindowBatcher
from ttt_speech_apps.finetune.cli import main as train_main


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


def losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)]


# ---- config ---------------------------------------------------------------------------------

def test_config_round_trip(tmp_path, corpus):
    config = load_train_config(write_config(tmp_path, corpus), ["optim.lr=3e-4", "ttt.layers=last:0.5"])
    assert config.optim.lr == 3e-4 and config.ttt.layers == "last:0.5"
    assert isinstance(config.ttt, TTTConfig) and config.data.window_frames == 12
    again = schema.from_dict(TrainConfig, schema.to_dict(config), "train")
    assert schema.to_dict(again) == schema.to_dict(config)


@pytest.mark.parametrize("override,message", [
    ("optim.lrr=1", "train.optim: unknown field(s) ['lrr']"),
    ("optim.lr=fast", "train.optim.lr: expected a number, got 'fast'"),
    ("optim.lr=0", "optim.lr: expected a positive number, got 0.0"),
    ("data.batch_size=0", "data.batch_size: expected an integer >= 1, got 0"),
    ("data.window_frames=-3", "data.window_frames: expected an integer >= 1"),
    ("steps=0", "steps: expected an integer >= 1, got 0"),
    ("trainable=everything", "train.trainable: expected one of"),
    ("precision=fp8", "train.precision: expected one of ['fp32', 'bf16']"),
    ("ttt.mini_batch_size=0", "TTTConfig.mini_batch_size"),
    ("data.train_manifest=/nonexistent/train.jsonl", "data.train_manifest: manifest /nonexistent/train.jsonl not found"),
    ("model.tiny.widht=3", "model.tiny: unknown kwarg(s) ['widht']"),
    # values that used to reach torch unchecked (a traceback, or a 40 GB allocation)
    ("model.tiny.dim=-64", "model.tiny.dim: expected an integer >= 1, got -64"),
    ("model.tiny.dim=100000", "-parameter model (at most 2B for a tiny one)"),
    ("model.tiny.n_q=4", "model.tiny.delays: expected n_q + 1 = 5 delays"),
    ("model.device=tpu", "model.device: expected auto, cpu, cuda, cuda:N or mps, got 'tpu'"),
    ("ttt.gate_init=1e308", "TTTConfig.gate_init: expected a number in [-10, 10]"),
    ("ttt.mini_batch_size=100000", "TTTConfig.mini_batch_size: expected at most 1024"),
])
def test_bad_config_is_one_line_error_exit_2_nothing_written(tmp_path, corpus, capsys, override, message):
    path = write_config(tmp_path, corpus)
    assert train_main([str(path), override, "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_bad_manifest_lines(tmp_path, corpus, capsys):
    bad = tmp_path / "bad.jsonl"
    for content, message in [('{"path": "x.safetensors"}', "file"), ("not json", "not a JSON object"),
                             ('{"duration": 3}', "expected an object with a 'path' string"),
                             ('{"path": "a.txt"}', "expected audio")]:
        bad.write_text(content + "\n")
        path = write_config(tmp_path, corpus, **{"data.train_manifest": str(bad)})
        assert train_main([str(path), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert f"{bad}:1" in err and message in err
    assert not (tmp_path / "run").exists()


def test_missing_config_file(tmp_path, capsys):
    assert train_main([str(tmp_path / "nope.yaml")]) == 2
    assert "cannot read config" in capsys.readouterr().err


# ---- persistent batching --------------------------------------------------------------------

def fake_entries(lengths):
    return [ManifestEntry(torch.tensor(0), None) for _ in lengths]  # paths unused by the fake loader


def test_rows_read_their_recordings_in_order_and_reset_at_boundaries():
    lengths = [10, 25, 7, 31, 12]
    recs = [torch.arange(n)[None].repeat(2, 1) + 1000 * i for i, n in enumerate(lengths)]
    batcher = WindowBatcher(fake_entries(lengths), lambda i: recs[i], global_batch=2, window=8, shuffle=False)
    seen = {0: [], 1: []}
    for _ in range(12):
        batch = batcher.next()
        for row, (codes, new, (index, start)) in enumerate(zip(batch.codes, batch.new_recording, batch.where)):
            assert bool(new) == (start == 0)
            n = lengths[index]
            expected = torch.arange(start, start + 8)
            real = expected < n
            assert torch.equal(codes[0][real], expected[real] + 1000 * index)
            assert (codes[0][~real] == -1).all()
            seen[row].append((index, start))
    # row 0 reads recordings 0, 2, 4 (then epoch 2), row 1 reads 1, 3; windows consecutive
    assert seen[0][:6] == [(0, 0), (0, 8), (2, 0), (4, 0), (4, 8), (0, 0)]
    assert seen[1][:7] == [(1, 0), (1, 8), (1, 16), (1, 24), (3, 0), (3, 8), (3, 16)]


def test_batcher_shards_rows_over_ranks_and_restores_position():
    lengths = [9] * 6
    recs = [torch.full((1, n), i) for i, n in enumerate(lengths)]
    single = WindowBatcher(fake_entries(lengths), lambda i: recs[i], 4, 4, seed=3)
    ranks = [WindowBatcher(fake_entries(lengths), lambda i: recs[i], 4, 4, rank=r, world=2, seed=3) for r in (0, 1)]
    for _ in range(5):
        full = single.next().codes
        assert torch.equal(full, torch.cat([b.next().codes for b in ranks]))
    copy = WindowBatcher(fake_entries(lengths), lambda i: recs[i], 4, 4, seed=3)
    copy.load_state_dict(single.state_dict())
    assert torch.equal(copy.next().codes, single.next().codes)
    with pytest.raises(ValueError, match="data.batch_size: 8 rows but the manifest lists only 6"):
        WindowBatcher(fake_entries(lengths), lambda i: recs[i], 8, 4)


def test_not_persistent_resets_every_window():
    recs = [torch.zeros(1, 30)] * 2
    batcher = WindowBatcher(fake_entries([30, 30]), lambda i: recs[i], 2, 8, persistent=False)
    assert all(batcher.next().new_recording.all() for _ in range(3))


# ---- carried TTT state ----------------------------------------------------------------------

def test_carried_state_over_windows_equals_one_streaming_pass():
    """lr 0 (parameters fixed), TTT in place of every attention: windows of the once-delayed stream
    with the carried state give the logits and final state of one chunked streaming pass."""
    lm = tiny_moshi_lm(card=64, text_card=100)
    patch_moshi(lm, TTTConfig(mode="replace", mini_batch_size=4))
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 64, (2, 17, 30), generator=g)
    codes[:, 0] = torch.randint(0, 100, (2, 30), generator=g)
    inputs, targets = delayed_streams(lm, codes)
    W = 7
    with torch.no_grad(), lm.streaming(2):
        ref = [chunk_logits(lm, inputs[:, :, s:s + W], targets[:, :, s:s + W]) for s in range(0, 30, W)]
        ref_state = TTTModel.of(lm).stream_state()
    lm.train()
    with TTTCarry(lm, 2) as carry:
        for i, s in enumerate(range(0, 30, W)):
            carry.next_window(torch.tensor([i == 0, i == 0]))
            text, audio = chunk_logits(lm, inputs[:, :, s:s + W], targets[:, :, s:s + W])
            (audio.nan_to_num().sum() + text.sum()).backward()  # the graph stays within the window
            assert (audio.detach() - ref[i][1]).abs().nan_to_num().max() < 1e-5
            assert (text.detach() - ref[i][0]).abs().max() < 1e-5
        state = carry.state_dict()
    assert state.keys() == ref_state.keys()
    assert max((state[k].float() - ref_state[k].float()).abs().max().item() for k in state) < 1e-5


def test_carry_resets_only_the_masked_rows_and_checkpoint_recompute_is_exact():
    lm = tiny_moshi_lm(card=64, text_card=100, num_layers=2)
    patch_moshi(lm, TTTConfig(mini_batch_size=4, gate_init=0.5))
    lm.train()
    codes = torch.randint(0, 64, (2, 17, 16), generator=torch.Generator().manual_seed(1))
    codes[:, 0] = 3
    inputs, targets = delayed_streams(lm, codes)
    grads = []
    for checkpointing in (False, True):
        lm.transformer.checkpointing = checkpointing
        lm.zero_grad()
        with TTTCarry(lm, 2) as carry:
            carry.next_window(torch.tensor([True, True]))
            chunk_logits(lm, inputs[:, :, :8], targets[:, :, :8])
            carry.next_window(torch.tensor([False, True]))
            fresh = carry.current()[0]
            initial = carry.modules[0].layer.initial_state(2)
            assert torch.equal(fresh.weights[0][1], initial.weights[0][1].detach())  # row 1 reset
            assert not torch.equal(fresh.weights[0][0], initial.weights[0][0].detach())  # row 0 carried
            text, audio = chunk_logits(lm, inputs[:, :, 8:], targets[:, :, 8:])
            (audio.nan_to_num().square().mean() + text.square().mean()).backward()
        grads.append({n: p.grad.clone() for n, p in lm.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    assert max((grads[0][k] - grads[1][k]).abs().max().item() for k in grads[0]) < 1e-6


def test_a_window_without_restarts_still_uses_the_initial_fast_weights_with_zero_gradient():
    """Every rank must reduce the same parameters (FSDP): a carried window with no restart applies an
    all-false reset mask, so W1 / b1 get a gradient, exactly zero (not none)."""
    lm = tiny_moshi_lm(card=64, text_card=100, num_layers=2)
    patch_moshi(lm, TTTConfig(mini_batch_size=4, gate_init=0.5))
    lm.train()
    codes = torch.randint(0, 64, (2, 17, 16), generator=torch.Generator().manual_seed(1))
    inputs, targets = delayed_streams(lm, codes)
    site = TTTModel.of(lm).sites[0]
    with TTTCarry(lm, 2) as carry:
        carry.next_window(torch.tensor([True, True]))
        chunk_logits(lm, inputs[:, :, :8], targets[:, :, :8])
        carry.next_window(torch.tensor([False, False]))  # nothing restarts
        assert not carry.resets_pending
        lm.zero_grad(set_to_none=True)
        text, audio = chunk_logits(lm, inputs[:, :, 8:], targets[:, :, 8:])
        (audio.nan_to_num().square().mean() + text.square().mean()).backward()
    W1, qkv = site.core.W1, site.core.qkv_proj.weight
    assert W1.grad is not None and float(W1.grad.abs().max()) == 0.0
    assert float(qkv.grad.abs().max()) > 0  # the check could fail: other TTT weights do learn


def test_a_step_that_restarts_no_row_leaves_the_initial_fast_weights_bit_identical(tmp_path, corpus):
    """Recordings of 40 frames in windows of 12: steps 1 and 5 restart every row, 2-4 read only carried
    states. W₀ (W1, b1) stays bit-identical through steps 2-4 while every other TTT weight moves, and
    moves again at step 5 (AdamW would otherwise move it by momentum in steps that never read it)."""
    config = write_config(tmp_path, corpus, steps=5, checkpoint_every=1, keep_checkpoints=10, trainable="ttt")
    assert train_main([str(config), "--quiet"]) == 0
    saved = [read_trainable(tmp_path / "run" / "checkpoints" / f"step_{s:06d}") for s in range(1, 6)]
    initial = [n for n in saved[0] if n.rsplit(".", 1)[-1] in ("W1", "b1")]
    others = [n for n in saved[0] if n not in initial]
    assert initial and others

    def moved(names, a, b):
        return [n for n in names if not torch.equal(saved[a][n], saved[b][n])]

    for step in (1, 2, 3):  # checkpoints after steps 2, 3, 4 against the one before
        assert moved(initial, step - 1, step) == [], step
        assert moved(others, step - 1, step) == others, step
    assert moved(initial, 3, 4) == initial  # the check can fail: step 5 restarts the rows and moves W₀


def test_a_bf16_run_leaves_nothing_behind_for_the_next_run_in_the_process(tmp_path, corpus):
    """A bf16 run (bf16 model, bf16 autocast), then an E2E run in the same process: the E2E run's
    losses are those of a fresh process. (The difference once seen, and the 3.4e-4 of a resume onto
    another world size, came from the tests' config writer, which wrote each override into one
    shared model section: every later config of the session got a bf16 model.)"""
    e2e = {"ttt": {"layer_type": "e2e_mlp", "mini_batch_size": 4, "gate_init": 0.5}, "trainable": "e2e-meta",
           "steps": 2}
    fresh = write_config(tmp_path / "fresh", corpus, **e2e)
    subprocess.run([sys.executable, "-m", "ttt_speech_apps.finetune", str(fresh), "--quiet"], check=True,
                   capture_output=True, env={**os.environ, "WANDB_MODE": "disabled"})
    bf16 = write_config(tmp_path / "bf16", corpus, steps=2, precision="bf16", **{"model.dtype": "bfloat16"})
    assert train_main([str(bf16), "--quiet"]) == 0
    after = write_config(tmp_path / "after", corpus, **e2e)
    assert "bfloat16" not in after.read_text()
    assert train_main([str(after), "--quiet"]) == 0
    assert losses(tmp_path / "after" / "run") == losses(tmp_path / "fresh" / "run")


# ---- training runs --------------------------------------------------------------------------

def test_exact_resume(tmp_path, corpus):
    """4 steps in one go == 2 steps, stop, --resume, 2 more: identical per-step losses."""
    one = write_config(tmp_path / "a", corpus, output_dir=str(tmp_path / "a" / "run"))
    assert train_main([str(one), "--quiet"]) == 0
    two = write_config(tmp_path / "b", corpus, output_dir=str(tmp_path / "b" / "run"), steps=2)
    assert train_main([str(two), "--quiet"]) == 0
    assert train_main([str(two), "steps=4", "--resume", str(tmp_path / "b" / "run"), "--quiet"]) == 0
    full, resumed = losses(tmp_path / "a" / "run"), losses(tmp_path / "b" / "run")
    assert len(full) == 4 and resumed == full


def test_run_outputs_and_export_reload(tmp_path, corpus):
    path = write_config(tmp_path, corpus, trainable="ttt+lora", **{
        "data.eval_manifest": str(corpus["eval"]), "lora.rank": 2, "steps": 3, "eval_every": 2,
        "checkpoint_every": 1, "keep_checkpoints": 2})
    assert train_main([str(path), "--quiet"]) == 0
    run = tmp_path / "run"
    for name in ("metrics.jsonl", "ttt_stats.csv", "loss.png", "export/model.json", "export/ttt.safetensors",
                 "export/lora.safetensors"):
        assert (run / name).is_file(), name
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000002", "step_000003"]
    header, *rows = (run / "ttt_stats.csv").read_text().splitlines()
    assert header == "step,layer,w_norm,w_delta,eta_mean" and len(rows) == 3 * 2  # 3 log steps x 2 layers
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_loss" in m for m in metrics)
    assert all(k in metrics[0] for k in ("loss", "text_loss", "audio_loss", "cb1_loss", "lr", "grad_norm", "tokens_per_s"))
    lm, model = load_exported_lm(run / "export")
    assert model.tiny["dim"] == 64 and TTTModel.of(lm).config.mini_batch_size == 4
    trained = torch.load(run / "checkpoints" / "step_000003" / "train_state.pt", weights_only=False)
    assert trained["step"] == 3


def test_non_finite_loss_stops_with_checkpoint(tmp_path, corpus, capsys):
    path = write_config(tmp_path, corpus, **{"optim.lr": 1e30, "optim.grad_clip": 0.0, "steps": 6})
    assert train_main([str(path), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "non-finite" in err and "last good state saved" in err
    assert list((tmp_path / "run" / "checkpoints").iterdir())


@pytest.mark.parametrize("failing_step", [3, 5], ids=["carried", "restarting"])
def test_a_diverged_step_is_checkpointed_as_the_step_before_it(tmp_path, corpus, monkeypatch, failing_step):
    """The checkpoint written when step k diverges holds the state before step k (nothing is
    snapshotted per step: the carry keeps the state its window started from): the same weights and
    AdamW state as the periodic checkpoint of step k - 1, and resumed it gives the uninterrupted run's
    losses. Step 5 restarts every row (recordings of 40 frames, windows of 12); step 3 carries."""
    from safetensors.torch import load_file

    from ttt_speech_apps.finetune.hosts import MoshiHost

    good = write_config(tmp_path / "good", corpus, steps=failing_step + 1, checkpoint_every=1, keep_checkpoints=10)
    assert train_main([str(good), "--quiet"]) == 0
    calls = {"n": 0}
    real = MoshiHost.summarize

    def fails_at_step_k(host, sums):
        calls["n"] += 1
        values = real(host, sums)
        return {**values, "loss": float("nan")} if calls["n"] == failing_step else values

    monkeypatch.setattr(MoshiHost, "summarize", fails_at_step_k)
    bad = write_config(tmp_path / "bad", corpus, steps=failing_step + 1)
    assert train_main([str(bad), "--quiet"]) == 1
    name = f"step_{failing_step - 1:06d}"
    a, b = tmp_path / "good" / "run" / "checkpoints" / name, tmp_path / "bad" / "run" / "checkpoints" / name
    mine, theirs = load_file(str(a / "trainable.safetensors")), load_file(str(b / "trainable.safetensors"))
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    sa, sb = (torch.load(p / "train_state.pt", weights_only=False) for p in (a, b))
    assert sa["data"] == sb["data"] and sa["step"] == sb["step"] == failing_step - 1
    adam_a, adam_b = sa["optimizer"]["state"], sb["optimizer"]["state"]
    assert adam_a.keys() == adam_b.keys() and all(
        torch.equal(adam_a[n][k], adam_b[n][k]) for n in adam_a for k in adam_a[n])
    monkeypatch.setattr(MoshiHost, "summarize", real)
    assert train_main([str(bad), "--resume", str(b), "--quiet"]) == 0
    assert losses(tmp_path / "bad" / "run")[-2:] == losses(tmp_path / "good" / "run")[-2:]


def test_baseline_without_ttt(tmp_path, corpus):
    path = write_config(tmp_path, corpus, ttt=None, steps=2)
    assert train_main([str(path), "--quiet"]) == 0
    assert not (tmp_path / "run" / "ttt_stats.csv").exists() and len(losses(tmp_path / "run")) == 2


def test_training_config_reference_and_shipped_configs_are_in_sync():
    """docs/training.md holds the generated field reference; every shipped training config loads."""
    from pathlib import Path

    from ttt_speech.schema import markdown_reference

    assert markdown_reference(TrainConfig) in Path("docs/training.md").read_text(), \
        "regenerate the table: python -c 'from ttt_speech_apps.finetune.config import TrainConfig; " \
        "from ttt_speech.schema import markdown_reference; print(markdown_reference(TrainConfig))'"
    for name in ("tiny.yaml", "moshi_7b_ttt.yaml"):
        config = load_train_config(Path("configs") / name)
        assert config.ttt is not None


def test_bf16_autocast_with_gradient_checkpointing_runs(tmp_path, corpus):
    path = write_config(tmp_path, corpus, precision="bf16", gradient_checkpointing=True, steps=1)
    assert train_main([str(path), "--quiet"]) == 0
    values = losses(tmp_path / "run")
    assert len(values) == 1 and all(math.isfinite(v) for v in values)  # one step logged, its loss a number


def test_wandb_offline_needs_no_network(tmp_path, corpus, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    path = write_config(tmp_path, corpus, steps=2)
    assert train_main([str(path), "--wandb-offline", "--quiet"]) == 0
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*"))


def test_length_generalisation_after_training(tmp_path, corpus):
    path = write_config(tmp_path, corpus, steps=1, **{"data.eval_manifest": str(corpus["eval"]),
                                                      "length_gen": {}})
    assert train_main([str(path), "--quiet"]) == 0
    result = json.loads((tmp_path / "run" / "length_gen" / "length_gen.json").read_text())["trained"]
    points = next(iter(result["groups"].values()))["points"]
    assert len(points) == 20
    assert any("skipped" in p for p in points) and any("cumulative" in p for p in points)  # 40 frames < 10x12
    assert (tmp_path / "run" / "length_gen" / "length_gen.png").is_file()
