#!/usr/bin/env python
"""Kernel launches per layer, counted on a CPU: what a GPU would launch, TTT (PyTorch path and the
Triton kernels) against one moshi transformer layer. Part of `make bench`; docs/benchmarks.md.

    .venv/bin/python scripts/bench_launches.py                 # ~1 minute here
    .venv/bin/python scripts/bench_launches.py --out runs/bench/launches.json

On a GPU every aten op is a kernel launch and ~10 µs of Python and dispatch, whatever its size;
counting them (`ttt_speech.kernels.launches.LaunchCounter`) is the figure a CPU can measure
honestly about GPU speed. Counted, per layer (the counts do not depend on the width):
  - one 1500-frame training window (configs/moshi_7b_ttt.yaml: b = 16, checkpoint group 4):
    forward, and forward + backward;
  - one streaming step (T = 1, `LMGen.step`'s call: inference mode, the state stepped in place);
for moshi's `StreamingTransformer` layer (Moshi-7B's kwargs, narrow), the PyTorch path at b = 16,
64 and 256 (fewer, larger steps: the direction of LaCT), and the Triton kernels (run here by
Triton's interpreter: their numbers, not their speed). Then the PyTorch path's host-side time at
width 32, where the math is negligible (1 thread): the floor those launches set.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are defined: run them on the CPU

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from bench_ttt import table, time_interleaved, write_results  # noqa: E402
from bench_width import moshi_layer  # noqa: E402

from ttt_speech.config import TTTConfig  # noqa: E402
from ttt_speech.kernels import triton_installed  # noqa: E402
from ttt_speech.kernels.launches import LaunchCounter  # noqa: E402
from ttt_speech.layer import TTTLayer  # noqa: E402

WINDOW = 1500  # configs/moshi_7b_ttt.yaml: 120 s training windows
GROUP = 4  # its checkpoint_group_size
TARGETS = {("linear", "forward"): 60, ("linear", "forward + backward"): 150, ("linear", "T = 1 step"): 30,
           ("mlp", "forward"): 60, ("mlp", "T = 1 step"): 30}  # issue: launches with the kernels
GPU_US_PER_LAUNCH = 10  # an estimate of launch + Python dispatch per op on a GPU, not a measurement


def ttt_layer(layer_type: str, b: int, kernel: str, dim: int, heads: int) -> TTTLayer:
    torch.manual_seed(0)
    config = TTTConfig(layer_type=layer_type, mini_batch_size=b, checkpoint_group_size=GROUP, kernel=kernel)
    return TTTLayer(dim, config, num_heads=heads)


def count(fn) -> LaunchCounter:
    with LaunchCounter() as counter:
        fn()
    return counter


def window_counts(module, dim: int, with_backward: bool, is_ttt: bool) -> dict:
    """Launches of one training window's forward, and forward + backward (grad seeded outside)."""
    x = torch.randn(1, WINDOW, dim, requires_grad=True)
    run = (lambda: module(x)[0]) if is_ttt else (lambda: module(x))
    out = {"forward": count(run).launches}
    if with_backward:
        y = run()
        seed = torch.randn_like(y)
        y = None
        out["forward + backward"] = count(lambda: run().backward(seed)).launches
    return out


def step_count(module, dim: int, is_ttt: bool) -> int:
    """Launches of one T = 1 streaming call, 5 frames into a stream, in inference mode."""
    frames = torch.randn(1, 6, dim)
    with torch.inference_mode():
        if is_ttt:
            state = module.initial_state(1).clone()
            module(frames[:, :5], state, in_place=True)
            c = count(lambda: module(frames[:, 5:], state, in_place=True))
        else:
            with module.streaming(1):
                module(frames[:, :5])
                c = count(lambda: module(frames[:, 5:]))
    return c.launches


