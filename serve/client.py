"""A websocket client of moshi's protocol: stream a file to the server in real time (or as fast as
it takes it) and record what comes back. It only speaks the protocol (serve/protocol.py): the same
bytes moshi's clients send, Opus through sphn, so it can talk to `python -m moshi.server` too.

Audio: the file is cut into 80 ms frames (the last one zero-padded), each Opus-encoded and sent as
kind 1; what comes back is Opus-decoded (kind 1) and text pieces collected (kind 2). Codes
(`format=codes`): each user frame is sent as kind 0x80, and the server's one reply per frame is
collected. After the input a ping (kind 6) asks the server to confirm it handled everything;
a server that does not answer pings (moshi's own) is waited on until it has been quiet for `idle`
seconds. A server that answers the end (kind 0x81, `ttt-speech serve`) is then asked to save the
session and say whether it did. `Conversation.failure` says when the conversation did not end so.
"""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

import numpy as np

from ttt_speech.data import FRAME_RATE

from . import protocol as P
from .access import TOKEN_HINT

SERVER_WAIT = 180.0  # seconds to wait for the handshake or the end's answer (the server may be saving a session)
HANDSHAKE_REFUSALS = {401: f"401: the server asks a token and none or a wrong one was given ({TOKEN_HINT})",
                      403: "403: the server refuses this client's Origin, Host or proxy headers "
                           "(docs/serve.md, Access)"}


class ServerRefused(ValueError):
    """The server refused the connection: HTTP 401 / 403, an error (kind 5) or a close before the handshake."""


@dataclass
class Conversation:
    """What one connection sent and received."""

    metadata: dict = field(default_factory=dict)      # the server's kind-4 message (session, position, ...)
    frames_sent: int = 0
    pcm: list[np.ndarray] = field(default_factory=list)     # received audio, in order
    text: list[str] = field(default_factory=list)            # received text pieces
    codes: list[np.ndarray | None] = field(default_factory=list)  # codes replies (None: nothing emitted)
    error: str | None = None                          # a kind-5 message received after the handshake
    confirmed: bool = False                           # the server answered the closing ping
    end_asked: bool = False                           # the client sent the end (kind 0x81)
    ended: dict | None = None                         # the server's answer to it (saved, frames)
    closed: str | None = None                         # "code: reason" when the server closed the connection
    broken: bool = False                              # the connection broke (no close from the server)

    @property
    def audio(self) -> np.ndarray:
        return np.concatenate(self.pcm) if self.pcm else np.zeros(0, dtype=np.float32)

    @property
    def failure(self) -> str | None:
        """Why the conversation did not end well (None: it did): the server's error, or the server
        gone before it handled the whole input or answered the end (what came back is partial)."""
        gone = f"the server closed the connection ({self.closed})" if self.closed else "the connection broke"
        if self.error is not None:
            return f"the server ended the conversation: {self.error}"
        if self.end_asked and self.ended is None:
            return f"{gone} before the server confirmed the session's save"
        if not self.confirmed and (self.closed or self.broken):
            return f"{gone} before the server confirmed it handled the whole input"
        return None


def chat_url(base: str, session: str | None, fmt: str = "opus") -> str:
    """`base` (ws://host:port, with or without /api/chat) with the session and format parameters."""
    from urllib.parse import urlencode

    url = base.rstrip("/")
    if not url.endswith("/api/chat"):
        url += "/api/chat"
    query = {**({"session": session} if session else {}), **({"format": fmt} if fmt != "opus" else {})}
    return f"{url}?{urlencode(query)}" if query else url


