#!/usr/bin/env python
"""Bytes of one `ttt-speech serve` session (a live stream's saved state), by part, for Moshi-7B's
real architecture (moshi's `loaders._lm_kwargs` on the meta device: nothing allocated) patched as
a TTT config says, and measured on the tiny model for comparison.

Parts: `lm.` every streaming module of the LM (the attention KV caches: 2 × layers × context ×
heads × head_dim in the LM's dtype, plus offsets), `ttt.` the TTT state (fast weights W, b and
their counters, float32), `gen.` LMGen's token cache, `mimi.` Mimi's streaming state (encoder and
decoder: conv buffers, transformer caches; the same for every Moshi), `session.`/`live.` counters.

    .venv/bin/python scripts/session_size.py                      # configs/moshi_7b_ttt.yaml
    .venv/bin/python scripts/session_size.py --config configs/moshi_7b_ttt.yaml --dtype bfloat16
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from ttt_speech import patch_moshi  # noqa: E402
from ttt_speech.generation.config import GenerationConfig  # noqa: E402
from ttt_speech.generation.live import LiveStream  # noqa: E402
from ttt_speech.generation.session import SamplingLMGen  # noqa: E402
from ttt_speech.handle import TTTModel  # noqa: E402
from ttt_speech.models import DTYPES, ModelConfig, load_lm, load_mimi  # noqa: E402
from ttt_speech.moshi.internals import attention_context, moshi_7b_lm, moshi_states_to_tensors  # noqa: E402
from ttt_speech_apps.finetune.config import load_train_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("lm.", "ttt.", "gen.", "mimi.", "session.", "live.")


def by_part(tensors: dict[str, torch.Tensor]) -> dict[str, int]:
    out = {p: 0 for p in PARTS}
    for key, t in tensors.items():
        part = next((p for p in PARTS if key.startswith(p)), "other")
        out[part] = out.get(part, 0) + t.numel() * t.element_size()
    return out


def moshi_7b_parts(ttt, dtype: torch.dtype) -> tuple[dict[str, int], int]:
    lm = moshi_7b_lm("meta", dtype).eval()
    if ttt is not None:
        patch_moshi(lm, ttt)
    gen = SamplingLMGen(lm, GenerationConfig())
    with gen.streaming(1):
        tensors = moshi_states_to_tensors({"": gen.streaming_state}, "gen.")
        tensors.update(moshi_states_to_tensors(lm.get_streaming_state(), "lm."))
        handle = TTTModel.find(lm)
        if handle is not None:
            tensors.update({f"ttt.{k}": v for k, v in handle.stream_state().items()})
    return by_part(tensors), attention_context(lm)


def tiny_parts(ttt) -> dict[str, int]:
    lm = load_lm(ModelConfig(name="tiny", device="cpu"))
    if ttt is not None:
        patch_moshi(lm, ttt)
    mimi = load_mimi(ModelConfig(name="tiny", device="cpu"))
    with LiveStream(lm, mimi) as live:
        live.feed_pcm(torch.zeros(3 * mimi.frame_size))
        tensors, _ = live.state_dict()
    return by_part(tensors)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "moshi_7b_ttt.yaml",
                        help="training config whose ttt: section patches Moshi-7B (default configs/moshi_7b_ttt.yaml)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="LM dtype (default bfloat16)")
    args = parser.parse_args(argv)
    ttt = load_train_config(args.config).ttt
    mib = 2 ** 20
    tiny = {name: tiny_parts(cfg) for name, cfg in (("unpatched", None), ("TTT", ttt))}
    rows = {}
    for name, cfg in (("unpatched", None), ("TTT", ttt)):
        parts, context = moshi_7b_parts(cfg, DTYPES[args.dtype])
        parts["mimi."] = tiny[name]["mimi."]  # Mimi is the same codec for every Moshi: measured on the tiny run
        parts["live."] = tiny[name]["live."]
        rows[name] = parts
    print(f"one session of Moshi-7B ({args.dtype}, attention context {context} steps), TTT as {args.config.name} "
          f"({ttt.layer_type}, {ttt.mode}, layers {ttt.layers}, b = {ttt.mini_batch_size}); MiB")
    print(f"{'part':>10} " + " ".join(f"{n:>12}" for n in rows) + f" {'tiny TTT':>12}")
    for part in PARTS:
        print(f"{part:>10} " + " ".join(f"{rows[n].get(part, 0) / mib:12.2f}" for n in rows)
              + f" {tiny['TTT'].get(part, 0) / mib:12.2f}")
    print(f"{'total':>10} " + " ".join(f"{sum(rows[n].values()) / mib:12.2f}" for n in rows)
          + f" {sum(tiny['TTT'].values()) / mib:12.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
