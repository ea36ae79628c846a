#!/usr/bin/env python
"""The GPU check: one command a maintainer with a CUDA GPU runs as is (sized for under 8 minutes on one).

    python scripts/gpu_check.py                       # writes gpu_check.json
    python scripts/gpu_check.py --out runs/gpu.json --skip moshi_7b

Checks, each reported in the JSON and on stdout as pass / fail (a check with a pass criterion),
measured (figures only: latency and throughput), skipped, or smoke (see below):

  gpu_tests      the `gpu`-marked tests (pytest -m gpu)
  kernel_parity  the Triton kernels against the PyTorch path on the GPU (tests/test_kernels.py:
                 outputs, states, every gradient; float32 and bf16 inputs; heads of 16 to 128)
  kernel_speed   ms per layer per 1500-frame window, forward + backward, at width 4096 (32 heads x
                 128, bf16 weights, float32 state): TTT-Linear on the PyTorch path and on the
                 kernels, TTT-MLP's forward on both, and moshi's transformer layer
  cuda_graphs    `LMGen.step` of TTT-patched tiny Moshis with moshi's CUDA graphs on vs off
                 (`moshi.utils.compile.no_cuda_graph`): the same tokens, text logits within 1e-4,
                 over 120 steps (7 TTT mini-batch boundaries of b = 16), on the PyTorch path (the
                 eager steps in the trimmed one-slot layout, the captured ones padded) and on the kernels
  bf16_agreement chunked (aligned chunks of `forward_text`) vs native (`LMGen.step`) per-frame NLL of
                 one stream, bfloat16 model, TTT state float32
  width_latency  `LMGen.step` at Moshi-7B's width (moshi's `_lm_kwargs`, 2 layers), bfloat16,
                 TTT-Linear hybrid vs unpatched
  training_width forward + backward of a 1500-frame window at that width (gradient checkpointing),
                 frames/s TTT / unpatched, TTT on the PyTorch path and on the kernels
  moshi_7b       `LMGen.step` of the whole Moshi-7B architecture (random weights, bfloat16) patched
                 as configs/moshi_7b_ttt.yaml vs unpatched: ms/frame against the 80 ms budget of 12.5 Hz
  serve_7b       a `ttt-speech serve` conversation's frames with that model (`LiveStream`: Mimi encode
                 + LMGen.step + Mimi decode) against the budget, and the save of its state (size, s)

Without a GPU it runs in seconds: what needs CUDA is skipped, what a CPU can check is checked
(bf16_agreement), and the rest runs its code at tiny sizes ("smoke": the numbers say nothing about
speed, but the code cannot rot: CI runs it this way). Exit status 1 if any check fails.
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout's ttt_speech first; the apps (ttt_speech_apps) need `make venv`

from ttt_speech import TTTConfig, patch_moshi, tiny_moshi_lm  # noqa: E402
from ttt_speech.files import write_text_atomic  # noqa: E402

BUDGET_MS = 1000 / 12.5  # one Moshi frame: real time needs a step within 80 ms
GRAPH_STEPS = 120  # > 7 mini-batches of b = 16: the graphed step crosses update boundaries
LOGIT_TOL = 1e-4  # float32, graphs on vs off
BF16_NLL_TOL = 0.1  # nats: bf16 matmuls of different shapes (1 frame vs a chunk) round differently


def cuda() -> bool:
    return torch.cuda.is_available()


def sync() -> None:
    if cuda():
        torch.cuda.synchronize()


def check_gpu_tests() -> dict:
    if not cuda():
        return {"status": "skipped", "reason": "no CUDA device (every gpu-marked test would skip)"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests"],
                          cwd=ROOT, capture_output=True, text=True)
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-1:] or [""]
    return {"status": "pass" if proc.returncode == 0 else "fail", "summary": tail[0], "returncode": proc.returncode}


def check_kernel_parity() -> dict:
    if not cuda():
        return {"status": "skipped", "reason": "make test runs tests/test_kernels.py in Triton's interpreter"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_kernels.py"],
                          cwd=ROOT, capture_output=True, text=True)
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-1:] or [""]
    return {"status": "pass" if proc.returncode == 0 else "fail", "summary": tail[0], "returncode": proc.returncode}


def window_ms(module: torch.nn.Module, x: torch.Tensor, backward: bool, repeats: int) -> float:
    """Median ms of module(x) over a window (and its backward), synchronised."""
    seed = None
    times = []
    for i in range(repeats + 2):
        sync()
        t0 = time.perf_counter()
        with torch.enable_grad() if backward else torch.no_grad():
            y = module(x)
            y = y[0] if isinstance(y, tuple) else y
            if backward:
                seed = torch.randn_like(y) if seed is None else seed
                y.backward(seed)
        sync()
        if i >= 2:
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def check_kernel_speed(device: str) -> dict:
    """One layer, one 1500-frame window (configs/moshi_7b_ttt.yaml: b = 16, checkpoint group 4)."""
    from ttt_speech.layer import TTTLayer

    sys.path.insert(0, str(ROOT / "scripts"))
    from bench_width import moshi_layer as moshi_transformer_layer

    if cuda():
        dim, heads, frames, dtype, kernels, status = 4096, 32, 1500, torch.bfloat16, ("torch", "triton"), "measured"
    else:  # the code at a tiny size; the kernels run in tests/test_kernels.py
        dim, heads, frames, dtype, kernels, status = 64, 2, 64, torch.float32, ("torch",), "smoke"
    moshi_layer = moshi_transformer_layer(dim, heads, device, dtype)
    x = torch.randn(1, frames, dim, device=device, dtype=dtype, requires_grad=True)
    out = {"width": dim, "heads": heads, "frames": frames, "dtype": str(dtype).removeprefix("torch."),
           "moshi_layer_ms": window_ms(moshi_layer, x, True, 5)}
    for layer_type in ("linear", "mlp"):
        for kernel in kernels:
            config = TTTConfig(layer_type=layer_type, checkpoint_group_size=4, kernel=kernel)
            layer = TTTLayer(dim, config, num_heads=heads, device=device, dtype=dtype)
            backward = layer_type == "linear"  # TTT-MLP: a forward kernel only
            out[f"{layer_type}_{kernel}_{'fwd_bwd' if backward else 'fwd'}_ms"] = window_ms(layer, x, backward, 5)
    if cuda():
        out["linear_speedup"] = out["linear_torch_fwd_bwd_ms"] / out["linear_triton_fwd_bwd_ms"]
        out["mlp_speedup"] = out["mlp_torch_fwd_ms"] / out["mlp_triton_fwd_ms"]
        torch.cuda.empty_cache()
    return {"status": status, **out}


def generate(lm, user: torch.Tensor, steps: int, graphs: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy `LMGen.step` over user codes [B, 8, steps] → (tokens [B, K, steps], text logits [B, 1, steps, V])."""
    from moshi.models.lm import LMGen
    from moshi.utils.compile import no_cuda_graph

    logits: list[torch.Tensor] = []
    tokens: list[torch.Tensor] = []
    gen = LMGen(lm, use_sampling=False, on_text_logits_hook=lambda t: logits.append(t.float().clone()))
    with (torch.no_grad() if graphs else no_cuda_graph()), gen.streaming(user.shape[0]):
        for t in range(steps):
            out = gen.step(user[:, :, t:t + 1])
            if out is not None:
                tokens.append(out.clone())
    return torch.cat(tokens, dim=2), torch.cat(logits, dim=2)


