"""The websocket server: moshi's `/api/chat` (serve/protocol.py) over a `LiveStream`, with sessions
whose stream outlives the connection (serve/sessions.py).

moshi's own server cannot be reused as a module (moshi 0.2.13 `server.py` runs its `main()` when
imported) and resets every stream at each connection; what it does per frame is what `LiveStream`
does (encode, `LMGen.step`, decode, moshi's first-frame rule), and its protocol is kept byte for
byte. Differences, all on purpose:

- the model runs in one worker thread (every step, load and save of a stream, in order), so the
  event loop stays free to answer a second client, the session endpoints and signals while a
  frame is computed;
- one conversation at a time (as moshi's lock); a further client is told so (kind 5, naming no
  session) and closed with 1013 instead of waiting unseen; a client that connects while the last
  conversation is being saved (its own session reconnecting, say) waits for the save;
- every route is guarded (serve/access.py: token, Origin, Host, proxy headers; sessions bound to
  tokens);
- a client that ends with kind 0x81 (end) gets its session saved before the connection closes,
  and is told whether the save worked;
- a message it cannot use (unknown kind, text frame, garbage Opus, bad codes) is logged and
  skipped; the conversation goes on;
- SIGINT / SIGTERM close the live connection (1001), save its session, then stop.
"""
from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import socket
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from aiohttp import WSMsgType, web

from ttt_speech.data import FRAME_RATE
from ttt_speech.data.layout import text_padding_ids
from ttt_speech.generation.config import GenerationConfig
from ttt_speech.generation.live import LiveFrame, LiveStream
from ttt_speech.generation.session import GenerationDiverged

from . import protocol as P
from .access import CHAT_PATH, TOKEN_ENV, Access, Refused, is_loopback, session_refusal
from .sessions import SessionStore, check_id

FRAME_BUDGET = 1.0 / FRAME_RATE   # seconds one frame may take to keep up with real time (80 ms)
REPORT_EVERY = 125                # frames between two progress lines of a conversation (10 s)
SAVE_WAIT = 120.0                 # seconds a reconnecting client / the shutdown waits for a save
HEARTBEAT = 20.0                  # seconds between the server's websocket pings (a dead client: ~2 of them)


def model_thread() -> ThreadPoolExecutor:
    """The one thread every torch call of the server runs in, loading included. On CPU each thread
    that calls torch gets its own OpenMP team: a model loaded in one thread and run in another ran
    its frames ~1.5x slower (tiny model, 2 cores: 143 vs 95 ms per frame)."""
    return ThreadPoolExecutor(1, thread_name_prefix="ttt-speech-model")


def log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


