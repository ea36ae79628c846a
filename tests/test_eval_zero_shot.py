"""`ttt-speech eval zero-shot` end to end, offline, on the fixture of real LibriVox speech
(eval/zero_shot_fixture.py; skipped cleanly without Debian's pocketsphinx-testdata): the command and
its outputs, accuracy that moves when a model learns forward speech, the swap rule, the statistics."""
from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch

from ttt_speech.cli import main
from ttt_speech.schema import from_dict
from ttt_speech_apps.eval import fixture
from ttt_speech_apps.eval import zero_shot_fixture as zsf
from ttt_speech_apps.eval.config import EvalConfig
from ttt_speech_apps.eval.pipeline import evaluate
from ttt_speech_apps.eval.zero_shot import ZeroShot, mcnemar_p, wilson_interval

PNG = b"\x89PNG\r\n\x1a\n"
TINY = {"dim": 64, "num_layers": 2, "num_heads": 2, "text_card": 100, "context": 64, "depformer_dim": 32,
        "depformer_dim_feedforward": 64, "depformer_num_layers": 1}
TASKS = ["swuggy", "tstorycloze"]  # a reversed and a halves-swapped negative


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    if not fixture.SOURCE.is_dir():
        pytest.skip("pocketsphinx-testdata is not installed (apt-get install -y pocketsphinx-testdata)")
    root = tmp_path_factory.mktemp("zero_shot")
    zsf.write_fixture(root / "data", tasks=(*TASKS, "sblimp"))
    return root


def config(suite, tmp_path, **zero_shot) -> EvalConfig:
    return from_dict(EvalConfig, {
        "model": {"tiny": TINY, "device": "cpu"}, "ttt": {"mini_batch_size": 4, "gate_init": 0.5},
        "eval": {"baseline": True, "chunk_size": 16},
        "data": {"codes_cache": str(suite / "codes")},
        "zero_shot": {"tasks": TASKS, "path": str(suite / "data"), **zero_shot},
        "output_dir": str(tmp_path / "out")}, "config")


