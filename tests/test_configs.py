"""The shipped configs: packaged with ttt-speech, listed, copied, and usable by name outside a clone."""
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml
from train_utils import make_corpus

from ttt_speech.cli import main
from ttt_speech.schema import apply_overrides, load_yaml
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
    assert "no packaged config 'nope' (packaged: demo, eval_continuation, eval_continuation_tiny, eval_librilight" in capsys.readouterr().err


def read_only_folder(tmp_path: Path) -> Path:
    """A folder this process cannot write into: a chmod 555 one, or (root ignores modes) /sys."""
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    for candidate in (folder, Path("/sys")):
        try:
            (candidate / ".probe").touch()
        except OSError:
            return candidate
        (candidate / ".probe").unlink()
    pytest.skip("no folder here refuses this process's writes")


def test_copy_into_a_read_only_folder_or_onto_a_folder_is_one_line(tmp_path, capsys):
    """The system's refusals are one line (exit 2), not an OSError traceback; nothing is left behind."""
    read_only = read_only_folder(tmp_path)
    assert main(["config", "cp", "tiny", str(read_only / "x.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"ttt-speech config: error: DEST (its folder): cannot write into {read_only} (")
    assert err.count("\n") == 1
    in_the_way = tmp_path / "d" / "tiny.yaml"  # `config cp tiny d/` where d/tiny.yaml is a folder
    in_the_way.mkdir(parents=True)
    for force in ([], ["--force"]):
        assert main(["config", "cp", "tiny", str(in_the_way.parent), *force]) == 2
        assert f"DEST: {in_the_way} is a folder, expected a file name" in capsys.readouterr().err
    assert [p.name for p in in_the_way.parent.iterdir()] == ["tiny.yaml"] and in_the_way.is_dir()


@pytest.mark.parametrize("override, expected", [
    ("model.seed=null", "config.model.seed: expected an integer, got None"),  # inside an optional section
    ("model={seed: null}", "config.model.seed: expected an integer, got None"),  # the section set whole
    ("eval.chunk_size=0", "config.eval: chunk_size: expected null or an integer >= 1, got 0"),  # a section's check
])
def test_a_bad_command_line_value_is_blamed_on_its_override_naming_the_field(override, expected, tmp_path, capsys):
    assert main(["eval", "length-gen", "eval_tiny", override]) == 2
    assert capsys.readouterr().err == f"ttt-speech eval: error: command-line override {override}: {expected}\n"
    own = tmp_path / "eval.yaml"  # the same value written in the file is the file's
    own.write_text(yaml.safe_dump(apply_overrides(load_yaml(FOLDER / "eval_tiny.yaml"), [override])))
    assert main(["eval", "length-gen", str(own)]) == 2
    assert capsys.readouterr().err.startswith(f"ttt-speech eval: error: {own}: ")


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