def check_cuda_graphs(device: str) -> dict:
    steps = GRAPH_STEPS if cuda() else 12
    results = {}
    for (layer_type, mode), kernel in itertools.product((("linear", "hybrid"), ("mlp", "replace")),
                                                        ("torch", "triton") if cuda() else ("torch",)):
        lm = tiny_moshi_lm(card=64, text_card=100, device=device)
        patch_moshi(lm, TTTConfig(layer_type=layer_type, mode=mode, mini_batch_size=16, gate_init=1.0, kernel=kernel))
        user = torch.randint(0, 64, (2, lm.num_audio_codebooks - lm.dep_q, steps),
                             generator=torch.Generator().manual_seed(0)).to(device)
        eager_tokens, eager_logits = generate(lm, user, steps, graphs=False)
        graph_tokens, graph_logits = generate(lm, user, steps, graphs=True)
        # the check must be able to fail: the tokens vary and the logits are not flat
        informative = eager_tokens.unique().numel() > 2 and float(eager_logits.std()) > 1e-3
        diff = (graph_logits - eager_logits).abs().max().item()
        results[f"{layer_type}/{mode}/{kernel}"] = {"logit_max_diff": diff, "tokens_equal": bool(torch.equal(graph_tokens,
                                                                                                      eager_tokens)),
                                           "informative": informative}
    ok = all(r["tokens_equal"] and r["logit_max_diff"] <= LOGIT_TOL and r["informative"] for r in results.values())
    out = {"steps": steps, "tolerance": LOGIT_TOL, "runs": results}
    if not cuda():
        return {"status": "smoke", "reason": "CUDA graphs need CUDA: both runs were eager on CPU", **out}
    return {"status": "pass" if ok else "fail", **out}


