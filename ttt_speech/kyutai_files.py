"""The files of a Kyutai checkpoint that one load reads: from a hub repo (through the HF cache) or
from a local folder laid out as one (config.json and the files it names), as moshi's
`CheckpointInfo.from_hf_repo` arguments.

moshi 0.2.13's `from_hf_repo` fetches every file it is not given from the hub, eagerly: building
Mimi downloads the 15 GB LM, and offline (HF_HUB_OFFLINE=1) any file not cached is an error, even
one the load never reads; offline, a config.json missing from the cache is taken for a legacy repo
(one without config.json, Moshi-7B), whatever the weights are. So the files are resolved here, each
failure one line naming the file, and `from_hf_repo` gets a path for every one: the files the load
does not read are placeholders (it takes a Path as it is, `loaders.hf_get`, and only the getter that
needs a file opens it). A legacy checkpoint (no config.json, moshi's default file names) is one only
when it really has none: online the hub says so, offline / in a folder its default files are there.
"""
from __future__ import annotations

import functools
import json
import warnings
from pathlib import Path

# config.json keys naming a checkpoint's files (moshi 0.2.13 `from_hf_repo`): the `from_hf_repo` argument each
# file is passed as, and the `moshi.models.loaders` constant of its default name (None: the file is optional).
# Constants by name: moshi is imported only when a checkpoint is resolved, not with ttt_speech.models.
FILE_KEYS = {"moshi_name": ("moshi_weights", "MOSHI_NAME"), "mimi_name": ("mimi_weights", "MIMI_NAME"),
             "tokenizer_name": ("tokenizer", "TEXT_TOKENIZER_NAME"), "lora_name": ("lora_weights", None),
             "mimi_config_name": ("mimi_config_path", None)}
# what each load reads ("config": config.json alone); a load of weights also resolves mimi_config_name, which
# from_hf_repo itself reads (a small JSON)
READS = {"moshi_weights": ("moshi_name", "lora_name"), "mimi_weights": ("mimi_name",), "tokenizer": ("tokenizer_name",),
         "config": ()}
ALWAYS = ("mimi_config_name",)
LEGACY_FILES = ("MOSHI_NAME", "MIMI_NAME")  # a checkpoint without config.json holds these (moshi's defaults)
LAYOUT = "a checkpoint folder is laid out as Kyutai's hub repos: config.json and the files it names"


def is_checkpoint_folder(name: str) -> bool:
    """Whether a model name (as ModelConfig holds it: folders resolved) is a local checkpoint folder,
    not 'tiny' or a hub repo id (which is never an absolute path)."""
    return name != "tiny" and Path(name).is_absolute()


def check_folder(folder: Path) -> None:
    """A checkpoint folder holds a readable config.json, or is a legacy one (moshi's default files);
    the files a load needs are checked by that load (encoding audio needs no LM)."""
    config = folder / "config.json"
    if config.is_file():
        read_config(config)
    elif not _legacy_folder(folder):
        raise ValueError(f"model.name: {folder} has no config.json ({LAYOUT})")
    else:
        _check_legacy_lm(folder)


def _check_legacy_lm(folder: Path) -> None:
    """A folder without config.json is built as Moshi-7B (moshi's default architecture): LM weights of
    another shape would fail only in `load_state_dict`, once the 7B model is built. Their shapes are
    read from the safetensors header (no weight is loaded) and compared with Moshi-7B's."""
    from moshi.models import loaders
    from safetensors import SafetensorError, safe_open

    weights = folder / loaders.MOSHI_NAME
    if not weights.is_file():  # Mimi alone (encoding audio needs no LM)
        return
    try:
        with safe_open(str(weights), framework="pt") as f:
            shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    except (OSError, SafetensorError) as e:
        raise ValueError(f"model.name: {weights} is not a readable safetensors file ({e})") from None
    expected = _moshi_7b_shapes()
    common = [key for key in expected if key in shapes]
    wrong = next((key for key in common if shapes[key] != expected[key]), None)
    if common and wrong is None:
        return
    found = (f"its {wrong} is {list(shapes[wrong])}, Moshi-7B's {list(expected[wrong])}" if wrong is not None
             else "it holds none of Moshi-7B's tensors")
    raise ValueError(f"model.name: {folder}: config.json missing; without one a folder is taken for Moshi-7B, but "
                     f"its {loaders.MOSHI_NAME} is another model ({found}); {LAYOUT}")


