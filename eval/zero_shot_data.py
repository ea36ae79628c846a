"""The spoken-LM zero-shot suite's data (issue 35): which datasets, where they are read from, and
their pairs of recordings decoded to mono float32 PCM at the codec's rate.

Each task is a Hugging Face dataset whose rows are pairs of audio recordings, a real one and a
fake one: `positive` / `negative` for speed/sWUGGY, speed/sBLIMP, speed/sStoryCloze and
speed/tStoryCloze (split `train`), `positive_audio` / `negative_audio` for slprl/SALMon, one
dataset config per acoustic task. A task is read from one of two places, never from the network:

* a local folder (`zero_shot.path`): `PATH/<task name>/` holds the split as written by
  `datasets.Dataset.save_to_disk` and read back with `datasets.load_from_disk` (a saved
  `DatasetDict` with a `train` split works too). From a machine with network access:

      from datasets import load_dataset
      load_dataset("speed/sWUGGY", split="train").save_to_disk("PATH/swuggy")
      load_dataset("slprl/SALMon", "speaker_consistency", split="train").save_to_disk("PATH/salmon_speaker")

  (`python -m ttt_speech_apps.eval.zero_shot_fixture OUT` writes such a folder from real LibriVox
  speech, for tests.)
* the Hugging Face cache (`zero_shot.path` unset): the repository's parquet files as
  `hf download --repo-type dataset speed/sWUGGY` (or an earlier online `load_dataset`) leave them
  in the hub cache (HF_HUB_CACHE; `<config>/<split>-*.parquet` for SALMon, `data/<split>-*.parquet`
  for the others), read with `datasets`' parquet builder, which prepares an Arrow copy in its own
  cache (HF_DATASETS_CACHE) the first time. With HF_HUB_OFFLINE=1 / HF_DATASETS_OFFLINE=1,
  `datasets.load_dataset(hub_id, config, split=...)` is tried first: it reads only the Arrow
  cache that an earlier online `load_dataset` prepared (datasets 5.x does not read the hub
  cache's files offline by itself).

Audio columns are read with `datasets.Audio(decode=False)` (datasets >= 4 decodes audio with
torchcodec, which ttt-speech does not install) and decoded here with soundfile from the stored
bytes (or the stored path when there are no bytes), mixed down to mono and resampled with
ttt_speech/data/audio.py's `resample`, as audio files are. A recording that cannot be decoded, is empty or holds
NaN / inf samples makes its pair skipped, with the reason, and counted.
"""
from __future__ import annotations

import contextlib
import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from ttt_speech.data.audio import resample


@dataclass(frozen=True)
class ZeroShotTask:
    name: str            # the task's name in configs and reports, and its folder under zero_shot.path
    hub_id: str          # the Hugging Face dataset repository
    config: str | None   # the dataset config (SALMon: one per acoustic task), None for the default one
    split: str           # "train": the only split the releases have
    positive: str        # the column of the real recording
    negative: str        # the column of the fake one
    tokens: str          # the anchors' token selection: "cb1" (first codebook only) or "audio" (all audio codebooks)


def _speed(name: str, repo: str) -> ZeroShotTask:
    return ZeroShotTask(name, f"speed/{repo}", None, "train", "positive", "negative", "cb1")


def _salmon(name: str, config: str) -> ZeroShotTask:
    return ZeroShotTask(name, "slprl/SALMon", config, "train", "positive_audio", "negative_audio", "audio")


# SALMon's config names are those of the slprl/SALMon repository (one folder of parquet files each).
TASKS: dict[str, ZeroShotTask] = {t.name: t for t in [
    _speed("swuggy", "sWUGGY"),
    _speed("sblimp", "sBLIMP"),
    _speed("sstorycloze", "sStoryCloze"),
    _speed("tstorycloze", "tStoryCloze"),
    _salmon("salmon_speaker", "speaker_consistency"),
    _salmon("salmon_gender", "gender_consistency"),
    _salmon("salmon_sentiment", "sentiment_consistency"),
    _salmon("salmon_bg_domain", "bg_domain_consistency"),
    _salmon("salmon_bg_all", "bg_all_consistency"),
    _salmon("salmon_room", "rir_consistency"),
    _salmon("salmon_sentiment_alignment", "sentiment_alignment"),
    _salmon("salmon_bg_alignment", "bg_alignment"),
]}


@dataclass
class Pair:
    id: str                      # "<task>/<row index in the split>"
    positive: np.ndarray         # mono float32 PCM at the requested sample rate
    negative: np.ndarray


