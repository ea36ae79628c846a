"""`ttt-speech eval` end to end on a LibriLight-layout fixture of real LibriVox speech.

The fixture comes from Debian's pocketsphinx-testdata (skipped cleanly when it is not installed):
one real book (5 utterances, 24.7 s) with a corrupt, an empty and a truncated file, plus one
short synthetic book. Audio is encoded once per module by the seeded random Mimi (tiny model),
whose codes carry the audio: the tests check that they are not constant.
"""
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile
import torch
import yaml

from ttt_speech import TTTConfig, patch_moshi, tiny_moshi_lm
from ttt_speech.cli import main
from ttt_speech.data.codes import load_codes
from ttt_speech.schema import from_dict
from ttt_speech_apps.eval import fixture
from ttt_speech_apps.eval.config import EvalConfig, load_config
from ttt_speech_apps.eval.length_gen import FILES as LENGTH_GEN_FILES
from ttt_speech_apps.eval.length_gen import LengthGen, LengthGenResult, length_generalisation
from ttt_speech_apps.eval.librilight import LibriLight
from ttt_speech_apps.eval.pipeline import evaluate
from ttt_speech_apps.eval.plan import build_models, plan_eval
from ttt_speech_apps.eval.writers import write_result
from ttt_speech_apps.eval.books import Book, Stream

ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"
TINY = {"dim": 64, "num_layers": 2, "num_heads": 2, "text_card": 100, "context": 100}


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    if not fixture.SOURCE.is_dir():
        pytest.skip("pocketsphinx-testdata is not installed (apt-get install -y pocketsphinx-testdata)")
    root = tmp_path_factory.mktemp("librilight")
    info = fixture.make_fixture(root, synthetic_books=1, synthetic_seconds=6.0, chapters=3, corrupt=True)
    return root, info, tmp_path_factory.mktemp("codes")


def write_config(path: Path, tree, **sections) -> Path:
    root, _, cache = tree
    data = {
        "model": {"name": "tiny", "tiny": TINY, "device": "cpu"},
        "ttt": {"mini_batch_size": 16, "gate_init": 0.5},
        "data": {"root": str(root), "codes_cache": str(cache), "max_frames": 320},
        "eval": {"chunk_size": 32, "native_max_frames": 32, "train_window": 32, "bin_frames": 25,
                 "positions": [60, 300, 1000], "position_window": 50, "gain_window": 50},
        "output_dir": str(path.parent / "out"),
    }
    for key, value in sections.items():
        data.setdefault(key, {}).update(value) if isinstance(value, dict) else data.__setitem__(key, value)
    path.write_text(yaml.safe_dump(data))
    return path


def test_fixture_has_the_librilight_layout(tree):
    root, info, _ = tree
    real = root / "small/9999/sense_and_sensibility_01_austen_64kb"
    assert len(list(real.glob("sense*.flac"))) == 5 and len(info["bad_files"]) == 3
    meta = json.loads(next(real.glob("sense*.json")).read_text())
    assert {"speaker", "book_meta", "snr", "voice_activity"} <= set(meta)
    assert {"genre", "Dramatic Readings", "meta_genre"} <= set(meta["book_meta"])


