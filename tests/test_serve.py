"""`ttt-speech serve` / `client` / `sessions`: a real server process on 127.0.0.1, real sockets,
real Opus, a tiny TTT export (gates at 0.5, so the TTT state shapes the output).

The library part (`LiveStream`) is checked in-process first: it speaks as moshi's server loop does
(greedy, token for token), and a saved / restored stream equals one that never stopped.
"""
import asyncio
import json
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import inserted_modules
from ttt_speech import TTTConfig, patch_moshi
from ttt_speech.cli import main
from ttt_speech.generation.config import GenerationConfig
from ttt_speech.generation.live import LiveStream
from ttt_speech.generation.state import read_state
from ttt_speech.models import ModelConfig, load_lm, load_mimi
from ttt_speech_apps.serve import protocol as P
from ttt_speech_apps.serve.client import chat_url, converse
from ttt_speech_apps.serve.process import ServerProcess
from ttt_speech_apps.serve.server import ttt_digest

LIBRIVOX = Path("/usr/share/pocketsphinx/test/data/librivox/sense_and_sensibility_01_austen_64kb-0870.wav")
TINY = {"dim": 64, "num_layers": 2, "num_heads": 2, "text_card": 100, "context": 40,
        "depformer_dim": 32, "depformer_dim_feedforward": 64, "depformer_num_layers": 1}
SAMPLING = ["--temperature", "1.0", "--text-temperature", "1.0", "--top-k", "0", "--text-top-k", "0", "--seed", "5"]
START_TIMEOUT = 120


def tiny_ttt_lm():
    lm = load_lm(ModelConfig(name="tiny", device="cpu", tiny=TINY))
    patch_moshi(lm, TTTConfig(mini_batch_size=4))
    with torch.no_grad():  # make the TTT branch matter
        for m in inserted_modules(lm):
            m.gate_alpha.fill_(0.5)
    return lm


@pytest.fixture(scope="module")
def mimi():
    return load_mimi(ModelConfig(device="cpu"))


@pytest.fixture(scope="module")
def speech(mimi):
    """2 s of real LibriVox speech at 24 kHz, float32 [48000]."""
    if not LIBRIVOX.is_file():
        pytest.skip("pocketsphinx-testdata is not installed (apt-get install -y pocketsphinx-testdata)")
    from ttt_speech.data.audio import read_audio

    pcm = read_audio(LIBRIVOX, mimi.sample_rate)[0, :2 * mimi.sample_rate]
    assert pcm.std() > 0.01  # speech, not silence
    return pcm


# ----------------------------------------------------------------------------- LiveStream (in-process)

def moshi_server_loop(lm, mimi, pcm, frames):
    """What moshi 0.2.13's server does with each frame of a fresh connection (`recv_loop`), greedy:
    encode, reset Mimi after the first frame, LMGen.step, decode."""
    from moshi.models.lm import LMGen

    gen = LMGen(lm, use_sampling=False)
    out = []
    with torch.no_grad(), gen.streaming(1), mimi.streaming(1):
        for i in range(frames):
            codes = mimi.encode(pcm[None, None, i * 1920:(i + 1) * 1920])
            if i == 0:
                mimi.reset_streaming()
            tokens = gen.step(codes)
            if tokens is not None:
                out.append((tokens[0, :, 0].clone(), mimi.decode(tokens[:, 1:])[0, 0].clone()))
    return out


def test_live_stream_speaks_as_moshis_server_loop(mimi, speech):
    lm = tiny_ttt_lm()
    greedy = GenerationConfig(temperature=0, text_temperature=0)
    frames = 12
    reference = moshi_server_loop(lm, mimi, speech, frames)
    with LiveStream(lm, mimi, greedy) as live:
        # fed in pieces that do not line up with frames: the stream buffers the rest
        outs = [o for piece in torch.split(speech[:frames * 1920], 1000) for o in live.feed_pcm(piece)]
        assert live.frames_in == frames and live.position == frames
    emitted = [o for o in outs if o.emitted]
    assert len(emitted) == len(reference) == frames - 1  # max_delay 1: nothing at the first step
    tokens = torch.stack([o.codes for o in emitted])
    assert tokens[:, 1:].unique().numel() > 5, "degenerate: the stream must carry information"
    assert torch.equal(tokens, torch.stack([t for t, _ in reference]))
    for o, (_, pcm) in zip(emitted, reference):
        assert torch.equal(o.pcm, pcm)


