"""The `ttt-speech` command line: the library's own tools (`check`, `inspect`, `data`) and the
subcommands the apps register under the entry-point group `ttt_speech.commands`
(docs/architecture.md §1): the library never imports an app.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from importlib.metadata import entry_points

COMMAND_GROUP = "ttt_speech.commands"  # entry points: name = "module:register", register(subparsers) adds one command
STREAMING_TOLERANCE = 1e-4  # `check`: max |logit diff| of chunked streaming vs one full forward (float32)
CHECK = (
    "Build a tiny random-init Moshi-architecture LM (CPU, no weights needed), patch it with TTT "
    "layers, check that chunked streaming equals one full forward (exit code 1 when the largest "
    f"logit difference exceeds {STREAMING_TOLERANCE:g}), and stream frames through moshi's LMGen.step, "
    "timing the TTT model against the unpatched one."
)


def build_parser() -> argparse.ArgumentParser:
    """The whole command tree (also walked by the tests: every option must have a help text)."""
    parser = argparse.ArgumentParser(
        prog="ttt-speech",
        description="Test-Time-Training layers for speech language models (Moshi).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    check = sub.add_parser(
        "check", description=CHECK,
        help="seconds-long install check: patch a tiny Moshi, check streaming, time LMGen.step")
    check.add_argument("--frames", type=int, default=100, help="frames to stream through LMGen.step (default 100)")
    check.add_argument("--layer-type", choices=["linear", "mlp"], default="linear", help="TTT inner model (default linear)")
    check.add_argument("--mode", choices=["replace", "hybrid"], default="hybrid", help="patch mode (default hybrid)")
    check.add_argument("--layers", default="all", help="layers to patch: all, every:k, last:f (default all)")
    check.add_argument("--mini-batch-size", type=int, default=16, help="TTT mini-batch size b (default 16)")
    check.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    check.add_argument("--quiet", action="store_true", help="no progress bar")
    check.set_defaults(func=_check)

    inspect = sub.add_parser("inspect", help="print what an export holds: trainable set, LoRA, TTT layers, provenance",
                             description="Print what an export contains: its base model, trainable set, LoRA, "
                                         "training provenance (model.json) and its TTT patch report and config "
                                         "(ttt_config.json; a bare save_ttt folder has only these).")
    inspect.add_argument("export", metavar="DIR_OR_REPO",
                         help="export or save_ttt folder, or hub repo id namespace/name[@revision]")
    inspect.set_defaults(func=_inspect)

    from .publish import register as register_export

    register_export(sub)

    from .data.cli import register as register_data

    register_data(sub)
    for command in sorted(entry_points(group=COMMAND_GROUP), key=lambda e: e.name):
        try:
            register = command.load()
        except (ImportError, AttributeError) as e:  # a stale or broken install must not take the other commands down
            print(f"ttt-speech: the command {command.name!r} ({command.value}) cannot be loaded ({e}); "
                  "reinstall the package (pip install -e .)", file=sys.stderr)
            continue
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError) as e:  # bad input, or what the system refused (a read-only folder, a full disk)
        print(f"ttt-speech {args.command}: error: {error_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: one line, the shell's code for SIGINT (train saves first)
        print(f"ttt-speech {args.command}: interrupted", file=sys.stderr)
        return 130


def error_line(error: ValueError | OSError) -> str:
    """The one line a user sees: an OSError raised by the system names its file(s) and the reason
    ("x.yaml: Permission denied"), not Python's "[Errno 13] ..."; the project's own errors are their message."""
    if isinstance(error, OSError) and error.strerror:
        files = " -> ".join(str(f) for f in (error.filename, error.filename2) if f is not None)
        return f"{files}: {error.strerror}" if files else error.strerror
    return str(error)


def streaming_error(lm, codes, chunks: tuple[int, ...]) -> float:
    """Largest |logit| difference between chunked streaming (each chunk size) and one full forward."""
    import torch

    from .moshi import teacher_forced_logits

    with torch.no_grad():
        full = lm(codes)
        worst = 0.0
        for chunk in chunks:
            part = teacher_forced_logits(lm, codes, chunk)
            for a, b in ((part.logits, full.logits), (part.text_logits, full.text_logits)):
                if not torch.equal(a.isnan(), b.isnan()):
                    return float("inf")  # predictions at different positions
                worst = max(worst, (a - b).nan_to_num().abs().max().item())
    return worst


def _check(args: argparse.Namespace) -> int:
    import torch
    from moshi.models.lm import LMGen
    from .progress import progress_bar

    from . import TTTConfig, TTTModel, patch_moshi, tiny_moshi_lm
    from .data import FRAME_RATE

    if args.frames < 1:
        raise ValueError(f"--frames: expected a positive integer, got {args.frames}")
    config = TTTConfig(layer_type=args.layer_type, mode=args.mode, layers=args.layers,
                       mini_batch_size=args.mini_batch_size)
    base = tiny_moshi_lm(seed=args.seed)
    lm = tiny_moshi_lm(seed=args.seed)
    report = patch_moshi(lm, config)
    print("== TTT patch ==")
    print(report)

    gen = torch.Generator().manual_seed(args.seed)
    codes = torch.randint(0, lm.card, (1, lm.num_codebooks, 64), generator=gen)
    codes[:, 0] = torch.randint(0, lm.text_card, (1, 64), generator=gen)
    if config.mode == "hybrid":  # an open gate: with the default 0.1 the TTT branch barely shows in the logits
        with torch.no_grad():
            for site in TTTModel.of(lm).sites:
                site.inserted.gate_alpha.fill_(1.0)
    chunks = (1, 7, config.mini_batch_size + 1)
    worst = streaming_error(lm, codes, chunks)
    ok = worst <= STREAMING_TOLERANCE
    print(f"\n== streaming contract == chunks of {', '.join(map(str, chunks))} vs one full forward (64 frames): "
          f"max |logit diff| = {worst:.2e} ({'OK' if ok else 'FAILED'}, tolerance {STREAMING_TOLERANCE:g})")
    if not ok:
        print("ttt-speech check: error: chunked streaming does not reproduce the full forward", file=sys.stderr)
        return 1

    user = torch.randint(0, lm.card, (1, 8, args.frames), generator=gen)
    rates = {}
    for name, model in (("unpatched", base), ("TTT", lm)):
        lm_gen = LMGen(model, temp=0.8, temp_text=0.7)
        torch.manual_seed(args.seed)
        with lm_gen.streaming(1):
            start = time.perf_counter()
            for t in progress_bar(range(args.frames), desc=f"LMGen.step ({name})", unit="frame", leave=False,
                                  enabled=not args.quiet):
                lm_gen.step(user[:, :, t:t + 1])
            rates[name] = args.frames / (time.perf_counter() - start)
    print(f"\n== LMGen.step, {args.frames} frames, batch 1, CPU ({torch.get_num_threads()} threads) ==")
    for name, rate in rates.items():
        print(f"{name:>10}: {rate:7.1f} frames/s ({1000 / rate:6.2f} ms/frame, {rate / FRAME_RATE:5.1f}x real time)")
    print(f"{'ratio':>10}: TTT runs at {rates['TTT'] / rates['unpatched']:.2f}x the unpatched step rate")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from .checkpoint import read_saved_ttt
    from .export import MODEL_FILE, Export, export_dir
    from .publish import describe

    directory = export_dir(args.export)
    if (directory / MODEL_FILE).is_file():  # an export; a bare save_ttt folder has only ttt_config.json
        export = Export.open(directory)
        rows = describe(export.meta)
        width = max(len(label) for label, _ in rows)
        print("\n".join(f"{label:<{width}}  {value}" for label, value in rows))
        saved = export.saved_ttt
        if saved is None:
            return 0
        print()
    else:
        saved = read_saved_ttt(directory)
    print(saved.report)
    print("config:", json.dumps(saved.config.to_dict()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
