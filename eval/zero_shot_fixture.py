"""A zero-shot suite on disk for tests and demos, from real speech: no download.

The 5 LibriVox utterances that eval/fixture.py reads (Debian's `pocketsphinx-testdata`, 24.7 s at
16 kHz) cut into 2 s windows every 0.5 s (32 windows). Each window is a pair: positive = the window
as spoken, negative = the same window time-reversed ("reversed") or with its two halves swapped
("swapped"). Every task is written in its real dataset's schema (the columns of zero_shot_data.TASKS,
Audio features at 16 kHz holding FLAC bytes) in zero_shot_data's local-folder format,
`OUT/<task>/` as `datasets.Dataset.save_to_disk` writes it; sBLIMP's fixture has one negative that
is not audio at all (pair "sblimp/3"), to be skipped and counted.

    python -m ttt_speech_apps.eval.zero_shot_fixture OUT [--tasks swuggy,sblimp] [--hub-cache DIR]

With `--hub-cache DIR` the tasks are also laid out as the Hugging Face hub cache holds a dataset
repository (`datasets--speed--sWUGGY/snapshots/<commit>/data/train-00000-of-00001.parquet`, refs/main),
so that HF_HUB_CACHE=DIR HF_HUB_OFFLINE=1 reads them with zero_shot.path unset.
"""
from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np

from . import fixture
from .zero_shot_data import TASKS, ZeroShotTask

RATE = fixture.RATE
WINDOW_SECONDS = 2.0
HOP_SECONDS = 0.5
# the fake recording of each fixture task; SALMon's schema (positive_audio / negative_audio) is in it too
NEGATIVES = {"swuggy": "reversed", "sblimp": "swapped", "sstorycloze": "reversed", "tstorycloze": "swapped",
             "salmon_speaker": "reversed"}
DEFAULT_TASKS = tuple(NEGATIVES)
UNREADABLE = ("sblimp", 3)  # (task, row) whose negative is not audio
COMMIT = "0123456789abcdef0123456789abcdef01234567"  # the snapshot's name in a hub-layout cache


def windows(source: Path = fixture.SOURCE, seconds: float = WINDOW_SECONDS,
            hop: float = HOP_SECONDS) -> list[np.ndarray]:
    """The utterances' `seconds`-long windows every `hop` seconds (float32, 16 kHz), in order."""
    size, step = int(seconds * RATE), int(hop * RATE)
    out = []
    for _, audio, _ in fixture.read_utterances(source):
        out += [audio[start:start + size] for start in range(0, len(audio) - size + 1, step)]
    return out


def negative(audio: np.ndarray, kind: str) -> np.ndarray:
    """The fake version of `audio`: "reversed" in time, or its halves "swapped"."""
    if kind == "reversed":
        return np.ascontiguousarray(audio[::-1])
    if kind == "swapped":
        half = len(audio) // 2
        return np.concatenate([audio[half:], audio[:half]])
    raise ValueError(f"unknown negative {kind!r} (reversed, swapped)")


def flac_bytes(audio: np.ndarray, rate: int = RATE) -> bytes:
    import soundfile

    buffer = io.BytesIO()
    soundfile.write(buffer, audio, rate, format="FLAC", subtype="PCM_16")
    return buffer.getvalue()


def write_task(folder: Path, task: ZeroShotTask, positives: list[bytes], negatives: list[bytes],
               rate: int = RATE):
    """A dataset in `task`'s schema (its two columns as Audio features of `rate` Hz, rows of stored bytes
    and no path) saved to `folder` with `save_to_disk`; the datasets.Dataset. Built from an Arrow table:
    datasets' own Audio encoding needs torchcodec."""
    import datasets
    import pyarrow as pa

    from .zero_shot_data import _quiet

    struct = pa.struct({"bytes": pa.binary(), "path": pa.string()})
    table = pa.table({"id": pa.array(range(len(positives)), pa.int64()),
                      task.positive: pa.array([{"bytes": b, "path": None} for b in positives], struct),
                      task.negative: pa.array([{"bytes": b, "path": None} for b in negatives], struct)})
    features = datasets.Features({"id": datasets.Value("int64"), task.positive: datasets.Audio(sampling_rate=rate),
                                  task.negative: datasets.Audio(sampling_rate=rate)})
    dataset = datasets.Dataset(table, info=datasets.DatasetInfo(features=features))
    with _quiet():
        dataset.save_to_disk(str(folder))
    return dataset