def test_librilight_both_modes_with_baseline_end_to_end(tree, tmp_path, capsys):
    config = write_config(tmp_path / "eval.yaml", tree)
    assert main(["eval", "librilight", str(config), "--mode", "both", "--baseline", "--quiet"]) == 0
    out = tmp_path / "out"
    for name in ("report.json", "report.md", "per_position.safetensors"):
        assert (out / name).is_file()
    for name in ("nll_curves.png", "ppl_vs_length.png", "fast_weights.png"):
        assert (out / name).read_bytes()[:8] == PNG
    assert not list(out.glob(".*tmp*"))  # atomic writes leave no temporary files
    report = json.loads((out / "report.json").read_text())
    assert set(report["runs"]) == {"ttt/chunked", "ttt/native", "baseline/chunked", "baseline/native"}
    assert_report_schema(report)

    # corrupt, empty and truncated files are skipped and counted
    skipped = {Path(s["path"]).name: s["reason"] for s in report["data"]["skipped_files"]}
    assert set(skipped) == {"zz_corrupt.flac", "zz_empty.flac", "zz_truncated.flac"}
    assert report["data"]["counts"]["files_skipped"] == 3 and report["data"]["counts"]["streams"] == 2
    assert "truncated" in skipped["zz_truncated.flac"]

    # the audio carries information: every encoded file's codes vary in each codebook, and the
    # report counts the distinct codes of every stream
    code_files = sorted(tree[2].rglob("*.safetensors"))
    assert len(code_files) >= 9  # 5 real utterances, the truncated one, 3 synthetic chapters
    for path in code_files:
        codes = load_codes(path).codes
        assert codes.shape[0] == 8 and all(len(row.unique()) > 1 for row in codes), path
    distinct = [s["distinct_codes"] for s in report["data"]["streams"]]
    assert len(distinct) == 2 and all(len(d) == 8 and min(d) > 1 for d in distinct)
    assert report["data"]["codes"] == {"distinct_min": min(map(min, distinct)),
                                       "distinct_max": max(map(max, distinct)), "constant_streams": []}

    # the evaluator's self-check: both modes agree for the TTT model and the baseline
    for model in ("ttt", "baseline"):
        c = report["comparisons"]["modes"][model]
        assert c["max_abs"] <= 1e-4 and all(s["frames"] == 32 for s in c["per_stream"])
        assert c["speed_ratio"] > 0
        # the modes' NLLs compared on the same frames (the runs' own tables cover different ones)
        assert c["shared"]["frames"] == 64 and c["shared"]["streams"] == 2
        assert abs(c["shared"]["chunked_nll"] - c["shared"]["native_nll"]) <= 1e-4
    native = report["runs"]["ttt/native"]["coverage"]
    # 387 frames: the 16 kHz files resampled aligned, without the 32 ms delay and chunk padding of sphn's
    # resampler (390 with them)
    assert native == {"streams": 2, "of_streams": 2, "frames": 64, "of_frames": 387, "max_frames": 32}
    assert report["runs"]["ttt/chunked"]["coverage"]["max_frames"] is None
    vs = report["comparisons"]["vs_baseline"]["ttt"]
    assert set(vs) == {"chunked", "native"}
    diffs = [b["diff"] for b in vs["chunked"]["curve"]["cb1"]]
    assert len(diffs) > 5 and len(set(diffs)) > 5 and any(d != 0 for d in diffs)  # the TTT branch changes the NLL
    assert any("se" in b for b in vs["chunked"]["curve"]["cb1"])  # 2 streams share the early bins
    # the fixture has no transcripts: the text stream is padding, its NLL measures nothing
    assert set(report["data"]["uninformative"]) == {"text"}

    run = report["runs"]["ttt/chunked"]
    assert set(run["groups"]) == {"text", "cb1", "cb2-8"}
    positions = {p["position"]: p for p in run["groups"]["cb1"]["positions"]}
    assert positions[60]["cumulative"]["n_streams"] == 2 and positions[300]["cumulative"]["n_streams"] == 1
    assert "skipped" in positions[1000] and "cumulative" not in positions[1000]  # no stream is 1000 frames long
    points = run["groups"]["text"]["length_gen"]["points"]
    assert len(points) == 20 and any("skipped" in p for p in points)
    assert run["fast_weights"] and run["fast_weights"][0]["layers"][0]["layer"] == 0
    assert report["runs"]["baseline/chunked"]["fast_weights"] is None
    assert report["alignment"]["ttt"]["aligned"] and report["alignment"]["ttt"]["efficiency"] > 0.9

    import wandb

    from ttt_speech_apps.eval.report import scalars
    from ttt_speech_apps.eval.writers import log_wandb

    values = scalars(report["runs"], left_out=["text"])
    assert values["eval/ttt/chunked/cb1/cumulative_nll@300"] == positions[300]["cumulative"]["nll"]
    assert not any("@1000" in k for k in values)  # skipped points are not logged as numbers
    assert not any("/text/" in k for k in values) and any("/cb1/" in k for k in values)
    run = wandb.init(mode="disabled", dir=str(tmp_path))
    result = SimpleNamespace(wandb_prefix="eval", scalars=lambda: values, tables=lambda: {})
    log_wandb(run, result, {"nll_curves": out / "nll_curves.png"}, [out / "report.json"])
    run.finish()

    md = (out / "report.md").read_text()
    for section in ("## NLL (perplexity) at positions", "## Length generalisation", "## Chunked vs native",
                    "## Model − baseline", "## Speed and memory", "zz_corrupt.flac", "![nll_curves](nll_curves.png)",
                    "![ppl_vs_length](ppl_vs_length.png)", "| ttt/native† |",
                    "ttt/native† scored the first 32 frames of each stream (64 of 387 frames)",
                    "Not reached by any stream (left out): position(s) 1,000.",
                    "- text: left out of every table and plot: the text stream is one repeated token",
                    f"- Mimi codes: {report['data']['codes']['distinct_min']}-{report['data']['codes']['distinct_max']} "
                    "distinct values per codebook"):
        assert section in md
    assert "### text" not in md and "| 1,000 |" not in md and "| skipped" not in md
    assert "chunked vs native on the same 64 frames" in capsys.readouterr().out


