"""Bearer-token authentication (and the web UI's session cookie), the request body cap, the
loopback rule and the Host check of a server without a token."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import os
import time
from pathlib import Path
from urllib.parse import urlsplit

from fastapi import HTTPException, Request, status
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

TOKEN_ENV = "DMSAE_API_TOKEN"


def load_token(token_file: str | Path | None = None) -> str | None:
    """The API token: from ``token_file`` if given, else ``$DMSAE_API_TOKEN``; None if unset."""
    if token_file is not None:
        token = Path(token_file).read_text().strip()
        if not token:
            raise ValueError(f"token file {token_file} is empty")
        return token
    return os.environ.get(TOKEN_ENV, "").strip() or None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a hostname we would have to resolve: not provably loopback


# The web UI (api/ui.py): a browser cannot add an Authorization header to a page load or to an
# EventSource, so a login form trades the token for this cookie (HttpOnly, SameSite=Strict).
SESSION_COOKIE = "dmsae_session"
SESSION_TTL_S = 7 * 24 * 3600
# Requests that change something and authenticate by the cookie must carry this header: a page
# of another origin cannot add it without a CORS preflight, which this server never grants.
UI_HEADER, UI_HEADER_VALUE = "X-Requested-With", "dmsae-ui"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def same_origin(request: Request) -> bool:
    """False for a browser request another origin sent: its ``Origin`` (or, without one, its
    ``Sec-Fetch-Site``) names another site than the ``Host`` it was sent to. Clients that are
    not browsers send neither header and pass."""
    origin = request.headers.get("origin")
    if origin is None:
        return request.headers.get("sec-fetch-site") in (None, "same-origin", "none")
    host = request.headers.get("host", "").strip().lower()
    return origin != "null" and urlsplit(origin.strip().lower()).netloc == host


def _forbidden(detail: str) -> HTTPException:
    return HTTPException(status.HTTP_403_FORBIDDEN, detail)


class BearerAuth:
    """FastAPI dependency: 401 without a bearer token, 403 with a wrong one. No token
    configured means no authentication (the server then binds loopback only); a browser's
    request of another origin that would change something is still refused (403).

    Without an ``Authorization`` header, a valid UI session cookie (``session_cookie``) also
    authenticates; a request that changes something then needs ``X-Requested-With: dmsae-ui``
    and the same origin (CSRF)."""

    def __init__(self, token: str | None) -> None:
        self._token = token.encode() if token else None

    @property
    def open(self) -> bool:
        """No token configured: nothing to log in with."""
        return self._token is None

    def check_token(self, given: str) -> bool:
        return self._token is not None and hmac.compare_digest(given.strip().encode(), self._token)

    def _sign(self, expires: int) -> str:
        assert self._token is not None
        msg = f"dmsae-ui-session-v1:{expires}".encode()
        return hmac.new(self._token, msg, hashlib.sha256).hexdigest()

    def session_cookie(self, now: float | None = None) -> str:
        """A cookie value valid for ``SESSION_TTL_S``: the expiry time and an HMAC of it keyed
        by the token (so it is not the token, and changing the token ends every session)."""
        expires = int(time.time() if now is None else now) + SESSION_TTL_S
        return f"{expires}.{self._sign(expires)}"

    def session_valid(self, value: str | None) -> bool:
        if self._token is None or not value:
            return False
        expires, _, sig = value.partition(".")
        if not expires.isdigit() or int(expires) < time.time():
            return False
        return hmac.compare_digest(sig.encode(), self._sign(int(expires)).encode())

    def __call__(self, request: Request) -> None:
        changes = request.method not in SAFE_METHODS
        if self._token is None:
            if changes and not same_origin(request):
                raise _forbidden("cross-origin request refused")
            return
        header = request.headers.get("authorization")
        if header is None and self.session_valid(request.cookies.get(SESSION_COOKIE)):
            if changes and (request.headers.get(UI_HEADER) != UI_HEADER_VALUE
                            or not same_origin(request)):
                raise _forbidden(
                    f"a request authenticated by the UI session cookie that changes something "
                    f"needs the header {UI_HEADER}: {UI_HEADER_VALUE} and the same origin"
                )
            return
        scheme, _, given = (header or "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED,
                "missing bearer token",
                headers={"WWW-Authenticate": "Bearer"},
            )
        if not self.check_token(given):
            raise _forbidden("invalid token")


LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")


def host_name(value: str) -> str:
    """The name part of a Host header or of an --allowed-host value, lowercase, without the
    port and a trailing dot; IPv6 addresses in brackets (``[::1]``)."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        return value[: end + 1] if end > 0 else value
    if value.count(":") > 1:  # a bare IPv6 address, as an --allowed-host value
        return f"[{value}]"
    return value.partition(":")[0].rstrip(".")


class HostCheckMiddleware:
    """400 for a request whose Host header is not localhost, 127.0.0.1, [::1] or one of
    ``allowed``. Installed when the server has no token: a loopback server without
    authentication must not answer pages of another site whose name was rebound to
    127.0.0.1 (DNS rebinding)."""

    def __init__(self, app: ASGIApp, allowed: list[str] | tuple[str, ...] = ()) -> None:
        self.app = app
        self.allowed = frozenset(host_name(h) for h in (*LOOPBACK_HOSTS, *allowed))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            hosts = [v for k, v in scope.get("headers", []) if k == b"host"]
            name = host_name(hosts[0].decode("latin-1")) if len(hosts) == 1 else ""
            if name not in self.allowed:
                if scope["type"] == "http":
                    await _reply(send, 400, "invalid Host header")
                else:
                    await send({"type": "websocket.close", "code": 1008})
                return
        await self.app(scope, receive, send)


class _TooLarge(StarletteHTTPException):
    # An HTTPException so that FastAPI's body parsing passes it on as a 413 (it turns any
    # other error raised while reading the body into a 400).
    def __init__(self, max_bytes: int) -> None:
        super().__init__(413, f"request body over {max_bytes} bytes")


class BodyLimitMiddleware:
    """413 for a request body over ``max_bytes``: by Content-Length up front, and by counting
    for chunked bodies (the handler then never sees the rest)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    await _reply(send, 400, "invalid Content-Length")
                    return
                if length > self.max_bytes:
                    await _reply(send, 413, f"request body over {self.max_bytes} bytes")
                    return
        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _TooLarge(self.max_bytes)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _TooLarge:
            if not started:
                await _reply(send, 413, f"request body over {self.max_bytes} bytes")


async def _reply(send: Send, code: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": code,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
