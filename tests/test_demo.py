"""`ttt-speech demo` end to end at a tiny budget: every output docs/demo.md names, the comparison, errors."""
import json
from pathlib import Path

import pytest

from ttt_speech.cli import main
from ttt_speech_apps.demo.config import load_demo_config
from ttt_speech_apps.demo.run import train_configs
from ttt_speech_apps.demo.summary import ascii_plot, range_edges
from ttt_speech_apps.finetune.config import load_train_config

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs/demo.yaml"
PNG = b"\x89PNG\r\n\x1a\n"
SMALL = ["corpus.recordings=24", "corpus.eval_recordings=2", "corpus.frames=48", "corpus.eval_frames=96",
         "train.steps=3", "train.log_every=1", "train.data.batch_size=4", "train.data.window_frames=16",
         "eval_max_frames=96", "eval.native_max_frames=24", "eval.native_max_streams=1", "eval.positions=[48,96]",
         "eval.position_window=16", "eval.gain_window=16", "eval.bin_frames=16", "eval.chunk_size=16",
         "eval.train_window=16", "audio.synthetic_seconds=2", "audio.native_max_frames=8"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = main(["demo", str(CONFIG), *SMALL, f"output_dir={out}", "--quiet"])
    return code, out, buffer.getvalue()


def test_demo_writes_what_the_readme_says(demo_run):
    code, out, stdout = demo_run
    assert code == 0
    summary = json.loads((out / "demo.json").read_text())
    guide = (ROOT / "docs" / "demo.md").read_text()
    for name in ("demo.md", "demo.json", "eval/report.md", "eval/report.json", "eval/nll_curves.png",
                 "eval/ppl_vs_length.png", "eval/fast_weights.png", "ttt/export", "baseline/export", "ttt.yaml",
                 "baseline.yaml", "eval.yaml", "loss.png", "ttt/loss.png", "ttt/ttt_stats.csv"):
        assert (out / name).exists(), name
        assert f"`{name}`" in guide or f"`{name}/`" in guide, f"docs/demo.md does not name {name}"
    for png in [*out.glob("eval/*.png"), out / "loss.png"]:
        assert png.read_bytes()[:8] == PNG
    for run in ("ttt", "baseline"):  # loss.png overlays a held-out loss for both models
        rows = [json.loads(line) for line in (out / run / "metrics.jsonl").read_text().splitlines()]
        assert any("eval_loss" in r for r in rows), run
    assert summary["plots"]["loss"] == str(out / "loss.png")
    assert (out / "demo.md").read_text().startswith("# ttt-speech demo")
    # the terminal table: both models, every range, chunked vs native, and the files at the end
    assert "TTT - baseline" in stdout and "chunked vs native" in stdout and "files:" in stdout
    for row in summary["nll"]["cb1"]:
        assert set(row) >= {"start", "stop", "ttt", "baseline", "diff"}
    assert summary["nll"]["cb1"][-1]["stop"] == 96
    for model in ("ttt", "baseline"):  # the evaluator's own check, inside the demo
        assert summary["modes"][model]["max_abs"] < 1e-4


def test_demo_configs_are_ordinary_configs(demo_run):
    _, out, _ = demo_run
    ttt, base = load_train_config(out / "ttt.yaml"), load_train_config(out / "baseline.yaml")
    assert ttt.ttt is not None and base.ttt is None
    assert ttt.steps == base.steps and ttt.data == base.data and ttt.model == base.model  # same budget and data
    meta = json.loads((out / "baseline/export/model.json").read_text())
    assert meta["ttt"] is False and json.loads((out / "ttt/export/model.json").read_text())["ttt"] is True


def test_demo_audio_path_counts_bad_files(demo_run):
    _, out, _ = demo_run
    audio = json.loads((out / "demo.json").read_text())["audio"]
    if "skipped" in audio:
        pytest.skip(audio["skipped"])
    assert audio["files_skipped"] == 3 and audio["max_abs"] < 1e-4  # corrupt, empty, truncated
    assert audio["distinct_codes"][0] > 1  # the codes carry the audio (a constant stream agrees trivially)


def test_demo_refuses_a_folder_it_did_not_make(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["demo", str(CONFIG), f"output_dir={tmp_path}", "--quiet"]) == 2
    assert "not a demo folder" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").exists() and not (tmp_path / "corpus").exists()
    # a file in the way, and options after the overrides
    assert main(["demo", str(CONFIG), f"output_dir={tmp_path / 'notes.txt'}", "--quiet"]) == 2
    assert "output_dir: " in capsys.readouterr().err and (tmp_path / "notes.txt").read_text() == "mine"


def test_demo_config_errors_name_the_field(tmp_path, capsys):
    assert main(["demo", str(CONFIG), "train.stepz=3", f"output_dir={tmp_path / 'x'}"]) == 2
    assert "demo.train: unknown field(s) ['stepz']" in capsys.readouterr().err
    with pytest.raises(ValueError, match="train.ttt"):
        load_demo_config(CONFIG, ["train.ttt=null"])
    with pytest.raises(ValueError, match="train.model.tiny.card"):
        load_demo_config(CONFIG, ["corpus.card=128"])
    assert not (tmp_path / "x").exists()


def test_baseline_is_the_same_recipe_without_ttt(tmp_path):
    config = load_demo_config(CONFIG, [f"output_dir={tmp_path}"])
    runs = train_configs(config, tmp_path / "train.jsonl", tmp_path / "eval.jsonl")
    assert runs["baseline"].ttt is None and runs["ttt"].ttt == config.train.ttt
    assert runs["ttt"].output_dir == tmp_path / "ttt" and runs["baseline"].output_dir == tmp_path / "baseline"
    assert runs["ttt"].optim == runs["baseline"].optim and runs["ttt"].seed == runs["baseline"].seed


def test_ranges_and_ascii_plot():
    assert range_edges(8, 32, 1024) == [0, 8, 32, 128, 512, 1024]
    assert range_edges(None, 32, 100) == [0, 32, 100]
    lines = ascii_plot({"ttt": [{"start": 0, "stop": 10, "nll": 2.0}, {"start": 10, "stop": 20, "nll": 1.0}],
                        "baseline": [{"start": 0, "stop": 10, "nll": 2.0}, {"start": 10, "stop": 20, "nll": 2.0}]})
    assert lines[0].endswith("|*b") and lines[-3].endswith("| T") and lines[-1].strip().endswith("20")
