"""Encode a manifest's audio into the codes cache ahead of training (`ttt-speech data encode`)."""
from __future__ import annotations

import logging
from pathlib import Path

from .cache import CodesCache
from . import FRAME_RATE
from .manifest import ManifestEntry, read_manifest, write_manifest

logger = logging.getLogger(__name__)


def encode_manifest(manifest: Path, out_manifest: Path, cache_dir: Path, model) -> tuple[Path, list[Path]]:
    """Audio manifest → code files in the cache + a manifest of them. Unreadable files are skipped
    with a warning and returned; code files in the input are passed through."""
    from tqdm import tqdm

    from ..models import load_mimi

    entries = read_manifest(manifest, "manifest")
    cache = CodesCache(cache_dir, model.codec_id(), lambda: load_mimi(model))
    out, skipped = [], []
    for entry in tqdm(entries, desc="encode", unit="file"):
        if entry.is_codes:
            out.append(entry)
            continue
        try:
            recording = cache.get(entry.path)
        except ValueError as e:
            logger.warning("skipped: %s", e)
            skipped.append(entry.path)
            continue
        out.append(ManifestEntry(cache.path_for(entry.path).resolve(), recording.num_frames / FRAME_RATE))
    if not out:
        raise ValueError(f"{manifest}: no file could be encoded")
    return write_manifest(out_manifest, out), skipped