def test_live_stream_restored_equals_uninterrupted(mimi, speech):
    """Audio in, sampled: stop after 7.5 frames (half a frame buffered), save, restore into a new
    stream and go on == one stream that never stopped (tokens and audio, bit for bit)."""
    lm = tiny_ttt_lm()
    config = GenerationConfig(temperature=1.0, text_temperature=1.0, seed=3)
    cut = 7 * 1920 + 960
    with LiveStream(lm, mimi, config) as live:
        whole = live.feed_pcm(speech[:16 * 1920])
    with LiveStream(lm, mimi, config) as live:
        first = live.feed_pcm(speech[:cut])
        tensors, meta = live.state_dict()
        moved = live.ttt_state()
    fresh = LiveStream(lm, mimi, config)
    assert ttt_digest(fresh.ttt_state()) != ttt_digest(moved), "the TTT state must have moved"
    fresh.close()
    with LiveStream(lm, mimi, config) as live:
        live.load_state_dict(tensors, meta)
        assert live.frames_in == 7 and live.position == 7 and ttt_digest(live.ttt_state()) == ttt_digest(moved)
        second = live.feed_pcm(speech[cut:16 * 1920])
    split = first + second
    assert len(split) == len(whole) == 16
    for a, b in zip(split, whole):
        assert torch.equal(a.codes, b.codes)
        assert (a.pcm is None) == (b.pcm is None) and (a.pcm is None or torch.equal(a.pcm, b.pcm))
    with LiveStream(lm, mimi, GenerationConfig(temperature=1.0, text_temperature=1.0, seed=4)) as live:
        other = live.feed_pcm(speech[:16 * 1920])  # the check can fail: another seed differs
    assert any(not torch.equal(a.codes, b.codes) for a, b in zip(other, whole))


def test_live_stream_refuses_another_model(mimi):
    lm = tiny_ttt_lm()
    with LiveStream(lm, mimi) as live:
        live.feed_codes(torch.zeros(3, 8, dtype=torch.long))
        tensors, meta = live.state_dict()
    other = load_lm(ModelConfig(name="tiny", device="cpu", seed=1, tiny=TINY))
    with LiveStream(other, mimi) as live, pytest.raises(ValueError, match="different model"):
        live.load_state_dict(tensors, meta)


# ----------------------------------------------------------------------------- the server process

class Server(ServerProcess):
    """`ttt-speech serve` on the tiny export, sampling at temperature 1 with a fixed seed."""

    def __init__(self, export: Path, sessions: Path) -> None:
        # one OpenMP thread: the test process computes too (2 cores)
        super().__init__(["--export", str(export), "--device", "cpu", "--sessions", str(sessions), *SAMPLING],
                         timeout=START_TIMEOUT, env={"OMP_NUM_THREADS": "1"})
        self.sessions = sessions


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    from ttt_speech.export import save_export

    return save_export(tiny_ttt_lm(), ModelConfig(name="tiny", device="cpu", tiny=TINY),
                       tmp_path_factory.mktemp("export") / "tiny-ttt", trainable="ttt")


@pytest.fixture(scope="module")
def server(export, tmp_path_factory):
    s = Server(export, tmp_path_factory.mktemp("sessions"))
    yield s
    assert s.stop() == 0, s.log()


def talk(url, session=None, timeout=120, **kw):
    fmt = "codes" if "codes" in kw else "opus"
    return asyncio.run(asyncio.wait_for(converse(chat_url(url, session, fmt), **kw), timeout))


