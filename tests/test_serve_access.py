"""Who may use `ttt-speech serve` (serve/access.py, docs/serve.md "Access"): a token on every route,
the Origin allow-list, the Host check without a token, sessions bound to their token; the token of
`ttt-speech client` / `sessions`. Real server processes (`--model tiny`) on 127.0.0.1 where the
routes matter; the decisions themselves in-process.
"""
import hashlib
import json

import numpy as np
import pytest
from test_serve import START_TIMEOUT, http, talk, ws_status

from ttt_speech.cli import main
from ttt_speech_apps.serve import access as A
from ttt_speech_apps.serve.access import Access, Refused, server_access
from ttt_speech_apps.serve.client import ServerRefused, chat_url
from ttt_speech_apps.serve.process import ServerProcess

ALICE, BOB = "alice-token-0123456789", "bob-token-0123456789ab"
APP = "https://app.example"
ROUTES = [("GET", "/api/sessions"), ("GET", "/api/sessions/x"), ("POST", "/api/sessions/x/reset"),
          ("DELETE", "/api/sessions/x")]


def serve(sessions, *args):
    # one OpenMP thread: the test process computes too (2 cores)
    return ServerProcess(["--model", "tiny", "--device", "cpu", "--sessions", str(sessions), *args],
                         timeout=START_TIMEOUT, env={"OMP_NUM_THREADS": "1", A.TOKEN_ENV: ""})


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    """Two users' tokens, sessions bound to them, one more browser origin allowed."""
    sessions = tmp_path_factory.mktemp("sessions")
    s = serve(sessions, "--token", ALICE, "--token", BOB, "--bind-sessions", "--allow-origin", APP)
    s.sessions = sessions
    yield s
    assert s.stop() == 0, s.log()


def bearer(token):
    return {"Authorization": f"Bearer {token}"}


def codes(frames=2):
    return np.zeros((frames, 8), dtype=np.int64)


def test_every_route_asks_the_token(guarded):
    for method, path in ROUTES:
        for headers in ({}, bearer("wrong-token-0123456789"), bearer(ALICE[:-1]), {"Authorization": ALICE}):
            status, body = http(guarded.url, path, method, headers)
            assert status == 401 and "a token is required" in body["error"], (path, headers, status, body)
        status, _ = http(guarded.url, path + f"?token={ALICE}", method)  # the query: only where headers cannot go
        assert status == 401
    assert http(guarded.url, "/api/sessions", headers=bearer(ALICE)) == (200, {"sessions": [], "live": None})
    assert ws_status(chat_url(guarded.url, None)) == 401
    assert ws_status(chat_url(guarded.url, None), bearer("wrong-token-0123456789")) == 401
    with pytest.raises(ServerRefused, match="401: the server asks a token"):
        talk(guarded.url, codes=codes())
    # a browser's websocket cannot set headers: ?token= (with or without a session)
    before = len(guarded.lines)
    assert ws_status(chat_url(guarded.url, None) + f"?token={BOB}") == 101
    guarded.wait_closed(None, since=before)
    assert talk(guarded.url, codes=codes(), token=BOB).failure is None
    assert "refused GET /api/chat from 127.0.0.1: 401" in guarded.log()


def test_a_foreign_origin_is_refused_even_with_the_token(guarded):
    port = guarded.url.rsplit(":", 1)[1]
    for method, path in ROUTES:
        status, body = http(guarded.url, path, method, {**bearer(ALICE), "Origin": "http://evil.example"})
        assert status == 403 and "Origin http://evil.example: not this server's own" in body["error"], body
    assert ws_status(chat_url(guarded.url, None) + f"?token={ALICE}", {"Origin": "http://evil.example"}) == 403
    for origin in (f"http://127.0.0.1:{port}", APP, APP.upper()):  # its own; --allow-origin's
        assert http(guarded.url, "/api/sessions", headers={**bearer(ALICE), "Origin": origin})[0] == 200, origin
    # with a token the Host is not checked: a proxy in front may name the server as it likes
    assert http(guarded.url, "/api/sessions", headers={**bearer(ALICE), "Host": "speech.example"})[0] == 200