# report.json's schema, as earlier reports and the demo's reader (demo/summary.py) read it: new keys
# may be added below these, none of these may go
REPORT_KEYS = ["format", "version", "kind", "title", "created", "environment", "config", "settings", "models", "data",
               "alignment", "markers", "runs", "comparisons", "plots"]
RUN_KEYS = ["mode", "streams", "coverage", "speed", "memory", "groups", "per_codebook", "fast_weights"]
GROUP_KEYS = ["label", "curve", "curve_log", "positions", "length_gen", "slope", "slope_beyond_window", "context_gain"]
MODEL_KEYS = ["source", "ttt", "params", "attention_context"]
MODES_KEYS = ["max_abs", "mean_abs", "shared", "per_stream", "speed_ratio", "chunked_frames_per_s",
              "native_frames_per_s", "chunked_peak_bytes", "native_peak_bytes", "memory_kind"]


def assert_report_schema(report: dict) -> None:
    """Passes on the demo's report.json written before the evaluator became a pipeline of probes
    (checked once by hand, with its inner-loop grid), and on this test's."""
    assert list(report) == REPORT_KEYS and (report["format"], report["version"]) == ("ttt-speech-eval", 1)
    for name, run in report["runs"].items():
        assert list(run) == RUN_KEYS, name
        for group, g in run["groups"].items():
            assert list(g) == GROUP_KEYS, (name, group)
            assert {"train_window", "points"} <= set(g["length_gen"]) or "skipped" in g["length_gen"]
    assert all(list(m)[:4] == MODEL_KEYS for m in report["models"].values())
    assert {"modes", "vs_baseline"} <= set(report["comparisons"]) <= {"modes", "vs_baseline", "inner_loop"}
    assert all(list(c) == MODES_KEYS for c in report["comparisons"]["modes"].values())
    assert all(set(per_mode) <= {"chunked", "native"} and all(list(d) == ["positions", "curve"] for d in per_mode.values())
               for per_mode in report["comparisons"]["vs_baseline"].values())
    assert {"train_window", "attention_context"} == set(report["markers"])
    assert {"streams", "skipped_files", "left_out_books", "counts", "codes", "cache", "uninformative"} == set(
        report["data"])


