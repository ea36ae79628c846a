"""`ttt-speech serve`, `ttt-speech client` and `ttt-speech sessions` (arguments and checks; the
server is serve/server.py, the client serve/client.py, the session files serve/sessions.py)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ttt_speech.data import FRAME_RATE
from ttt_speech.generation.options import add_model_options, add_sampling_options, generation_config

from .access import TOKEN_ENV

if TYPE_CHECKING:
    from urllib.request import OpenerDirector

    from torch import Tensor

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 8998  # moshi's server: localhost:8998
DEFAULT_SESSIONS = Path("runs/sessions")

SERVE = (
    "Serve a (TTT-patched) Moshi over moshi's websocket protocol (/api/chat: handshake, Opus audio "
    "both ways, text pieces), so moshi's clients and `ttt-speech client` can talk to it. A client "
    "that names a session (?session=ID) keeps its conversation: on disconnect the live stream (TTT "
    "state, attention caches, LMGen, Mimi, RNG) is saved under --sessions, and the next connection "
    "with that id goes on from there. One conversation at a time. Every route asks a token when one is "
    f"given (--token, {TOKEN_ENV}) and always beyond loopback (generated and printed when none is given), "
    "and refuses other sites' browser pages. See docs/serve.md."
)
CLIENT = (
    "Stream INPUT to a running `ttt-speech serve` (or moshi's server) in real time, or as fast as it "
    "takes it with --fast, and write what Moshi says back: an audio INPUT is sent as Opus and the "
    "reply written as OUTPUT (.wav); a code file INPUT (.safetensors, the user's Mimi codes) is sent "
    "as codes and the reply written as a code file. Text pieces are printed as they arrive."
)
SESSIONS = "List, show, reset or delete the sessions of a running server (or of a sessions folder, --dir)."


def _add_address(p: argparse.ArgumentParser, scheme: str) -> None:
    p.add_argument("--host", default=DEFAULT_HOST, help=f"server host (default {DEFAULT_HOST})")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"server port (default {DEFAULT_PORT})")
    p.add_argument("--url", metavar="URL", help=f"server address instead of --host/--port, e.g. {scheme}://gpu-box:8998")
    p.add_argument("--token", metavar="TOKEN", help=f"the server's token (default: the environment variable "
                                                    f"{TOKEN_ENV}, which keeps it out of `ps`; none: send none)")


def _port(value: int) -> int:
    if not 0 <= value <= 65535:
        raise ValueError(f"--port: expected 0..65535 (0: any free port), got {value}")
    return value


def _base(args: argparse.Namespace, scheme: str) -> str:
    if args.url:
        if not args.url.startswith(("ws://", "wss://", "http://", "https://")):
            raise ValueError(f"--url: expected ws://, wss://, http:// or https://, got {args.url!r}")
        url = args.url
        if scheme == "ws":
            url = url.replace("http://", "ws://", 1).replace("https://", "wss://", 1)
        else:
            url = url.replace("ws://", "http://", 1).replace("wss://", "https://", 1)
        return url.rstrip("/")
    return f"{scheme}://{args.host}:{_port(args.port)}"


# ---------------------------------------------------------------------- serve

def register_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", description=SERVE,
                       help="websocket server (moshi's protocol) with sessions whose TTT memory outlives the connection")
    add_model_options(p)
    add_sampling_options(p, live=True)
    s = p.add_argument_group("server")
    s.add_argument("--host", default=DEFAULT_HOST, help=f"address to listen on (default {DEFAULT_HOST}; 0.0.0.0: every "
                                                        "interface, over plain HTTP: put a TLS reverse proxy in front)")
    s.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0: any free port)")
    s.add_argument("--token", action="append", metavar="TOKEN",
                   help=f"a token every request must present (repeat: one per user); default: the environment "
                        f"variable {TOKEN_ENV} (out of `ps`); none: generated and printed when --host is beyond "
                        "loopback, not asked on loopback")
    s.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                   help="a browser origin allowed besides the server's own, e.g. https://app.example (repeat)")
    s.add_argument("--bind-sessions", action="store_true",
                   help="a session is only for the token that created it (needs --token or the variable)")
    s.add_argument("--sessions", type=Path, default=DEFAULT_SESSIONS, metavar="DIR",
                   help=f"folder of the saved sessions (default {DEFAULT_SESSIONS}; created, checked writable at start)")
    s.add_argument("--verbose", action="store_true", help="log every frame's handling time (default: every 10 s)")
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    from ttt_speech.generation.loading import check_generation_model

    config = generation_config(args)
    _port(args.port)
    from .access import server_access
    from .sessions import SessionStore

    access, generated = server_access(args.host, args.token, args.allow_origin, args.bind_sessions)
    store = SessionStore(args.sessions)
    check_generation_model(args.export, args.ttt)

    import asyncio

    import torch

    from ttt_speech.generation.live import check_live_model
    from ttt_speech.generation.loading import load_generation_model
    from ttt_speech.models import load_mimi, load_text_tokenizer

    from .server import ChatServer, check_listen, log, model_thread, run_server

    check_listen(args.host, args.port)  # a port in use: before the model loads
    # after the port check: a second server started by mistake on a running one's port and folder
    # fails there, before it could remove a save in progress
    for path in store.remove_staging():
        log(f"removed {path}: a save's staging folder, left by a server stopped mid-save (its last save stays)")

    executor = model_thread()
    source = f"--export {args.export}" if args.export is not None else f"--model {args.model}"

    def load():
        torch.set_grad_enabled(False)  # the model's thread never needs autograd
        lm, model_config = load_generation_model(args.export, args.model, args.ttt, args.device, args.dtype)
        mimi = load_mimi(model_config, device=lm.device)
        try:  # before the port opens and anything runs the model
            check_live_model(lm, mimi)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None
        return lm, model_config, mimi, load_text_tokenizer(model_config)

    log("loading the model")
    try:
        lm, model_config, mimi, tokenizer = executor.submit(load).result()
    except BaseException:
        executor.shutdown(wait=False)
        raise
    name = str(args.export) if args.export is not None else model_config.name
    server = ChatServer(lm, mimi, tokenizer, config, store, name, executor, access, verbose=args.verbose)
    log(f"warming up ({name} on {lm.device}{', TTT layers' if _has_ttt(lm) else ', no TTT layers'})")

    async def main() -> None:
        await server.warmup()
        await run_server(server, args.host, args.port, generated)
    asyncio.run(main())
    return 0


def _has_ttt(lm) -> bool:
    from ttt_speech.handle import TTTModel

    return TTTModel.find(lm) is not None


# ---------------------------------------------------------------------- client

def register_client(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("client", description=CLIENT,
                       help="stream an audio (or code) file to a server in real time, record Moshi's reply")
    p.add_argument("input", type=Path, metavar="INPUT", help="the user's side: audio file (wav, flac, ogg, mp3, "
                                                             "opus; mixed to mono) or code file (.safetensors)")
    p.add_argument("--out", type=Path, required=True, metavar="OUTPUT",
                   help="Moshi's reply: .wav for an audio INPUT, .safetensors (codes + text) for a code file")
    p.add_argument("--session", metavar="ID", help="session to continue or start (default: a fresh stream, "
                                                   "not saved, as moshi's server)")
    _add_address(p, "ws")
    p.add_argument("--fast", action="store_true", help="send as fast as the server takes it, not in real time")
    p.add_argument("--quiet", action="store_true", help="do not print text pieces")
    p.set_defaults(func=_client)


def user_codes(codes: "Tensor", source: Path) -> "Tensor":
    """The user's 8 codebooks of a code file [K, T]: rows 8-15 of a stereo file (its right channel,
    the user's side in this project's layout, docs/architecture.md §8), rows 0-7 of a mono one."""
    if codes.shape[0] >= 16:
        return codes[8:16]
    if codes.shape[0] == 8:
        return codes
    raise ValueError(f"{source}: expected 8 (mono) or 16 (stereo) codebooks, got {codes.shape[0]}")


def _client(args: argparse.Namespace) -> int:
    import asyncio

    from ttt_speech.data.audio import AUDIO_SUFFIXES
    from ttt_speech.files import require_file, writable_file

    from .access import client_token
    from .client import ServerRefused, chat_url, converse
    from .sessions import check_id

    source = require_file(args.input, "an audio file or a code file")
    codes_mode = source.suffix.lower() == ".safetensors"
    if not codes_mode and source.suffix.lower() not in AUDIO_SUFFIXES:
        raise ValueError(f"{source}: expected audio ({', '.join(AUDIO_SUFFIXES)}) or a code file (.safetensors)")
    want = ".safetensors" if codes_mode else ".wav"
    if args.out.suffix.lower() != want:
        raise ValueError(f"--out: expected a {want} file for {'a code file' if codes_mode else 'an audio'} INPUT, "
                         f"got {args.out}")
    writable_file(args.out, "--out")
    if args.out.resolve() == source.resolve():
        raise ValueError(f"--out: {args.out} is the INPUT")
    if args.session is not None:
        check_id(args.session)
    token = client_token(args.token)
    url = chat_url(_base(args, "ws"), args.session, "codes" if codes_mode else "opus")

    sample_rate = 24000  # Mimi's, the protocol's
    if codes_mode:
        from ttt_speech.data.codes import load_codes

        codes = user_codes(load_codes(source).codes, source).T.numpy()  # [T, 8]
        pcm = None
    else:
        from ttt_speech.data.audio import read_audio

        pcm = read_audio(source, sample_rate).mean(dim=0).numpy()
        codes = None

    def on_text(piece: str) -> None:
        if not args.quiet:
            sys.stdout.write(piece)
            sys.stdout.flush()

    def on_metadata(meta: dict) -> None:
        where = (f"resumed at frame {meta.get('frames')}" if meta.get("resumed") else "new stream")
        print(f"connected: {meta.get('session') and 'session ' + meta['session'] or 'anonymous stream'}, {where} "
              f"({meta.get('model')})", file=sys.stderr)

    try:
        talk = asyncio.run(converse(url, pcm=pcm, codes=codes, sample_rate=sample_rate, realtime=not args.fast,
                                    on_text=on_text, on_metadata=on_metadata, token=token))
    except ServerRefused as e:
        raise ValueError(str(e)) from None
    if not args.quiet and talk.text:
        sys.stdout.write("\n")
    _write_reply(args.out, talk, codes_mode, sample_rate, str(source))
    seconds = talk.frames_sent / FRAME_RATE
    got = (f"{sum(c is not None for c in talk.codes)} frames of codes" if codes_mode
           else f"{talk.audio.shape[0] / sample_rate:.2f} s of audio")
    unconfirmed = ("" if talk.confirmed or talk.failure
                   else " (the server did not confirm the end: it may not answer pings)")
    print(f"sent {seconds:.2f} s ({talk.frames_sent} frames), received {got} and {len(talk.text)} text piece(s)"
          f"{unconfirmed}; wrote {args.out}", file=sys.stderr)
    if talk.failure:  # what was written is what came back before: say so, and fail
        print(f"ttt-speech client: error: {talk.failure}; {args.out} holds what came back before", file=sys.stderr)
        return 1
    return 0


def _write_reply(path: Path, talk, codes_mode: bool, sample_rate: int, source: str) -> None:
    import numpy as np
    import torch

    if codes_mode:
        from ttt_speech.data.codes import Recording, save_codes

        frames = [c for c in talk.codes if c is not None]
        stacked = torch.tensor(np.stack(frames, axis=1)) if frames else torch.zeros(9, 0, dtype=torch.long)
        save_codes(path, Recording(stacked[1:9].long(), stacked[0].long(), None, "", f"ttt-speech client {source}"))
    else:
        from ttt_speech.data.audio import write_wav

        write_wav(path, torch.from_numpy(talk.audio), sample_rate)


# ---------------------------------------------------------------------- sessions

def register_sessions(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sessions", description=SESSIONS, help="list / show / reset / delete a server's saved sessions")
    p.add_argument("action", choices=["list", "show", "reset", "delete"],
                   help="list: every session; show ID: one record; reset ID: forget its stream (the next "
                        "connection starts fresh); delete ID: remove it")
    p.add_argument("session", nargs="?", metavar="ID", help="the session (show, reset, delete)")
    _add_address(p, "http")
    p.add_argument("--dir", type=Path, metavar="DIR", help="work on this sessions folder directly (no server; "
                                                           "do not use on a folder a running server serves)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_sessions)


def _sessions(args: argparse.Namespace) -> int:
    from .sessions import check_id

    if args.action == "list" and args.session is not None:
        raise ValueError("list: takes no session id")
    if args.action != "list":
        if args.session is None:
            raise ValueError(f"{args.action}: expected a session id")
        check_id(args.session)
    result = _sessions_local(args) if args.dir is not None else _sessions_http(args)
    if args.json:
        print(json.dumps(result, indent=2))
    elif args.action == "list":
        _print_list(result["sessions"], result.get("live"))
    elif args.action == "delete":
        print(f"deleted session {args.session}")
    else:
        _print_list([result], args.session if result.get("live") else None)
    return 0


def _sessions_local(args: argparse.Namespace):
    from .sessions import SessionStore

    if not args.dir.is_dir():
        raise ValueError(f"--dir: {args.dir} is not a folder")
    store = SessionStore(args.dir, "--dir")
    try:
        if args.action == "list":
            return {"sessions": store.list(), "live": None}
        if args.action == "show":
            return store.require(args.session)
        if args.action == "reset":
            return store.reset(args.session)
        store.delete(args.session)
        return {"deleted": args.session}
    except KeyError as e:
        raise ValueError(e.args[0]) from None


def _no_redirects() -> "OpenerDirector":
    """A urllib opener that follows no redirect: urllib's would send the Authorization header (the
    token) along to wherever one points, another host included."""
    import urllib.request

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs) -> None:  # None: the 3xx is raised as an HTTPError
            return None
    return urllib.request.build_opener(NoRedirect)


def _sessions_http(args: argparse.Namespace):
    import urllib.error
    import urllib.request

    from .access import client_token

    base = _base(args, "http")
    token = client_token(args.token)
    path = "/api/sessions" + ("" if args.action == "list" else f"/{args.session}") + (
        "/reset" if args.action == "reset" else "")
    method = {"list": "GET", "show": "GET", "reset": "POST", "delete": "DELETE"}[args.action]
    request = urllib.request.Request(base + path, method=method,
                                     headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with _no_redirects().open(request, timeout=30) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as e:
        if 300 <= e.code < 400:
            raise ValueError(f"{args.action}: {base + path} answered {e.code} (a redirect to "
                             f"{e.headers.get('Location')!r}); expected the server's own answer: give --url the "
                             "server's address (a redirect is not followed: it would take the token along)") from None
        try:
            reason = json.loads(e.read()).get("error", e.reason)
        except ValueError:
            reason = e.reason
        raise ValueError(f"{args.action}: {reason}") from None
    except (urllib.error.URLError, OSError) as e:
        raise ValueError(f"cannot reach {base} ({getattr(e, 'reason', e)}); is `ttt-speech serve` running there?") from None


def _print_list(records: list[dict], live: str | None) -> None:
    if not records:
        print("no sessions")
        return
    print(f"{'session':<24} {'frames':>8} {'minutes':>8} {'state MiB':>9} {'conn':>5} {'resets':>6}  updated")
    for r in records:
        if "error" in r:
            print(f"{r['id']:<24} unreadable: {r['error']}")
            continue
        mark = " (live)" if r.get("id") == live else ""
        frames = int(r.get("frames", 0))
        print(f"{r['id'] + mark:<24} {frames:>8} {frames / FRAME_RATE / 60:>8.2f} {r.get('state_bytes', 0) / 2**20:>9.1f} "
              f"{r.get('connections', 0):>5} {r.get('resets', 0):>6}  {r.get('updated', '')}")