@functools.cache
def _moshi_7b_shapes() -> dict[str, tuple[int, ...]]:
    """Moshi-7B's parameter shapes (built on the meta device: ~2 s, once per process)."""
    from .moshi.internals import moshi_7b_lm

    return {key: tuple(value.shape) for key, value in moshi_7b_lm().state_dict().items()}


def checkpoint_files(name: str, given: dict[str, Path | None], reads: str) -> dict[str, Path]:
    """`from_hf_repo` arguments (config_path, moshi_weights, mimi_weights, tokenizer, lora_weights,
    mimi_config_path) for a load that `reads` a key of READS; `given`: files named explicitly
    (ModelConfig's local files, as from_hf_repo names them), used as they are. No config_path in
    the result: a legacy checkpoint (Moshi-7B, moshi's default file names).

    A missing file, or a hub failure, is a one-line ValueError naming model.name and the file."""
    folder = Path(name) if is_checkpoint_folder(name) else None
    config_path = given.get("config_path") or _fetch(name, folder, "config.json", optional=True)
    files: dict[str, Path] = {"config_path": Path(config_path)} if config_path is not None else {}
    names = read_config(config_path) if config_path is not None else {}
    if config_path is None:  # (warnings: once per checkpoint, not once per load)
        warnings.warn(f"{name} has no config.json: a legacy checkpoint, taken for Moshi-7B (as moshi's loaders do)")
    from moshi.models import loaders

    for key in READS[reads] + (ALWAYS if reads != "config" else ()):
        argument, default = FILE_KEYS[key]
        filename = names.get(key) if key in names else default and getattr(loaders, default)
        if given.get(argument) is not None:
            files[argument] = Path(given[argument])
        elif filename:  # moshi skips a null or empty optional name (lora_name: null)
            files[argument] = _fetch(name, folder, filename, source=f"config.json's {key}"
                                     if key in names else "moshi's default name")
    for key, (argument, default) in FILE_KEYS.items():
        needed = default is not None or (names.get(key) and key != "mimi_config_name")  # from_hf_repo would fetch it
        if argument not in files and needed:
            files[argument] = Path(given.get(argument) or f"<{argument}: not read by this load>")
    return files


def _legacy_folder(folder: Path) -> bool:
    from moshi.models import loaders

    return any((folder / getattr(loaders, constant)).is_file() for constant in LEGACY_FILES)


def _legacy_in_cache(repo_id: str) -> bool:
    """Offline, config.json not cached: a legacy repo when moshi's default files are (downloaded
    whole, it would have had its config.json too)."""
    from huggingface_hub import try_to_load_from_cache
    from moshi.models import loaders

    return any(isinstance(try_to_load_from_cache(repo_id, getattr(loaders, constant)), str)
               for constant in LEGACY_FILES)


def _fetch(name: str, folder: Path | None, filename: str, source: str = "", optional: bool = False) -> Path | None:
    """`filename` of the folder, else of the hub repo `name` (HF cache). `optional` (config.json):
    None for a legacy checkpoint that has none."""
    if folder is not None:
        path = folder / filename
        if path.is_file():
            return path
        if optional and _legacy_folder(folder):
            return None
        raise ValueError(f"model.name: {folder} has no {filename} ({source or LAYOUT})")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import EntryNotFoundError, LocalEntryNotFoundError

    from .hub import LIBRARY, hub_failure

    try:
        return Path(hf_hub_download(name, filename, library_name=LIBRARY))
    except Exception as e:  # noqa: BLE001 - the hub's failures are explained, anything else is re-raised
        if optional and isinstance(e, EntryNotFoundError) and (
                not isinstance(e, LocalEntryNotFoundError) or _legacy_in_cache(name)):
            return None  # online the repo has no such file; offline its default files are cached without one
        reason = hub_failure(e, name, filename=filename)
        if reason is None:
            raise
    raise ValueError(f"model.name: {reason} (or give the files: model.moshi_weights, mimi_weights, config_path, "
                     "text_tokenizer, or a checkpoint folder as model.name)")


def read_config(config_path: Path) -> dict:
    """config.json's entries (LM kwargs, file names, model_type, ...); unreadable: a one-line ValueError."""
    try:
        names = json.loads(Path(config_path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"model: {config_path} is not a readable config.json ({e})") from None
    if not isinstance(names, dict):
        raise ValueError(f"model: {config_path} holds a JSON {type(names).__name__}, expected an object")
    return names