def test_bad_audio_is_skipped_and_a_mixed_book_left_out(tree, tmp_path, capfd):
    """A float WAV with a NaN sample (16 kHz: it needs resampling, where sphn used to panic) is a
    skipped file; a book mixing mono and stereo files is left out; the rest is evaluated."""
    (name, speech, _), *_ = fixture.read_utterances()
    second = speech[:fixture.RATE]
    root = tmp_path / "librilight"
    mixed, real = root / "small/1/mixed", root / "small/2/real"
    mixed.mkdir(parents=True)
    real.mkdir(parents=True)
    soundfile.write(str(mixed / "1_m.flac"), second, fixture.RATE)
    soundfile.write(str(mixed / "2_m.flac"), second[::-1].copy(), fixture.RATE)
    soundfile.write(str(mixed / "3_s.flac"), np.stack([second, second[::-1]], axis=1), fixture.RATE)
    soundfile.write(str(real / "1_r.flac"), speech, fixture.RATE)
    broken = speech.copy()
    broken[len(broken) // 2] = np.nan
    soundfile.write(str(real / "2_nan.wav"), broken, fixture.RATE, subtype="FLOAT")
    config = write_config(tmp_path / "eval.yaml", (root, None, tmp_path / "codes"), eval={"positions": [60]})
    assert main(["eval", "librilight", str(config), "--quiet"]) == 0
    err = capfd.readouterr().err
    assert "panicked" not in err and "Traceback" not in err
    data = json.loads((tmp_path / "out/report.json").read_text())["data"]
    assert [s["id"] for s in data["streams"]] == ["small/2/real"]
    (nan,) = data["skipped_files"]
    assert nan["path"].endswith("2_nan.wav") and "NaN or inf" in nan["reason"]
    assert data["left_out_books"] == [{"path": "small/1/mixed", "reason": "files mix mono and stereo (2 mono, 1 stereo)"}]

    # nothing left but the mixed book: the one-line "no stream left" error
    assert main(["eval", "librilight", str(config), "--quiet", "data.max_books=1", "--overwrite"]) == 2
    err = capfd.readouterr().err.strip()
    assert "data: no stream left to evaluate (" in err and "small/1/mixed: files mix mono and stereo" in err
    assert "\n" not in err and "Traceback" not in err


def test_an_output_dir_that_cannot_be_written_fails_before_any_model_loads(tree, tmp_path, capfd, monkeypatch):
    from ttt_speech_apps.eval import librilight, pipeline

    monkeypatch.setattr(pipeline, "build_models", lambda *a, **k: pytest.fail("a model was built before the check"))
    monkeypatch.setattr(librilight, "load_data", lambda *a, **k: pytest.fail("data was loaded before the check"))
    config = write_config(tmp_path / "eval.yaml", tree)
    in_the_way = tmp_path / "a_file"
    in_the_way.write_text("")
    for command in ("librilight", "length-gen"):
        for output_dir, message in [(in_the_way, f"output_dir: {in_the_way} is a file, expected a folder"),
                                    (in_the_way / "sub", f"output_dir: cannot write into {in_the_way / 'sub'}")]:
            assert main(["eval", command, str(config), "--quiet", f"output_dir={output_dir}"]) == 2
            err = capfd.readouterr().err.strip()
            assert message in err and "\n" not in err, err


def test_every_scoring_call_names_the_model_and_the_book(monkeypatch):
    """The warm-up too: a NaN there must not be reported as coming from 'stream'."""
    from ttt_speech_apps.eval import nll
    from ttt_speech_apps.eval.librilight import score
    from ttt_speech_apps.eval.plan import EvalModel, PlannedModel

    calls = []
    for mode in ("chunked", "native"):
        monkeypatch.setitem(nll.MODES, mode, lambda lm, codes, *, where, **kwargs:
                            calls.append(where) or SimpleNamespace(weights=None))  # a result without TTT layers
    codes = random_streams(1)["s0"]
    streams = [Stream(Book(f"book-{i}", [], None), codes, [0], [], [2] * 8) for i in range(2)]
    config = from_dict(EvalConfig, {"eval": {"mode": "both", "chunk_size": 8}}, "config")
    planned = PlannedModel("baseline", "eval.baseline", None, None, None, None, 8, ("chunked", "native"))
    model = EvalModel(planned, tiny_moshi_lm(card=64, text_card=100), "tiny")
    for mode in planned.modes:
        score(model, mode, streams, config.eval, progress=False)
    assert len(calls) == 6 and calls[0] == "baseline: book-0 (warm-up)"
    assert all(c.startswith("baseline: book-") for c in calls)


def test_length_gen_command(tree, tmp_path, capsys):
    config = write_config(tmp_path / "eval.yaml", tree, eval={"chunk_size": 16})
    assert main(["eval", "length-gen", str(config), "--quiet", "data.max_frames=200"]) == 0
    out = tmp_path / "out"
    results = json.loads((out / "length_gen.json").read_text())
    assert list(results) == ["ttt"]
    points = results["ttt"]["groups"]["cb1"]["points"]
    assert [p["length"] for p in points][:2] == [16, 19] and points[-1]["length"] == 320
    assert "skipped" in points[-1] and "cumulative" in points[0]  # 320 > the 200 frames evaluated
    assert (out / "length_gen.png").read_bytes()[:8] == PNG
    md = (out / "length_gen.md").read_text()
    assert "are longer than every stream (the longest: 200 frames) and left out" in md and "| 320 |" not in md
    assert "## text" not in md and "text stream is one repeated token" in md
    printed = capsys.readouterr().out
    assert "ttt: perplexity at L = 0.94x -> 6.22x the window (30 -> 199 frames)" in printed and "longer length(s) left out" in printed
    # the training system's figures: 1x and 5x reached (interpolated), 10x not (320 frames > 200)
    figures = results["ttt"]["groups"]["cb1"]["figures"]
    assert figures["ppl_at"]["1x"]["interpolated"] and "ppl" in figures["ppl_at"]["5x"]
    assert "not reached" in figures["ppl_at"]["10x"]["skipped"] and figures["degradation_ratio"] >= 1.0
    assert "| run | ppl @1x | ppl @5x | ppl @10x | max / min ppl | best L |" in md and "| not reached |" in md
    assert "cb1: ppl @1x ~" in printed and "@10x not reached; max/min " in printed


def test_librilight_and_length_gen_share_an_output_dir(tree, tmp_path):
    """Both commands write into one output_dir without overwriting each other's figures."""
    config = write_config(tmp_path / "eval.yaml", tree)
    assert main(["eval", "librilight", str(config), "--quiet"]) == 0
    out = tmp_path / "out"
    report = json.loads((out / "report.json").read_text())
    before = {name: (out / name).read_bytes() for name in report["plots"].values()}
    assert main(["eval", "length-gen", str(config), "--quiet"]) == 0
    assert {name: (out / name).read_bytes() for name in before} == before
    assert (out / "length_gen.png").read_bytes()[:8] == PNG and "length_gen.png" not in before


def test_several_exports_in_one_report(tree, tmp_path):
    """`compare` adds exports side by side: one run each, each compared with the baseline."""
    from ttt_speech.export import save_export
    from ttt_speech.models import ModelConfig

    model = ModelConfig(name="tiny", tiny=TINY, device="cpu")
    for name, layer_type in (("linear", "linear"), ("mlp", "mlp")):
        lm = tiny_moshi_lm(**TINY)
        torch.manual_seed(1)
        patch_moshi(lm, TTTConfig(layer_type=layer_type, mini_batch_size=16, gate_init=0.5))
        save_export(lm, model, tmp_path / name, trainable="ttt")
    config = write_config(tmp_path / "eval.yaml", tree, ttt=None, export=str(tmp_path / "linear"),
                          compare={"ttt-mlp": str(tmp_path / "mlp")}, eval={"baseline": True})
    assert main(["eval", "librilight", str(config), "--quiet"]) == 0
    report = json.loads((tmp_path / "out/report.json").read_text())
    assert list(report["runs"]) == ["ttt/chunked", "ttt-mlp/chunked", "baseline/chunked"]
    assert report["models"]["ttt-mlp"]["ttt"]["layer_type"] == "mlp"
    vs = report["comparisons"]["vs_baseline"]
    assert set(vs) == {"ttt", "ttt-mlp"}
    nll = [report["runs"][r]["groups"]["cb1"]["positions"][0]["cumulative"]["nll"] for r in report["runs"]]
    assert len(set(nll)) == 3  # three different models, not one scored three times
    md = (tmp_path / "out/report.md").read_text()
    assert "| frame | window | ttt/chunked | ttt-mlp/chunked | baseline/chunked |" in md


@pytest.mark.parametrize("compare, message", [
    ({"baseline": "x"}, "compare.baseline: expected a name other than ['ttt', 'baseline', 'ground_truth']"),
    ({"a/b": "x"}, "compare.a/b: expected a name other than"),
])
def test_compare_names_are_checked(tmp_path, compare, message):
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump({"compare": compare}))
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(path)


