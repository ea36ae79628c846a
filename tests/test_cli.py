"""The `ttt-speech` command line: help texts, the install check, clear errors with exit code 2."""
import subprocess
import sys

import pytest

from ttt_speech import TTTConfig, patch_moshi, save_ttt, tiny_moshi_lm
from ttt_speech.cli import main


def test_help_describes_every_command():
    out = subprocess.run([sys.executable, "-m", "ttt_speech.cli", "--help"], capture_output=True, text=True)
    for command in ("demo", "check", "train", "eval", "generate", "data", "inspect"):
        assert command in out.stdout
    check = subprocess.run([sys.executable, "-m", "ttt_speech.cli", "check", "--help"], capture_output=True, text=True)
    for option in ("--frames", "--layer-type", "--mode", "--layers", "--mini-batch-size", "--seed"):
        assert option in check.stdout


def test_check_runs(capsys):
    assert main(["check", "--frames", "5", "--layers", "last:0.5", "--mini-batch-size", "4"]) == 0
    out = capsys.readouterr().out
    assert "patched layers            2-3 (2 of 4)" in out
    assert "max |logit diff|" in out and "(OK, tolerance 0.0001)" in out and "frames/s" in out


def test_check_fails_when_streaming_breaks_the_contract(monkeypatch, capsys):
    """A TTT layer that drops its state between calls (every chunk starts from the initial fast
    weights) breaks chunked == full forward: the check must say so and exit 1, before timing."""
    from ttt_speech.moshi.streaming import TTTStreamState

    monkeypatch.setattr(TTTStreamState, "updates_in_place", lambda self, training: False)
    monkeypatch.setattr(TTTStreamState, "assign", lambda self, new: None)
    assert main(["check", "--frames", "5", "--mini-batch-size", "4"]) == 1
    captured = capsys.readouterr()
    assert "FAILED, tolerance 0.0001" in captured.out and "frames/s" not in captured.out
    assert "chunked streaming does not reproduce the full forward" in captured.err


def test_check_bad_input_exits_2(capsys):
    assert main(["check", "--frames", "0"]) == 2
    assert "--frames: expected a positive integer" in capsys.readouterr().err
    assert main(["check", "--mini-batch-size", "0"]) == 2
    assert "TTTConfig.mini_batch_size" in capsys.readouterr().err


def test_inspect(tmp_path, capsys):
    lm = tiny_moshi_lm(card=64, text_card=100)
    patch_moshi(lm, TTTConfig(layers=[1]))
    save_ttt(lm, tmp_path)
    assert main(["inspect", str(tmp_path)]) == 0
    assert "patched layers            1 (1 of 4)" in capsys.readouterr().out
    assert main(["inspect", str(tmp_path / "nope")]) == 2


def test_an_os_error_is_one_line_naming_the_file_and_a_bug_is_not_hidden(monkeypatch, capsys):
    """Any OSError (not only FileNotFoundError) is what the system refused: one line, exit 2; other
    exceptions are programming errors and keep their traceback."""
    from ttt_speech_apps.configs import cli as config_cli

    def refused(args):
        raise PermissionError(13, "Permission denied", "runs/ro/.x.yaml.tmp")

    monkeypatch.setattr(config_cli, "_list", refused)
    assert main(["config", "list"]) == 2
    assert capsys.readouterr().err == "ttt-speech config: error: runs/ro/.x.yaml.tmp: Permission denied\n"
    monkeypatch.setattr(config_cli, "_list", lambda args: [][0])
    with pytest.raises(IndexError):
        main(["config", "list"])
