#!/usr/bin/env python
"""Benchmark of the LibriLight evaluator's two modes on a tiny random-init TTT model.

1. speed: chunked vs native frames/s (and tokens/s) side by side on the same stream
   (goal: chunked >= 20x native);
2. scale: one long stream (default 6,000 and 24,000 frames) in chunked mode: time and peak
   memory (goal: flat, 24k <= 1.2x 6k).

Every measurement runs in a fresh subprocess, so peak memory is that process's own high-water
mark (CPU: ru_maxrss; CUDA: max_memory_allocated) and one run's allocator caches do not hide the
next one's. Both the process peak and the increase over the level before scoring (model and
stream already built) are reported.

    python scripts/bench_eval.py                                   # the full benchmark (CPU: ~10-20 min)
    python scripts/bench_eval.py --speed-frames 64 --scale-frames 128 256   # a quick check
    python scripts/bench_eval.py --out bench_eval.json             # also write the figures as JSON
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path


def worker(args: argparse.Namespace) -> dict:
    """One measurement in this process: build the model and stream, score it, report."""
    import torch

    from ttt_speech import TTTConfig, patch_moshi, tiny_moshi_lm
    from ttt_speech_apps.eval.memory import PeakMemory
    from ttt_speech_apps.eval.nll import chunked_nll, native_nll

    torch.manual_seed(0)
    device = torch.device(args.device)
    lm = tiny_moshi_lm(device=device)  # dim 128, 4 layers, Moshi's 17 streams, card 2048, text 32000
    if not args.no_ttt:
        patch_moshi(lm, TTTConfig(mini_batch_size=args.mini_batch_size, layers=args.layers))
    codes = torch.randint(0, lm.card, (lm.num_codebooks, args.frames))
    codes[0] = lm.text_padding_token_id
    warm = codes[:, : min(args.frames, 2 * args.chunk_size)]
    if args.mode == "chunked":  # one-time kernel set-up outside the timing
        chunked_nll(lm, warm, args.chunk_size)
    else:
        native_nll(lm, warm[:, :8])
    with PeakMemory(device) as scoring:  # increase over the level before scoring (sampled on CPU)
        start = time.perf_counter()
        result = (chunked_nll(lm, codes, args.chunk_size) if args.mode == "chunked" else native_nll(lm, codes))
        seconds = time.perf_counter() - start
    if device.type == "cuda":
        peak, kind = torch.cuda.max_memory_allocated(), "cuda max_memory_allocated"
    else:
        peak, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process peak RSS"
    return {"mode": args.mode, "frames": args.frames, "chunk_size": args.chunk_size, "seconds": seconds,
            "frames_per_s": args.frames / seconds, "tokens_per_s": args.frames * (1 + lm.dep_q) / seconds,
            "peak_bytes": peak, "increase_bytes": scoring.peak, "memory": kind,
            "threads": torch.get_num_threads(), "device": str(device), "ttt": not args.no_ttt,
            "scored": int(result.mask.sum())}


def run_worker(base: list[str], mode: str, frames: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--mode", mode, "--frames", str(frames), *base]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"worker failed ({' '.join(cmd)}):\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def mib(n: int) -> str:
    return f"{n / 2**20:8.1f} MiB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="chunked vs native speed; chunked memory at two stream lengths")
    parser.add_argument("--speed-frames", type=int, default=1000, help="stream length of the speed comparison")
    parser.add_argument("--scale-frames", type=int, nargs="+", default=[6000, 24000],
                        help="stream lengths of the chunked scale runs (default 6000 24000)")
    parser.add_argument("--chunk-size", type=int, default=64, help="chunked mode's chunk (default 64 = 4 x b)")
    parser.add_argument("--mini-batch-size", type=int, default=16, help="TTT mini-batch size b (default 16)")
    parser.add_argument("--layers", default="all", help="TTT layers (default all)")
    parser.add_argument("--no-ttt", action="store_true", help="benchmark the model without TTT layers")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--out", type=Path, help="write all figures to this JSON file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="chunked", help=argparse.SUPPRESS)
    parser.add_argument("--frames", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0

    base = ["--chunk-size", str(args.chunk_size), "--mini-batch-size", str(args.mini_batch_size),
            "--layers", args.layers, "--device", args.device] + (["--no-ttt"] if args.no_ttt else [])
    figures: dict = {"speed": {}, "scale": []}
    print(f"== speed: {args.speed_frames} frames, chunk {args.chunk_size}, TTT b={args.mini_batch_size}, {args.device} ==")
    for mode in ("chunked", "native"):
        r = run_worker(base, mode, args.speed_frames)
        figures["speed"][mode] = r
        print(f"{mode:>8}: {r['seconds']:8.2f} s  {r['frames_per_s']:9.1f} frames/s  {r['tokens_per_s']:10.0f} tokens/s"
              f"  ({r['threads']} threads)")
    ratio = figures["speed"]["chunked"]["frames_per_s"] / figures["speed"]["native"]["frames_per_s"]
    figures["speed"]["ratio"] = ratio
    print(f"   ratio: chunked is {ratio:.1f}x faster than native (goal >= 20x)")

    print(f"\n== scale: chunked mode, chunk {args.chunk_size} ==")
    for frames in args.scale_frames:
        r = run_worker(base, "chunked", frames)
        figures["scale"].append(r)
        print(f"{frames:>8} frames: {r['seconds']:8.2f} s  {r['frames_per_s']:8.1f} frames/s  peak {mib(r['peak_bytes'])}"
              f"  (+{mib(r['increase_bytes'])} while scoring)")
    if len(figures["scale"]) >= 2:
        first, last = figures["scale"][0], figures["scale"][-1]
        growth = last["peak_bytes"] / first["peak_bytes"]
        figures["memory_growth"] = growth
        print(f"   peak memory ({first['memory']}) {last['frames']} vs {first['frames']} frames: {growth:.2f}x "
              f"(goal <= 1.2x)")
    if args.out:
        args.out.write_text(json.dumps(figures, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
