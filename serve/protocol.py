"""moshi's websocket protocol (`/api/chat`), as moshi's server and clients speak it, plus two extensions.

Every message is binary: one kind byte, then a payload (moshi 0.2.13 `server.py` / `client.py` and
its web client).

    0  handshake   server → client, once, when the stream is ready (payload empty here)
    1  audio       both ways: Ogg/Opus pages of 24 kHz mono (sphn's Opus stream writer/reader)
    2  text        server → client: a UTF-8 text piece of Moshi's inner monologue
    3  control     (moshi's web client; not used by moshi's Python server, ignored here)
    4  metadata    server → client: UTF-8 JSON (here: the session, its stream position, TTT digest)
    5  error       server → client: a UTF-8 message, before the server closes the connection
    6  ping        client → server: answered with a ping once every earlier message is handled
                   (a client's "all my audio is processed" barrier; moshi's server ignores it)

The extension, only on connections opened with `format=codes`: kind 0x80 carries Mimi codes as
little-endian int32, client → server one or more user frames ([T, n_user] row-major), server →
client exactly one reply per user frame: [1 + dep_q] (text token, then Moshi's audio codes) of the
frame that step emitted, or an empty payload for a step that emitted none (the first max_delay).

Kind 0x81 (end), on any connection to a server whose metadata says `"answers_end": true`: client →
server (empty) "I am done: save my session"; the server saves it, then answers 0x81 (JSON: `saved`,
`frames`) or, when the save failed, an error (kind 5), and closes the connection (1000; 1011 when
not saved). Without it the server saves after the client is gone, and only its log can tell.
"""
from __future__ import annotations

import json

import numpy as np

HANDSHAKE, AUDIO, TEXT, CONTROL, METADATA, ERROR, PING = range(7)
CODES, END = 0x80, 0x81  # this project's extensions, out of moshi's range
KINDS = {HANDSHAKE: "handshake", AUDIO: "audio", TEXT: "text", CONTROL: "control", METADATA: "metadata",
         ERROR: "error", PING: "ping", CODES: "codes", END: "end"}
FORMATS = ("opus", "codes")  # the `format` query parameter of /api/chat

# websocket close codes (RFC 6455 §7.4.1)
CLOSE_GOING_AWAY = 1001     # the server shuts down
CLOSE_POLICY = 1008         # a request the server refuses (bad session id, different model, another token's session)
CLOSE_INTERNAL = 1011       # the model failed (e.g. diverged), or the session asked to end could not be saved
CLOSE_TRY_LATER = 1013      # another conversation is live


class ProtocolError(ValueError):
    """A message this side cannot use (the connection goes on without it)."""


def message(kind: int, payload: bytes = b"") -> bytes:
    return bytes([kind]) + payload


def text_message(kind: int, text: str) -> bytes:
    return message(kind, text.encode("utf-8"))


def json_message(kind: int, data: dict) -> bytes:
    return text_message(kind, json.dumps(data))


def codes_message(codes: np.ndarray) -> bytes:
    """Kind 0x80 with `codes` (any shape, row-major) as little-endian int32."""
    return message(CODES, np.ascontiguousarray(codes, dtype="<i4").tobytes())


def split(data: object) -> tuple[int, bytes]:
    """(kind, payload) of a received binary message; ProtocolError for anything else."""
    if not isinstance(data, (bytes, bytearray)):
        raise ProtocolError(f"not a binary message ({type(data).__name__})")
    if not data:
        raise ProtocolError("empty message")
    return data[0], bytes(data[1:])


def parse_codes(payload: bytes, width: int) -> np.ndarray:
    """int64 [T, width] from a kind-0x80 payload; ProtocolError when it is not whole rows."""
    if len(payload) % (4 * width):
        raise ProtocolError(f"codes: {len(payload)} bytes is not a whole number of frames of {width} int32")
    return np.frombuffer(payload, dtype="<i4").reshape(-1, width).astype(np.int64)


def kind_name(kind: int) -> str:
    return KINDS.get(kind, f"unknown kind {kind}")
