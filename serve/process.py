"""`ttt-speech serve` in a child process, for scripts, benchmarks and tests: started on a free port,
ready once it listens, its log collected line by line, stopped with a signal (SIGTERM saves the
live session, as for a user)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

READY = "listening on ws://"


class ServerProcess:
    """    with ServerProcess(["--export", "runs/x/export", "--sessions", "runs/sessions"]) as server:
            converse(chat_url(server.url, "s1"), pcm=...)
    """

    def __init__(self, args: list[str], timeout: float = 300, env: dict[str, str] | None = None) -> None:
        argv = [sys.executable, "-c", "import sys; from ttt_speech.cli import main; sys.exit(main())",
                "serve", "--host", "127.0.0.1", "--port", "0", *args]
        self.proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
        self.lines: list[str] = []
        self.port: int | None = None
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if not self._ready.wait(timeout) or self.port is None:
            self.stop(signal.SIGKILL)
            raise RuntimeError("ttt-speech serve did not start:\n" + self.log())

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))
            if READY in line and self.port is None:
                self.port = int(line.split(READY)[1].split("/")[0].rsplit(":", 1)[1])
                self._ready.set()
        self._ready.set()  # the process ended

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def log(self) -> str:
        return "\n".join(self.lines)

    def wait_closed(self, session: str | None, times: int = 1, since: int = 0, timeout: float = 120) -> None:
        """Until the server logged the end (and save) of `session`'s connection (None: an anonymous
        one) `times` times in its log lines from `since` on: a client returns before the save."""
        name = f"session {session}" if session else "anonymous stream"
        deadline = time.monotonic() + timeout
        while sum(f"{name}: closed" in line for line in self.lines[since:]) < times:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"the server did not close {name}:\n" + self.log())
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 120) -> int:
        """Signal the server and wait for it to exit; its exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