def test_opus_conversation_continues_across_connections(server, speech, tmp_path, capsys):
    """2 s of LibriVox through the client (Opus both ways), disconnect, reconnect with the same id:
    the second connection starts from the stream position and fast weights saved by the first."""
    wav = tmp_path / "in.wav"
    from ttt_speech.data.audio import read_audio, write_wav

    write_wav(wav, speech, 24000)
    assert main(["client", str(wav), "--out", str(tmp_path / "reply.wav"), "--session", "talk",
                 "--url", server.url]) == 0
    err = capsys.readouterr().err
    assert "session talk, new stream" in err and "sent 2.00 s (25 frames)" in err, err
    reply = read_audio(tmp_path / "reply.wav", 24000)[0]
    assert reply.shape[0] >= 23 * 1920 and reply.std() > 1e-4  # Moshi spoke: audio, not silence

    server.wait_closed("talk")  # the client is gone; the server saves the stream after it
    tensors, meta = read_state(server.sessions / "talk.safetensors")
    assert meta["live"]["frames_in"] == 25 and meta["live"]["position"] == 25
    fresh = talk(server.url, pcm=speech[:1920].numpy())  # an anonymous stream: fresh TTT state, not saved
    assert fresh.metadata["resumed"] is False and fresh.metadata["frames"] == 0
    saved = ttt_digest(tensors)
    assert saved is not None and saved != fresh.metadata["ttt"], "the TTT state must have moved"

    second = talk(server.url, "talk", pcm=speech.numpy())
    assert second.metadata["resumed"] is True
    assert second.metadata["position"] == second.metadata["frames"] == 25
    assert second.metadata["ttt"] == saved  # the fast weights it starts from are the ones saved
    assert second.confirmed and second.frames_sent == 25 and len(second.text) > 0
    server.wait_closed("talk", times=2)
    _, meta = read_state(server.sessions / "talk.safetensors")
    assert meta["live"]["position"] == 50
    assert (server.sessions / "talk.safetensors").is_file() and not (server.sessions / "None.safetensors").exists()


def test_codes_session_split_in_two_equals_one_uninterrupted(server):
    """Codes in (no codec), the same seed: 20 + 20 frames over two connections of one session give
    the tokens of 40 frames in one, token for token; another input differs (the check can fail)."""
    codes = torch.randint(0, 2048, (40, 8), generator=torch.Generator().manual_seed(0)).numpy()
    a = talk(server.url, "split", codes=codes[:20])
    b = talk(server.url, "split", codes=codes[20:])
    whole = talk(server.url, "whole", codes=codes)
    assert b.metadata["frames"] == 20 and len(a.codes) == len(b.codes) == 20 and len(whole.codes) == 40
    split = a.codes + b.codes
    assert split[0] is None and whole.codes[0] is None  # max_delay: nothing emitted at the first step
    emitted = np.stack(whole.codes[1:])
    assert emitted.shape == (39, 9) and len(np.unique(emitted[:, 1:])) > 50, "degenerate replies"
    assert all(np.array_equal(x, y) for x, y in zip(split[1:], whole.codes[1:]))
    other = codes.copy()
    other[5] = (other[5] + 1) % 2048  # (the first frame would not do: LMGen never reads it, moshi's rule)
    changed = talk(server.url, "other", codes=other)
    assert any(not np.array_equal(x, y) for x, y in zip(changed.codes[1:], whole.codes[1:]))


async def _raw(url, send, expect_ping=True):
    """Open a raw websocket, send `send` (bytes or str), then a ping; what came back, by kind."""
    import aiohttp

    got = {}
    async with aiohttp.ClientSession() as http, http.ws_connect(url) as ws:
        first = await ws.receive()
        assert first.data == P.message(P.HANDSHAKE)
        for item in send:
            await (ws.send_str(item) if isinstance(item, str) else ws.send_bytes(item))
        await ws.send_bytes(P.message(P.PING))
        async for msg in ws:
            kind = msg.data[0]
            got.setdefault(kind, []).append(msg.data[1:])
            if kind == P.PING:
                break
        assert not ws.closed
    return got


