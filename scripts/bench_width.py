#!/usr/bin/env python
"""Real-width benchmark: Moshi-7B's temporal-transformer layers, unpatched vs TTT-patched, measured side by side.

The layers are built from moshi's own `loaders._lm_kwargs` (dim 4096, 32 heads x 128, gated FFN,
RoPE, context 3000) with fewer layers, small vocabularies and a one-layer depformer (only the
temporal transformer is timed). Each TTT model is a copy of the same base weights patched with
`TTTConfig(layer_type, mode, mini_batch_size)` on every layer. In one run it measures:

  (1) the machine's own float32 (and bfloat16) matmul rate, the yardstick of (3);
  (2) streaming forward, `forward_text` inside `lm.streaming(1)` on chunks of T frames (T = 1 is
      the `LMGen.step` shape; T = --train-chunk a training window), for TTT-Linear / TTT-MLP,
      hybrid / replace, per dtype: unpatched and patched calls alternate so that machine noise
      hits both alike; medians, their ratio, and the bytes/FLOPs bound (the ratio of the
      transformer's parameters: each weight is read and multiplied once per frame);
  (3) the TTT inner loop alone (`prepare` + `scan_minibatches` of `ttt_speech.ops`) on a
      training-length chunk: matmul FLOPs counted by torch's FlopCounterMode, achieved rate, and
      its fraction of (1);
  (4) a training step (forward + backward, moshi's gradient checkpointing on, every parameter
      trainable) on a window of --train-frames frames: tokens/s, TTT / unpatched.

    .venv/bin/python scripts/bench_width.py                 # everything (~10 min on a 2-core CPU), in `make bench`
    .venv/bin/python scripts/bench_width.py --quick         # a smoke run (~2 min)
    .venv/bin/python scripts/bench_width.py --layer-types mlp --modes hybrid --chunks 1 16 --dtypes float32

A 2-core CPU needs a quiet machine: with another busy process torch's threads oversubscribe and
small ops slow down by up to 100x. The script waits up to --wait seconds for the 1-minute load
average to fall to --max-load, and refuses to quote figures if it does not.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from bench_ttt import table, time_interleaved, wait_for_quiet, write_results  # scripts/ is on sys.path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from ttt_speech import TTTConfig, patch_moshi  # noqa: E402
from ttt_speech.moshi.teacher_forcing import widen_kv_caches  # noqa: E402
from ttt_speech.ops.inner_lr import position_scale  # noqa: E402
from ttt_speech.ops.inner_models import INNER_MODELS, InnerNorm, prepare  # noqa: E402
from ttt_speech.ops.scan import scan_minibatches  # noqa: E402

# Vocabularies and depformer shrunk: only the temporal transformer (Moshi-7B's own layers) is timed.
WIDTH_KWARGS = {"text_card": 64, "card": 64, "depformer_num_layers": 1, "depformer_dim": 64,
                "depformer_dim_feedforward": 128, "depformer_num_heads": 1}
TRAIN_CHUNK_7B = 1500  # configs/moshi_7b_ttt.yaml: 120 s windows


def build(num_layers: int, dtype: torch.dtype, device: str = "cpu"):
    """Moshi-7B's LMModel kwargs with `num_layers` temporal layers, random weights, eval mode."""
    from moshi.models import loaders
    from moshi.models.lm import LMModel

    torch.manual_seed(0)
    kwargs = {**loaders._lm_kwargs, **WIDTH_KWARGS, "num_layers": num_layers}  # moshi 0.2.13's Moshi-7B kwargs
    return LMModel(device=device, dtype=dtype, **kwargs).eval()


