"""Speed benchmarks of the TTT layer, measured side by side in one run (ratios, not absolutes).

    python scripts/bench_ttt.py            # full run (a few minutes on 2 CPU cores)
    python scripts/bench_ttt.py --quick    # smoke run
    python scripts/bench_ttt.py --out results.json

(a) dual form vs a per-token primal loop with the same math (T=4096, b=16);
(b) one TTT layer vs one Moshi attention layer of the same width, T in {256, 1024, 3000};
(c) LMGen.step latency, tiny TTT-patched Moshi vs unpatched, at stream position ~100 and ~20,000.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
from moshi.models.lm import LMGen
from moshi.modules.rope import RotaryEmbedding
from moshi.modules.transformer import StreamingMultiheadAttention

from ttt_speech import TTTConfig, patch_moshi, tiny_moshi_lm
from ttt_speech.layer import TTTLayer
from ttt_speech.ops.inner_lr import position_scale, token_lr
from ttt_speech.ops.layer_norm import layer_norm, layer_norm_l2_grad
from ttt_speech.ops.rope import rope_interleaved


def timed(fn, repeats: int, warmup: int = 1) -> float:
    """Median wall time of fn() in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def primal_ttt_linear(layer: TTTLayer, x: torch.Tensor) -> torch.Tensor:
    """TTT-Linear one token at a time (the primal form), vectorised over batch and heads."""
    B, T, C = x.shape
    H, d, b = layer.num_heads, layer.head_dim, layer.mini_batch_size
    split = lambda t: t.view(B, T, H, d).transpose(1, 2)  # noqa: E731
    pos = torch.arange(T) % b
    q = rope_interleaved(split(layer.q_proj(x)), pos, layer.config.rope_theta)
    k = rope_interleaved(split(layer.k_proj(x)), pos, layer.config.rope_theta)
    v = split(layer.v_proj(x))
    lam = token_lr(x, layer.lr_gate_weight, layer.lr_gate_bias, layer.config.base_lr, d)  # [B, H, T]
    tau = position_scale(layer.tau_offset)
    gw, gb, eps = layer.ttt_norm_weight[None, :, None], layer.ttt_norm_bias[None, :, None], layer.config.ln_eps
    w = layer.W1.expand(B, H, d, d).clone()
    bias = layer.b1.expand(B, H, 1, d).clone()
    out = torch.empty(B, H, T, d)
    for t in range(T):
        i = t % b
        if i == 0:
            w0, b0 = w, bias
            acc_w, acc_b = torch.zeros_like(w), torch.zeros_like(bias)
        kt, qt = k[:, :, t:t + 1], q[:, :, t:t + 1]
        g = layer_norm_l2_grad(kt @ w0 + b0, v[:, :, t:t + 1] - kt, gw, gb, eps)
        lg = lam[:, :, t, None, None] * g
        acc_w = acc_w + kt.transpose(-1, -2) @ lg
        acc_b = acc_b + lg
        w_t, b_t = w0 - tau[i] * acc_w, b0 - tau[i] * acc_b
        out[:, :, t:t + 1] = qt + layer_norm(qt @ w_t + b_t, gw, gb, eps)
        if i == b - 1:
            w, bias = w_t, b_t
    return layer.o_proj(layer.post_norm(out.transpose(1, 2).reshape(B, T, C)))


def bench_dual_vs_primal(T: int) -> dict:
    torch.manual_seed(0)
    layer = TTTLayer(128, TTTConfig(mini_batch_size=16), num_heads=4)
    x = torch.randn(1, T, 128)
    with torch.inference_mode():
        diff = (layer(x)[0] - primal_ttt_linear(layer, x)).abs().max().item()
        dual = timed(lambda: layer(x), repeats=5)
        primal = timed(lambda: primal_ttt_linear(layer, x), repeats=2)
    print(f"\n(a) TTT-Linear, dim 128, 4 heads, b=16, T={T}: dual form vs per-token primal loop")
    print(f"    outputs agree: max |diff| = {diff:.1e}")
    print(f"    dual {dual * 1e3:8.1f} ms   primal {primal * 1e3:8.1f} ms   -> dual is {primal / dual:.1f}x faster")
    return {"T": T, "max_abs_diff": diff, "dual_ms": dual * 1e3, "primal_ms": primal * 1e3, "speedup": primal / dual}


