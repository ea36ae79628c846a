"""Every `ttt-speech eval` command refuses, before any model is built, an output_dir that is a training
run's folder or that holds its own earlier results, unless --overwrite; commands whose outputs differ
share a folder (tests/test_eval_run.py: librilight and length-gen)."""
from pathlib import Path

import pytest
import yaml

from ttt_speech.cli import main
from ttt_speech_apps.eval import pipeline
from ttt_speech_apps.eval.length_gen import LengthGen
from ttt_speech_apps.eval.librilight import LibriLight
from ttt_speech_apps.eval.memory_probe import Memory
from ttt_speech_apps.finetune.run_folder import claim

# each command, and one file of its own outputs (an earlier run of it)
COMMANDS = {"librilight": LibriLight.files.json, "length-gen": LengthGen.files.json, "memory": Memory.files.json}


@pytest.fixture(autouse=True)
def no_models(monkeypatch):
    """Where the first model would be built, an error: past the output_dir check, nothing is scored."""
    def built(*args, **kwargs):
        raise ValueError("a model was built")

    monkeypatch.setattr(pipeline, "build_models", built)


def argv(command: str, tmp_path: Path, output_dir: Path, *options: str) -> list[str]:
    if command == "memory":
        config = tmp_path / "memory.yaml"
        config.write_text(yaml.safe_dump({"model": {"name": "tiny", "device": "cpu"}, "models": [{"name": "base"}],
                                          "data": {"manifest": str(tmp_path / "streams.jsonl")}}))
    else:
        config = "eval_tiny"
    return ["eval", command, str(config), f"output_dir={output_dir}", "model.device=cpu", "--quiet", *options]


def training_run(folder: Path) -> Path:
    """A folder as `ttt-speech train` leaves it: claimed (its lock), outputs written, released."""
    run_folder = claim(folder, None, overwrite=False)
    (folder / "metrics.jsonl").write_text("{}\n")
    run_folder.release()
    return folder


@pytest.mark.parametrize("command", COMMANDS)
def test_a_training_runs_folder_is_refused_without_overwrite(command, tmp_path, capsys):
    out = training_run(tmp_path / "run")
    assert main(argv(command, tmp_path, out)) == 2
    err = capsys.readouterr().err
    assert f"output_dir: {out} is a training run's folder (holding metrics.jsonl); choose another output_dir, or " \
           "pass --overwrite" in err and err.count("\n") == 1
    assert main(argv(command, tmp_path, out, "--overwrite")) == 2
    assert "a model was built" in capsys.readouterr().err  # past the check
    assert sorted(p.name for p in out.iterdir()) == [".lock", "metrics.jsonl"]


@pytest.mark.parametrize("command", COMMANDS)
def test_an_earlier_evaluation_is_refused_without_overwrite(command, tmp_path, capsys):
    out = tmp_path / "eval"
    out.mkdir()
    (out / COMMANDS[command]).write_text("{}")
    assert main(argv(command, tmp_path, out)) == 2
    err = capsys.readouterr().err
    assert f"output_dir: {out} already holds {COMMANDS[command]} (an earlier run's results); choose another " \
           "output_dir, or pass --overwrite to replace them" in err
    assert main(argv(command, tmp_path, out, "--overwrite")) == 2
    assert "a model was built" in capsys.readouterr().err
    others = [name for name in COMMANDS.values() if name != COMMANDS[command]]
    (out / COMMANDS[command]).unlink()
    for name in others:  # the outputs of the other eval commands are no obstacle
        (out / name).write_text("{}")
    assert main(argv(command, tmp_path, out)) == 2
    assert "a model was built" in capsys.readouterr().err