class PairSet:
    """A task's pairs, decoded one at a time as they are iterated: a whole split at 24 kHz would not
    fit in memory (sBLIMP's 25,200 pairs are ~10 GB of PCM). A pair whose recording cannot be decoded
    is left out of the iteration and listed in `skipped` (id, reason)."""

    def __init__(self, task: ZeroShotTask, dataset, rows: list[int], sample_rate: int, total: int, source: str):
        self.task, self.rows, self.total, self.source = task, rows, total, source
        self._dataset, self._sample_rate = dataset, sample_rate
        self._skipped: list[tuple[str, str]] = []
        self._done = False

    def __len__(self) -> int:
        """The rows it reads (skipped ones included)."""
        return len(self.rows)

    def __iter__(self) -> Iterator[Pair]:
        self._skipped = []
        for row in self.rows:
            item = self._dataset[row]
            pair_id = f"{self.task.name}/{row}"
            try:
                audio = [_decode(item[column], self._sample_rate, side)
                         for column, side in ((self.task.positive, "positive"), (self.task.negative, "negative"))]
            except ValueError as e:
                self._skipped.append((pair_id, str(e)))
                continue
            yield Pair(pair_id, audio[0], audio[1])
        self._done = True

    @property
    def skipped(self) -> list[tuple[str, str]]:
        """(pair id, reason) of the pairs left out (decoding the set first if it was not iterated)."""
        if not self._done:
            for _ in self:
                pass
        return self._skipped


def check_available(task: ZeroShotTask, path: Path | None, where: str) -> None:
    """Before any model loads: `path / task.name` holds a saved dataset (or, `path` None, the hub
    dataset is in the local Hugging Face cache) with the task's two audio columns. Otherwise a
    one-line ValueError naming `where` (e.g. "zero_shot.tasks.swuggy"), the dataset, and how to get it."""
    _open(task, path, where)


def read_pairs(task: ZeroShotTask, path: Path | None, sample_rate: int, max_pairs: int | None = None,
               seed: int = 0, where: str | None = None) -> PairSet:
    """The split's pairs, both recordings decoded (as the set is iterated), mono, at `sample_rate`.
    With `max_pairs` (< the split's rows) a random subset of that many rows drawn with `seed`, kept in
    row order. A pair with a recording that cannot be decoded, is empty or not finite is skipped:
    (id, reason) in `skipped`."""
    where = where or f"zero_shot.tasks.{task.name}"
    if max_pairs is not None and max_pairs < 1:
        raise ValueError(f"{where}: max_pairs must be >= 1 (got {max_pairs})")
    dataset, source = _open(task, path, where)
    total = len(dataset)
    rows = np.arange(total)
    if max_pairs is not None and max_pairs < total:
        rows = np.sort(np.random.default_rng(seed).choice(total, size=max_pairs, replace=False))
    return PairSet(task, dataset, rows.tolist(), sample_rate, total, source)


# ---- where a task is read from

def _open(task: ZeroShotTask, path: Path | None, where: str):
    """(the split as a datasets.Dataset with its audio columns undecoded, a description of its source)."""
    import datasets

    with _quiet():
        if path is not None:
            dataset, source = _from_folder(task, Path(path), where), str(Path(path) / task.name)
        else:
            dataset, source = _from_hub_cache(task, where)
    columns = dataset.column_names
    for column in (task.positive, task.negative):
        if column not in columns:
            raise ValueError(f"{where}: {source} has no column {column!r} (columns: {', '.join(columns) or 'none'})")
        feature = dataset.features.get(column)
        if isinstance(feature, datasets.Audio):
            dataset = dataset.cast_column(column, datasets.Audio(decode=False))
        elif not _is_audio_struct(feature):
            raise ValueError(f"{where}: column {column!r} of {source} is not audio ({_describe(feature)}; "
                             "expected an Audio column of bytes / path)")
    return dataset.select_columns([task.positive, task.negative]), source


def _from_folder(task: ZeroShotTask, path: Path, where: str):
    import datasets

    folder = path / task.name
    how = (f"write it with `datasets.load_dataset({task.hub_id!r}{f', {task.config!r}' if task.config else ''}, "
           f"split={task.split!r}).save_to_disk({str(folder)!r})`, or unset zero_shot.path to read the Hugging "
           "Face cache")
    if not folder.is_dir():
        raise ValueError(f"{where}: no dataset folder {folder} for {_name(task)}; {how}")
    try:
        loaded = datasets.load_from_disk(str(folder))
    except (FileNotFoundError, OSError, ValueError) as e:
        raise ValueError(f"{where}: {folder} is not a saved dataset ({_first_line(e)}); {how}") from None
    if isinstance(loaded, datasets.DatasetDict):
        if task.split not in loaded:
            raise ValueError(f"{where}: {folder} has no split {task.split!r} (splits: {', '.join(loaded)})")
        loaded = loaded[task.split]
    return loaded