def check_bf16_agreement(device: str) -> dict:
    from ttt_speech_apps.eval.nll import chunked_nll, native_nll

    lm = tiny_moshi_lm(card=64, text_card=100, device=device, dtype=torch.bfloat16)
    patch_moshi(lm, TTTConfig(mini_batch_size=16, gate_init=1.0))
    frames = 96
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 64, (lm.num_codebooks, frames), generator=g)
    codes[0] = torch.randint(0, 100, (frames,), generator=g)
    chunked, native = chunked_nll(lm, codes, 32), native_nll(lm, codes)
    mask = chunked.mask & native.mask
    diff = (chunked.nll - native.nll)[mask].abs()
    informative = chunked.nll[mask].std().item() > 1e-3
    ok = diff.max().item() <= BF16_NLL_TOL and informative
    return {"status": "pass" if ok else "fail", "device": device, "frames": frames, "chunk": 32,
            "nll_max_abs_diff": diff.max().item(), "nll_mean_abs_diff": diff.mean().item(),
            "tolerance": BF16_NLL_TOL, "informative": informative}


def step_latency(lm, steps: int, warmup: int) -> dict:
    """ms per `LMGen.step` (graphs on where moshi uses them), batch 1, after `warmup` steps."""
    from moshi.models.lm import LMGen

    gen = LMGen(lm, use_sampling=True, temp=0.8, temp_text=0.7)
    user = torch.randint(0, lm.card, (1, lm.num_audio_codebooks - lm.dep_q, 1), device=lm.device)
    times = []
    with torch.no_grad(), gen.streaming(1):
        for i in range(warmup + steps):
            sync()
            t0 = time.perf_counter()
            gen.step(user)
            sync()
            if i >= warmup:
                times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return {"median_ms": statistics.median(times), "p90_ms": times[int(0.9 * (len(times) - 1))], "steps": steps}


def compare_latency(build: Callable[[], torch.nn.Module], config: TTTConfig, steps: int, warmup: int) -> dict:
    base = build()
    unpatched = step_latency(base, steps, warmup)
    patch_moshi(base, config)
    ttt = step_latency(base, steps, warmup)
    return {"unpatched": unpatched, "ttt": ttt, "ratio": ttt["median_ms"] / unpatched["median_ms"],
            "budget_ms": BUDGET_MS, "ttt_within_budget": ttt["median_ms"] <= BUDGET_MS}


def check_width_latency(device: str) -> dict:
    if not cuda():
        out = compare_latency(lambda: tiny_moshi_lm(), TTTConfig(), steps=5, warmup=2)
        return {"status": "smoke", "reason": "width 4096 needs a GPU to say anything; ran the code on a tiny model",
                **out}
    sys.path.insert(0, str(ROOT / "scripts"))
    from bench_width import build

    out = compare_latency(lambda: build(2, torch.bfloat16, device), TTTConfig(), steps=100, warmup=10)
    return {"status": "measured", "layers": 2, "dtype": "bfloat16", **out}


def check_training_width(device: str) -> dict:
    """Forward + backward at width 4096 (bench_width's training step), bf16 on the GPU."""
    if not cuda():
        return {"status": "skipped", "reason": "minutes per step at width 4096 on a CPU: "
                                                "scripts/bench_width.py measures it there"}
    import copy

    sys.path.insert(0, str(ROOT / "scripts"))
    from bench_width import bench_training, build

    base = build(2, torch.bfloat16, device)
    out = {}
    for kernel in ("torch", "triton"):
        ttt = copy.deepcopy(base)
        patch_moshi(ttt, TTTConfig(checkpoint_group_size=4, kernel=kernel))
        out[kernel] = bench_training(base, ttt, frames=1500, steps=5)  # configs/moshi_7b_ttt.yaml's 120 s windows
        del ttt
        torch.cuda.empty_cache()
    return {"status": "measured", "layers": 2, "dtype": "bfloat16", "goal": ">= 0.7", **out}


def check_moshi_7b(device: str) -> dict:
    from ttt_speech_apps.finetune.config import load_train_config

    config = load_train_config(ROOT / "configs" / "moshi_7b_ttt.yaml", []).ttt
    if not cuda():
        out = compare_latency(lambda: tiny_moshi_lm(), config, steps=5, warmup=2)
        return {"status": "smoke", "reason": "the 7B architecture needs a GPU; ran the code on a tiny model", **out}
    from moshi.models import loaders
    from moshi.models.lm import LMModel

    def build():
        torch.manual_seed(0)
        return LMModel(device=device, dtype=torch.bfloat16, **loaders._lm_kwargs).eval()  # moshi 0.2.13's 7B kwargs

    out = compare_latency(build, config, steps=100, warmup=10)
    torch.cuda.empty_cache()
    return {"status": "pass" if out["ttt_within_budget"] else "fail", "ttt": config.to_dict(), **out}