def test_cli_errors_name_the_field_and_exit_2(tree, tmp_path, capsys):
    config = write_config(tmp_path / "eval.yaml", tree)
    assert main(["eval", "librilight", str(config), "eval.chunk_size=0"]) == 2
    assert "chunk_size: expected null or an integer >= 1" in capsys.readouterr().err
    assert main(["eval", "librilight", str(config), "data.root=/nonexistent", "--quiet"]) == 2
    assert "data.root: /nonexistent is not a folder" in capsys.readouterr().err
    assert main(["eval", "librilight", str(config), "--mode", "fast"]) == 2
    assert "--mode" in capsys.readouterr().err
    assert main(["eval", "length-gen", str(config), "eval.train_window=null"]) == 2
    assert "eval.train_window" in capsys.readouterr().err
    assert main(["eval", "librilight", str(tmp_path / "missing.yaml")]) == 2


def test_configs_in_the_repository_load():
    for path in sorted((ROOT / "configs").glob("eval_*.yaml")):
        if path.name == "eval_memory.yaml":  # a MemoryConfig (`ttt-speech eval memory`): tests/test_eval_memory.py
            continue
        config = load_config(path)
        if path.name == "eval_zero_shot.yaml":  # reads the zero-shot datasets, not data.root
            assert config.zero_shot.tasks and config.export is not None and config.eval.baseline, path
            continue
        assert config.data.root is not None or config.data.manifest is not None, path  # says what to read
        assert config.export is not None or config.ttt is not None, path  # and which TTT model to score