def write_fixture(out: Path, source: Path = fixture.SOURCE, tasks: tuple[str, ...] = DEFAULT_TASKS) -> dict:
    """`out/<task>/` for each of `tasks` (keys of NEGATIVES); returns {"path", "sample_rate", "seconds",
    "tasks": {task: {"pairs", "negative", "unreadable": [pair ids]}}}."""
    out = Path(out)
    unknown = [t for t in tasks if t not in NEGATIVES]
    if unknown:
        raise ValueError(f"no fixture for task(s) {', '.join(unknown)} (known: {', '.join(NEGATIVES)})")
    pieces = windows(source)
    positives = [flac_bytes(p) for p in pieces]
    info = {"path": str(out), "sample_rate": RATE, "seconds": WINDOW_SECONDS, "tasks": {}}
    encoded: dict[str, list[bytes]] = {}
    for name in tasks:
        kind = NEGATIVES[name]
        if kind not in encoded:
            encoded[kind] = [flac_bytes(negative(p, kind)) for p in pieces]
        negatives = list(encoded[kind])
        unreadable = []
        if name == UNREADABLE[0]:
            negatives[UNREADABLE[1]] = b"this is not audio " * 8
            unreadable.append(f"{name}/{UNREADABLE[1]}")
        write_task(out / name, TASKS[name], positives, negatives)
        info["tasks"][name] = {"pairs": len(pieces), "negative": kind, "unreadable": unreadable}
    return info


def cache_as_hub(folder: Path, cache: Path, tasks: tuple[str, ...], commit: str = COMMIT) -> dict[str, Path]:
    """Lay the saved tasks of `folder` out in `cache` (HF_HUB_CACHE) as the hub cache holds their dataset
    repositories: parquet files (with datasets' features) under snapshots/<commit>/<config or data>/,
    refs/main holding `commit`. Returns {task: its parquet file}. SALMon's configs share one repository."""
    import datasets
    from huggingface_hub.file_download import repo_folder_name

    from .zero_shot_data import _quiet

    written = {}
    for name in tasks:
        task = TASKS[name]
        storage = cache / repo_folder_name(repo_id=task.hub_id, repo_type="dataset")
        target = storage / "snapshots" / commit / (task.config or "data") / f"{task.split}-00000-of-00001.parquet"
        target.parent.mkdir(parents=True, exist_ok=True)
        with _quiet():
            datasets.load_from_disk(str(folder / name)).to_parquet(str(target))
        (storage / "refs").mkdir(exist_ok=True)
        (storage / "refs" / "main").write_text(commit)
        written[name] = target
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="output folder (zero_shot.path: OUT/<task>/)")
    parser.add_argument("--source", type=Path, default=fixture.SOURCE,
                        help=f"pocketsphinx-testdata librivox folder (default {fixture.SOURCE})")
    parser.add_argument("--tasks", default=",".join(DEFAULT_TASKS),
                        help=f"comma-separated (default {','.join(DEFAULT_TASKS)})")
    parser.add_argument("--hub-cache", type=Path, help="also lay the tasks out in this hub-layout cache (HF_HUB_CACHE)")
    args = parser.parse_args(argv)
    tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
    try:
        info = write_fixture(args.out, args.source, tasks)
        if args.hub_cache is not None:
            cache_as_hub(args.out, args.hub_cache, tasks)
    except (FileNotFoundError, ValueError) as e:
        print(f"zero_shot_fixture: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {len(info['tasks'])} tasks of {', '.join(str(t['pairs']) for t in info['tasks'].values())} pairs "
          f"({WINDOW_SECONDS:g} s, {RATE} Hz) under {args.out}"
          + (f"; laid out as the hub cache in {args.hub_cache} (HF_HUB_CACHE={args.hub_cache} HF_HUB_OFFLINE=1)"
             if args.hub_cache is not None else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