def test_the_command_offline_on_the_fixture(suite, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    path = tmp_path / "zero_shot.yaml"
    path.write_text(json.dumps({"model": {"tiny": TINY, "device": "cpu"}, "ttt": {"mini_batch_size": 4},
                                "data": {"codes_cache": str(suite / "codes")},
                                "zero_shot": {"tasks": ["sblimp", "swuggy"], "path": str(suite / "data"),
                                              "max_pairs": 12, "seed": 1},
                                "output_dir": str(tmp_path / "out")}))
    assert main(["eval", "zero-shot", str(path), "--baseline", "--quiet"]) == 0
    out = tmp_path / "out"
    report = json.loads((out / "zero_shot.json").read_text())
    assert list(report["results"]) == ["ttt", "baseline"] and list(report["tasks"]) == ["sblimp", "swuggy"]
    sblimp = report["tasks"]["sblimp"]
    assert sblimp["rows"] == 32 and sblimp["tokens"] == "cb1" and sblimp["reduction"] == "mean"
    assert sblimp["pairs"] + len(sblimp["skipped"]) == 12  # the seeded subset holds the unreadable pair
    assert [s["id"] for s in sblimp["skipped"]] == ["sblimp/3"] and "negative" in sblimp["skipped"][0]["reason"]
    for per_task in report["results"].values():
        for entry in per_task.values():
            lo, hi = entry["ci95"]
            assert 0 <= lo <= entry["accuracy"] <= hi <= 1 and entry["pairs"] >= 11
            assert entry["mean_nll_positive"] != entry["mean_nll_negative"]  # the two sides differ
    vs = report["vs_baseline"]["ttt"]["swuggy"]
    assert 0 <= vs["p_value"] <= 1 and vs["model_only"] + vs["baseline_only"] <= 12
    assert (out / "zero_shot.png").read_bytes()[:8] == PNG
    md = (out / "zero_shot.md").read_text()
    assert "| task | tokens | NLL | pairs | ttt | baseline | published |" in md and "## Model − baseline" in md
    assert "`sblimp/3`" in md and "![zero_shot](zero_shot.png)" in md and "| 58.9 |" in md
    printed = capsys.readouterr().out
    assert "sblimp (11 pairs, cb1, mean NLL): ttt " in printed and "ttt − baseline:" in printed

    # wandb: the summary values and the plot, under zero_shot/
    from types import SimpleNamespace

    from ttt_speech_apps.eval.writers import log_wandb
    from ttt_speech_apps.eval.zero_shot import ZeroShotResult

    logged, summary = {}, {}
    run = SimpleNamespace(summary=summary, log=logged.update, save=lambda *a, **k: None)
    log_wandb(run, ZeroShotResult(report), {"zero_shot": out / "zero_shot.png"}, [out / "zero_shot.json"])
    assert set(logged) == {"zero_shot/plots/zero_shot"}
    assert summary["zero_shot/ttt/swuggy/accuracy"] == report["results"]["ttt"]["swuggy"]["accuracy"]
    assert summary["zero_shot/ttt/sblimp/p_value"] == report["vs_baseline"]["ttt"]["sblimp"]["p_value"]
    assert {"zero_shot/baseline/swuggy/ci95_low", "zero_shot/ttt/swuggy/minus_baseline"} <= set(summary)


def test_a_task_whose_dataset_is_absent_is_one_line_before_any_model_loads(suite, tmp_path, capsys, monkeypatch):
    from ttt_speech_apps.eval import pipeline

    monkeypatch.setattr(pipeline, "build_models", lambda *a, **k: pytest.fail("a model was built before the check"))
    path = tmp_path / "zero_shot.yaml"
    path.write_text(json.dumps({"zero_shot": {"tasks": ["sstorycloze"], "path": str(suite / "data")},
                                "output_dir": str(tmp_path / "out")}))
    assert main(["eval", "zero-shot", str(path), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ttt-speech eval: error: zero_shot.tasks.sstorycloze: no dataset folder") and "\n" not in err
    assert main(["eval", "zero-shot", str(path), "--quiet", "zero_shot.tasks=[nope]"]) == 2
    assert "config.zero_shot: tasks[0]: expected one of ['swuggy'" in capsys.readouterr().err


def test_swapping_the_columns_turns_accuracy_a_into_one_minus_a(suite, tmp_path):
    import datasets

    swapped = tmp_path / "swapped"
    for task in TASKS:
        data = datasets.load_from_disk(str(suite / "data" / task))
        data.rename_columns({"positive": "negative", "negative": "positive"}).save_to_disk(str(swapped / task))
    straight, _ = evaluate(ZeroShot(config(suite, tmp_path / "a")), progress=False)
    crossed, _ = evaluate(ZeroShot(replace(config(suite, tmp_path / "b"), zero_shot=replace(
        config(suite, tmp_path).zero_shot, path=swapped))), progress=False)
    for model, per_task in straight.report["results"].items():
        for task, entry in per_task.items():
            other = crossed.report["results"][model][task]
            assert entry["pairs"] == other["pairs"] == 32
            assert entry["accuracy"] + other["accuracy"] == 1.0, (model, task)  # exactly: ties count half
    assert {e["accuracy"] for per_task in straight.report["results"].values() for e in per_task.values()} != {0.5}


def test_a_model_trained_on_forward_speech_tells_it_from_reversed_speech(suite, tmp_path):
    """The accuracy can move: the tiny model, trained a few hundred steps on the forward windows, prefers
    them to their time-reversed copies (swuggy's negatives); untrained, it does not."""
    from ttt_speech.export import save_export
    from ttt_speech.moshi.loss import masked_ce
    from ttt_speech_apps.eval.plan import build_models

    untrained = config(suite, tmp_path / "untrained", tasks=["swuggy"])
    probe = ZeroShot(replace(untrained, eval=replace(untrained.eval, baseline=False)))
    plan = probe.plan()
    model = next(build_models(plan))
    (data,) = probe.load(plan, model.lm, progress=False)
    lm = model.lm.train()
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(lm.parameters(), lr=3e-3)
    a0, a1 = lm.audio_offset, lm.audio_offset + lm.dep_q
    for step in range(240):
        batch = torch.stack([data.positive[(4 * step + i) % len(data.positive)] for i in range(4)])
        out = lm(batch)
        loss = masked_ce(out.logits, batch[:, a0:a1], out.mask).sum() / out.mask.sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    save_export(lm.eval(), plan.base, tmp_path / "export", trainable="full")
    trained = replace(untrained, ttt=None, export=tmp_path / "export", output_dir=tmp_path / "trained")
    before, _ = evaluate(ZeroShot(untrained), progress=False)
    after, _ = evaluate(ZeroShot(trained), progress=False)
    acc_before = before.report["results"]["ttt"]["swuggy"]["accuracy"]
    acc_after = after.report["results"]["ttt"]["swuggy"]["accuracy"]
    assert acc_after >= 0.85 and acc_after - acc_before >= 0.25, (acc_before, acc_after)
    assert after.report["vs_baseline"]["ttt"]["swuggy"]["p_value"] < 0.05  # the base model does not


def test_the_statistics():
    lo, hi = wilson_interval(8, 10)
    assert (round(lo, 4), round(hi, 4)) == (0.4902, 0.9433)  # the textbook Wilson interval of 8 / 10
    assert wilson_interval(0, 0) == (0.0, 1.0)
    assert mcnemar_p(0, 0) == 1.0 and mcnemar_p(5, 5) == 1.0
    assert mcnemar_p(10, 0) == pytest.approx(2 / 2 ** 10) and mcnemar_p(0, 10) == mcnemar_p(10, 0)
    assert mcnemar_p(8, 2) == pytest.approx(2 * sum(math.comb(10, i) for i in range(3)) / 2 ** 10)


def test_a_recording_too_short_to_score_skips_its_pair(tmp_path):
    """Codebook 1 (delay 0) scores a 1-frame recording; every audio codebook needs delay + 1 = 2 frames."""
    import numpy as np

    from ttt_speech import tiny_moshi_lm
    from ttt_speech.data.cache import CodesCache
    from ttt_speech.models import ModelConfig, load_mimi
    from ttt_speech_apps.eval.zero_shot import MIMI_SAMPLE_RATE, encode_pairs
    from ttt_speech_apps.eval.zero_shot_data import TASKS, read_pairs

    rng = np.random.default_rng(0)
    sound = [(0.1 * rng.standard_normal(int(16000 * s))).astype(np.float32) for s in (0.5, 0.05, 0.5)]
    task = TASKS["salmon_speaker"]
    zsf.write_task(tmp_path / "data" / task.name, task, [zsf.flac_bytes(a) for a in sound],
                   [zsf.flac_bytes(a[::-1].copy()) for a in sound])
    model = ModelConfig(tiny={"card": 2048}, device="cpu")
    cache = CodesCache(tmp_path / "codes", model.codec_id(), lambda: load_mimi(model))
    lm = tiny_moshi_lm(**TINY)
    for tokens, skipped in (("audio", ["salmon_speaker/1"]), ("cb1", [])):
        data = encode_pairs(read_pairs(task, tmp_path / "data", MIMI_SAMPLE_RATE), cache, lm, tokens, False)
        assert [i for i, _ in data.skipped] == skipped, tokens
        assert all("too short to score (at least 2" in reason for _, reason in data.skipped)
        assert len(data.ids) == 3 - len(skipped)
    assert min(c.shape[1] for c in data.positive) == 1  # codebook 1 scores the 1-frame recording


def test_recordings_scored_in_batches_score_as_one_at_a_time(tmp_path):
    """zero_shot.batch_size sorts the recordings by length and scores them side by side: each pair's NLL
    must land on its own pair and side, as one recording per call gives it (recordings of 0.3-1.5 s)."""
    import numpy as np

    from ttt_speech import TTTConfig, patch_moshi, tiny_moshi_lm
    from ttt_speech.data.cache import CodesCache
    from ttt_speech.models import ModelConfig, load_mimi
    from ttt_speech_apps.eval.plan import EvalModel, PlannedModel
    from ttt_speech_apps.eval.zero_shot import MIMI_SAMPLE_RATE, encode_pairs, score_task
    from ttt_speech_apps.eval.zero_shot_data import TASKS, read_pairs

    rng = np.random.default_rng(0)
    sound = [(0.1 * rng.standard_normal(int(16000 * s))).astype(np.float32) for s in rng.uniform(0.3, 1.5, 6)]
    task = TASKS["tstorycloze"]
    zsf.write_task(tmp_path / "data" / task.name, task, [zsf.flac_bytes(a) for a in sound],
                   [zsf.flac_bytes(a[::-1].copy()) for a in sound[::-1]])  # each negative of another length
    mimi = ModelConfig(tiny={"card": 2048}, device="cpu")
    cache = CodesCache(tmp_path / "codes", mimi.codec_id(), lambda: load_mimi(mimi))
    lm = tiny_moshi_lm(**TINY)
    patch_moshi(lm, TTTConfig(mini_batch_size=4, gate_init=0.5))
    data = encode_pairs(read_pairs(task, tmp_path / "data", MIMI_SAMPLE_RATE), cache, lm, "audio", False)
    assert len({c.shape[1] for c in data.positive + data.negative}) >= 5  # lengths differ: the sort reorders
    model = EvalModel(PlannedModel("ttt", "ttt", None, None, None, None, 8, ("chunked",)), lm, "test")
    one, many = score_task(model, data, "mean", 1), score_task(model, data, "mean", 4)
    for side in ("positive", "negative"):
        assert max(abs(x - y) for x, y in zip(one[side], many[side])) < 1e-5
        assert len(set(one[side])) == 6