def random_streams(n=2, T=60, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(n):
        codes = torch.randint(0, 64, (17, T - 15 * i), generator=g)
        codes[0] = torch.randint(0, 100, (T - 15 * i,), generator=g)
        out[f"s{i}"] = codes
    return out


def test_length_generalisation_function_for_the_training_loop(tmp_path):
    lm = tiny_moshi_lm(card=64, text_card=100, context=16)
    patch_moshi(lm, TTTConfig(mini_batch_size=4))
    result = length_generalisation(lm, random_streams(), train_window=8)
    assert result["lengths"][0] == 4 and result["lengths"][-1] == 80 and result["chunk_size"] == 16
    points = result["groups"]["text"]["points"]
    assert all(("cumulative" in p) == (p["length"] <= 60) for p in points)
    at_50 = next(p for p in points if p["length"] >= 50)
    assert at_50["cumulative"]["n_streams"] == 1  # the 45-frame stream does not reach it
    import wandb

    run = wandb.init(mode="disabled", dir=str(tmp_path))
    paths = write_result(LengthGenResult({"ttt": result}), tmp_path, LENGTH_GEN_FILES, wandb_run=run)
    run.finish()
    assert paths["length_gen"].read_bytes()[:8] == PNG
    with pytest.raises(ValueError, match="train_window"):
        length_generalisation(lm, random_streams(), train_window=0)


def test_export_and_baseline_models(tmp_path):
    from ttt_speech.export import save_export
    from ttt_speech.models import ModelConfig

    model = ModelConfig(tiny={"card": 64, "text_card": 100}, device="cpu")
    lm = tiny_moshi_lm(card=64, text_card=100)
    patch_moshi(lm, TTTConfig(mini_batch_size=4, layers=[1]))
    with torch.no_grad():
        next(p for n, p in lm.named_parameters() if "ttt" in n).add_(1.0)
    save_export(lm, model, tmp_path / "export", trainable="ttt")
    config = from_dict(EvalConfig, {"export": str(tmp_path / "export"), "eval": {"baseline": True}}, "config")
    models = list(build_models(plan_eval(config), torch.device("cpu")))
    assert [m.name for m in models] == ["ttt", "baseline"]
    assert models[0].ttt.report.layers == [1] and models[1].ttt is None
    codes = random_streams(1)["s0"][None]
    with torch.no_grad():
        assert torch.equal(models[0].lm(codes).logits.nan_to_num(), lm(codes).logits.nan_to_num())
    with pytest.raises(ValueError, match="not both"):
        from_dict(EvalConfig, {"export": str(tmp_path / "export"), "ttt": {}}, "config")


def test_settings_a_model_cannot_run_fail_before_models_or_data_load(tmp_path, monkeypatch):
    """The chunk rule and the E2E refusal of native mode are checked from the export's metadata."""
    from ttt_speech.export import save_export
    from ttt_speech.models import ModelConfig
    from ttt_speech_apps.eval import librilight, pipeline

    lm = tiny_moshi_lm(card=64, text_card=100)
    patch_moshi(lm, TTTConfig(layer_type="e2e_mlp", mini_batch_size=4))
    save_export(lm, ModelConfig(tiny={"card": 64, "text_card": 100}, device="cpu"), tmp_path / "e2e", trainable="ttt")
    monkeypatch.setattr(pipeline, "build_models", lambda *a, **k: pytest.fail("a model was built before the check"))
    monkeypatch.setattr(librilight, "load_data", lambda *a, **k: pytest.fail("data was loaded before the check"))
    for settings, message in [({"chunk_size": 6}, "eval.chunk_size: 6 frames is not a multiple of the E2E mini-batch "
                                                  "size (4)"),
                              ({"mode": "both"}, "eval.mode: 'both' includes native (LMGen.step)")]:
        config = from_dict(EvalConfig, {"export": str(tmp_path / "e2e"), "eval": settings}, "config")
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            evaluate(LibriLight(config), progress=False)
    config = from_dict(EvalConfig, {"export": str(tmp_path / "e2e"), "eval": {"chunk_size": 6, "train_window": 8}},
                       "config")
    with pytest.raises(ValueError, match="eval.chunk_size: 6 frames"):
        evaluate(LengthGen(config), progress=False)


def test_docs_describe_every_config_field():
    from ttt_speech.schema import reference

    docs = (ROOT / "docs/evaluation.md").read_text()
    missing = [name for name, _, _ in reference(EvalConfig) if f"`{name}`" not in docs
               and not name.startswith(("model.", "ttt."))]
    assert not missing, f"docs/evaluation.md does not describe {missing}"
