"""Importing ttt_speech (and its config) does no heavy work."""
import subprocess
import sys


def test_import_is_light():
    code = ("import sys, ttt_speech; from ttt_speech import TTTConfig; TTTConfig(); "
            "heavy = [m for m in ('torch', 'moshi', 'safetensors') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_command_tree_is_built_without_torch():
    """`ttt-speech --help` (every app's `register`) declares arguments only: torch loads when a command runs."""
    code = ("import sys; from ttt_speech.cli import build_parser; build_parser(); "
            "print([m for m in ('torch', 'moshi', 'transformers') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
