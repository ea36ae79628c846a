"""Encode a manifest's audio into the codes cache ahead of training (`ttt-speech data encode`)."""
from __future__ import annotations

import logging
from pathlib import Path

from ..files import writable_dir, writable_file
from .cache import CodecUnavailable, CodesCache
from . import FRAME_RATE
from .manifest import ManifestEntry, read_manifest, write_manifest

logger = logging.getLogger(__name__)


def encode_manifest(manifest: Path, out_manifest: Path, cache_dir: Path, model,
                    skip_bad: bool = False, progress: bool = True) -> tuple[Path, dict[Path, str]]:
    """Audio manifest → code files in the cache + a manifest of them; returns (out_manifest,
    {skipped file: reason}). Code files in the input are passed through.

    Audio that cannot be decoded cleanly (corrupt, empty, NaN / inf samples) is a one-line
    ValueError naming the file, and no manifest is written; with `skip_bad` such files are left
    out of the manifest with a warning instead, and returned with the reason."""
    from ..progress import progress_bar

    from ..models import load_mimi

    entries = read_manifest(manifest, "manifest")
    # the outputs are checked before the codec is loaded and hours of audio encoded
    writable_file(out_manifest, "out_manifest")
    writable_dir(cache_dir, "--cache")
    cache = CodesCache(cache_dir, model.codec_id(), lambda: load_mimi(model))
    out, skipped = [], {}
    for entry in progress_bar(entries, desc="encode", unit="file", enabled=progress):
        if entry.is_codes:
            out.append(entry)
            continue
        try:
            recording = cache.get(entry.path)
        except CodecUnavailable:
            raise  # not a bad file: --skip-bad would skip every one
        except ValueError as e:
            if not skip_bad:
                raise ValueError(f"{e} (--skip-bad leaves such files out)") from None
            logger.warning("skipped: %s", e)
            skipped[entry.path] = str(e).removeprefix(f"{entry.path}: ")
            continue
        out.append(ManifestEntry(cache.path_for(entry.path).resolve(), recording.num_frames / FRAME_RATE))
    if not out:
        raise ValueError(f"{manifest}: no file could be encoded")
    return write_manifest(out_manifest, out), skipped
