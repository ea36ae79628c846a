"""Peak memory of a block of work: exact on CUDA, sampled resident memory on CPU."""
from __future__ import annotations

import os
import resource
import threading

import torch


def _rss_bytes() -> int:
    """Current resident set size of this process (Linux /proc; elsewhere the lifetime peak)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


CPU_FLOOR = 8 * 2**20  # bytes: sampled resident-memory growth below this is allocator noise, not a measurement


def informative_peaks(peaks: list[int | None], kind: str) -> bool:
    """Whether peak-memory figures say something: any CUDA peak, or a CPU one of at least CPU_FLOOR
    (tiny models on CPU grow the process by 0-1 MiB: printed, that reads as a measurement)."""
    floor = CPU_FLOOR if kind == "cpu_rss_sampled" else 1
    return any(p is not None and p >= floor for p in peaks)


class PeakMemory:
    """`with PeakMemory(device) as m: ...` → m.peak: bytes above the level at entry, m.kind: how.

    CUDA: `max_memory_allocated` (tensors only; exact). CPU: resident memory sampled every 5 ms by
    a thread ("cpu_rss_sampled"): it includes the allocator's caches and misses spikes shorter
    than the sampling period, so compare runs made in fresh processes (scripts/bench_eval.py does).
    """

    def __init__(self, device: torch.device | str, interval: float = 0.005) -> None:
        self.device = torch.device(device)
        self.interval = interval
        self.peak: int | None = None
        self.kind = "cuda_allocated" if self.device.type == "cuda" else "cpu_rss_sampled"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._start = 0
        self._max = 0

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            self._start = self._max = _rss_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._max = max(self._max, _rss_bytes())

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._start
        else:
            self._stop.set()
            assert self._thread is not None
            self._thread.join()
            self._max = max(self._max, _rss_bytes())
            self.peak = self._max - self._start
