#!/usr/bin/env python
"""Training throughput: tokens/s of TTT-patched vs unpatched training steps, side by side.

Same model (the tiny config's Moshi architecture), same windows, same optimizer; the two models
are timed alternately, step by step, so that machine load hits both alike. A step is the real
training step: carried TTT state, forward on one window of the delayed stream, loss, backward,
AdamW. Prints tokens/s (frames x streams), the ratio TTT / unpatched (goal >= 0.7), and the
activation memory of one step (bytes autograd saves for the backward, counted by a hook: exact on
CPU, where resident memory is too coarse for a model this small).

    .venv/bin/python scripts/bench_train.py                # configs/tiny.yaml sizes
    .venv/bin/python scripts/bench_train.py --quick        # a smoke run
    .venv/bin/python scripts/bench_train.py ttt.layer_type=e2e_mlp ttt.layers=null trainable=e2e-meta
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from ttt_speech.models import load_lm
from ttt_speech.moshi.carry import TTTCarry
from ttt_speech.moshi.teacher_forcing import chunk_logits, delayed_streams
from ttt_speech_apps.finetune.config import load_train_config
from ttt_speech_apps.finetune.loss import loss_terms, total_loss
from ttt_speech_apps.finetune.model import build_model


def make_step(lm, config, carry):
    params = [p for p in lm.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step(inputs, targets, new):
        if carry is not None:
            carry.next_window(new)
        text, audio = chunk_logits(lm, inputs, targets, meta=config.meta and carry is not None)
        terms = loss_terms(text, audio, targets, lm.text_card, lm.card, lm.audio_offset, lm.text_padding_token_id,
                           config.data.first_codebook_weight, config.data.text_padding_weight)
        optimizer.zero_grad(set_to_none=True)
        total_loss(terms).backward()
        optimizer.step()
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny.yaml", help="training config giving the model and window")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per model (default 20)")
    parser.add_argument("--quick", action="store_true", help="3 steps, for a smoke test")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="training-config overrides, e.g. ttt.layer_type=e2e_mlp trainable=e2e-meta")
    args = parser.parse_args()
    steps = 3 if args.quick else args.steps
    config = load_train_config(args.config, args.overrides)  # the model, TTT and window sizes; no data is read
    B, W = config.data.batch_size, config.data.window_frames
    torch.manual_seed(0)
    base = load_lm(config.model, device=torch.device("cpu")).train()
    ttt = build_model(config, torch.device("cpu"))
    with torch.no_grad():  # the same base weights in both (the TTT model's random init differs from base's)
        for name, p in base.named_parameters():
            ttt.get_parameter(name).copy_(p)
    carry = TTTCarry(ttt, B)
    g = torch.Generator().manual_seed(0)
    T = W * (steps + 2)
    codes = torch.randint(0, base.card, (B, base.num_codebooks, T), generator=g)
    codes[:, 0] = base.text_padding_token_id
    inputs, targets = delayed_streams(base, codes)
    runs = {"unpatched": make_step(base, config, None), "TTT": make_step(ttt, config, carry)}
    times = {k: [] for k in runs}
    for i in range(steps + 1):
        window = slice(i * W, (i + 1) * W)
        for name, step in runs.items():
            t0 = time.perf_counter()
            step(inputs[:, :, window], targets[:, :, window], torch.full((B,), i == 0))
            if i:  # the first step of each is warm-up
                times[name].append(time.perf_counter() - t0)
    saved = {}
    for name, step in runs.items():  # one more step each, counting what autograd keeps for backward
        window = slice((steps + 1) * W, (steps + 2) * W)
        saved[name] = saved_bytes(lambda: step(inputs[:, :, window], targets[:, :, window], torch.full((B,), False)))
    tokens = B * W * base.num_codebooks
    print(f"training step, {config.ttt.layer_type} TTT ({config.ttt.mode}, layers {config.ttt.layers}, "
          f"b={config.ttt.mini_batch_size}), trainable {config.trainable}, batch {B} x window {W} frames x "
          f"{base.num_codebooks} streams, CPU {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.2f}")
    rates = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        rates[name] = tokens / med
        print(f"{name:>10}: {rates[name]:9.0f} tokens/s  (median {med * 1000:7.1f} ms/step over {len(ts)} steps), "
              f"activations saved for backward {saved[name] / 2**20:7.1f} MiB")
    print(f"{'ratio':>10}: TTT / unpatched = {rates['TTT'] / rates['unpatched']:.2f}x (goal >= 0.7), "
          f"activation memory {saved['TTT'] / saved['unpatched']:.2f}x")


def saved_bytes(run) -> int:
    """Bytes of the tensors autograd saves for backward while `run()` builds its graph (each storage once)."""
    seen: dict[int, int] = {}

    def pack(t):
        if t.device.type != "meta":
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(seen.values())


if __name__ == "__main__":
    main()
