#!/usr/bin/env python
"""Real-width benchmark: Moshi-7B's temporal-transformer layers, unpatched vs TTT-patched, interleaved.

The layers are built from moshi's own `loaders._lm_kwargs` (dim 4096, 32 heads x 128, gated FFN
x 4.125, RoPE, context 3000) with fewer layers, small vocabularies and a one-layer depformer (only
the temporal transformer is timed). The TTT model is a copy of the same base weights patched with
`TTTConfig(layer_type, mode, mini_batch_size)` on every layer. Both stream side by side inside
`lm.streaming(1)`: `forward_text` on chunks of T frames, calls alternating between the two models
so that machine noise hits both alike; medians per call, and their ratio.

    .venv/bin/python scripts/bench_width.py                        # TTT-Linear hybrid, 2 layers, T = 1, 16, 64
    .venv/bin/python scripts/bench_width.py --layer-type mlp --chunks 1 16 --budget 10

A 2-core CPU needs a quiet machine: with another busy process torch's threads oversubscribe and
small ops slow down by up to 100x, so the script refuses to run when the 1-minute load average is
above --max-load (default 1.0).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path

import torch

from bench_ttt import time_interleaved  # the project's interleaved timer (scripts/ is on sys.path)

WIDTH_KWARGS = {"text_card": 64, "card": 64, "depformer_num_layers": 1, "depformer_dim": 64,
                "depformer_dim_feedforward": 128, "depformer_num_heads": 1}  # vocabularies and depformer shrunk


def build(num_layers: int, dtype: torch.dtype):
    from moshi.models import loaders
    from moshi.models.lm import LMModel

    torch.manual_seed(0)
    return LMModel(device="cpu", dtype=dtype, **{**loaders._lm_kwargs, **WIDTH_KWARGS, "num_layers": num_layers}).eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=2, help="temporal-transformer layers (default 2)")
    parser.add_argument("--layer-type", choices=["linear", "mlp"], default="linear", help="TTT inner model (default linear)")
    parser.add_argument("--mode", choices=["hybrid", "replace"], default="hybrid", help="patch mode (default hybrid)")
    parser.add_argument("--mini-batch-size", type=int, default=16, help="TTT mini-batch size b (default 16)")
    parser.add_argument("--chunks", type=int, nargs="+", default=[1, 16, 64], help="frames per call (default 1 16 64)")
    parser.add_argument("--budget", type=float, default=20.0, help="seconds of timing per chunk size (default 20)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="model dtype (default float32)")
    parser.add_argument("--max-load", type=float, default=1.0, help="refuse to run above this 1-minute load average")
    parser.add_argument("--out", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    load = os.getloadavg()[0]
    if load > args.max_load:
        print(f"bench_width: the 1-minute load average is {load:.2f} (> --max-load {args.max_load}); timings on a "
              "busy machine are not comparable, wait for it to settle", file=sys.stderr)
        return 2

    from ttt_speech import TTTConfig, patch_moshi
    from ttt_speech.moshi.teacher_forcing import widen_kv_caches

    dtype = getattr(torch, args.dtype)
    base = build(args.layers, dtype)
    ttt = copy.deepcopy(base)
    patch_moshi(ttt, TTTConfig(layer_type=args.layer_type, mode=args.mode, mini_batch_size=args.mini_batch_size))
    models = {"unpatched": base, "TTT": ttt}
    params = {n: sum(p.numel() for p in m.transformer.parameters()) for n, m in models.items()}
    print(f"moshi _lm_kwargs: dim {base.dim}, {args.layers} layers x 32 heads, {args.dtype}, CPU "
          f"{torch.get_num_threads()} threads, load average {load:.2f}; TTT-{args.layer_type} {args.mode} on every "
          f"layer, b={args.mini_batch_size}; transformer parameters {params['unpatched'] / 1e6:.0f}M -> "
          f"{params['TTT'] / 1e6:.0f}M ({params['TTT'] / params['unpatched']:.2f}x)")
    gen = torch.Generator().manual_seed(0)
    results = {}
    print(f"{'T':>4} {'unpatched ms':>13} {'TTT ms':>9} {'TTT/unpatched':>14} {'unpatched ms/frame':>19} {'TTT ms/frame':>13}")
    for T in args.chunks:
        tokens = torch.randint(0, 64, (1, base.num_codebooks, T), generator=gen)
        with torch.inference_mode(), base.streaming(1), ttt.streaming(1):
            for lm in models.values():
                widen_kv_caches(lm, T)
            timed = time_interleaved({n: (lambda lm=lm: lm.forward_text(tokens)) for n, lm in models.items()},
                                     args.budget)
        ms = {n: t for n, (t, _) in timed.items()}
        results[T] = {"unpatched_ms": ms["unpatched"], "ttt_ms": ms["TTT"], "ratio": ms["TTT"] / ms["unpatched"]}
        print(f"{T:>4} {ms['unpatched']:>13.1f} {ms['TTT']:>9.1f} {ms['TTT'] / ms['unpatched']:>13.2f}x "
              f"{ms['unpatched'] / T:>19.2f} {ms['TTT'] / T:>13.2f}")
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    if args.out is not None:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "load": load,
                                        "params": params, "results": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
