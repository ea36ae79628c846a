"""The shipped configs: packaged with ttt-speech, listed, copied, and usable by name outside a clone."""
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from train_utils import make_corpus

from ttt_speech.cli import main
from ttt_speech_apps.configs import FOLDER, packaged_configs, resolve_config
from ttt_speech_apps.finetune.config import load_train_config

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "ttt_speech.cli"]


def test_every_shipped_config_is_listed_with_its_command(tmp_path):
    listed = {c.name: c for c in packaged_configs()}
    assert set(listed) == {p.name for p in (ROOT / "configs").glob("*.yaml")}
    assert listed["tiny.yaml"].command == "train" and listed["eval_tiny.yaml"].command == "eval librilight"
    assert listed["eval_memory.yaml"].command == "eval memory" and all(c.description for c in listed.values())
    out = subprocess.run([*CLI, "config", "list"], cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    assert any(line.startswith("tiny.yaml") and " train " in line for line in out.splitlines())


def test_the_wheel_carries_the_configs(tmp_path):
    source = tmp_path / "src"  # a copy: building writes build/ and *.egg-info next to pyproject.toml
    top = {".git", ".venv", ".cache", "build", "runs", "data"}  # checkouts, environments, outputs: not sources
    shutil.copytree(ROOT, source, ignore=lambda folder, names: [
        n for n in names if n.endswith(".egg-info") or (Path(folder) == ROOT and n in top)])
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path), str(source)], check=True, capture_output=True, cwd=tmp_path)
    (wheel,) = tmp_path.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"ttt_speech_apps/configs/{c.name}" for c in packaged_configs()} <= names


def test_copy_a_config_and_train_from_it(tmp_path, capsys):
    assert main(["config", "cp", "tiny", str(tmp_path)]) == 0
    copied = tmp_path / "tiny.yaml"
    assert copied.read_text() == (FOLDER / "tiny.yaml").read_text()
    assert load_train_config(copied).steps > 0
    assert main(["config", "cp", "tiny.yaml", str(copied)]) == 2  # an existing file is kept ...
    assert f"DEST: {copied} exists; pass --force" in capsys.readouterr().err
    assert main(["config", "cp", "tiny", str(copied), "--force"]) == 0  # ... unless asked
    assert main(["config", "cp", "nope", str(tmp_path)]) == 2
    assert "no packaged config 'nope' (packaged: demo, eval_librilight" in capsys.readouterr().err


def test_names_resolve_and_paths_win(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_config("tiny") == resolve_config("tiny.yaml") == resolve_config("configs/tiny.yaml") == FOLDER / "tiny.yaml"
    (tmp_path / "tiny.yaml").write_text("steps: 1\n")
    assert resolve_config("tiny.yaml") == Path("tiny.yaml")  # a file that exists is always the one meant
    with pytest.raises(ValueError, match="no file 'tny' here, and no packaged config of that name"):
        resolve_config("tny")
    assert resolve_config("elsewhere/x.yaml") == Path("elsewhere/x.yaml")  # the loader names the missing file


def test_train_by_name_outside_a_clone(tmp_path):
    corpus = make_corpus(tmp_path, recordings=4, frames=40)
    run = subprocess.run([*CLI, "train", "tiny", "--quiet", "steps=1", "log_every=1", "eval_every=0",
                          f"data.train_manifest={corpus['train']}", f"data.eval_manifest={corpus['eval']}",
                          "data.batch_size=2", "output_dir=run"], cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert (tmp_path / "run" / "export" / "model.json").is_file()  # relative paths: below the current folder
