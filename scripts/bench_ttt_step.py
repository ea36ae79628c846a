#!/usr/bin/env python
"""Training-step micro-benchmark: one TTT layer's forward + backward vs causal nn.MultiheadAttention.

Same input x [B, T, C] (requires_grad), same width and head count; the two are timed alternately
(so that machine load hits both alike) and the medians are compared. Float32, CPU.

    .venv/bin/python scripts/bench_ttt_step.py                  # linear + mlp, T = 128 and 512
    .venv/bin/python scripts/bench_ttt_step.py --reps 50 --types linear --lengths 128
    .venv/bin/python scripts/bench_ttt_step.py --threads 1 --cpu-time   # A/B runs on a busy machine
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from ttt_speech import TTTConfig  # noqa: E402
from ttt_speech.layer import TTTLayer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--mini-batch", type=int, default=16)
    parser.add_argument("--types", nargs="+", default=["linear", "mlp"])
    parser.add_argument("--lengths", nargs="+", type=int, default=[128, 512])
    parser.add_argument("--reps", type=int, default=30, help="timed repetitions of each (default 30)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--cpu-time", action="store_true",
                        help="time process CPU time instead of wall time (steadier on a loaded machine, "
                             "meaningful with --threads 1)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.process_time if args.cpu_time else time.perf_counter
    torch.manual_seed(0)
    B, C, H = args.batch, args.dim, args.heads
    print(f"forward+backward, B={B} C={C} H={H} b={args.mini_batch}, CPU {torch.get_num_threads()} threads, "
          f"{'CPU' if args.cpu_time else 'wall'} time, load average {os.getloadavg()[0]:.2f}")
    attn = nn.MultiheadAttention(C, H, batch_first=True)
    for T in args.lengths:
        mask = nn.Transformer.generate_square_subsequent_mask(T)
        x = torch.randn(B, T, C, requires_grad=True)

        def attn_step() -> None:
            y, _ = attn(x, x, x, attn_mask=mask, is_causal=True, need_weights=False)
            y.sum().backward()

        for layer_type in args.types:
            layer = TTTLayer(C, TTTConfig(layer_type=layer_type, mini_batch_size=args.mini_batch), num_heads=H)

            def ttt_step() -> None:
                y, _ = layer(x)
                y.sum().backward()

            times: dict[str, list[float]] = {"ttt": [], "attn": []}
            for i in range(args.warmup + args.reps):
                for name, fn in (("ttt", ttt_step), ("attn", attn_step)):
                    t0 = clock()
                    fn()
                    if i >= args.warmup:
                        times[name].append(clock() - t0)
            ttt_ms, attn_ms = (1e3 * statistics.median(times[k]) for k in ("ttt", "attn"))
            print(f"{layer_type:6s} T={T:4d}: TTT {ttt_ms:7.2f} ms  attention {attn_ms:6.2f} ms  "
                  f"TTT/attention {ttt_ms / attn_ms:5.2f}x")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
