"""The Hugging Face hub as a source of exports: `user/repo[@revision]` → a local snapshot folder
(the standard HF cache: HF_HUB_CACHE, HF_HUB_OFFLINE), and the upload of an export folder.

One convention everywhere an export is named (Python, configs, the command line): a local folder
that exists wins; otherwise `namespace/name` is a hub model repo, `namespace/name@revision` pins a
branch, tag or commit. huggingface_hub is imported when the hub is used, not with the command tree.
"""
from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from pathlib import Path

LIBRARY = "ttt-speech"  # the hub's library_name: user agent and model-card front matter
HUB_SOURCE = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[^@\s]+))?")
HUB_ID = "namespace/name[@revision]"  # how the errors name the form of HUB_SOURCE


def parse_hub_source(source: str) -> tuple[str, str | None] | None:
    """(repo id, revision or None) of a `namespace/name[@revision]` string; None when it is not one
    (a local path). A string with an '@' names a revision, so it is meant as a hub id: a malformed
    one (`org/name@`, `@rev`) is a ValueError saying so, not a missing local folder."""
    match = _match(source)
    if match is None:
        if "@" in source:
            raise ValueError(f"{source}: no such local folder, and a malformed hub id (expected {HUB_ID})")
        return None
    return match["repo"], match["revision"]


def check_repo_id(repo_id: str, field: str) -> str:
    """`repo_id` if it names a hub repo (`namespace/name`, no revision); otherwise a one-line ValueError."""
    match = _match(repo_id)
    if match is None or match["revision"] is not None:
        raise ValueError(f"{field}: expected a hub repo id namespace/name (e.g. me/moshi-ttt), got {repo_id!r}")
    return repo_id


def _match(source: str) -> re.Match | None:
    """`HUB_SOURCE`'s match of `source` when its repo id is one the hub accepts, else None."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    match = HUB_SOURCE.fullmatch(source)
    if match is None:
        return None
    try:
        validate_repo_id(match["repo"])
    except HFValidationError:
        return None
    return match


def resolve_export(source: str | Path, files: Sequence[str] | None = None) -> Path:
    """The local folder of an export named by `source`: the folder itself when it exists, else the
    snapshot of the hub repo `namespace/name[@revision]` (downloaded into the HF cache, only `files`
    when given). Neither a folder nor a repo id: `Path(source)`, for the readers' own missing-file error."""
    path = Path(source)
    parsed = None if path.exists() else parse_hub_source(str(source))
    if parsed is None:
        return path
    repo_id, revision = parsed
    try:
        return _snapshot(repo_id, revision, tuple(files) if files else None)
    except Exception as e:  # noqa: BLE001 - the hub's failures are explained, anything else is re-raised
        reason = hub_failure(e, repo_id, revision)
        if reason is None:
            raise
        raise ValueError(f"{source}: no such local folder, and {reason}") from None


def hub_failure(error: BaseException, repo_id: str, revision: str | None = None,
                filename: str | None = None) -> str | None:
    """Why the hub could not give `filename` of `repo_id` (or the repo's snapshot at `revision`), in
    words that say what to do; None when `error` is not a hub or network failure."""
    from huggingface_hub import constants
    from huggingface_hub.utils import (EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError,
                                       RepositoryNotFoundError, RevisionNotFoundError)

    at = f"revision {revision!r}" if revision else "its main branch"
    thing = f"{filename} of hub repo {repo_id}" if filename else f"hub repo {repo_id} ({at})"
    if isinstance(error, RevisionNotFoundError):
        return f"the hub repo {repo_id} has no {at} (expected a branch, tag or commit)"
    if isinstance(error, RepositoryNotFoundError):
        return (f"no hub repo {repo_id} that you can read (check the path or repo id; a private repo needs "
                "`hf auth login` or HF_TOKEN)")
    if isinstance(error, LocalEntryNotFoundError):  # before EntryNotFoundError, its parent class
        if constants.HF_HUB_OFFLINE:
            return (f"{thing} is not in the local cache ({constants.HF_HUB_CACHE}) while HF_HUB_OFFLINE is set; "
                    "check the path, or download it once online")
        return (f"the hub cannot be reached while {thing} is not (completely) in the local cache "
                f"({constants.HF_HUB_CACHE}); check the path, or retry with network access")
    if isinstance(error, EntryNotFoundError):
        return f"the hub repo {repo_id} has no file {filename}" if filename else f"{thing}: {_first_line(error)}"
    if isinstance(error, transport_errors()):
        return f"the hub cannot be reached ({_first_line(error)})"
    if isinstance(error, HfHubHTTPError):
        return f"the hub refused {thing} ({_first_line(error)})"
    return None


@functools.lru_cache(maxsize=None)
def _snapshot(repo_id: str, revision: str | None, files: tuple[str, ...] | None) -> Path:
    """One resolution per process: every reader of one export (its model.json, its TTT config, its
    weights) sees the same commit even if the branch moves meanwhile, and asks the hub once."""
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id, revision=revision, allow_patterns=list(files) if files else None,
                                  library_name=LIBRARY))


def push_folder(directory: Path, files: Sequence[str], readme: str, repo_id: str, revision: str | None = None,
                private: bool = False, message: str = "Upload ttt-speech export") -> str:
    """Upload `files` of `directory` and `readme` as README.md to the hub model repo `repo_id` in one
    commit (the repo, and the branch `revision`, created when missing). Returns the commit's URL."""
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.utils import HfHubHTTPError, OfflineModeIsEnabled

    api = HfApi(library_name=LIBRARY)
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(directory / name)) for name in files]
    operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=readme.encode()))
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        if revision is not None:
            api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
        info = api.create_commit(repo_id, operations, commit_message=message, repo_type="model", revision=revision)
    except OfflineModeIsEnabled:
        raise ValueError(f"{repo_id}: HF_HUB_OFFLINE is set; pushing needs the network (unset it)") from None
    except HfHubHTTPError as e:
        raise ValueError(f"{repo_id}: the hub refused the push ({_first_line(e)}); it needs a write token "
                         "(`hf auth login` or HF_TOKEN) for a repo you may write to") from None
    except transport_errors() as e:  # no network, DNS, proxy, timeout
        raise ValueError(f"{repo_id}: the hub cannot be reached ({_first_line(e)}); pushing needs the network") from None
    return info.commit_url


def transport_errors() -> tuple[type[BaseException], ...]:
    """The exceptions of a network that is not there (no route, DNS, proxy, timeout): huggingface_hub
    1.x talks through httpx, 0.x through requests. Caught after the hub's own HTTP errors."""
    errors: list[type[BaseException]] = []
    try:
        import httpx

        errors.append(httpx.TransportError)
    except ImportError:
        pass
    try:
        import requests

        errors += [requests.exceptions.ConnectionError, requests.exceptions.Timeout]
    except ImportError:
        pass
    return tuple(errors)


def _first_line(error: Exception) -> str:
    return next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
