"""Every Triton kernel builds ahead of time for the GPUs users run (A100 sm_80, H100 sm_90), with no
GPU present, at the block sizes the code picks for Moshi-7B (head dim 128, b = 16, TTT-MLP
hidden 512), within the target's shared memory per block (`ttt_speech.kernels.build`).

Run in a child process: under TRITON_INTERPRET=1 (set by tests/test_kernels.py) the kernels are
defined for the interpreter and cannot be compiled. ~30 s on 2 cores from a cold Triton cache.
"""
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def triton_cache(tmp_path_factory):
    """A Triton cache of this module's own (not ~/.triton): the second test reuses the first's builds."""
    return tmp_path_factory.mktemp("triton-cache")


def build(cache, *code_lines: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(cache)
    return subprocess.run([sys.executable, "-c", "\n".join(code_lines)], env=env, capture_output=True, text=True,
                          timeout=600)


def test_every_kernel_builds_for_sm80_and_sm90_within_shared_memory(triton_cache):
    proc = build(triton_cache, "from ttt_speech.kernels.build import main", "raise SystemExit(main(['--jobs', '2']))")
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr[-3000:]
    rows = [line for line in out.splitlines() if "(sm_" in line]
    assert len(rows) == 20 and sum("sm_80" in r for r in rows) == 10, out
    assert "DOES NOT FIT" not in out and "20 of 20 builds fit their target" in out
    for name in ("linear_forward", "linear_backward", "mlp_forward"):
        assert any(r.startswith(name) for r in rows), name


def test_a_build_that_does_not_fit_fails(monkeypatch, triton_cache):
    """The check can fail: the same builds (from the cache) against a 1 KB shared-memory limit."""
    proc = build(triton_cache, "from ttt_speech.kernels import build",
                 "build.SHARED_MEMORY_PER_BLOCK.update({80: 1024, 90: 1024})", "raise SystemExit(build.main([]))")
    assert proc.returncode == 1 and proc.stdout.count("DOES NOT FIT") == 20, proc.stdout + proc.stderr[-3000:]
    from ttt_speech.kernels import build as in_process

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert in_process.main([]) == 2  # refuses to build interpreter-defined kernels, in one line
