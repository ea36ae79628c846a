"""Who may use the server (docs/serve.md "Access"): a token on every route, an Origin allow-list,
a Host check where no token is asked, sessions bound to the token that created them.

- Token: `Authorization: Bearer TOKEN` on every route; on `/api/chat` also `?token=TOKEN` (a
  browser's websocket cannot set headers). Compared in constant time. A server that listens beyond
  loopback always asks one (given, or generated at start and printed); one on loopback asks one
  only when given: then any process of this machine may use it, as moshi's server.
- Origin: a browser sends it with every cross-site request, and a page of any site may send a
  body-less POST, a DELETE (after a preflight this server never answers) or open a websocket
  without the user's consent. A request whose Origin is neither the server's own (the Host it was
  sent to) nor one of `--allow-origin` is refused; clients that are not browsers send none.
- Host: a tokenless server answers only requests addressed to a loopback name, or a page of
  another site could rebind its own name to 127.0.0.1 (DNS rebinding) and be "same origin".
- Proxy headers: a reverse proxy sends its own Host (nginx's default is 127.0.0.1:PORT), so the
  Host check cannot tell that a request came through one; a tokenless server refuses any request
  that carries what proxies add (`PROXY_HEADERS`). Behind a proxy, a token is the protection.

Only the standard library: the command tree imports this module to build its options.
"""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import re
import secrets
from dataclasses import dataclass
from typing import Mapping
from urllib.parse import urlsplit

TOKEN_ENV = "TTT_SPEECH_TOKEN"
TOKEN_PATTERN = re.compile(r"[A-Za-z0-9._~-]{16,}")  # URL-safe as is: the same text in a header or a query
TOKEN_RULE = ("at least 16 characters of letters, digits, '.', '_', '~' or '-' "
              "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')")
TOKEN_HINT = f"give it with --token or the environment variable {TOKEN_ENV}"
CHAT_PATH = "/api/chat"
# what reverse proxies add (RFC 7239's and the de-facto ones nginx, Caddy, Traefik, Apache send)
PROXY_HEADERS = ("Forwarded", "X-Forwarded-For", "X-Forwarded-Host", "X-Real-IP")


class Refused(Exception):
    """A request the server does not serve: its HTTP status and a one-line reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


def check_token(token: str, what: str) -> str:
    if not TOKEN_PATTERN.fullmatch(token):
        raise ValueError(f"{what}: expected {TOKEN_RULE}; the value given is not (not shown: it is a secret)")
    return token


def check_origin(origin: str) -> str:
    """`scheme://host[:port]` of an --allow-origin value, lower-cased (as browsers send it)."""
    parts = urlsplit(origin.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.path not in ("", "/") \
            or parts.query or parts.fragment:
        raise ValueError(f"--allow-origin: expected an origin such as https://app.example or "
                         f"http://localhost:3000 (scheme, host, optional port; no path), got {origin!r}")
    return f"{parts.scheme}://{parts.netloc}".lower()


def is_loopback(host: str) -> bool:
    """Whether `host` (an address to listen on, or a Host header's name) is this machine only.
    Names other than `localhost` count as not: what they resolve to can change."""
    name = host.strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def token_owner(token: str) -> str:
    """What a session record keeps of the token that created it: its sha256, never the token."""
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Access:
    """The server's access rules (built by `server_access`)."""

    tokens: tuple[str, ...] = ()             # accepted tokens; none: no token asked (loopback only)
    origins: frozenset[str] = frozenset()    # browser Origins allowed besides the server's own
    bind_sessions: bool = False              # a session is only for the token that created it

    def admit(self, headers: Mapping[str, str], host: str, query_token: str | None) -> str | None:
        """The token the request presents (None where none is asked); Refused (403, 401) otherwise.
        `host`: the request's Host header; `query_token`: its ?token= where the route takes one."""
        origin = headers.get("Origin")
        if origin is not None and origin.lower() not in self.origins and _netloc(origin) != host.lower():
            raise Refused(403, f"Origin {origin}: not this server's own and not allowed (--allow-origin)")
        if not self.tokens:
            present = {name.lower() for name in headers}
            forwarded = next((name for name in PROXY_HEADERS if name.lower() in present), None)
            if forwarded is not None:
                raise Refused(403, f"{forwarded}: this server has no token and answers no request that came "
                                   f"through a proxy; behind a proxy, give it a token (--token or {TOKEN_ENV})")
            if not is_loopback(_netloc(f"//{host}", hostname=True)):
                raise Refused(403, f"Host {host}: this server has no token and answers only requests "
                                   "addressed to localhost, 127.0.0.1 or [::1]")
            return None
        given = _bearer(headers.get("Authorization")) or query_token or ""
        # every token compared, in constant time: neither the match nor the time tells which
        matches = [t for t in self.tokens if hmac.compare_digest(t.encode(), given.encode())]
        if not matches:
            raise Refused(401, f"a token is required and none or a wrong one was given ({TOKEN_HINT}: "
                               "Authorization: Bearer TOKEN, or ?token=TOKEN on /api/chat)")
        return matches[0]

    def owner(self, token: str | None) -> str | None:
        """The owner a session created with `token` gets (None: sessions are not bound)."""
        return token_owner(token) if self.bind_sessions and token is not None else None

    @staticmethod
    def may_use(record: dict | None, owner: str | None) -> bool:
        """Whether a client whose owner is `owner` may use the session of `record` (None: a new one).
        Without binding (`owner` None) every admitted client may; an unbound session is for all."""
        bound = record.get("owner") if record else None
        return owner is None or bound is None or hmac.compare_digest(str(bound).encode(), owner.encode())


def session_refusal(session: str) -> str:
    """What a client is told of a session it may not use (another token's; on a server that binds
    sessions, one whose record is unreadable, so whose it is is unknown), on every route: what a
    session that does not exist gets over HTTP. Neither its owner nor that it is bound is said."""
    return f"no session {session!r} for this client"


def _netloc(url: str, hostname: bool = False) -> str:
    """`url`'s host[:port] (lower-cased), or its host name alone; "" when it has none or is malformed."""
    try:
        parts = urlsplit(url)
        return (parts.hostname if hostname else parts.netloc.lower()) or ""
    except ValueError:  # e.g. an unclosed "[" of an IPv6 address
        return ""


def _bearer(value: str | None) -> str | None:
    if value is None:
        return None
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


def server_access(host: str, tokens: list[str] | None, origins: list[str], bind_sessions: bool
                  ) -> tuple[Access, str | None]:
    """The access rules of `ttt-speech serve` and the token it generated (None: none generated).
    `tokens`: --token's values; none given: the environment variable's; none there either: a
    generated one beyond loopback, no token on loopback."""
    given = [check_token(t, "--token") for t in tokens or []]
    if not given and os.environ.get(TOKEN_ENV):
        given = [check_token(os.environ[TOKEN_ENV], TOKEN_ENV)]
    if bind_sessions and not given:
        raise ValueError(f"--bind-sessions: needs the tokens sessions are bound to ({TOKEN_HINT}; a generated "
                         "token changes at every start, and the sessions bound to it would be lost)")
    generated = None if given or is_loopback(host) else secrets.token_urlsafe(32)
    access = Access(tuple(given) or ((generated,) if generated else ()),
                    frozenset(check_origin(o) for o in origins), bind_sessions)
    return access, generated


def client_token(given: str | None) -> str | None:
    """The token a client sends: --token, else the environment variable's, else none."""
    if given is not None:
        return check_token(given, "--token")
    env = os.environ.get(TOKEN_ENV)
    return check_token(env, TOKEN_ENV) if env else None