def test_bad_messages_are_logged_and_skipped(server, speech):
    import sphn

    writer = sphn.OpusStreamWriter(24000)
    pages = [P.message(P.AUDIO, writer.append_pcm(f.numpy())) for f in speech[:6 * 1920].reshape(6, 1920)]
    before = len(server.lines)
    garbage = [b"", "hello", P.message(42, b"x"), P.message(P.AUDIO, b"not opus at all" * 4),
               P.message(P.CODES, b"\x01\x02\x03")]
    got = asyncio.run(asyncio.wait_for(_raw(chat_url(server.url, None), [*pages[:3], *garbage, *pages[3:]]), 60))
    assert P.PING in got and len(got.get(P.AUDIO, [])) >= 4  # all 6 frames handled around the garbage
    server.wait_closed(None, since=before)
    skipped = [line for line in server.lines[before:] if ": skipped " in line]
    assert len(skipped) == len(garbage), "\n".join(server.lines[before:])
    assert "5 message(s) skipped" in "\n".join(server.lines[before:])
    bad_codes = [P.codes_message(np.full((1, 8), 5000)), P.codes_message(np.zeros((1, 7))), P.message(P.AUDIO, b"x")]
    got = asyncio.run(asyncio.wait_for(_raw(chat_url(server.url, None, "codes"),
                                            [*bad_codes, P.codes_message(np.zeros((2, 8)))]), 60))
    assert len(got[P.CODES]) == 2  # only the valid frames were answered


def test_a_second_client_is_told_the_server_is_busy(server, speech, tmp_path, capsys):
    import aiohttp

    async def scenario():
        async with aiohttp.ClientSession() as http, http.ws_connect(chat_url(server.url, "first")) as ws:
            assert (await ws.receive()).data == P.message(P.HANDSHAKE)
            async with http.ws_connect(chat_url(server.url, "second")) as other:
                msg = await other.receive()
                assert msg.data[0] == P.ERROR and b"busy" in msg.data, msg
                assert b"first" not in msg.data  # which conversation is live is not the caller's business
                await other.receive()
                assert other.close_code == P.CLOSE_TRY_LATER
            # the first conversation was not disturbed
            await ws.send_bytes(P.message(P.PING))
            async for msg in ws:
                if msg.data[0] == P.PING:
                    break
            code = await asyncio.to_thread(main, ["client", str(wav), "--out", str(tmp_path / "r.wav"),
                                                  "--url", server.url, "--quiet"])
            assert code == 2
    wav = tmp_path / "in.wav"
    from ttt_speech.data.audio import write_wav

    write_wav(wav, speech[:1920], 24000)
    asyncio.run(asyncio.wait_for(scenario(), 60))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the server refused the connection: busy" in err[0], err


