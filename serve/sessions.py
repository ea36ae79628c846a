"""Where the server keeps conversations between connections: one folder, two files per session.

    <dir>/<id>.json          the record: created / updated, connections, frames, resets, the last
                             connection's timings, the model it belongs to, the owner (the sha256
                             of the token that created it, when the server binds sessions)
    <dir>/<id>.safetensors   the live stream's state (`LiveStream.state_dict`: LMGen, KV caches,
                             TTT state, Mimi, RNG), absent for a session that was reset

The two change together or not at all (`_commit`): both are written under temporary names in a
staging folder, then renamed over the old pair; a failure on the way puts the old state back. Only
a crash between the two renames (two metadata operations) could leave the new state with the
old record. A server killed mid-save leaves its staging folder; the next one removes it at start
(`remove_staging`).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

from ttt_speech.files import read_json, writable_dir, write_text_atomic
from ttt_speech.generation.state import read_state, write_state

ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
ID_RULE = "1-64 characters of letters, digits, '.', '_' or '-', starting with a letter or digit"
STAGING = ".{session}.saving."  # a save's staging folder: this prefix, then mkdtemp's random part


def check_id(session: str) -> str:
    if not isinstance(session, str) or not ID_PATTERN.fullmatch(session):
        raise ValueError(f"session: expected {ID_RULE}, got {session!r}")
    return session


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class SessionStore:
    """The sessions under `root` (created and checked writable at once: a server that cannot save
    fails when it starts, not when the first conversation ends)."""

    def __init__(self, root: str | Path, what: str = "--sessions") -> None:
        self.root = writable_dir(root, what)

    def state_path(self, session: str) -> Path:
        return self.root / f"{check_id(session)}.safetensors"

    def record_path(self, session: str) -> Path:
        return self.root / f"{check_id(session)}.json"

    def record(self, session: str) -> dict | None:
        """The session's record (with `state_bytes`: its state file's size, 0 when none); None if unknown."""
        record = read_json(self.record_path(session), "a session record", missing_ok=True)
        if record is not None:
            state = self.state_path(session)
            record["state_bytes"] = state.stat().st_size if state.is_file() else 0
        return record

    def require(self, session: str) -> dict:
        record = self.record(session)
        if record is None:
            raise KeyError(f"no session {session!r} in {self.root}")
        return record

    def remove_staging(self) -> list[Path]:
        """Remove the staging folders saves left (a server killed mid-save); the folders removed.
        Only for a server that starts: a running one's save in progress would lose its files."""
        removed = []
        for path in sorted(self.root.glob(STAGING.format(session="*") + "*")):
            session = path.name[1:].rsplit(".saving.", 1)[0]
            if path.is_dir() and not path.is_symlink() and ID_PATTERN.fullmatch(session):
                shutil.rmtree(path)
                removed.append(path)
        return removed

    def list(self) -> list[dict]:
        records = []
        for path in sorted(self.root.glob("*.json")):
            if ID_PATTERN.fullmatch(path.stem):
                try:
                    records.append(self.record(path.stem))
                except ValueError as e:  # one unreadable record must not hide the others
                    records.append({"id": path.stem, "error": str(e)})
        return [r for r in records if r is not None]

    def load(self, session: str) -> tuple[dict, dict] | None:
        """(tensors, meta) of the session's saved stream; None for a new or reset session."""
        path = self.state_path(session)
        return read_state(path) if path.is_file() else None

    def save(self, session: str, tensors: dict, meta: dict, connection: dict, owner: str | None = None) -> dict:
        """Write the stream's state and its record (updated with `connection`'s figures), both or
        neither; a new session's record keeps `owner` (serve/access.py `token_owner`) when given.
        An unreadable old record fails the save before anything is written."""
        record = self.record(session) or {"id": session, "created": _now(), "connections": 0, "resets": 0,
                                          **({"owner": owner} if owner else {})}
        record.pop("state_bytes", None)
        live = meta.get("live", {})
        record.update(updated=_now(), connections=record["connections"] + 1, frames=live.get("frames_in", 0),
                      model=meta.get("model"), model_name=meta.get("model_name"), last_connection=connection)
        self._commit(session, record, lambda path: write_state(path, tensors, {**meta, "session": session}))
        return self.record(session)

    def reset(self, session: str) -> dict:
        """Forget the session's stream (its next connection starts fresh); the record stays, counted."""
        record = self.require(session)
        record.pop("state_bytes", None)
        record.update(updated=_now(), frames=0, resets=record.get("resets", 0) + 1)
        self._commit(session, record, None)
        return self.record(session)

    def delete(self, session: str) -> None:
        self.require(session)
        self.state_path(session).unlink(missing_ok=True)
        self.record_path(session).unlink(missing_ok=True)

    def _commit(self, session: str, record: dict, write_state_to: Callable[[Path], object] | None) -> None:
        """Replace the session's pair: `record`, and the state `write_state_to(path)` writes (None: no
        state). Both are written in a staging folder first; the old state keeps a second name there
        until the record is in place, and gets its own back when anything fails."""
        state, record_path = self.state_path(session), self.record_path(session)
        # not an id: never listed
        staging = Path(tempfile.mkdtemp(dir=self.root, prefix=STAGING.format(session=session)))
        try:
            new_state, new_record, previous = staging / state.name, staging / record_path.name, staging / "previous"
            if write_state_to is not None:
                write_state_to(new_state)
            write_text_atomic(new_record, json.dumps(record, indent=2) + "\n")
            had_state = state.exists()
            if had_state:  # a second name: the session is never without its state
                try:
                    os.link(state, previous)
                except OSError:  # a file system without hard links (EPERM, EXDEV, ENOTSUP...): a copy
                    shutil.copy2(state, previous)
            try:
                if write_state_to is not None:
                    os.replace(new_state, state)
                else:
                    state.unlink(missing_ok=True)
                os.replace(new_record, record_path)
            except BaseException:
                if had_state:
                    os.replace(previous, state)
                else:
                    state.unlink(missing_ok=True)
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