def test_sessions_are_bound_to_the_token_that_created_them(guarded, capsys, monkeypatch):
    """Bob cannot see, show, reset, delete or continue Alice's session (as if it did not exist,
    except that he cannot take its id); the record keeps the token's hash, never the token."""
    mine = talk(guarded.url, "mine", codes=codes(3), token=ALICE)
    assert mine.ended == {"saved": True, "frames": 3}
    text = (guarded.sessions / "mine.json").read_text()
    assert json.loads(text)["owner"] == "sha256:" + hashlib.sha256(ALICE.encode()).hexdigest() and ALICE not in text
    talk(guarded.url, "theirs", codes=codes(), token=BOB)

    def listed(token):
        status, body = http(guarded.url, "/api/sessions", headers=bearer(token))
        assert status == 200
        return sorted(r["id"] for r in body["sessions"])
    assert listed(ALICE) == ["mine"] and listed(BOB) == ["theirs"]
    # one refusal, the same on every route, whether the session is another token's, unreadable or
    # (over HTTP) not there at all: neither its owner nor that it is bound is said
    (guarded.sessions / "broken.json").write_text("{not json")
    try:
        assert listed(ALICE) == ["mine"]  # an unreadable record is nobody's to list on a bound server
        for session, token in [("mine", BOB), ("broken", ALICE), ("nothing", ALICE)]:
            refusal = f"no session {session!r} for this client"
            for method, path in [("GET", f"/api/sessions/{session}"), ("POST", f"/api/sessions/{session}/reset"),
                                 ("DELETE", f"/api/sessions/{session}")]:
                assert http(guarded.url, path, method, bearer(token)) == (404, {"error": refusal}), (session, path)
            if session != "nothing":  # (a websocket creates a session that is not there)
                with pytest.raises(ServerRefused) as e:
                    talk(guarded.url, session, codes=codes(), token=token)
                assert str(e.value) == f"the server refused the connection: {refusal}"
    finally:
        (guarded.sessions / "broken.json").unlink()
    assert "session mine: bound to another token" in guarded.log()  # the operator is told why
    again = talk(guarded.url, "mine", codes=codes(), token=ALICE)
    assert again.metadata["resumed"] is True and again.metadata["frames"] == 3

    # the commands send the token: --token, or the environment variable
    capsys.readouterr()
    assert main(["sessions", "list", "--url", guarded.url, "--token", BOB, "--json"]) == 0
    assert [r["id"] for r in json.loads(capsys.readouterr().out)["sessions"]] == ["theirs"]
    monkeypatch.setenv(A.TOKEN_ENV, ALICE)
    assert main(["sessions", "show", "mine", "--url", guarded.url, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["frames"] == 5
    monkeypatch.delenv(A.TOKEN_ENV)
    assert main(["sessions", "list", "--url", guarded.url]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "list: a token is required" in err[0], err


def test_the_client_sends_the_token(guarded, tmp_path, capsys, monkeypatch):
    import torch

    from ttt_speech.data.codes import Recording, save_codes

    save_codes(tmp_path / "in.safetensors", Recording(torch.zeros(8, 2, dtype=torch.long)))
    argv = ["client", str(tmp_path / "in.safetensors"), "--out", str(tmp_path / "out.safetensors"), "--url",
            guarded.url, "--fast", "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the server refused the connection: 401: the server asks a token" in err[0], err
    assert not (tmp_path / "out.safetensors").exists()
    assert main([*argv, "--token", ALICE]) == 0
    monkeypatch.setenv(A.TOKEN_ENV, BOB)
    assert main(argv) == 0


def test_a_token_is_generated_and_printed_beyond_loopback(tmp_path):
    with serve(tmp_path, "--host", "0.0.0.0") as server:
        printed = [line for line in server.lines if "token (generated" in line]
        assert len(printed) == 1 and any("WARNING: listening beyond this machine" in line for line in server.lines)
        token = printed[0].rsplit(" ", 1)[1]
        assert http(server.url, "/api/sessions")[0] == 401
        assert http(server.url, "/api/sessions", headers=bearer(token))[0] == 200
        assert any(f"/api/chat?token={token}" in line for line in server.lines)  # for a browser


# ----------------------------------------------------------------------------- the decisions, in-process

@pytest.mark.parametrize("host, generated", [
    ("127.0.0.1", False), ("localhost", False), ("::1", False), ("127.0.0.2", False),
    ("0.0.0.0", True), ("::", True), ("", True), ("192.168.1.7", True), ("gpu-box", True),
])
def test_a_token_is_generated_only_beyond_loopback(host, generated, monkeypatch):
    monkeypatch.delenv(A.TOKEN_ENV, raising=False)
    access, token = server_access(host, None, [], False)
    assert (token is not None) == generated and access.tokens == ((token,) if generated else ())
    monkeypatch.setenv(A.TOKEN_ENV, ALICE)  # given: used, never generated
    assert server_access(host, None, [], False) == (Access((ALICE,)), None)
    assert server_access(host, [BOB], [], True) == (Access((BOB,), bind_sessions=True), None)


@pytest.mark.parametrize("tokens, origins, bind, message", [
    (["short"], [], False, "--token: expected at least 16 characters"),
    (["has space 0123456789"], [], False, "--token: expected"),
    (None, [], True, "--bind-sessions: needs the tokens"),
    (None, ["evil.example"], False, "--allow-origin: expected an origin"),
    (None, ["https://app.example/path"], False, "--allow-origin: expected an origin"),
])
def test_bad_access_options_are_one_line_errors(tokens, origins, bind, message, monkeypatch):
    monkeypatch.delenv(A.TOKEN_ENV, raising=False)
    with pytest.raises(ValueError, match=message) as e:
        server_access("127.0.0.1", tokens, origins, bind)
    assert "\n" not in str(e.value) and "has space" not in str(e.value)  # a token is not echoed


def test_tokens_are_compared_in_constant_time(monkeypatch):
    """Every accepted token is compared with hmac.compare_digest, the right one or not: neither an
    early exit nor `==` tells an attacker how much of a guess was right."""
    calls = []

    def spy(a, b):
        calls.append((a, b))
        return a == b
    monkeypatch.setattr(A.hmac, "compare_digest", spy)
    access = Access((ALICE, BOB))
    assert access.admit(bearer(ALICE), "127.0.0.1:1", None) == ALICE
    assert access.admit({}, "127.0.0.1:1", BOB) == BOB
    with pytest.raises(Refused) as e:
        access.admit(bearer("x" * 20), "127.0.0.1:1", None)
    assert e.value.status == 401 and len(calls) == 6


def test_a_malformed_origin_or_host_is_refused_not_an_error():
    access = Access()
    for headers, host in [({"Origin": "http://["}, "127.0.0.1:1"), ({}, "["), ({}, "")]:
        with pytest.raises(Refused) as e:
            access.admit(headers, host, None)
        assert e.value.status == 403
    assert access.admit({}, "[::1]:8998", None) is None


@pytest.mark.parametrize("header", ["Forwarded", "X-Forwarded-For", "X-Forwarded-Host", "X-Real-IP", "x-real-ip"])
def test_a_tokenless_server_refuses_what_a_proxy_forwards(header):
    """nginx forwards `Host: $proxy_host` (127.0.0.1:PORT) by default: the Host check alone would
    let anyone the proxy serves use a tokenless server. Its proxy headers are refused instead."""
    with pytest.raises(Refused) as e:
        Access().admit({header: "203.0.113.9"}, "127.0.0.1:8998", None)
    reason = e.value.reason
    assert e.value.status == 403 and header.lower() in reason.lower() and "give it a token" in reason, reason
    assert "\n" not in reason
    # with a token a proxy in front is the documented setup
    assert Access((ALICE,)).admit({**bearer(ALICE), header: "203.0.113.9"}, "127.0.0.1:8998", None) == ALICE


def test_the_sessions_command_does_not_follow_redirects(capsys):
    """A redirect would carry the token to wherever it points (urllib re-sends Authorization to any
    host): it is a one-line error naming the URL and the status, and the target gets nothing."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    seen = []

    class Target(BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append(self.headers.get("Authorization"))
            body = json.dumps({"sessions": [], "live": None}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    class Redirect(Target):
        def do_GET(self):
            self.send_response(302)
            self.send_header("Location", f"http://127.0.0.1:{target.server_port}/api/sessions")
            self.send_header("Content-Length", "0")
            self.end_headers()

    target, redirect = ThreadingHTTPServer(("127.0.0.1", 0), Target), ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    for server in (target, redirect):
        threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{redirect.server_port}"
        assert main(["sessions", "list", "--url", url, "--token", ALICE]) == 2
    finally:
        for server in (target, redirect):
            server.shutdown()
            server.server_close()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{url}/api/sessions answered 302" in err[0], err
    assert ALICE not in err[0] and seen == []


@pytest.mark.parametrize("host, hostname, url", [
    ("127.0.0.1", "vm", "ws://127.0.0.1:8998/api/chat"),
    ("192.168.1.7", "vm", "ws://192.168.1.7:8998/api/chat"),
    ("gpu-box", "vm", "ws://gpu-box:8998/api/chat"),
    ("fe80::1", "vm", "ws://[fe80::1]:8998/api/chat"),
    ("0.0.0.0", "gpu-box", "ws://gpu-box:8998/api/chat"),
    ("::", "gpu-box", "ws://gpu-box:8998/api/chat"),
    ("", "gpu-box", "ws://gpu-box:8998/api/chat"),
    ("0.0.0.0", "", "ws://HOST:8998/api/chat"),
    ("::", OSError("no name"), "ws://HOST:8998/api/chat"),
])
def test_the_printed_url_is_one_a_client_can_use(host, hostname, url, monkeypatch):
    """0.0.0.0 and :: are no address to connect to: the machine's name instead (else a placeholder,
    said so); an IPv6 literal in brackets."""
    from ttt_speech_apps.serve import server

    def gethostname():
        if isinstance(hostname, Exception):
            raise hostname
        return hostname
    monkeypatch.setattr(server.socket, "gethostname", gethostname)
    got, note = server.client_url(host, 8998)
    assert got == url
    assert ("HOST" in note) == ("HOST" in url) and (note == "") == (host not in ("0.0.0.0", "::", ""))