def moshi_layer(dim: int, heads: int, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """One moshi transformer layer (a one-layer `StreamingTransformer`) with Moshi-7B's options (gated
    FFN of its hidden scale, RMS norm, RoPE, causal context) at width `dim`, random weights."""
    from moshi.models import loaders
    from moshi.modules.transformer import StreamingTransformer

    kw = loaders._lm_kwargs  # moshi 0.2.13's Moshi-7B kwargs
    torch.manual_seed(0)
    return StreamingTransformer(d_model=dim, num_heads=heads, num_layers=1, dim_feedforward=int(kw["hidden_scale"] * dim),
                                causal=kw["causal"], context=kw["context"], positional_embedding=kw["positional_embedding"],
                                max_period=kw["max_period"], gating=kw["gating"], norm=kw["norm"],
                                layer_scale=kw["layer_scale"], device=device, dtype=dtype)


def transformer_params(lm) -> int:
    return sum(p.numel() for p in lm.transformer.parameters())


def matmul_rate(dtype: torch.dtype, n: int = 2048, budget_s: float = 3.0) -> float:
    """GFLOP/s of one n x n x n matmul (2n³ FLOPs) in `dtype`: the machine's own yardstick."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    ms, _ = time_interleaved({"mm": lambda: a @ b}, budget_s)["mm"]
    return 2 * n ** 3 / (ms * 1e-3) / 1e9


def bench_stream(base, ttt, chunks: list[int], budget_s: float) -> list[dict]:
    """Median ms of `forward_text` on T-frame chunks, both models streaming side by side."""
    gen = torch.Generator().manual_seed(0)
    rows = []
    for T in chunks:
        tokens = torch.randint(0, WIDTH_KWARGS["card"], (1, base.num_codebooks, T), generator=gen)
        with torch.inference_mode(), base.streaming(1), ttt.streaming(1):
            for lm in (base, ttt):
                widen_kv_caches(lm, T)
            timed = time_interleaved({"unpatched": lambda: base.forward_text(tokens),
                                      "TTT": lambda: ttt.forward_text(tokens)}, budget_s)
        rows.append({"T": T, "unpatched_ms": timed["unpatched"][0], "ttt_ms": timed["TTT"][0],
                     "ratio": timed["TTT"][0] / timed["unpatched"][0]})
    return rows


def bench_inner_loop(layer_type: str, T: int, heads: int, head_dim: int, b: int, budget_s: float) -> dict:
    """The inner loop alone (weight-independent inputs + scan) on one T-frame chunk, float32.

    Random inputs of the layer's shapes (the FLOPs do not depend on the values): rows R = heads
    (batch 1), N = T / b mini-batches, fast weights as a TTT layer of this width holds them.
    """
    config = TTTConfig(layer_type=layer_type, mini_batch_size=b)
    N, R, d = -(-T // b), heads, head_dim
    m = config.mlp_expansion * d
    g = torch.Generator().manual_seed(0)

    def rand(*shape: int, std: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    q, k, v = (rand(N, R, b, d) for _ in range(3))
    lr = torch.full((N, R, b), config.base_lr / d)
    complete = torch.ones(N, R, dtype=torch.bool)
    tau = position_scale(torch.zeros(b))
    gamma, beta = torch.ones(R, 1, d), torch.zeros(R, 1, d)
    shapes = [(d + 1, d)] if layer_type == "linear" else [(d + 1, m), (m + 1, d)]
    weights = tuple(rand(R, *s, std=0.02) for s in shapes)
    grads = tuple(torch.zeros_like(w) for w in weights)
    norm = InnerNorm(gamma * gamma, config.ln_eps)

    def run(in_place: bool):
        inputs = prepare(q, k, v, lr, complete, tau, gamma, beta)
        return scan_minibatches(INNER_MODELS[layer_type], weights, grads, inputs, tau, norm, in_place=in_place)

    with torch.inference_mode():
        counter = FlopCounterMode(display=False)
        with counter:
            run(in_place=False)  # FlopCounterMode does not count in-place matmuls (baddbmm_)
        flops = counter.get_total_flops()
        # timed as streaming inference runs it: the state's buffers stepped in place
        ms, _ = time_interleaved({"inner": lambda: run(in_place=True)}, budget_s)["inner"]
    if not all(torch.isfinite(w).all() for w in weights):  # the stepped weights drifted: timings untrustworthy
        raise RuntimeError("bench_inner_loop: the fast weights became non-finite while timing")
    return {"layer_type": layer_type, "T": T, "gflop": flops / 1e9, "ms": ms, "gflops": flops / (ms * 1e-3) / 1e9}


def bench_training(base, ttt, frames: int, steps: int) -> dict:
    """Forward + backward of one window (moshi's gradient checkpointing on, all parameters trainable).

    No optimizer step: its cost is per parameter, the same per step whatever the window."""
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, WIDTH_KWARGS["card"], (1, base.num_codebooks, frames), generator=gen).to(base.device)
    models = {"unpatched": base, "TTT": ttt}
    for lm in models.values():
        lm.train()
        lm.transformer.checkpointing = True  # what `gradient_checkpointing: true` sets in training
        lm.requires_grad_(True)

    def step(lm):
        def run():
            out, _ = lm.forward_text(tokens)
            out.float().square().mean().backward()
            # gradient buffers kept between steps, as an accelerator's caching allocator keeps them: on
            # a CPU, freed multi-GB buffers go back to the OS and page-faulting them in again each
            # step halved the patched model's measured rate (0.50x vs 0.78x, same run otherwise)
            lm.zero_grad(set_to_none=False)
            if tokens.is_cuda:
                torch.cuda.synchronize()
        return run

    try:
        timed = time_interleaved({n: step(lm) for n, lm in models.items()}, budget_s=0.0, min_rounds=steps)
    finally:
        for lm in models.values():
            lm.eval()
            lm.transformer.checkpointing = False
            lm.requires_grad_(False)
    rates = {n: frames / (ms * 1e-3) for n, (ms, _) in timed.items()}
    return {"frames": frames, "unpatched_ms": timed["unpatched"][0], "ttt_ms": timed["TTT"][0],
            "unpatched_frames_per_s": rates["unpatched"], "ttt_frames_per_s": rates["TTT"],
            "ratio": rates["TTT"] / rates["unpatched"]}


def plot_stream(rows: list[dict], path: Path) -> Path:
    """(2) as a figure: TTT / unpatched against T (log), one panel per dtype, each patch's bound dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from ttt_speech.figures import save_figure

    dtypes = sorted({r["dtype"] for r in rows}, key=["float32", "bfloat16"].index)
    fig, axes = plt.subplots(1, len(dtypes), figsize=(5.5 * len(dtypes), 4), sharey=True, squeeze=False)
    for ax, dt in zip(axes[0], dtypes):
        for i, key in enumerate(sorted({(r["layer_type"], r["mode"]) for r in rows if r["dtype"] == dt})):
            mine = sorted((r for r in rows if r["dtype"] == dt and (r["layer_type"], r["mode"]) == key),
                          key=lambda r: r["T"])
            color = f"C{i}"
            ax.plot([r["T"] for r in mine], [r["ratio"] for r in mine], "o-", color=color,
                    label=f"TTT-{key[0]} {key[1]}")
            ax.axhline(mine[0]["bound"], color=color, linestyle="--", linewidth=0.8)
        ax.axhline(1.0, color="grey", linewidth=0.6)
        ax.set_xscale("log", base=2)
        ticks = sorted({r["T"] for r in rows})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("frames per call T (1 = LMGen.step)")
        ax.set_title(f"{dt}: patched / unpatched time (dashed: bytes/FLOPs bound)", fontsize=9)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("TTT / unpatched")
    fig.suptitle("Moshi-7B width (dim 4096, 32 heads), 2 layers, CPU", fontsize=10)
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=2, help="temporal-transformer layers (default 2)")
    parser.add_argument("--layer-types", nargs="+", choices=["linear", "mlp"], default=["linear", "mlp"],
                        help="TTT inner models (default both)")
    parser.add_argument("--modes", nargs="+", choices=["hybrid", "replace"], default=["hybrid", "replace"],
                        help="patch modes (default both)")
    parser.add_argument("--mini-batch-size", type=int, default=16, help="TTT mini-batch size b (default 16)")
    parser.add_argument("--chunks", type=int, nargs="+", default=[1, 16, 64], help="frames per call (default 1 16 64)")
    parser.add_argument("--train-chunk", type=int, default=256,
                        help=f"the training-length chunk of (2) and (3) (default 256; configs/moshi_7b_ttt.yaml "
                             f"trains on {TRAIN_CHUNK_7B}-frame windows, too slow for a CPU run)")
    parser.add_argument("--train-frames", type=int, default=64,
                        help="window of the training step (4), frames (default 64; 0 skips it)")
    parser.add_argument("--dtypes", nargs="+", choices=["float32", "bfloat16"], default=None,
                        help="model dtypes (default float32, and bfloat16 where the CPU has native bf16)")
    parser.add_argument("--budget", type=float, default=6.0, help="seconds of timing per point (default 6)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: TTT-Linear hybrid, float32, T = 1 and 16, short budgets")
    parser.add_argument("--max-load", type=float, default=1.0, help="refuse to run above this 1-minute load average")
    parser.add_argument("--wait", type=float, default=180.0,
                        help="seconds to wait for the load average to settle before refusing (default 180)")
    parser.add_argument("--out", type=Path, help="also write the figures to this JSON file")
    parser.add_argument("--plot", type=Path, help="also draw (2) as a PNG: ratio against T, with the bounds")
    args = parser.parse_args(argv)
    if args.quick:
        args.layer_types, args.modes, args.chunks, args.dtypes = ["linear"], ["hybrid"], [1, 16], ["float32"]
        args.train_chunk, args.train_frames, args.budget = 64, 16, 1.0
    if args.dtypes is None:
        args.dtypes = ["float32"] + (["bfloat16"] if torch.backends.mkldnn.is_available()
                                     and torch.ops.mkldnn._is_mkldnn_bf16_supported() else [])
    load = wait_for_quiet("bench_width", args.max_load, args.wait)
    if load is None:
        return 2
    start = time.perf_counter()
    results: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "load_average_1min_at_start": load}

    print(f"== Moshi-7B width: moshi's _lm_kwargs with {args.layers} layers (dim 4096, 32 heads x 128), b = "
          f"{args.mini_batch_size}, CPU {torch.get_num_threads()} threads, 1-min load average {load:.2f} ==\n")
    rates = {dt: matmul_rate(getattr(torch, dt)) for dt in sorted({"float32", *args.dtypes})}
    results["matmul_gflops"] = rates
    print("(1) matmul rate, 2048 x 2048 x 2048: " + ", ".join(f"{dt} {r:.0f} GFLOP/s" for dt, r in rates.items()))

    chunks = sorted({*args.chunks, args.train_chunk})
    results["stream"] = []
    print(f"\n(2) streaming forward_text on T-frame chunks, median ms per call, unpatched and TTT interleaved;\n"
          f"    bound = transformer parameters TTT / unpatched (bytes read and matmul FLOPs per frame); "
          f"T = {args.train_chunk}: the training-length chunk")
    base_by_dtype = {}
    for dt in args.dtypes:
        base = base_by_dtype[dt] = build(args.layers, getattr(torch, dt))
        rows = []
        for layer_type in args.layer_types:
            for mode in args.modes:
                ttt = copy.deepcopy(base)
                patch_moshi(ttt, TTTConfig(layer_type=layer_type, mode=mode, mini_batch_size=args.mini_batch_size))
                bound = transformer_params(ttt) / transformer_params(base)
                for r in bench_stream(base, ttt, chunks, args.budget):
                    r.update(dtype=dt, layer_type=layer_type, mode=mode, bound=bound)
                    rows.append(r)
                del ttt
        results["stream"] += rows
        print(table(["dtype", "TTT", "mode", "T", "unpatched ms", "TTT ms", "TTT/unpatched", "bound",
                     "unpatched ms/frame", "TTT ms/frame"],
                    [[r["dtype"], r["layer_type"], r["mode"], str(r["T"]), f"{r['unpatched_ms']:.1f}",
                      f"{r['ttt_ms']:.1f}", f"{r['ratio']:.2f}x", f"{r['bound']:.2f}x",
                      f"{r['unpatched_ms'] / r['T']:.2f}", f"{r['ttt_ms'] / r['T']:.2f}"] for r in rows],
                    align="lllrrrrrrr"))

    print(f"\n(3) the TTT inner loop alone (prepare + scan, float32, batch 1, 32 heads x 128) on a "
          f"{args.train_chunk}-frame chunk:\n    matmul FLOPs (torch FlopCounterMode) per call, achieved rate, "
          f"fraction of (1)'s float32 matmul rate")
    inner = [bench_inner_loop(lt, args.train_chunk, 32, 128, args.mini_batch_size, args.budget)
             for lt in args.layer_types]
    for r in inner:
        r["fraction_of_matmul"] = r["gflops"] / rates["float32"]
    results["inner_loop"] = inner
    print(table(["TTT", "T", "GFLOP", "ms", "GFLOP/s", "of matmul rate"],
                [[r["layer_type"], str(r["T"]), f"{r['gflop']:.2f}", f"{r['ms']:.1f}", f"{r['gflops']:.0f}",
                  f"{100 * r['fraction_of_matmul']:.0f}%"] for r in inner]))

    if args.train_frames > 0:
        base = base_by_dtype.get("float32") or build(args.layers, torch.float32)
        results["training"] = []
        steps = 2 if args.quick else 5
        print(f"\n(4) training step, float32: forward + backward of a {args.train_frames}-frame window, batch 1, "
              f"moshi's gradient checkpointing on,\n    every parameter trainable; TTT on every layer with "
              f"checkpoint_group_size 4 (configs/moshi_7b_ttt.yaml); {steps} steps each, interleaved")
        for layer_type in args.layer_types:
            ttt = copy.deepcopy(base)
            patch_moshi(ttt, TTTConfig(layer_type=layer_type, mode="hybrid", mini_batch_size=args.mini_batch_size,
                                       checkpoint_group_size=4))
            r = bench_training(base, ttt, args.train_frames, steps=steps)
            r["layer_type"] = layer_type
            results["training"].append(r)
            del ttt
        print(table(["TTT (hybrid)", "frames", "unpatched ms", "TTT ms", "unpatched frames/s", "TTT frames/s",
                     "TTT / unpatched"],
                    [[r["layer_type"], str(r["frames"]), f"{r['unpatched_ms']:.0f}", f"{r['ttt_ms']:.0f}",
                      f"{r['unpatched_frames_per_s']:.1f}", f"{r['ttt_frames_per_s']:.1f}", f"{r['ratio']:.2f}x"]
                     for r in results["training"]]))

    if args.plot is not None:
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        print(f"plot written to {plot_stream(results['stream'], args.plot)}")
    results["total_s"] = time.perf_counter() - start
    print(f"\ntotal: {results['total_s']:.0f} s")
    write_results(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