def check_serve_7b(device: str) -> dict:
    """What a `ttt-speech serve` conversation costs per frame with Moshi-7B patched as
    configs/moshi_7b_ttt.yaml: `LiveStream` frames (Mimi encode + `LMGen.step` + Mimi decode; random
    weights, bfloat16 LM) against the 80 ms budget, and the save of its state at a disconnect."""
    import tempfile

    from ttt_speech.generation.config import GenerationConfig
    from ttt_speech.generation.live import LiveStream
    from ttt_speech.generation.state import write_state
    from ttt_speech.models import ModelConfig, load_mimi
    from ttt_speech.moshi.internals import moshi_7b_lm
    from ttt_speech_apps.finetune.config import load_train_config
    from ttt_speech_apps.serve.server import timing_summary

    config = load_train_config(ROOT / "configs" / "moshi_7b_ttt.yaml", []).ttt
    if cuda():
        torch.manual_seed(0)
        lm, frames, warmup, status = moshi_7b_lm(device, torch.bfloat16).eval(), 200, 20, "measured"
    else:
        lm, frames, warmup, status = tiny_moshi_lm(), 6, 2, "smoke"
    patch_moshi(lm, config)
    mimi = load_mimi(ModelConfig(name="tiny", device=device))  # the real codec's architecture, random weights
    pcm = 0.1 * torch.randn((warmup + frames) * mimi.frame_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), LiveStream(lm, mimi, GenerationConfig()) as live:
        seconds = [out.seconds for out in live.feed_pcm(pcm)][warmup:]
        start = time.perf_counter()
        tensors, meta = live.state_dict()
        with tempfile.TemporaryDirectory() as tmp:
            size = write_state(Path(tmp) / "session.safetensors", tensors, meta).stat().st_size
        save_s = time.perf_counter() - start
    timing = timing_summary(seconds)  # as the server logs it
    out = {"status": status, "frames": frames, "median_ms": timing["p50_ms"], "p99_ms": timing["p99_ms"],
           "budget_ms": BUDGET_MS, "within_budget": timing["p50_ms"] <= BUDGET_MS, "state_mib": size / 2**20,
           "save_s": save_s}
    del lm, live, tensors
    if cuda():
        torch.cuda.empty_cache()
    return out


CHECKS: dict[str, Callable[[str], dict]] = {
    "gpu_tests": lambda device: check_gpu_tests(),
    "kernel_parity": lambda device: check_kernel_parity(),
    "kernel_speed": check_kernel_speed,
    "cuda_graphs": check_cuda_graphs,
    "bf16_agreement": check_bf16_agreement,
    "width_latency": check_width_latency,
    "training_width": check_training_width,
    "moshi_7b": check_moshi_7b,
    "serve_7b": check_serve_7b,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"), help="JSON results (default gpu_check.json)")
    parser.add_argument("--skip", nargs="*", default=[], choices=sorted(CHECKS), help="checks not to run")
    args = parser.parse_args(argv)
    device = "cuda" if cuda() else "cpu"
    name = torch.cuda.get_device_name() if cuda() else "no CUDA device"
    print(f"gpu_check: {name}, torch {torch.__version__}")
    report: dict = {"device": name, "torch": torch.__version__, "checks": {}}
    start = time.perf_counter()
    for check, run in CHECKS.items():
        if check in args.skip:
            result = {"status": "skipped", "reason": "--skip"}
        else:
            t0 = time.perf_counter()
            try:
                result = run(device)
            except Exception as e:  # a failed check is a result, the others still run
                result = {"status": "fail", "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
            result["seconds"] = round(time.perf_counter() - t0, 2)
        report["checks"][check] = result
        detail = result.get("reason") or result.get("error") or ""
        print(f"  {check:<15} {result['status']:<8} {detail}")
    report["seconds"] = round(time.perf_counter() - start, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out, json.dumps(report, indent=1) + "\n")
    statuses = [r["status"] for r in report["checks"].values()]
    skipped = [c for c, r in report["checks"].items() if r["status"] in ("skipped", "smoke")]
    print(f"gpu_check: {statuses.count('pass')} passed, {statuses.count('fail')} failed, "
          f"{statuses.count('measured')} measured, "
          f"skipped or smoke only: {', '.join(skipped) or 'none'}; {report['seconds']} s; results in {args.out}")
    return 1 if "fail" in statuses else 0


if __name__ == "__main__":
    sys.exit(main())
