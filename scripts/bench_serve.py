#!/usr/bin/env python
"""Serving latency: per-frame handling time of `ttt-speech serve`, TTT vs unpatched, through the
real server process, websocket and client.

Two servers run side by side on 127.0.0.1: the tiny random-init Moshi (`--model tiny`: dim 128,
4 layers, depformer 2 over 8 codebooks, text vocabulary 32000, attention context 3000) unpatched,
and the same model with TTT layers (`--ttt`: hybrid TTT-Linear, mini-batch 16, every layer, gates
at 0.5). Each round streams --seconds of real LibriVox speech (looped; Debian's
pocketsphinx-testdata, or a synthetic signal without it) to each server in turn (interleaved),
in real time as a user would (--fast: as fast as the server takes it):

- opus: the full path, Opus in → Mimi encoder → LMGen.step → Mimi decoder → Opus out;
- codes: the user's Mimi codes in, Moshi's codes out (the LM alone, no codec).

A frame's handling time is what the server measures around one frame (encode + step + decode;
step alone for codes), as moshi's server logs it. Reported per (model, format), over all rounds:
median of the rounds' p50 and the largest p99 in ms, and the real-time factor (80 ms over the
mean handling time; >= 1 keeps up with 12.5 frames/s).

    .venv/bin/python scripts/bench_serve.py                 # 3 rounds of 10 s (~3 min on a 2-core CPU)
    .venv/bin/python scripts/bench_serve.py --quick         # 1 round of 3 s
    .venv/bin/python scripts/bench_serve.py --out runs/bench/serve.json
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from ttt_speech import TTTConfig, patch_moshi  # noqa: E402
from ttt_speech.checkpoint import save_ttt  # noqa: E402
from ttt_speech.data import FRAME_RATE  # noqa: E402
from ttt_speech.data.audio import encode_pcm, read_audio  # noqa: E402
from ttt_speech.files import write_text_atomic  # noqa: E402
from ttt_speech.handle import TTTModel  # noqa: E402
from ttt_speech.models import ModelConfig, load_lm, load_mimi  # noqa: E402
from ttt_speech_apps.serve.client import chat_url, converse  # noqa: E402
from ttt_speech_apps.serve.process import ServerProcess  # noqa: E402

LIBRIVOX = Path("/usr/share/pocketsphinx/test/data/librivox/sense_and_sensibility_01_austen_64kb-0870.wav")
MODELS = ("unpatched", "TTT")


def speech(seconds: float, sample_rate: int) -> np.ndarray:
    if LIBRIVOX.is_file():
        pcm = read_audio(LIBRIVOX, sample_rate)[0].numpy()
    else:  # a voiced-like signal: harmonics with a moving pitch, in bursts
        t = np.arange(int(5 * sample_rate)) / sample_rate
        f0 = 120 + 30 * np.sin(2 * np.pi * 0.5 * t)
        pcm = sum(np.sin(2 * np.pi * k * np.cumsum(f0) / sample_rate) / k for k in range(1, 6))
        pcm = (0.1 * pcm * (np.sin(2 * np.pi * 2 * t) > 0)).astype(np.float32)
    n = int(seconds * sample_rate)
    return np.tile(pcm, -(-n // pcm.shape[0]))[:n].astype(np.float32)


def ttt_weights(folder: Path, config: TTTConfig) -> Path:
    lm = load_lm(ModelConfig(name="tiny", device="cpu"))
    patch_moshi(lm, config)
    with torch.no_grad():
        for site in TTTModel.of(lm).sites:
            if hasattr(site.inserted, "gate_alpha"):
                site.inserted.gate_alpha.fill_(0.5)
    save_ttt(lm, folder)
    return folder


def round_trip(server: ServerProcess, session: str, fmt: str, pcm, codes, realtime: bool) -> dict:
    since = len(server.lines)
    kw = {"pcm": pcm} if fmt == "opus" else {"codes": codes}
    asyncio.run(converse(chat_url(server.url, session, fmt), realtime=realtime, **kw))
    server.wait_closed(session, since=since)
    return server_record(server, session)


def server_record(server: ServerProcess, session: str) -> dict:
    import urllib.request

    url = server.url.replace("ws://", "http://") + f"/api/sessions/{session}"
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())["last_connection"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0, help="audio streamed per round (default 10)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per (model, format), interleaved (default 3)")
    parser.add_argument("--formats", nargs="+", choices=["opus", "codes"], default=["opus", "codes"],
                        help="what the client sends (default both)")
    parser.add_argument("--fast", action="store_true", help="send as fast as the server takes it, not in real time")
    parser.add_argument("--mini-batch-size", type=int, default=16, help="TTT mini-batch size b (default 16)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 round of 3 s")
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds, args.rounds = 3.0, 1

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU(s), torch {torch.__version__}, "
          f"Python {platform.python_version()}; 1-min load average at start: {load:.2f}")
    mimi = load_mimi(ModelConfig(name="tiny", device="cpu"))
    pcm = speech(args.seconds, mimi.sample_rate)
    codes = encode_pcm(mimi, torch.from_numpy(pcm)[None]).T.numpy()  # [T, 8] the user's codes
    frames = codes.shape[0]
    results: dict[str, dict[str, list[dict]]] = {m: {f: [] for f in args.formats} for m in MODELS}
    with tempfile.TemporaryDirectory() as tmp:
        ttt = ttt_weights(Path(tmp) / "ttt", TTTConfig(mini_batch_size=args.mini_batch_size))
        common = ["--model", "tiny", "--device", "cpu", "--seed", "0"]
        servers = {}
        try:
            servers["unpatched"] = ServerProcess([*common, "--sessions", f"{tmp}/sessions-plain"])
            servers["TTT"] = ServerProcess([*common, "--ttt", str(ttt), "--sessions", f"{tmp}/sessions-ttt"])
            for r in range(args.rounds):
                for fmt in args.formats:
                    for name in MODELS:
                        record = round_trip(servers[name], f"bench-{fmt}-{r}", fmt, pcm, codes, not args.fast)
                        results[name][fmt].append(record)
                        print(f"round {r + 1}/{args.rounds} {name:>9} {fmt:>5}: p50 {record['p50_ms']:6.1f} ms, "
                              f"p99 {record['p99_ms']:6.1f} ms, {record['realtime_factor']:.2f}x real time", flush=True)
        finally:
            for server in servers.values():
                server.stop()

    print(f"\n{frames} frames ({args.seconds:g} s) per round, {args.rounds} round(s), "
          f"{'as fast as possible' if args.fast else 'in real time'}; frame budget {1000 / FRAME_RATE:.0f} ms")
    print(f"{'model':>10} {'format':>6} {'p50 ms':>8} {'p99 ms':>8} {'x real time':>12}")
    summary = {}
    for fmt in args.formats:
        for name in MODELS:
            rounds = results[name][fmt]
            # the median round's p50 and real-time factor, the worst round's p99
            row = {"p50_ms": statistics.median(r["p50_ms"] for r in rounds),
                   "p99_ms": max(r["p99_ms"] for r in rounds),
                   "realtime_factor": statistics.median(r["realtime_factor"] for r in rounds)}
            summary[f"{name}/{fmt}"] = row
            print(f"{name:>10} {fmt:>6} {row['p50_ms']:8.1f} {row['p99_ms']:8.1f} {row['realtime_factor']:12.2f}")
        ratio = summary[f"TTT/{fmt}"]["p50_ms"] / summary[f"unpatched/{fmt}"]["p50_ms"]
        summary[f"ratio/{fmt}"] = ratio
        print(f"{'TTT / unpatched':>17} p50: {ratio:.2f}x ({fmt})")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(args.out, json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "load_average": load,
                                        "frames": frames, "summary": summary, "rounds": results}, indent=2))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
