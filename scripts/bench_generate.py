#!/usr/bin/env python
"""Generation speed: frames/s of `ttt_speech.generate` (LMGen.step + sampling), TTT vs unpatched.

Both models are the tiny random-init Moshi architecture (`ModelConfig` 'tiny': dim 128, 4 layers,
depformer 2 layers over 8 codebooks, text vocabulary 32000, codebooks of 2048); the TTT one is
patched with `TTTConfig` (default: hybrid TTT-Linear, mini-batch 16, every layer). Each model gets
one `GenerationSession` (batch --batch, a random prompt of --prompt-frames, default sampling
settings); after a warm-up, the two sessions generate --chunk frames in turn (interleaved, so that
machine noise hits both alike) until each has timed --frames frames. Reported: median over chunks
of frames per second per stream, ms per step, and the multiple of real time (12.5 frames/s).
A third row times the unpatched model through moshi's own `LMGen` (its sampler, no session) to show
what the session adds per step. No Mimi: audio decoding is not part of the figures.

    .venv/bin/python scripts/bench_generate.py             # 300 frames each (~1 min on a 2-core CPU)
    .venv/bin/python scripts/bench_generate.py --quick     # smoke run (a few seconds after warm-up)
    .venv/bin/python scripts/bench_generate.py --batch 4 --out results.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from ttt_speech import TTTConfig, patch_moshi  # noqa: E402
from ttt_speech.generate import FRAME_RATE, GenerationConfig, GenerationSession  # noqa: E402
from ttt_speech.models import ModelConfig, load_lm  # noqa: E402

RAW = "moshi LMGen"


def build(ttt: TTTConfig | None, seed: int):
    lm = load_lm(ModelConfig(name="tiny", seed=seed, device="cpu"))
    report = patch_moshi(lm, ttt) if ttt is not None else None
    return lm, report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=300, help="timed frames per model (default 300)")
    parser.add_argument("--chunk", type=int, default=25, help="frames per timed chunk (default 25)")
    parser.add_argument("--warmup", type=int, default=20, help="untimed frames per model first (default 20)")
    parser.add_argument("--batch", type=int, default=1, help="streams generated together (default 1)")
    parser.add_argument("--prompt-frames", type=int, default=25, help="random prompt length (default 25)")
    parser.add_argument("--layer-type", choices=["linear", "mlp"], default="linear", help="TTT inner model")
    parser.add_argument("--mode", choices=["hybrid", "replace"], default="hybrid", help="TTT patch mode")
    parser.add_argument("--mini-batch-size", type=int, default=16, help="TTT mini-batch size b (default 16)")
    parser.add_argument("--eager", action="store_true", help="turn off moshi's torch.compile of small functions")
    parser.add_argument("--quick", action="store_true", help="smoke run: 40 frames, chunks of 10, warm-up 5")
    parser.add_argument("--seed", type=int, default=0, help="model and sampling seed (default 0)")
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    if args.quick:
        args.frames, args.chunk, args.warmup = 40, 10, 5
    for name in ("frames", "chunk", "batch"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}: expected an integer >= 1")

    from contextlib import ExitStack, nullcontext

    from moshi.models.lm import LMGen
    from moshi.utils.compile import no_compile

    ttt = TTTConfig(layer_type=args.layer_type, mode=args.mode, mini_batch_size=args.mini_batch_size)
    models = {"unpatched": build(None, args.seed), "TTT": build(ttt, args.seed)}
    g = torch.Generator().manual_seed(args.seed)
    lm0 = models["unpatched"][0]
    prompt = torch.randint(0, lm0.card, (lm0.num_codebooks, args.prompt_frames), generator=g)
    prompt[0] = torch.randint(0, lm0.text_card, (args.prompt_frames,), generator=g)
    silence = torch.randint(0, lm0.card, (8,), generator=g)
    config = GenerationConfig(seed=args.seed)

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print("== ttt-speech generation benchmark ==")
    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), {platform.processor() or platform.machine()}, "
          f"Python {platform.python_version()}; 1-min load average at start: {load:.2f}")
    print(f"tiny Moshi (dim 128, 4 layers, depformer 2 x 8 codebooks), float32 CPU, batch {args.batch}, "
          f"prompt {args.prompt_frames} frames, sampling temp 0.8/0.7 top-k 250/25; "
          f"torch.compile {'off' if args.eager else 'on (moshi default)'}")
    print(f"TTT: {models['TTT'][1].mode} TTT-{args.layer_type}, b={args.mini_batch_size}, "
          f"layers {models['TTT'][1].layers}")

    # Reference row: the unpatched model through moshi's own LMGen (its sampler, no prompt forcing),
    # to show what the session adds per step (forcing bookkeeping, noise, the sampler).
    raw = LMGen(build(None, args.seed)[0], temp=0.8, temp_text=0.7, top_k=250, top_k_text=25)
    user = silence[None, :, None].repeat(args.batch, 1, 1)

    def raw_chunk(n: int) -> int:
        for _ in range(n):
            raw.step(user)
        return n

    times: dict[str, list[float]] = {name: [] for name in [*models, RAW]}
    with no_compile() if args.eager else nullcontext(), ExitStack() as stack:
        sessions = {name: stack.enter_context(GenerationSession(lm, args.batch, config, silence))
                    for name, (lm, _) in models.items()}
        stack.enter_context(raw.streaming(args.batch))
        runners = {name: (lambda n, s=session: sum(1 for _ in s.run(None, n))) for name, session in sessions.items()}
        runners[RAW] = raw_chunk
        for session in sessions.values():  # warm-up: prompt + first frames (and compilation)
            for _ in session.run([prompt] * args.batch, args.warmup):
                pass
        torch.manual_seed(args.seed)
        raw_chunk(args.warmup + args.prompt_frames)
        while min(len(t) for t in times.values()) * args.chunk < args.frames:
            for name, fn in runners.items():
                start = time.perf_counter()
                n = fn(args.chunk)
                times[name].append((time.perf_counter() - start) / n)

    results = {}
    print(f"\n    {'model':<11}  {'frames/s/stream':>15}  {'ms/step':>8}  {'x real time':>11}  {'timed frames':>12}")
    print(f"    {'-' * 11}  {'-' * 15}  {'-' * 8}  {'-' * 11}  {'-' * 12}")
    for name, ts in times.items():
        step = statistics.median(ts)
        rate = 1 / step
        results[name] = {"frames_per_s_per_stream": rate, "ms_per_step": step * 1e3,
                         "x_real_time": rate / FRAME_RATE, "timed_frames": len(ts) * args.chunk}
        print(f"    {name:<11}  {rate:15.1f}  {step * 1e3:8.2f}  {rate / FRAME_RATE:11.2f}  {len(ts) * args.chunk:12d}")
    ratio = results["TTT"]["frames_per_s_per_stream"] / results["unpatched"]["frames_per_s_per_stream"]
    print(f"\n    TTT generates at {ratio:.2f}x the unpatched rate (batch {args.batch}: "
          f"{args.batch * results['TTT']['frames_per_s_per_stream']:.1f} vs "
          f"{args.batch * results['unpatched']['frames_per_s_per_stream']:.1f} frames/s in all)")
    print(f"    ({RAW!r}: the unpatched model through moshi's LMGen with its own sampler, no session; "
          f"session overhead = 1 - unpatched / {RAW!r} = "
          f"{1 - results['unpatched']['frames_per_s_per_stream'] / results[RAW]['frames_per_s_per_stream']:+.0%})")
    if args.out is not None:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "load_average": load,
                                        "results": results, "ttt_over_unpatched": ratio}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
