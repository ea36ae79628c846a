"""The files of a Kyutai checkpoint that one load reads: from a hub repo (through the HF cache) or
from a local folder laid out as one (config.json and the files it names), as moshi's
`CheckpointInfo.from_hf_repo` arguments.

moshi 0.2.13's `from_hf_repo` fetches every file it is not given from the hub, eagerly: building
Mimi downloads the 15 GB LM, and offline (HF_HUB_OFFLINE=1) any file not cached is an error, even
one the load never reads; a missing config.json is taken for a legacy repo, and then it builds
Moshi-7B whatever the weights are. So the files are resolved here, each failure one line naming the
file, and `from_hf_repo` gets a path for every one: the files the load does not read are
placeholders (it takes a Path as it is, `loaders.hf_get`, and only the getter that needs a file
opens it).
"""
from __future__ import annotations

import json
from pathlib import Path

# config.json keys naming a checkpoint's files (moshi 0.2.13 `from_hf_repo`): the `from_hf_repo` argument each
# file is passed as, and the `moshi.models.loaders` constant of its default name (None: the file is optional)
FILE_KEYS = {"moshi_name": ("moshi_weights", "MOSHI_NAME"), "mimi_name": ("mimi_weights", "MIMI_NAME"),
             "tokenizer_name": ("tokenizer", "TEXT_TOKENIZER_NAME"), "lora_name": ("lora_weights", None),
             "mimi_config_name": ("mimi_config_path", None)}
# what each load reads; mimi_config is read by from_hf_repo itself (a small JSON), so always resolved
READS = {"moshi_weights": ("moshi_name", "lora_name"), "mimi_weights": ("mimi_name",), "tokenizer": ("tokenizer_name",),
         "config": ()}
ALWAYS = ("mimi_config_name",)


def is_checkpoint_folder(name: str) -> bool:
    """Whether a model name (as ModelConfig holds it: folders resolved) is a local checkpoint folder,
    not 'tiny' or a hub repo id (which is never an absolute path)."""
    return name != "tiny" and Path(name).is_absolute()


def checkpoint_files(name: str, given: dict[str, Path | None], reads: str) -> dict[str, Path]:
    """`from_hf_repo` arguments (config_path, moshi_weights, mimi_weights, tokenizer, lora_weights,
    mimi_config_path) for a load that `reads` one of READS; `given`: files named explicitly
    (ModelConfig's local files, as from_hf_repo names them), used as they are.

    A missing file, or a hub failure, is a one-line ValueError naming model.name and the file."""
    folder = Path(name) if is_checkpoint_folder(name) else None
    config_path = given.get("config_path") or _fetch(name, folder, "config.json", optional=folder is None)
    files: dict[str, Path] = {"config_path": config_path} if config_path is not None else {}
    names = read_config(config_path) if config_path is not None else {}
    from moshi.models import loaders

    for key in READS[reads] + ALWAYS:
        argument, default = FILE_KEYS[key]
        filename = names.get(key, default and getattr(loaders, default))
        if given.get(argument) is not None:
            files[argument] = Path(given[argument])
        elif filename is not None:
            files[argument] = _fetch(name, folder, filename, source=f"config.json's {key}"
                                     if key in names else "moshi's default name")
    for key, (argument, default) in FILE_KEYS.items():
        if argument not in files and (default is not None or key in names):  # one this load does not read
            files[argument] = Path(given.get(argument) or f"<{argument}: not read by this load>")
    return files


def _fetch(name: str, folder: Path | None, filename: str, source: str = "", optional: bool = False) -> Path | None:
    """`filename` of the folder, else of the hub repo `name` (HF cache; a legacy repo may lack an
    `optional` file: None)."""
    if folder is not None:
        path = folder / filename
        if not path.is_file():
            raise ValueError(f"model.name: {folder} has no {filename}" + (f" ({source})" if source else
                             " (a checkpoint folder is laid out as Kyutai's hub repos: config.json and the files it "
                             "names)"))
        return path
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import EntryNotFoundError, LocalEntryNotFoundError

    from .hub import LIBRARY, hub_failure

    try:
        return Path(hf_hub_download(name, filename, library_name=LIBRARY))
    except EntryNotFoundError as e:
        if optional and not isinstance(e, LocalEntryNotFoundError):  # online, and the repo has no such file
            return None
        reason = hub_failure(e, f"{filename} of hub repo {name}")
    except Exception as e:  # noqa: BLE001 - the hub's failures are explained, anything else is re-raised
        reason = hub_failure(e, f"{filename} of hub repo {name}")
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