def bench_ttt_vs_attention(lengths: list[int], dim: int = 128, heads: int = 4) -> list[dict]:
    torch.manual_seed(0)
    attn = StreamingMultiheadAttention(dim, heads, causal=True, context=3000, rope=RotaryEmbedding(10000))
    layers = {lt: TTTLayer(dim, TTTConfig(layer_type=lt, mini_batch_size=16), num_heads=heads) for lt in ("linear", "mlp")}
    print(f"\n(b) one layer forward, dim {dim}, {heads} heads, batch 1 (ms; ratio = TTT / attention)")
    print(f"    {'T':>6} {'attention':>10} {'TTT-Linear':>11} {'ratio':>6} {'TTT-MLP':>9} {'ratio':>6}")
    rows = []
    with torch.inference_mode():
        for T in lengths:
            x = torch.randn(1, T, dim)
            reps = 5 if T <= 1024 else 3
            a = timed(lambda: attn(x, x, x), reps)
            lin = timed(lambda: layers["linear"](x), reps)
            mlp = timed(lambda: layers["mlp"](x), reps)
            print(f"    {T:>6} {a * 1e3:10.2f} {lin * 1e3:11.2f} {lin / a:6.2f} {mlp * 1e3:9.2f} {mlp / a:6.2f}")
            rows.append({"T": T, "attention_ms": a * 1e3, "ttt_linear_ms": lin * 1e3, "ttt_mlp_ms": mlp * 1e3})
    return rows


def bench_lmgen_step(far: int, steps: int) -> list[dict]:
    """ms per LMGen.step at position ~100 and ~`far`. The far position is reached by feeding the
    delayed stream through `forward_text` in chunks of 500 inside the same streaming context
    (the TTT and KV-cache states advance exactly as by stepping)."""
    print(f"\n(c) LMGen.step latency, tiny Moshi (dim 128, 4 layers), batch 1 (ms/step, median of {steps})")
    print(f"    {'model':>10} {'pos ~100':>9} {'pos ~' + str(far):>11}")
    rows = []
    for name in ("unpatched", "TTT"):
        lm = tiny_moshi_lm(seed=0)
        if name == "TTT":
            patch_moshi(lm, TTTConfig(mini_batch_size=16, mode="hybrid"))
        gen = LMGen(lm, temp=0.8, temp_text=0.7)
        user = torch.randint(0, lm.card, (1, 8, 1))
        result = {}
        with torch.no_grad(), gen.streaming(1):
            for _ in range(100):
                gen.step(user)
            result["near"] = timed(lambda: gen.step(user), steps, warmup=0)
            fill = torch.zeros(1, lm.num_codebooks, 500, dtype=torch.long)
            fill[:, 0] = lm.text_padding_token_id
            for _ in range(far // 500):
                lm.forward_text(fill)
            result["far"] = timed(lambda: gen.step(user), steps, warmup=0)
        print(f"    {name:>10} {result['near'] * 1e3:9.2f} {result['far'] * 1e3:11.2f}")
        rows.append({"model": name, "near_ms": result["near"] * 1e3, "far_ms": result["far"] * 1e3})
    base, ttt = rows
    print(f"    TTT / unpatched: {ttt['near_ms'] / base['near_ms']:.2f}x near, {ttt['far_ms'] / base['far_ms']:.2f}x far; "
          f"far / near: unpatched {base['far_ms'] / base['near_ms']:.2f}x, TTT {ttt['far_ms'] / ttt['near_ms']:.2f}x")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short sizes, for a smoke run (~30 s)")
    parser.add_argument("--out", help="also write the results as JSON to this path")
    args = parser.parse_args(argv)
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads")
    results = {
        "dual_vs_primal": bench_dual_vs_primal(512 if args.quick else 4096),
        "ttt_vs_attention": bench_ttt_vs_attention([256, 1024] if args.quick else [256, 1024, 3000]),
        "lmgen_step": bench_lmgen_step(far=2000 if args.quick else 20000, steps=20 if args.quick else 50),
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