def ttt_digest(tensors: dict[str, torch.Tensor]) -> str | None:
    """sha256 (16 hex digits) of the TTT state tensors (`ttt.*`) of a stream's state; None without."""
    keys = sorted(k for k in tensors if k.startswith("ttt."))
    if not keys:
        return None
    h = hashlib.sha256()
    for key in keys:
        h.update(key.encode())
        h.update(tensors[key].detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def timing_summary(seconds: list[float]) -> dict:
    """Frames handled and their handling time: p50 / p99 / max in ms, real-time factor (80 ms / mean)."""
    if not seconds:
        return {"frames": 0}
    ordered = sorted(seconds)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    mean = statistics.fmean(seconds)
    return {"frames": len(seconds), "p50_ms": round(1000 * statistics.median(seconds), 3),
            "p99_ms": round(1000 * p99, 3), "max_ms": round(1000 * ordered[-1], 3),
            "realtime_factor": round(FRAME_BUDGET / mean, 3) if mean > 0 else None}


@dataclass
class Connection:
    """One live conversation: its socket, its stream, its Opus codec state and its timings."""

    ws: web.WebSocketResponse
    session: str | None
    format: str
    sample_rate: int
    owner: str | None = None      # the token's owner a new session is bound to (None: not bound)
    live: LiveStream | None = None
    resumed: bool = False
    ending: bool = False          # the client asked to end (kind 0x81): it waits for the save's outcome
    closing: bool = False         # the client is gone; the stream is being saved
    failed: bool = False          # the model diverged: the stream is not saved
    skipped: int = 0              # messages logged and skipped
    seconds: list[float] = field(default_factory=list)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    last_warning: float = 0.0

    def __post_init__(self) -> None:
        import sphn

        self.reader = sphn.OpusStreamReader(self.sample_rate)
        self.writer = sphn.OpusStreamWriter(self.sample_rate)

    @property
    def name(self) -> str:
        return f"session {self.session}" if self.session else "anonymous stream"

    def decode_opus(self, payload: bytes) -> np.ndarray:
        """pcm of an audio message. sphn's reader stays broken after bytes it cannot parse, so on an
        error a fresh reader takes the message again (it decodes pages without the stream's header);
        a ValueError when that fails too."""
        import sphn

        try:
            return self.reader.append_bytes(payload)
        except ValueError:
            self.reader = sphn.OpusStreamReader(self.sample_rate)
            return self.reader.append_bytes(payload)


class ChatServer:
    """The model, its codec and tokenizer, the sessions folder, and the one live conversation."""

    def __init__(self, lm, mimi, text_tokenizer, config: GenerationConfig, store: SessionStore,
                 model_name: str, executor: ThreadPoolExecutor, access: Access, verbose: bool = False) -> None:
        self.lm, self.mimi, self.tokenizer = lm, mimi, text_tokenizer
        self.config, self.store, self.model_name, self.verbose = config, store, model_name, verbose
        self.access = access
        self.n_user = lm.num_codebooks - 1 - lm.dep_q
        self.padding = set(text_padding_ids(lm))
        self.executor = executor  # the model's one thread (`model_thread`): it loaded the model, it runs it
        self.live: Connection | None = None
        self.stopping = False
        self.silence: torch.Tensor | None = None

    # ------------------------------------------------------------------ the model's thread
    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def warmup(self, frames: int = 4) -> None:
        """The codec's silence codes, then a few frames through a throwaway stream (as moshi's server)."""
        def warm():
            from ttt_speech.data.audio import silence_codes

            self.silence = silence_codes(self.mimi)
            with LiveStream(self.lm, self.mimi, self.config, self.silence) as live:
                live.feed_pcm(torch.zeros(frames * self.mimi.frame_size))
        await self._run(warm)

    def _open(self, session: str | None) -> tuple[LiveStream, bool]:
        live = LiveStream(self.lm, self.mimi, self.config, self.silence)
        try:
            saved = self.store.load(session) if session else None
            if saved is not None:
                live.load_state_dict(*saved, where=f"session {session} ({self.store.state_path(session)})")
        except BaseException:
            live.close()
            raise
        return live, saved is not None

    def _close(self, conn: Connection) -> dict | None:
        """Save the conversation's stream (a named, healthy one) and release it; its record or None."""
        try:
            if conn.session and not conn.failed:
                tensors, meta = conn.live.state_dict()
                meta["model_name"] = self.model_name
                return self.store.save(conn.session, tensors, meta, timing_summary(conn.seconds), conn.owner)
            return None
        finally:
            conn.live.close()

    # ------------------------------------------------------------------ /api/chat
    async def handle_chat(self, request: web.Request) -> web.WebSocketResponse:
        # heartbeat: a client that vanished without closing (network drop, sleep) ends its conversation
        # (saved) within HEARTBEAT s instead of holding the model until TCP gives up (hours)
        ws = web.WebSocketResponse(heartbeat=HEARTBEAT)
        await ws.prepare(request)
        try:
            session = request.query.get("session") or None
            if session is not None:
                check_id(session)
            fmt = request.query.get("format", "opus")
            if fmt not in P.FORMATS:
                raise ValueError(f"format: expected one of {', '.join(P.FORMATS)}, got {fmt!r}")
        except ValueError as e:
            return await self._refuse(ws, str(e), P.CLOSE_POLICY)
        ending = self.live
        if ending is not None and ending.closing:
            try:  # the last conversation is over and being saved (this may be its session reconnecting): wait
                await asyncio.wait_for(ending.done.wait(), SAVE_WAIT)
            except asyncio.TimeoutError:
                pass
        if self.stopping:
            return await self._refuse(ws, "the server is shutting down", P.CLOSE_GOING_AWAY)
        if self.live is not None:  # (which conversation is another client's business: not named)
            return await self._refuse(ws, "busy: the model is in another conversation; one conversation at a "
                                          "time, try again when it ends", P.CLOSE_TRY_LATER)
        owner = self.access.owner(request.get("token"))
        # checked after any save above (a session being created is bound by then) and with no await
        # before it goes live (nothing can create the session in between)
        try:  # a record the save could not update fails now, not after the conversation
            if session:
                self._usable_record(session, owner)
        except (KeyError, ValueError) as e:
            return await self._refuse(ws, e.args[0], P.CLOSE_POLICY)
        conn = Connection(ws, session, fmt, self.mimi.sample_rate, owner)
        self.live = conn
        try:
            await self._converse(conn)
        finally:
            self.live = None
            conn.done.set()
        return ws

    async def _refuse(self, ws: web.WebSocketResponse, reason: str, code: int) -> web.WebSocketResponse:
        log(f"refused a connection: {reason}")
        await self._send(ws, P.text_message(P.ERROR, reason))
        await ws.close(code=code, message=reason.encode()[:120])
        return ws

    async def _converse(self, conn: Connection) -> None:
        try:
            conn.live, conn.resumed = await self._run(self._open, conn.session)
        except ValueError as e:  # a saved state this model cannot continue (other model, unreadable file)
            await self._refuse(conn.ws, str(e), P.CLOSE_POLICY)
            return
        except Exception as e:  # anything else: one line in the log and to the client, the server goes on
            await self._refuse(conn.ws, f"cannot open the stream ({type(e).__name__}: {e})", P.CLOSE_INTERNAL)
            return
        live = conn.live
        start_frames = live.frames_in
        try:  # from here on the stream is open: whatever happens, it is closed (and saved) below
            digest = await self._run(lambda: ttt_digest(live.ttt_state()))
            info = {"session": conn.session, "resumed": conn.resumed, "format": conn.format,
                    "position": live.position, "frames": live.frames_in, "ttt": digest,
                    "sample_rate": self.mimi.sample_rate, "frame_rate": FRAME_RATE, "model": self.model_name,
                    "answers_end": True}
            log(f"{conn.name}: connected ({conn.format}); " + (f"resumed at frame {live.frames_in}" if conn.resumed
                                                             else "new stream"))
            await self._send(conn.ws, P.message(P.HANDSHAKE))
            await self._send(conn.ws, P.json_message(P.METADATA, info))
            await self._receive(conn)
        finally:
            conn.closing = True
            summary = timing_summary(conn.seconds)
            record, failure = None, None
            try:
                record = await self._run(self._close, conn)
            except Exception as e:  # a failed save must not take the server down; say what was lost
                failure = (f"could not save session {conn.session} ({type(e).__name__}: {e}); its last save, "
                           "if any, is unchanged")
                log(f"{conn.name}: ERROR: {failure}")
            if conn.ending:
                await self._answer_end(conn, record, failure)
            timing = (f"frame handling p50 {summary['p50_ms']:.1f} ms, p99 {summary['p99_ms']:.1f} ms, "
                      f"{summary['realtime_factor']:.2f}x real time" if summary["frames"] else "no frames")
            saved = (f"; saved {record['state_bytes'] / 2**20:.1f} MiB to {self.store.state_path(conn.session)}"
                     if record else "")
            log(f"{conn.name}: closed after {live.frames_in - start_frames} frames (stream at frame {live.frames_in}), "
                f"{timing}{f', {conn.skipped} message(s) skipped' if conn.skipped else ''}{saved}")

    async def _receive(self, conn: Connection) -> None:
        live = conn.live
        async for msg in conn.ws:
            if msg.type == WSMsgType.ERROR:
                log(f"{conn.name}: connection error ({conn.ws.exception()})")
                break
            if msg.type != WSMsgType.BINARY:
                self._skip(conn, f"a {msg.type.name.lower()} message (the protocol is binary)")
                continue
            try:
                kind, payload = P.split(msg.data)
                if kind == P.PING:
                    await self._send(conn.ws, P.message(P.PING))
                    continue
                if kind == P.END:  # saved (by `_converse`) while the client waits for the outcome
                    conn.ending = True
                    break
                if kind == P.AUDIO and conn.format == "opus":
                    try:
                        pcm = conn.decode_opus(payload)
                    except ValueError as e:
                        raise P.ProtocolError(f"audio: not Ogg/Opus ({e})") from None
                    if pcm.size == 0:
                        continue
                    frames = await self._run(live.feed_pcm, torch.from_numpy(pcm))
                elif kind == P.CODES and conn.format == "codes":
                    codes = P.parse_codes(payload, self.n_user)
                    if codes.size and (codes.min() < 0 or codes.max() >= self.lm.card):
                        raise P.ProtocolError(f"codes: expected values in [0, {self.lm.card})")
                    frames = await self._run(live.feed_codes, torch.from_numpy(codes))
                else:
                    raise P.ProtocolError(f"{P.kind_name(kind)} message (this connection speaks format={conn.format})")
            except P.ProtocolError as e:
                self._skip(conn, str(e))
                continue
            except Exception as e:  # the model failed mid-step (diverged, out of memory, ...): its state is suspect
                conn.failed = True
                what = str(e) if isinstance(e, GenerationDiverged) else f"{type(e).__name__}: {e}"
                log(f"{conn.name}: ERROR: {what}; the stream is not saved")
                await self._send(conn.ws, P.text_message(P.ERROR, f"the model failed: {what}"))
                await conn.ws.close(code=P.CLOSE_INTERNAL, message=b"the model failed")
                break
            await self._reply(conn, frames)

    async def _answer_end(self, conn: Connection, record: dict | None, failure: str | None) -> None:
        """Tell a client that asked to end whether its session was saved, then close (1000; 1011 when not)."""
        if failure is not None:
            await self._send(conn.ws, P.text_message(P.ERROR, failure))
            await conn.ws.close(code=P.CLOSE_INTERNAL, message=b"session not saved")
            return
        await self._send(conn.ws, P.json_message(P.END, {"saved": record is not None, "frames": conn.live.frames_in}))
        await conn.ws.close()

    def _skip(self, conn: Connection, what: str) -> None:
        conn.skipped += 1
        log(f"{conn.name}: skipped {what}")

    async def _reply(self, conn: Connection, frames: list[LiveFrame]) -> None:
        for out in frames:
            if conn.format == "codes":
                await self._send(conn.ws, P.codes_message(out.codes.numpy()) if out.emitted else P.message(P.CODES))
            elif out.pcm is not None:
                data = conn.writer.append_pcm(out.pcm.numpy())
                if len(data):
                    await self._send(conn.ws, P.message(P.AUDIO, data))
            piece = self._piece(out.text) if out.emitted else None
            if piece:
                await self._send(conn.ws, P.text_message(P.TEXT, piece))
            self._account(conn, out.seconds)

    def _piece(self, token: int) -> str | None:
        """The text piece of a token, as moshi's server sends it ('▁' → ' '); None for padding.
        Without a tokenizer (the tiny model has none) the token id, as "[id]"."""
        if token < 0 or token in self.padding:
            return None
        if self.tokenizer is None:
            return f"[{token}]"
        return self.tokenizer.id_to_piece(token).replace("▁", " ")

    def _account(self, conn: Connection, seconds: float) -> None:
        conn.seconds.append(seconds)
        n = len(conn.seconds)
        if self.verbose:
            log(f"{conn.name}: frame {conn.live.frames_in} handled in {1000 * seconds:.1f} ms")
        if n % REPORT_EVERY == 0:
            window = timing_summary(conn.seconds[-REPORT_EVERY:])
            log(f"{conn.name}: frame {conn.live.frames_in} | last {REPORT_EVERY / FRAME_RATE:g} s: handling p50 "
                f"{window['p50_ms']:.1f} ms, p99 {window['p99_ms']:.1f} ms | {window['realtime_factor']:.2f}x real time")
        recent = conn.seconds[-int(FRAME_RATE):]
        mean = statistics.fmean(recent)
        if len(recent) == int(FRAME_RATE) and mean > FRAME_BUDGET and time.monotonic() - conn.last_warning > 10:
            conn.last_warning = time.monotonic()
            log(f"{conn.name}: WARNING: cannot keep up with real time: frames take {1000 * mean:.0f} ms on average "
                f"over the last second, real time needs < {1000 * FRAME_BUDGET:.0f} ms; the conversation lags "
                f"(run it on a GPU, or a smaller model)")

    @staticmethod
    async def _send(ws: web.WebSocketResponse, data: bytes) -> None:
        """Send unless the connection is closing (a client gone mid-reply is not an error)."""
        if ws.closed:
            return
        try:
            await ws.send_bytes(data)
        except (ConnectionError, RuntimeError):
            pass

    def _usable_record(self, session: str, owner: str | None) -> dict | None:
        """The record of `session` for a client whose owner is `owner` (None: a new session). A
        session the client may not use is a KeyError with the one refusal every route gives
        (`session_refusal`; the reason is logged): another token's, or, on a server that binds
        sessions, one whose record is unreadable (whose it is cannot be told). An unreadable record
        on a server that does not bind is a ValueError naming the file."""
        try:
            record = self.store.record(session)
        except ValueError as e:
            if not self.access.bind_sessions:
                raise
            log(f"refused session {session}: {e}")
            raise KeyError(session_refusal(session)) from None
        if not self.access.may_use(record, owner):
            log(f"refused session {session}: bound to another token")
            raise KeyError(session_refusal(session))
        return record

    # ------------------------------------------------------------------ /api/sessions
    def _live_session(self) -> str | None:
        return self.live.session if self.live is not None else None

    async def list_sessions(self, request: web.Request) -> web.Response:
        """The sessions the client may use (all, unless bound to other tokens) and which of them is
        live. Unreadable records are listed (with their error) only where sessions are not bound:
        there every client may use every session; with binding, whose they are is unknown."""
        owner = self.access.owner(request.get("token"))
        live = self._live_session() if self.live is not None and self.live.owner == owner else None
        listed = [r for r in self.store.list() if self.access.may_use(r, owner)
                  and not ("error" in r and self.access.bind_sessions)]
        return web.json_response({"sessions": listed, "live": live})

    async def show_session(self, request: web.Request) -> web.Response:
        return self._session_call(request, lambda s: self.store.require(s))

    async def reset_session(self, request: web.Request) -> web.Response:
        return self._session_call(request, lambda s: self.store.reset(s), refuse_live=True)

    async def delete_session(self, request: web.Request) -> web.Response:
        def delete(s):
            self.store.delete(s)
            return {"deleted": s}
        return self._session_call(request, delete, refuse_live=True)

    def _session_call(self, request: web.Request, call, refuse_live: bool = False) -> web.Response:
        session = request.match_info["session"]
        try:
            check_id(session)
            if self._usable_record(session, self.access.owner(request.get("token"))) is None:
                raise KeyError(session)
            if refuse_live and session == self._live_session():
                return web.json_response({"error": f"session {session} is live; end its conversation first"},
                                         status=409)
            result = call(session)
        except KeyError:  # (not the store's message: the server's folder is not the client's business)
            return web.json_response({"error": session_refusal(session)}, status=404)
        except ValueError as e:
            return web.json_response({"error": str(e)}, status=400)
        if isinstance(result, dict) and "id" in result:
            result = {**result, "live": session == self._live_session()}
        return web.json_response(result)

    def application(self) -> web.Application:
        app = web.Application(middlewares=[self._guard])
        app.router.add_get(CHAT_PATH, self.handle_chat)
        app.router.add_get("/api/sessions", self.list_sessions)
        app.router.add_get("/api/sessions/{session}", self.show_session)
        app.router.add_delete("/api/sessions/{session}", self.delete_session)
        app.router.add_post("/api/sessions/{session}/reset", self.reset_session)
        return app

    @web.middleware
    async def _guard(self, request: web.Request, handler) -> web.StreamResponse:
        """Every route: the access rules (serve/access.py) before the handler; the admitted token is
        kept as request["token"]. A refused websocket is refused before the upgrade (HTTP 401 / 403)."""
        try:
            request["token"] = self.access.admit(request.headers, request.host,
                                                 request.query.get("token") if request.path == CHAT_PATH else None)
        except Refused as e:
            log(f"refused {request.method} {request.path} from {request.remote}: {e.status} {e.reason}")
            return web.json_response({"error": e.reason}, status=e.status,
                                     headers={"WWW-Authenticate": "Bearer"} if e.status == 401 else None)
        return await handler(request)

    # ------------------------------------------------------------------ shutdown
    async def shutdown(self) -> None:
        """Refuse new connections, close the live one (1001) and wait until its session is saved."""
        self.stopping = True
        conn = self.live
        if conn is None:
            return
        log(f"shutting down: closing {conn.name}" + (" and saving it" if conn.session else ""))
        await conn.ws.close(code=P.CLOSE_GOING_AWAY, message=b"server shutting down")
        try:
            await asyncio.wait_for(conn.done.wait(), SAVE_WAIT)
        except asyncio.TimeoutError:
            log(f"{conn.name}: ERROR: not saved within {SAVE_WAIT:g} s")


def _cannot_listen(host: str, port: int, e: OSError) -> ValueError:
    return ValueError(f"--host/--port: cannot listen on {host}:{port} ({e.strerror or e})")


def check_listen(host: str, port: int) -> None:
    """Listen on `host`:`port` and let go at once, as the server will (asyncio's defaults, which
    aiohttp's site keeps): a port in use fails before the model loads, not after. Port 0 (any free
    port) cannot be in use."""
    async def probe() -> None:
        try:
            listener = await asyncio.get_running_loop().create_server(asyncio.Protocol, host, port)
        except OSError as e:
            raise _cannot_listen(host, port, e) from None
        listener.close()
        await listener.wait_closed()
    if port:
        asyncio.run(probe())


def _netloc(host: str, port: int) -> str:
    """`host:port` of a URL: an IPv6 literal in brackets."""
    name = host.strip("[]")
    try:
        return f"[{name}]:{port}" if ipaddress.ip_address(name).version == 6 else f"{name}:{port}"
    except ValueError:  # a name
        return f"{name}:{port}"


def client_url(host: str, port: int) -> tuple[str, str]:
    """The ws:// URL of /api/chat a client can use for a server listening on `host`:`port`, and a
    note on it ("" when it is `host` itself). The wildcard addresses (0.0.0.0, ::, "") are no
    address to connect to: the machine's name stands in, else the placeholder HOST."""
    if host.strip("[]") not in ("0.0.0.0", "::", ""):
        return f"ws://{_netloc(host, port)}{CHAT_PATH}", ""
    try:
        name = socket.gethostname()
    except OSError:
        name = ""
    if name:
        return (f"ws://{_netloc(name, port)}{CHAT_PATH}",
                " (this machine's name; listening on every interface, any of its addresses works too)")
    return f"ws://HOST:{port}{CHAT_PATH}", " (HOST: this machine's name or address, as the client reaches it)"


def _log_access(access: Access, generated: str | None, host: str, port: int) -> None:
    """Say what protects the server (and the token it generated: printed once, here)."""
    if generated is not None:
        url, note = client_url(host, port)
        log(f"token (generated; clients: --token TOKEN or {TOKEN_ENV}=TOKEN): {generated}")
        log(f"browser websocket: {url}?token={generated}{note}")
    elif access.tokens:
        log(f"a token is required ({len(access.tokens)} accepted)"
            + ("; sessions are bound to the token that created them" if access.bind_sessions else ""))
    else:
        log(f"no token: every process on this machine may use the server (browser pages of other sites are "
            f"refused by the Origin and Host checks); --token or {TOKEN_ENV} to require one")
    if not is_loopback(host):
        log("WARNING: listening beyond this machine over plain HTTP: the token, the audio and the text cross "
            "the network unencrypted; put a TLS reverse proxy in front (docs/serve.md)")


async def run_server(server: ChatServer, host: str, port: int, generated: str | None = None) -> None:
    """Serve until SIGINT / SIGTERM, then close the live conversation (saved) and stop.
    `generated`: the token generated for this start, to print."""
    import signal

    runner = web.AppRunner(server.application(), handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except OSError as e:
            raise _cannot_listen(host, port, e) from None
        bound = runner.addresses[0][1] if runner.addresses else port
        _log_access(server.access, generated, host, bound)
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        def on_signal() -> None:
            if stop.is_set():  # the save runs in the model's thread, which a signal cannot interrupt
                log("already stopping: waiting for the live session's save (kill -9 loses only its last connection)")
            stop.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal)
        log(f"listening on ws://{_netloc(host, bound)}{CHAT_PATH} (sessions in {server.store.root}; Ctrl-C to stop)")
        await stop.wait()
        await server.shutdown()
    finally:
        await runner.cleanup()
        server.executor.shutdown(wait=True)
    log("stopped")