def _from_hub_cache(task: ZeroShotTask, where: str):
    import datasets
    from huggingface_hub import constants

    if datasets.config.HF_HUB_OFFLINE:  # datasets' own Arrow cache of an earlier online load_dataset, if any
        try:
            return datasets.load_dataset(task.hub_id, task.config, split=task.split), f"{_name(task)} (datasets cache)"
        except Exception:  # noqa: BLE001 - not there (ConnectionError, FileNotFoundError, ...): try the hub cache
            pass
    files = _snapshot_files(task)
    if not files:
        include = f" --include '{task.config}/*'" if task.config else ""
        raise ValueError(f"{where}: {_name(task)} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}); "
                         f"download it with `hf download --repo-type dataset {task.hub_id}{include}`, or set "
                         f"zero_shot.path to a folder holding {task.name}/ (Dataset.save_to_disk)")
    try:
        dataset = datasets.load_dataset("parquet", data_files={task.split: [str(f) for f in files]}, split=task.split)
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file: one line naming it
        raise ValueError(f"{where}: cannot read {_name(task)} from the Hugging Face cache ({files[0].parent}): "
                         f"{_first_line(e)}") from None
    return dataset, f"{_name(task)} (hub cache {files[0].parent})"


def _snapshot_files(task: ZeroShotTask) -> list[Path]:
    """The split's parquet files in the hub cache's snapshot of `task.hub_id` (refs/main), [] if none."""
    from huggingface_hub import snapshot_download

    try:
        snapshot = Path(snapshot_download(task.hub_id, repo_type="dataset", local_files_only=True))
    except Exception:  # noqa: BLE001 - LocalEntryNotFoundError and kin: nothing cached
        return []
    folder = snapshot / (task.config or "data")
    return sorted(folder.glob(f"{task.split}-*.parquet")) or sorted((folder / task.split).glob("*.parquet"))


# ---- decoding

def _decode(value, sample_rate: int, side: str) -> np.ndarray:
    """One stored recording ({"bytes", "path"}, or a path) → mono float32 at `sample_rate`;
    ValueError "<side>: <why>" when it cannot be used."""
    import soundfile

    data, where = (value.get("bytes"), value.get("path")) if isinstance(value, dict) else (None, value)
    if not data:
        if data is not None:  # b"": stored, but empty
            raise ValueError(f"{side}: empty audio (0 bytes)")
        if not where:
            raise ValueError(f"{side}: no audio (neither bytes nor a path)")
        if not Path(where).is_file():
            raise ValueError(f"{side}: no audio file at {where} (and no bytes stored)")
    try:
        pcm, rate = soundfile.read(io.BytesIO(data) if data else str(where), dtype="float32", always_2d=True)
    except Exception as e:  # noqa: BLE001 - libsndfile's errors, and whatever a malformed header raises
        why = re.sub(r"^Error opening <[^>]*>: ", "", _first_line(e))  # the BytesIO's repr says nothing
        raise ValueError(f"{side}: cannot decode audio ({why})") from None
    if pcm.shape[0] == 0:
        raise ValueError(f"{side}: empty audio (0 samples)")
    mono = pcm.mean(axis=1, dtype=np.float32) if pcm.shape[1] > 1 else pcm[:, 0]
    bad = ~np.isfinite(mono)
    if bad.any():
        raise ValueError(f"{side}: {int(bad.sum())} NaN or inf sample(s) (first at {int(np.argmax(bad)) / rate:.3f} s)")
    if rate != sample_rate:
        try:  # a Rust panic is a BaseException
            mono = resample(mono[None], rate, sample_rate)[0]
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # noqa: BLE001
            raise ValueError(f"{side}: cannot resample audio from {rate} Hz ({_first_line(e)})") from None
    return np.ascontiguousarray(mono, dtype=np.float32)


# ---- small helpers

def _name(task: ZeroShotTask) -> str:
    return f"{task.hub_id} (config {task.config})" if task.config else task.hub_id


def _is_audio_struct(feature) -> bool:
    """A column stored as audio without the Audio feature: {"bytes", "path"} structs, or file paths."""
    from datasets import Value

    if isinstance(feature, dict):
        return "bytes" in feature and "path" in feature
    return isinstance(feature, Value) and feature.dtype in ("string", "large_string")


def _describe(feature) -> str:
    if isinstance(feature, dict):
        return "a struct of " + ", ".join(feature)
    return getattr(feature, "dtype", None) or type(feature).__name__


def _first_line(error: BaseException) -> str:
    return next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)


@contextlib.contextmanager
def _quiet():
    """datasets' progress bars and warnings off while a split is opened (its "Using the latest cached
    version..." would precede our own one-line error); both as they were afterwards."""
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from datasets.utils import logging as dlogging

    was_disabled, verbosity = are_progress_bars_disabled(), dlogging.get_verbosity()
    disable_progress_bars()
    dlogging.set_verbosity_error()
    try:
        yield
    finally:
        dlogging.set_verbosity(verbosity)
        if not was_disabled:
            enable_progress_bars()