async def converse(url: str, *, pcm: np.ndarray | None = None, codes: np.ndarray | None = None,
                   sample_rate: int = 24000, frame_size: int = 1920, realtime: bool = True,
                   idle: float = 2.0, on_text=None, on_metadata=None, token: str | None = None) -> Conversation:
    """Send `pcm` (float32 [S], mono, at `sample_rate`) or `codes` (int [T, n_user]; the url must
    ask format=codes) over one connection to `url` (with `token` as `Authorization: Bearer`);
    return what came back, its `failure` saying whether it ended well.

    Raises ServerRefused when the server refuses the connection (token, Origin, busy, bad session,
    other model), ValueError when it cannot be reached."""
    import aiohttp
    import sphn

    if (pcm is None) == (codes is None):
        raise ValueError("converse: give pcm or codes")
    out = Conversation()
    ping, ended = asyncio.Event(), asyncio.Event()
    last_message = [time.monotonic()]
    reader = sphn.OpusStreamReader(sample_rate)

    def handle(kind: int, payload: bytes) -> None:
        last_message[0] = time.monotonic()
        if kind == P.AUDIO:
            out.pcm.append(np.asarray(reader.append_bytes(payload), dtype=np.float32))
        elif kind == P.TEXT:
            piece = payload.decode("utf-8", errors="replace")
            out.text.append(piece)
            if on_text is not None:
                on_text(piece)
        elif kind == P.CODES:
            out.codes.append(np.frombuffer(payload, dtype="<i4").astype(np.int64) if payload else None)
        elif kind == P.METADATA:
            out.metadata = json.loads(payload.decode("utf-8"))
            if on_metadata is not None:
                on_metadata(out.metadata)
        elif kind == P.ERROR:
            out.error = payload.decode("utf-8", errors="replace")
            ended.set()  # (an error after the end is the save's failure)
        elif kind == P.PING:
            out.confirmed = True
            ping.set()
        elif kind == P.END:
            out.ended = json.loads(payload.decode("utf-8"))
            ended.set()

    async def receive(ws) -> None:
        while True:
            msg = await ws.receive()
            if msg.type == aiohttp.WSMsgType.BINARY and msg.data:
                handle(msg.data[0], bytes(msg.data[1:]))
            elif msg.type == aiohttp.WSMsgType.CLOSE:  # the server closes: say why
                out.closed = f"{msg.data}: {msg.extra or 'no reason given'}"
                break
            elif msg.type == aiohttp.WSMsgType.CLOSING:  # this side closes
                break
            elif msg.type in (aiohttp.WSMsgType.ERROR, aiohttp.WSMsgType.CLOSED):  # gone without a close
                out.broken = True
                break
        ping.set()  # nothing more will come
        ended.set()

    headers = {"Authorization": f"Bearer {token}"} if token else None
    async with aiohttp.ClientSession() as http:
        try:
            ws = await http.ws_connect(url, max_msg_size=0, headers=headers,
                                       timeout=aiohttp.ClientWSTimeout(ws_close=10))
        except aiohttp.WSServerHandshakeError as e:
            if e.status in HANDSHAKE_REFUSALS:
                raise ServerRefused(f"the server refused the connection: {HANDSHAKE_REFUSALS[e.status]}") from None
            raise ValueError(f"cannot connect to {url} ({e}); is `ttt-speech serve` running there?") from None
        except (aiohttp.ClientError, OSError) as e:
            raise ValueError(f"cannot connect to {url} ({e}); is `ttt-speech serve` running there?") from None
        async with ws:
            await _handshake(ws, url, handle, out)
            receiver = asyncio.create_task(receive(ws))
            try:
                await _send(ws, pcm, codes, sample_rate, frame_size, realtime, out)
                await _send_bytes(ws, P.message(P.PING), out)
                await _drain(ping, last_message, idle, out)
                if out.confirmed and out.metadata.get("answers_end") and await _send_bytes(ws, P.message(P.END), out):
                    out.end_asked = True
                    try:  # the server saves the session, then answers
                        await asyncio.wait_for(ended.wait(), SERVER_WAIT)
                    except asyncio.TimeoutError:
                        pass  # (`failure` says so)
            finally:
                await ws.close()
                await receiver
    return out


async def _handshake(ws, url: str, handle, out: Conversation) -> None:
    import aiohttp

    try:
        msg = await asyncio.wait_for(ws.receive(), SERVER_WAIT)
    except asyncio.TimeoutError:
        raise ServerRefused(f"{url}: no handshake within {SERVER_WAIT:g} s") from None
    while msg.type == aiohttp.WSMsgType.BINARY and msg.data and msg.data[0] == P.ERROR:
        handle(P.ERROR, bytes(msg.data[1:]))
        msg = await ws.receive()
    if out.error is not None:
        raise ServerRefused(f"the server refused the connection: {out.error}")
    if msg.type != aiohttp.WSMsgType.BINARY or not msg.data or msg.data[0] != P.HANDSHAKE:
        code = f" (close code {ws.close_code})" if ws.close_code is not None else ""
        raise ServerRefused(f"{url}: expected the handshake, the server sent {msg.type.name.lower()}{code}")


async def _send(ws, pcm, codes, sample_rate: int, frame_size: int, realtime: bool, out: Conversation) -> None:
    import sphn

    start = time.monotonic()
    if pcm is not None:
        pcm = np.asarray(pcm, dtype=np.float32).reshape(-1)
        n = -(-pcm.shape[0] // frame_size)
        frames = np.pad(pcm, (0, n * frame_size - pcm.shape[0])).reshape(n, frame_size)  # [n, frame_size]
        writer = sphn.OpusStreamWriter(sample_rate)
        items = (P.message(P.AUDIO, writer.append_pcm(f)) for f in frames)
    else:
        items = (P.codes_message(row[None]) for row in np.asarray(codes))
    for i, data in enumerate(items):
        if ws.closed or (len(data) > 1 and not await _send_bytes(ws, data, out)):
            break
        out.frames_sent += 1
        if realtime:
            await asyncio.sleep(max(0.0, start + (i + 1) / FRAME_RATE - time.monotonic()))


async def _send_bytes(ws, data: bytes, out: Conversation) -> bool:
    """Send unless the connection is gone (False then: the server closed it, or it broke)."""
    import aiohttp

    if ws.closed:
        return False
    try:
        await ws.send_bytes(data)
    except (aiohttp.ClientError, ConnectionError):  # the server vanished between the check and the write
        out.broken = True
        return False
    return True


async def _drain(ping: asyncio.Event, last_message: list[float], idle: float, out: Conversation) -> None:
    """Until the server confirmed the ping (or closed), or was quiet `idle` s (a server without pings)."""
    while not ping.is_set():
        try:
            await asyncio.wait_for(ping.wait(), idle)
        except asyncio.TimeoutError:
            if time.monotonic() - last_message[0] >= idle:
                return
