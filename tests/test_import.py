"""Importing ttt_speech (and its config) does no heavy work."""
import subprocess
import sys


def test_import_is_light():
    code = ("import sys, ttt_speech; from ttt_speech import TTTConfig; TTTConfig(); "
            "heavy = [m for m in ('torch', 'moshi', 'safetensors') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
