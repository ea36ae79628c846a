"""Progress bars: drawn on a terminal, never written into pipes and log files; --quiet turns them off."""
import io
import subprocess
import sys

from ttt_speech import progress

CLI = [sys.executable, "-m", "ttt_speech.cli"]


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bars_need_a_terminal_and_no_quiet(monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # a pipe or a log file
    assert not progress.show_progress(True)
    assert progress.progress_bar(range(3), enabled=True).disable
    monkeypatch.setattr(sys, "stderr", Terminal())
    assert progress.show_progress(True) and not progress.show_progress(False)  # --quiet
    bar = progress.progress_bar(range(3), enabled=True, desc="x")
    assert not bar.disable and list(bar) == [0, 1, 2]
    bar.close()
    assert "\r" in sys.stderr.getvalue()  # the check can fail: a bar on a terminal does redraw


def test_long_commands_write_no_carriage_returns_into_a_pipe(tmp_path):
    for command in (["data", "synth", str(tmp_path / "corpus"), "--recordings", "40", "--eval-recordings", "2",
                     "--frames", "16", "--eval-frames", "16"],
                    ["check", "--frames", "20"]):
        run = subprocess.run([*CLI, *command], capture_output=True, text=True, cwd=tmp_path)
        assert run.returncode == 0, run.stderr[-1000:]
        assert "\r" not in run.stderr and "\r" not in run.stdout, command