def host_times_ms(configs: list[tuple[str, int]], budget_s: float) -> dict[tuple[str, int], float]:
    """Median ms of one window's forward + backward on the PyTorch path at width 32 (1 thread), per
    (layer type, b), the configurations timed interleaved."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    x = torch.randn(1, WINDOW, 32, requires_grad=True)
    seed = torch.randn(1, WINDOW, 32)

    def step(layer):
        return lambda: layer(x)[0].backward(seed)

    try:
        fns = {config: step(ttt_layer(config[0], config[1], "torch", dim=32, heads=2)) for config in configs}
        return {config: ms for config, (ms, _) in time_interleaved(fns, budget_s, max_calls=20).items()}
    finally:
        torch.set_num_threads(threads)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="b = 16 only, fewer timing repeats")
    parser.add_argument("--out", type=Path, help="also write the figures as JSON")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    dim, heads = 32, 2  # the counts do not depend on the width; the interpreter is slow at large ones
    sizes = (16,) if args.quick else (16, 64, 256)
    rows, results = [], {"window": WINDOW, "checkpoint_group_size": GROUP, "rows": []}

    def add(name: str, path: str, b: int | str, counts: dict, step: int, note: str = "") -> None:
        fwd, both = counts.get("forward"), counts.get("forward + backward")
        results["rows"].append({"layer": name, "path": path, "b": b, **counts, "T = 1 step": step})
        rows.append([name, path, str(b), f"{fwd:,}", f"{both:,}" if both is not None else "—", f"{step:,}", note])

    print(f"== kernel launches per layer: one {WINDOW}-frame window (checkpoint group {GROUP}), one T = 1 step ==",
          flush=True)
    moshi = moshi_layer(dim, heads)
    add("moshi transformer layer", "torch", "—", window_counts(moshi, dim, True, False),
        step_count(moshi.eval(), dim, False))
    for layer_type, name in (("linear", "TTT-Linear"), ("mlp", "TTT-MLP")):
        for b in sizes:
            layer = ttt_layer(layer_type, b, "torch", dim, heads)
            add(name, "torch", b, window_counts(layer, dim, True, True), step_count(layer.eval(), dim, True))
        if not triton_installed():
            rows.append([name, "triton", "16", "(triton not installed)", "", "", ""])
            continue
        layer = ttt_layer(layer_type, 16, "triton", dim, heads)
        if layer_type == "linear":
            add(name, "triton", 16, window_counts(layer, dim, True, True), step_count(layer.eval(), dim, True))
        else:  # a forward kernel only: the window's forward without autograd (evaluation)
            with torch.no_grad():
                counts = window_counts(layer, dim, False, True)
            add(name, "triton", 16, counts, step_count(layer.eval(), dim, True), "forward: no autograd")
        print(f"  {name} counted", flush=True)
    print(table(["layer", "path", "b", "forward", "fwd + bwd", "T = 1 step", ""], rows, "lllrrrl"))
    print(f"  targets with the kernels (issue): TTT-Linear <= {TARGETS[('linear', 'forward')]} forward, "
          f"<= {TARGETS[('linear', 'forward + backward')]} forward + backward, <= {TARGETS[('linear', 'T = 1 step')]} "
          f"per step; TTT-MLP <= {TARGETS[('mlp', 'forward')]} forward, <= {TARGETS[('mlp', 'T = 1 step')]} per step")
    print(f"  at ~{GPU_US_PER_LAUNCH} µs of launch and Python per op on a GPU (an estimate), 1,000 launches "
          f"cost ~{GPU_US_PER_LAUNCH} ms whatever the width")

    print("\n== the PyTorch path's host-side time: one window forward + backward at width 32, 1 thread, "
          "the rows timed interleaved ==", flush=True)
    timing = []
    times = host_times_ms([(layer_type, b) for layer_type in ("linear", "mlp") for b in sizes],
                          budget_s=3.0 if args.quick else 10.0)
    for layer_type, name in (("linear", "TTT-Linear"), ("mlp", "TTT-MLP")):
        for b in sizes:
            ms = times[(layer_type, b)]
            launches = next(r["forward + backward"] for r in results["rows"]
                            if r["layer"] == name and r["path"] == "torch" and r["b"] == b)
            results.setdefault("host_ms", []).append({"layer": name, "b": b, "ms": ms, "launches": launches})
            timing.append([name, str(b), f"{launches:,}", f"{ms:.1f}", f"{1e3 * ms / launches:.1f}"])
    print(table(["layer", "b", "launches", "ms / window", "µs / launch"], timing))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"  1-minute load average at the end: {load:.2f} (timings on a busy machine are not comparable)")
    print(f"\ntotal: {time.perf_counter() - start:.0f} s")
    write_results(args.out, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
