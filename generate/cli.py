"""`ttt-speech generate`: continue audio prompts with a (TTT-patched) Moshi, frame by frame (arguments,
model loading and output files; the generation itself is `ttt_speech.generate`)."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ttt_speech.data import FRAME_RATE
from ttt_speech.generation.options import add_model_options, add_sampling_options, generation_config

if TYPE_CHECKING:
    from ttt_speech.generate import Continuations

DESCRIPTION = (
    "Continue each PROMPT (an audio file, or a code file) with Moshi (TTT-patched or not), "
    "frame by frame through moshi's LMGen.step, and write each continuation as a wav file "
    "and a code file into --out. Several prompts run as one batch. --state-out saves the "
    "live stream (TTT state, attention caches, LMGen and Mimi state, RNG) and --state-in "
    "continues it later: the result equals one uninterrupted generation. See docs/generate.md."
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate", description=DESCRIPTION,
        help="continue audio prompts frame by frame (LMGen.step), write audio + codes")
    p.add_argument("prompts", nargs="*", type=Path, metavar="PROMPT",
                   help="audio (wav, flac, ogg, mp3, opus; mono = Moshi's voice, stereo = Moshi + user) or "
                        "code file (.safetensors); none with --state-in: continue the saved stream")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder (created)")
    add_model_options(p)
    add_sampling_options(p)
    o = p.add_argument_group("output and state")
    o.add_argument("--include-prompt", action="store_true", help="outputs start with the prompt, not after it")
    o.add_argument("--no-audio", action="store_true", help="write code files only (no Mimi decoding)")
    o.add_argument("--state-in", type=Path, metavar="FILE", help="continue the stream saved in this file")
    o.add_argument("--state-out", type=Path, metavar="FILE", help="save the live stream here at the end (safetensors)")
    o.add_argument("--quiet", action="store_true", help="no live progress line")
    p.set_defaults(func=_generate)


def _check_outputs(args: argparse.Namespace, prompts: list[Path], outputs: list[Path]) -> None:
    """Every file of this run can be written and overwrites no input: checked before the model is
    loaded, so that a bad path fails at once rather than after the generation. Nothing is created
    here: a run that fails later (a prompt that cannot be decoded, a diverged model) leaves no folder."""
    from ttt_speech.files import writable_dir, writable_file

    writable_dir(args.out, "--out", create=False)
    inputs = {p.resolve() for p in prompts} | ({args.state_in.resolve()} if args.state_in is not None else set())
    for path in outputs:
        if path.is_dir():
            raise ValueError(f"--out: {path} is a folder, expected to write a file there")
        if path.resolve() in inputs:
            raise ValueError(f"--out: writing {path} would overwrite an input; choose another folder")
    if args.state_out is not None:
        writable_file(args.state_out, "--state-out", create=False)
        # the state file may replace --state-in (a rolling state), but neither a prompt nor an output
        if args.state_out.resolve() in {p.resolve() for p in [*prompts, *outputs]}:
            raise ValueError(f"--state-out: {args.state_out} would overwrite a prompt or an output of this run; "
                             "choose another file name")


def _output_names(prompts: list[Path]) -> list[str]:
    names, seen = [], {}
    for path in prompts:
        stem = path.name.split(".")[0] or "prompt"
        seen[stem] = seen.get(stem, 0) + 1
        names.append(stem if seen[stem] == 1 else f"{stem}-{seen[stem]}")
    return names


class _Progress:
    """`generate: 37/125 steps | 41.2 frames/s | 3.30x real time` on a terminal (stderr), live."""

    def __init__(self, batch: int, enabled: bool) -> None:
        from ttt_speech.progress import show_progress

        self.batch = batch
        self.live = show_progress(enabled)
        self.last_print = time.perf_counter()
        self.window: list[float] = []

    def update(self, done: int, total: int) -> None:
        now = time.perf_counter()
        self.window = (self.window + [now])[-26:]
        if self.live and (now - self.last_print > 0.25 or done == total):
            self.last_print = now
            rate = (len(self.window) - 1) / (self.window[-1] - self.window[0]) if len(self.window) > 1 else 0.0
            sys.stderr.write(f"\rgenerate: {done}/{total} steps | {rate:6.1f} frames/s"
                             f"{' per stream' if self.batch > 1 else ''} | {rate / FRAME_RATE:5.2f}x real time ")
            sys.stderr.flush()

    def finish(self) -> None:
        if self.live:
            sys.stderr.write("\n")


def _generate(args: argparse.Namespace) -> int:
    """The command: check the arguments and every output path, load the model, the prompts and (when
    needed) Mimi, run `ttt_speech.generate.generate`, write a code file (and a wav) per row."""
    from ttt_speech.files import require_file, writable_dir
    from ttt_speech.generation.loading import check_generation_model, load_generation_model
    from ttt_speech.generation.prompts import PROMPT

    config = generation_config(args)
    prompts: list[Path] = list(args.prompts)
    if not prompts and args.state_in is None:
        raise ValueError("give at least one PROMPT, or --state-in to continue a saved stream")
    prompts = [require_file(path, PROMPT) for path in prompts]
    if args.state_in is not None and args.seed is not None:
        print("note: --seed is ignored with --state-in (the saved stream continues its own RNG)", file=sys.stderr)
    check_generation_model(args.export, args.ttt)

    from ttt_speech.data.audio import write_wav
    from ttt_speech.data.codes import Recording, save_codes
    from ttt_speech.generate import GenerationDiverged, generate, read_state

    saved = read_state(args.state_in) if args.state_in is not None else None
    if saved is not None and prompts and len(prompts) != saved[1]["batch_size"]:
        raise ValueError(f"--state-in: the saved stream has {saved[1]['batch_size']} row(s), got {len(prompts)} prompt(s)")
    names = _output_names(prompts) if prompts else list(saved[1].get("names") or [])
    batch = len(prompts) if prompts else saved[1]["batch_size"]
    if len(names) != batch:
        names = [f"stream{i}" for i in range(batch)]
    run = int(saved[1].get("runs", 0)) if saved is not None else 0  # outputs of run r > 0: <name>.resume<r>.*
    suffix = f".resume{run}" if run > 0 else ""
    _check_outputs(args, prompts, [args.out / f"{name}{suffix}{ext}" for name in names
                                   for ext in (".safetensors", *(() if args.no_audio else (".wav",)))])

    lm, model_config = load_generation_model(args.export, args.model, args.ttt, args.device, args.dtype)
    if lm.dep_q != 8:
        raise ValueError(f"the model makes {lm.dep_q} audio codebooks; Mimi and code files use 8")
    streams, silence, mimi = _inputs(args, prompts, saved, lm, model_config)
    codec = model_config.codec_id()
    progress = _Progress(batch, enabled=not args.quiet)
    try:
        made = generate(lm, streams, config, silence, batch=batch, mimi=None if args.no_audio else mimi, saved=saved,
                        include_prompt=args.include_prompt, state_out=args.state_out,
                        state_meta={"names": names, "model_name": model_config.name}, on_step=progress.update)
    except GenerationDiverged as e:
        # exit 1, not 2: the input was valid, the model failed; nothing of this run is written
        progress.finish()
        rows = "; ".join(f"row {i} is {names[i]}" for i, _ in e.where)
        print(f"ttt-speech generate: error: {e}; {rows}; no output written", file=sys.stderr)
        return 1
    progress.finish()
    if made.audio_restarts:
        print("note: the saved stream has no Mimi decoder state (--no-audio): its audio restarts at this boundary",
              file=sys.stderr)

    writable_dir(args.out, "--out")  # created now that the run has succeeded
    written = []
    for i, name in enumerate(names):
        source = str(prompts[i]) if prompts else f"{args.state_in}"
        written.append(save_codes(args.out / f"{name}{suffix}.safetensors",
                                  Recording(made.codes[i], made.text[i], silence[:8], codec, source)))
        if made.pcm is not None:
            wav = args.out / f"{name}{suffix}.wav"
            write_wav(wav, made.pcm[i], mimi.sample_rate)
            written.append(wav)
    _summary(made, batch, written, args.state_out)
    return 0


def _inputs(args: argparse.Namespace, prompts: list[Path], saved: tuple[dict, dict] | None, lm, model_config):
    """(prompt streams or None, the user stream's silence codes, Mimi or None): code files read as
    they are, audio encoded by Mimi, which is loaded only when audio is read or written or no
    silence codes are known otherwise."""
    from ttt_speech.data.audio import AUDIO_SUFFIXES
    from ttt_speech.generate import default_silence, load_prompt, prompt_streams
    from ttt_speech.generation.loading import check_codec
    from ttt_speech.models import load_mimi

    recordings = [load_prompt(p, None) if p.suffix.lower() not in AUDIO_SUFFIXES else None for p in prompts]
    code_prompts = [r for r in recordings if r is not None]
    need_mimi = not args.no_audio or None in recordings or default_silence(code_prompts, saved) is None
    mimi = load_mimi(model_config, device=lm.device) if need_mimi else None
    if mimi is not None:
        check_codec(lm, mimi, " (code-file prompts with --no-audio need no Mimi)")
    codec = model_config.codec_id()
    for i, path in enumerate(prompts):
        if recordings[i] is None:
            recordings[i] = load_prompt(path, mimi, codec=codec)
        elif recordings[i].codec and recordings[i].codec != codec:
            print(f"note: {path} holds codes of codec {recordings[i].codec!r}; the model's codec is {codec!r}",
                  file=sys.stderr)
    silence = default_silence(code_prompts, saved, mimi)
    return [prompt_streams(lm, r, silence) for r in recordings] if prompts else None, silence, mimi


def _summary(made: "Continuations", batch: int, written: list[Path], state_out: Path | None) -> None:
    """The run's speed and what it wrote, on stdout."""
    rate = made.steps / made.seconds if made.seconds > 0 else float("inf")
    counts = sorted({len(t) for t in made.text})
    print(f"{batch} stream(s), {made.steps} LMGen steps in {made.seconds:.1f} s (Mimi decoding included): "
          f"{rate:.1f} frames/s per stream, {rate / FRAME_RATE:.2f}x real time, {batch * rate:.1f} frames/s in all; "
          f"wrote {'/'.join(map(str, counts))} frames ({'/'.join(f'{c / FRAME_RATE:.2f}' for c in counts)} s) per stream")
    for path in written:
        print(f"wrote {path}")
    if state_out is not None:
        print(f"saved stream state to {state_out} (continue with --state-in {state_out})")
