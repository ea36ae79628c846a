"""Token streams for text-token LMs (host llama): a token file (`.npy`, a 1-D integer array of ids) or a
text file (`.txt`) tokenized with the model's tokenizer and cached, keyed by the file's content and
the tokenizer, so that a corpus is tokenized once however many runs read it."""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

TOKEN_SUFFIX, TEXT_SUFFIX = ".npy", ".txt"
TOKEN_KINDS = ((TOKEN_SUFFIX, TEXT_SUFFIX), f"token ids ({TOKEN_SUFFIX}, a 1-D integer array) or text ({TEXT_SUFFIX})")


def read_token_file(path: Path, where: str = "") -> Tensor:
    """The ids of a `.npy` token file, [T] int64; a one-line ValueError for anything else."""
    try:
        ids = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"{where or path}: not a readable .npy array ({str(e).splitlines()[0]})") from None
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{where or path}: expected a 1-D integer array of token ids, got {ids.dtype} {ids.shape}")
    return torch.from_numpy(ids.astype(np.int64))


def tokenize_text_file(path: Path, tokenizer, tokenizer_id: str, cache_dir: Path) -> Tensor:
    """The ids of a text file under `tokenizer` (no special tokens added), [T] int64, through the cache
    `cache_dir/tokens/<sha256 of content and tokenizer>.npy` (written atomically)."""
    text = path.read_bytes()
    key = hashlib.sha256(text + b"\0" + tokenizer_id.encode() + b"\0" + str(len(tokenizer)).encode()).hexdigest()
    cached = cache_dir / "tokens" / f"{key}{TOKEN_SUFFIX}"
    if cached.is_file():
        return read_token_file(cached)
    try:
        decoded = text.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    ids = torch.from_numpy(np.asarray(tokenizer(decoded, add_special_tokens=False)["input_ids"], dtype=np.int64))
    write_token_file(cached, ids)
    return ids


def write_token_file(path: Path, ids: Tensor) -> Path:
    """Save ids [T] as a `.npy` token file (int32 when the ids fit, else int64), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    array = ids.numpy()
    array = array.astype(np.int32 if array.size == 0 or int(array.max()) < 2**31 else np.int64)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TOKEN_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def check_ids(ids: Tensor, vocab_size: int, where: str) -> Tensor:
    """`ids`, each one a token of the model's vocabulary (else a one-line ValueError)."""
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise ValueError(f"{where}: token ids must lie in [0, {vocab_size}) (the model's vocabulary), found "
                         f"{int(ids.min())}..{int(ids.max())}")
    return ids
