"""The benchmark and GPU-check scripts: what CI can run of them (figures are for a quiet machine)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))


def test_gpu_check_runs_without_a_gpu_and_says_what_it_skipped(tmp_path):
    """On a CPU-only machine: exit 0 in seconds, every check reported, the CUDA-only ones skipped or
    smoke-run (their code ran on a tiny model), bf16 chunked-vs-native agreement really checked."""
    pytest.importorskip("moshi")
    import torch

    if torch.cuda.is_available():
        pytest.skip("runs the real GPU check on a GPU: use scripts/gpu_check.py directly")
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, str(SCRIPTS / "gpu_check.py"), "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    checks = json.loads(out.read_text())["checks"]
    assert set(checks) == {"gpu_tests", "kernel_parity", "kernel_speed", "cuda_graphs", "bf16_agreement",
                           "width_latency", "training_width", "moshi_7b", "serve_7b"}
    assert all(checks[c]["status"] == "skipped" for c in ("gpu_tests", "kernel_parity", "training_width"))
    assert all(checks[c]["status"] == "smoke" for c in ("kernel_speed", "cuda_graphs", "width_latency", "moshi_7b",
                                                        "serve_7b"))
    assert checks["kernel_speed"]["linear_torch_fwd_bwd_ms"] > 0 and checks["kernel_speed"]["moshi_layer_ms"] > 0
    assert all(r["informative"] and r["tokens_equal"] for r in checks["cuda_graphs"]["runs"].values())
    agreement = checks["bf16_agreement"]
    assert agreement["status"] == "pass" and agreement["informative"]
    assert ("skipped or smoke only: gpu_tests, kernel_parity, kernel_speed, cuda_graphs, width_latency, "
            "training_width, moshi_7b, serve_7b") in proc.stdout


def test_benchmarks_refuse_a_busy_machine(monkeypatch, capsys):
    import bench_ttt

    monkeypatch.setattr(bench_ttt.os, "getloadavg", lambda: (2.5, 0.0, 0.0))
    monkeypatch.setattr(bench_ttt.time, "sleep", lambda s: None)
    assert bench_ttt.wait_for_quiet("bench", max_load=1.0, wait_s=0.0) is None
    assert "load average is 2.50 (> --max-load 1.0)" in capsys.readouterr().err
    monkeypatch.setattr(bench_ttt.os, "getloadavg", lambda: (0.4, 0.0, 0.0))
    assert bench_ttt.wait_for_quiet("bench", max_load=1.0, wait_s=0.0) == 0.4


def test_width_plot_draws_every_patch_and_dtype(tmp_path):
    """bench_width's figure from results of its own shape (no benchmark is run)."""
    pytest.importorskip("matplotlib")
    import bench_width

    rows = [{"dtype": dt, "layer_type": lt, "mode": "hybrid", "T": T, "ratio": 1.0 + 0.01 * T, "bound": 1.33}
            for dt in ("float32", "bfloat16") for lt in ("linear", "mlp") for T in (1, 16, 64)]
    path = bench_width.plot_stream(rows, tmp_path / "width.png")
    assert path.stat().st_size > 10_000 and path.read_bytes()[:4] == b"\x89PNG"


def test_bench_memory_moshi_7b_table_is_computed_in_seconds(tmp_path):
    """The computed half of bench_memory (the measured half is torchrun runs: tests/test_distributed.py
    checks the same figures per rank)."""
    out = tmp_path / "memory.json"
    proc = subprocess.run([sys.executable, str(SCRIPTS / "bench_memory.py"), "--moshi-7b", "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    table = json.loads(out.read_text())["moshi_7b"]
    assert set(table) == {"ttt", "ttt+lora", "full", "lora r128 (moshi-finetune)"}
    assert table["full"]["trainable_params"] == table["full"]["total_params"] > 8.7e9
    assert "| `ttt` | 8.77 B (1.085 B) |" in proc.stdout


def test_bench_memory_llama_table_is_the_documented_one(tmp_path):
    """`--llama`: Qwen2.5-7B-Instruct patched as configs/qwen2_5_7b_ttt.yaml, the table of docs/llama_omni.md."""
    pytest.importorskip("transformers")
    out = tmp_path / "memory.json"
    proc = subprocess.run([sys.executable, str(SCRIPTS / "bench_memory.py"), "--llama", "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    table = json.loads(out.read_text())["qwen2_5_7b"]
    base = table["full"]["total_params"] - (table["ttt"]["trainable_params"])
    assert abs(base - 7.615e9) < 0.01e9  # Qwen2.5-7B's published 7.61 B parameters
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| `")]
    docs = (Path(__file__).resolve().parents[1] / "docs" / "llama_omni.md").read_text()
    assert len(rows) == 3 and all(row in docs for row in rows), rows