def test_session_commands(server, capsys):
    talk(server.url, "keep", codes=np.zeros((3, 8), dtype=np.int64))
    server.wait_closed("keep")
    assert main(["sessions", "list", "--url", server.url.replace("ws://", "http://")]) == 0
    out = capsys.readouterr().out
    assert "keep" in out and "frames" in out
    assert main(["sessions", "show", "keep", "--url", server.url, "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["frames"] == 3 and record["state_bytes"] > 0 and record["last_connection"]["frames"] == 3
    assert main(["sessions", "reset", "keep", "--url", server.url, "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["frames"] == 0 and record["resets"] == 1 and record["state_bytes"] == 0
    again = talk(server.url, "keep", codes=np.zeros((2, 8), dtype=np.int64))
    assert again.metadata["resumed"] is False  # a reset session starts a fresh stream
    server.wait_closed("keep", times=2)
    assert main(["sessions", "delete", "keep", "--url", server.url]) == 0
    assert not (server.sessions / "keep.json").exists() and not (server.sessions / "keep.safetensors").exists()
    capsys.readouterr()
    for argv, message in [(["show", "keep"], "no session 'keep'"), (["show", "../x"], "session: expected"),
                          (["reset"], "reset: expected a session id")]:
        assert main(["sessions", *argv, "--url", server.url]) == 2
        assert message in capsys.readouterr().err
    # the folder itself, without a server; an unreadable record is listed as such, the others still are
    talk(server.url, "listed", codes=np.zeros((2, 8), dtype=np.int64))
    server.wait_closed("listed")
    (server.sessions / "broken.json").write_text("{not json")
    try:
        assert main(["sessions", "list", "--dir", str(server.sessions), "--json"]) == 0
        listed = {r["id"]: r for r in json.loads(capsys.readouterr().out)["sessions"]}
        assert listed["listed"]["frames"] == 2 and "error" in listed["broken"]
        assert main(["sessions", "list", "--url", server.url]) == 0
        out = capsys.readouterr().out
        assert "broken" in out and "unreadable" in out and "listed" in out
    finally:
        (server.sessions / "broken.json").unlink()


def test_sigterm_saves_the_live_session(export, speech, tmp_path):
    server = Server(export, tmp_path / "sessions")
    result = {}

    def client():
        pcm = np.tile(speech.numpy(), 3)  # 6 s in real time: still talking when the signal comes
        result["talk"] = talk(server.url, "live", pcm=pcm)
    thread = threading.Thread(target=client)
    thread.start()
    deadline = time.monotonic() + 60
    while not any("session live: connected" in line for line in server.lines) and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.5)  # ~18 frames into the conversation
    assert server.stop(signal.SIGTERM) == 0, server.log()
    thread.join(60)
    log = server.log()
    assert "shutting down: closing session live and saving it" in log and "stopped" in log, log
    tensors, meta = read_state(tmp_path / "sessions" / "live.safetensors")
    frames = meta["live"]["frames_in"]
    assert 0 < frames < 75 and meta["live"]["position"] == frames, meta
    assert result["talk"].closed is not None and result["talk"].closed.startswith("1001"), result["talk"].closed


# ----------------------------------------------------------------------------- errors before any work

@pytest.mark.parametrize("argv, message", [
    (["serve", "--sessions", "{file}"], "--sessions: {file} is a file, expected a folder"),
    (["serve", "--port", "70000"], "--port: expected 0..65535"),
    (["serve", "--temperature", "-1"], "--temperature: expected a number >= 0"),
    (["client", "{file}", "--out", "{tmp}/o.wav"], "expected audio"),
    (["client", "{wav}", "--out", "{tmp}/o.safetensors"], "--out: expected a .wav file"),
    (["client", "{wav}", "--out", "{tmp}/o.wav", "--session", "a b"], "session: expected"),
    (["client", "{wav}", "--out", "{tmp}/o.wav", "--port", "1"], "cannot connect to ws://127.0.0.1:1/api/chat"),
    (["sessions", "list", "--port", "1"], "cannot reach http://127.0.0.1:1"),
])
def test_bad_arguments_are_one_line_errors(tmp_path, capsys, argv, message):
    (tmp_path / "file").write_text("")
    from ttt_speech.data.audio import write_wav

    write_wav(tmp_path / "in.wav", torch.zeros(1920), 24000)
    fill = {"file": str(tmp_path / "file"), "tmp": str(tmp_path), "wav": str(tmp_path / "in.wav")}
    assert main([a.format(**fill) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message.format(**fill) in err[0], err


def test_the_client_sends_the_user_side_of_a_code_file():
    """Rows 8-15 of a stereo code file (the right channel: the user's, as training lays it out), the
    8 rows of a mono one."""
    from ttt_speech_apps.serve.cli import user_codes

    stereo = torch.arange(16)[:, None].expand(16, 3)
    assert torch.equal(user_codes(stereo, Path("s")), stereo[8:])
    assert torch.equal(user_codes(stereo[:8], Path("m")), stereo[:8])
    with pytest.raises(ValueError, match="m: expected 8 \\(mono\\) or 16 \\(stereo\\) codebooks, got 5"):
        user_codes(stereo[:5], Path("m"))


# ----------------------------------------------------------------------------- access without a token (loopback)

def http(url, path, method="GET", headers=None):
    """(status, JSON body) of an HTTP request to the server at `url` (ws://host:port)."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url.replace("ws://", "http://") + path, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def ws_status(url, headers=None):
    """The HTTP status of a websocket handshake (101: upgraded, closed again at once)."""
    import aiohttp

    async def attempt():
        async with aiohttp.ClientSession() as session:
            try:
                async with session.ws_connect(url, headers=headers) as ws:
                    await ws.receive()  # the handshake: the server opened a stream
                    return 101
            except aiohttp.WSServerHandshakeError as e:
                return e.status
    return asyncio.run(asyncio.wait_for(attempt(), 60))


def test_a_tokenless_server_refuses_other_sites(server):
    """The issue's reproduction: a page of another site, open in the user's browser, resets a
    session with a body-less POST (no CORS preflight) or resumes it over a websocket. Refused
    (403) by Origin; a rebound name (DNS rebinding: same origin to the browser) by Host."""
    talk(server.url, "erin", codes=np.zeros((2, 8), dtype=np.int64))
    state = server.sessions / "erin.safetensors"
    assert state.is_file()
    port = server.url.rsplit(":", 1)[1]
    evil = {"Origin": "http://evil.example"}
    for method, path in [("POST", "/api/sessions/erin/reset"), ("DELETE", "/api/sessions/erin"),
                         ("GET", "/api/sessions/erin"), ("GET", "/api/sessions")]:
        status, body = http(server.url, path, method, evil)
        assert status == 403 and "Origin http://evil.example" in body["error"], (path, status, body)
        status, body = http(server.url, path, method, {"Host": f"evil.example:{port}"})
        assert status == 403 and "has no token" in body["error"], (path, status, body)
        # behind a proxy (nginx sends Host: 127.0.0.1:PORT by default): refused by its headers
        status, body = http(server.url, path, method, {"X-Forwarded-For": "203.0.113.9"})
        assert status == 403 and "X-Forwarded-For" in body["error"], (path, status, body)
    assert ws_status(chat_url(server.url, "erin"), evil) == 403
    assert ws_status(chat_url(server.url, "erin"), {"Origin": "null"}) == 403  # a sandboxed page, a file
    assert state.is_file() and json.loads((server.sessions / "erin.json").read_text())["resets"] == 0
    # the server's own origin, and clients that are no browser (no Origin), are served
    assert http(server.url, "/api/sessions/erin", headers={"Origin": f"http://127.0.0.1:{port}"})[0] == 200
    assert http(server.url, "/api/sessions/erin", headers={"Host": f"localhost:{port}"})[0] == 200
    before = len(server.lines)
    assert ws_status(chat_url(server.url, None), {"Origin": f"http://127.0.0.1:{port}"}) == 101
    server.wait_closed(None, since=before)


# ----------------------------------------------------------------------------- faults found by trying

def test_a_failed_save_keeps_the_last_one_and_tells_the_client(server):
    """A record corrupted during a conversation: the save fails as a whole (the state file it saved
    last is not overwritten, no temporary file stays), the client that asked to end is told (kind 5,
    1011), and the next connection is refused at once, naming the file."""
    import aiohttp

    codes = np.zeros((3, 8), dtype=np.int64)
    first = talk(server.url, "pair", codes=codes)
    assert first.ended == {"saved": True, "frames": 3} and first.failure is None
    state, record = server.sessions / "pair.safetensors", server.sessions / "pair.json"
    saved = state.read_bytes()

    async def scenario():
        async with aiohttp.ClientSession() as session, session.ws_connect(chat_url(server.url, "pair", "codes")) as ws:
            assert (await ws.receive()).data == P.message(P.HANDSHAKE)
            assert (await ws.receive()).data[0] == P.METADATA
            record.write_text("{corrupt")  # after the connection checked it: only the save finds it
            await ws.send_bytes(P.codes_message(codes))
            await ws.send_bytes(P.message(P.END))
            return [msg.data async for msg in ws], ws.close_code
    try:
        got, code = asyncio.run(asyncio.wait_for(scenario(), 60))
        errors = [data[1:].decode() for data in got if data[0] == P.ERROR]
        assert code == P.CLOSE_INTERNAL and len(errors) == 1, (code, got)
        assert "could not save session pair" in errors[0] and "pair.json: not valid JSON" in errors[0], errors
        assert not any(data[0] == P.END for data in got)
        assert state.read_bytes() == saved and record.read_text() == "{corrupt"  # the last pair, untouched
        assert not [p.name for p in server.sessions.iterdir() if p.name.startswith(".")]
        with pytest.raises(ValueError, match="pair.json: not valid JSON"):
            talk(server.url, "pair", codes=codes)
    finally:
        record.unlink()
        state.unlink()


def test_the_client_fails_when_its_session_is_not_saved(server, tmp_path, capsys):
    """`ttt-speech client` waits for its session's save and exits 1, saying why, when it failed
    (here the record's path is a folder)."""
    from ttt_speech.data.codes import Recording, save_codes

    save_codes(tmp_path / "in.safetensors", Recording(torch.zeros(8, 3, dtype=torch.long)))
    (server.sessions / "nosave.json").mkdir()
    try:
        code = main(["client", str(tmp_path / "in.safetensors"), "--out", str(tmp_path / "out.safetensors"),
                     "--session", "nosave", "--url", server.url, "--fast", "--quiet"])
    finally:
        (server.sessions / "nosave.json").rmdir()
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1, err
    assert err[-1].startswith("ttt-speech client: error: the server ended the conversation: could not save "
                              "session nosave (IsADirectoryError"), err
    assert not (server.sessions / "nosave.safetensors").exists()  # neither file: the new state is gone too


def test_session_store_saves_both_files_or_neither(tmp_path, monkeypatch):
    """Both files change or neither: an unreadable record fails before anything is written; a
    record that cannot be put in place puts the last state back."""
    import os

    from ttt_speech_apps.serve import sessions
    from ttt_speech_apps.serve.sessions import SessionStore

    store = SessionStore(tmp_path)
    meta = {"live": {"frames_in": 1}}
    store.save("s", {"x": torch.zeros(2)}, meta, {})
    state, record = store.state_path("s"), store.record_path("s")
    saved, recorded = state.read_bytes(), record.read_text()

    record.write_text("[1, 2")
    with pytest.raises(ValueError, match="s.json: not valid JSON"):
        store.save("s", {"x": torch.ones(2)}, meta, {})
    assert state.read_bytes() == saved and record.read_text() == "[1, 2"
    record.write_text(recorded)

    replace = os.replace

    def failing(src, dst):  # (os.replace itself: the module's `os` is the os module)
        if Path(dst).parent == tmp_path and Path(dst).suffix == ".json":  # a record put in place
            raise OSError(28, "No space left on device")
        replace(src, dst)
    monkeypatch.setattr(sessions.os, "replace", failing)
    for change in (lambda: store.save("s", {"x": torch.ones(2)}, meta, {}), lambda: store.reset("s")):
        with pytest.raises(OSError, match="No space"):
            change()
        assert state.read_bytes() == saved and record.read_text() == recorded
    with pytest.raises(OSError, match="No space"):  # a new session: no state left behind
        store.save("t", {"x": torch.ones(2)}, meta, {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.json", "s.safetensors"]


def test_session_store_saves_without_hard_links(tmp_path, monkeypatch):
    """On a file system without hard links (os.link: EPERM, EXDEV, ENOTSUP...) the old state's
    second name is a copy: saving an existing session works, and a failure still puts it back."""
    import errno
    import os

    from ttt_speech_apps.serve import sessions
    from ttt_speech_apps.serve.sessions import SessionStore

    def no_link(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")
    monkeypatch.setattr(sessions.os, "link", no_link)
    store = SessionStore(tmp_path)
    meta = {"live": {"frames_in": 1}}
    store.save("s", {"x": torch.zeros(2)}, meta, {})
    assert store.save("s", {"x": torch.ones(2)}, meta, {})["connections"] == 2  # an existing session
    state, record = store.state_path("s"), store.record_path("s")
    saved, recorded = state.read_bytes(), record.read_text()
    replace = os.replace

    def failing(src, dst):
        if Path(dst) == record:
            raise OSError(28, "No space left on device")
        replace(src, dst)
    monkeypatch.setattr(sessions.os, "replace", failing)
    with pytest.raises(OSError, match="No space"):
        store.save("s", {"x": torch.full((2,), 2.0)}, meta, {})
    assert state.read_bytes() == saved and record.read_text() == recorded
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.json", "s.safetensors"]


def test_session_store_removes_what_a_killed_save_left(tmp_path):
    """A server killed mid-save leaves its staging folder (`.ID.saving.*`): removed when a server
    opens the folder (`ttt-speech serve` logs each); sessions and other files are left alone."""
    from ttt_speech_apps.serve.sessions import SessionStore

    store = SessionStore(tmp_path)
    store.save("s", {"x": torch.zeros(2)}, {"live": {"frames_in": 1}}, {})
    left = tmp_path / ".s.saving.k3x9_a"
    left.mkdir()
    (left / "s.safetensors").write_bytes(b"half")
    (tmp_path / ".notes.saving").write_text("not a folder")  # not a staging folder
    assert store.remove_staging() == [left]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".notes.saving", "s.json", "s.safetensors"]
    assert store.remove_staging() == []


@pytest.mark.parametrize("how, said", [
    ("shuts down", "the server closed the connection (1001: server shutting down)"),
    ("dies", "the connection broke"),
])
def test_the_client_fails_when_the_server_goes_mid_stream(tmp_path, capsys, how, said):
    """A server that closes (1001) or vanishes after the first frame: the client writes what came
    back, and exits 1 saying so in one line."""
    from aiohttp import web

    from ttt_speech.data.audio import write_wav

    async def chat(request):
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_bytes(P.message(P.HANDSHAKE))
        await ws.receive()  # the first frame, then the server goes
        if how == "dies":
            request.transport.abort()
        else:
            await ws.close(code=P.CLOSE_GOING_AWAY, message=b"server shutting down")
        return ws

    async def scenario():
        app = web.Application()
        app.router.add_get("/api/chat", chat)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        port = runner.addresses[0][1]
        try:
            return await asyncio.to_thread(main, ["client", str(wav), "--out", str(tmp_path / "r.wav"), "--port",
                                                  str(port), "--fast", "--quiet"])
        finally:
            await runner.cleanup()
    wav = tmp_path / "in.wav"
    write_wav(wav, torch.zeros(24000), 24000)
    assert asyncio.run(asyncio.wait_for(scenario(), 60)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"ttt-speech client: error: {said} before the server confirmed it handled the whole input; "
                       f"{tmp_path / 'r.wav'} holds what came back before"), err
    assert (tmp_path / "r.wav").is_file()


def test_serving_an_export_of_other_codes_is_one_line(tmp_path, capsys):
    """A `train tiny` export (64-code codebooks, synthetic codes) cannot talk through Mimi (2048):
    said once the model is loaded, before anything runs it (not as silence codes out of range)."""
    from ttt_speech.export import save_export

    tiny = {**TINY, "card": 64}
    lm = load_lm(ModelConfig(name="tiny", device="cpu", tiny=tiny))
    patch_moshi(lm, TTTConfig(mini_batch_size=4))
    export = save_export(lm, ModelConfig(name="tiny", device="cpu", tiny=tiny), tmp_path / "export", trainable="ttt")
    left = tmp_path / "sessions" / ".s.saving.k3x9_a"  # (also: a killed save's leftover is removed at start)
    left.mkdir(parents=True)
    assert main(["serve", "--export", str(export), "--device", "cpu", "--port", "0",
                 "--sessions", str(tmp_path / "sessions")]) == 2
    err = capsys.readouterr().err
    assert not left.exists() and f"removed {left}: " in err, err
    assert err.strip().splitlines()[-1] == (
        f"ttt-speech serve: error: --export {export}: the model's 64-code audio codebooks do not match Mimi's "
        "2048: it was trained on other codes than Mimi's and cannot talk through Mimi"), err
    assert "warming up" not in err


def test_a_port_in_use_is_found_before_the_model_loads(tmp_path, capsys):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--model", "tiny", "--device", "cpu", "--port", str(port),
                     "--sessions", str(tmp_path / "sessions")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"ttt-speech serve: error: --host/--port: cannot listen on "
                                               f"127.0.0.1:{port} (")  # and "loading the model" never came
