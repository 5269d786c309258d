"""api/security.py without a server: the token's sources, the loopback rule, Host names, the UI
session cookie, the bearer and CSRF rules, and the two ASGI middlewares (Host check, body cap)
on a bare ASGI app. The same rules in the served app: test_api.py (tokens, the Host check of
an open server) and test_ui.py (the session cookie and CSRF through /ui and /v1)."""

from __future__ import annotations

import asyncio
import json

import pytest
from fastapi import HTTPException
from starlette.requests import Request

from api.security import (
    SESSION_COOKIE,
    SESSION_TTL_S,
    TOKEN_ENV,
    UI_HEADER,
    UI_HEADER_VALUE,
    BearerAuth,
    BodyLimitMiddleware,
    HostCheckMiddleware,
    host_name,
    is_loopback,
    load_token,
    same_origin,
)

TOKEN = "s3cret-token"


def request(method: str = "GET", host: str = "api:8000", **headers: str) -> Request:
    pairs = [(b"host", host.encode())] + [
        (k.replace("_", "-").lower().encode(), v.encode()) for k, v in headers.items()
    ]
    return Request({"type": "http", "method": method, "path": "/", "headers": pairs})


def test_the_token_comes_from_its_file_else_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    assert load_token() is None
    monkeypatch.setenv(TOKEN_ENV, "  ")
    assert load_token() is None
    monkeypatch.setenv(TOKEN_ENV, " from-env\n")
    assert load_token() == "from-env"
    path = tmp_path / "token"
    path.write_text("from-file\n")
    assert load_token(path) == "from-file"  # the file wins
    path.write_text("\n")
    with pytest.raises(ValueError, match="is empty"):
        load_token(path)


def test_only_provable_loopback_addresses_are_loopback():
    for host in ("localhost", "127.0.0.1", "127.1.2.3", "::1", "[::1]"):
        assert is_loopback(host), host
    for host in ("0.0.0.0", "10.0.0.1", "::", "example.com", "localhost.example", ""):
        assert not is_loopback(host), host


def test_host_names_drop_the_port_case_and_trailing_dot():
    assert host_name("LocalHost:8000") == "localhost"
    assert host_name("example.com.") == "example.com"
    assert host_name(" Evil.Example:80 ") == "evil.example"
    assert host_name("[::1]:8000") == "[::1]" and host_name("[::1]") == "[::1]"
    assert host_name("::1") == "[::1]"  # a bare IPv6 --allowed-host value


def test_the_session_cookie_is_signed_by_the_token_and_expires():
    auth = BearerAuth(TOKEN)
    now = 2_000_000_000
    cookie = auth.session_cookie(now)
    expires, _, sig = cookie.partition(".")
    assert int(expires) == now + SESSION_TTL_S and TOKEN not in cookie
    assert auth.session_valid(auth.session_cookie())
    assert not auth.session_valid(f"{expires}.{'0' * len(sig)}")  # forged signature
    assert not auth.session_valid(f"{int(expires) + 1}.{sig}")  # a later expiry, same HMAC
    assert not auth.session_valid(auth.session_cookie(0))  # expired long ago
    assert not BearerAuth("another-token").session_valid(auth.session_cookie())
    for bad in (None, "", "x", "abc.def", TOKEN):
        assert not auth.session_valid(bad), bad
    assert not BearerAuth(None).session_valid(cookie) and BearerAuth(None).open
    assert auth.check_token(f" {TOKEN} ") and not auth.check_token("wrong")
    assert not BearerAuth(None).check_token(TOKEN)


def test_same_origin_by_origin_else_sec_fetch_site():
    assert same_origin(request())  # not a browser: neither header
    assert same_origin(request(origin="http://api:8000"))
    assert same_origin(request(origin="HTTP://API:8000"))
    assert not same_origin(request(origin="http://evil.example"))
    assert not same_origin(request(origin="null"))
    assert same_origin(request(sec_fetch_site="same-origin"))
    assert same_origin(request(sec_fetch_site="none"))
    assert not same_origin(request(sec_fetch_site="cross-site"))


def status_of(auth: BearerAuth, req: Request) -> int:
    try:
        auth(req)
    except HTTPException as err:
        return err.status_code
    return 200


def test_bearer_token_and_cookie_rules():
    auth = BearerAuth(TOKEN)
    assert status_of(auth, request()) == 401
    assert status_of(auth, request(authorization="Basic abc")) == 401
    assert status_of(auth, request(authorization="Bearer ")) == 401
    assert status_of(auth, request(authorization="Bearer wrong")) == 403
    assert status_of(auth, request(authorization=f"Bearer {TOKEN}")) == 200
    assert status_of(auth, request("POST", authorization=f"bearer {TOKEN}")) == 200
    cookie = f"{SESSION_COOKIE}={auth.session_cookie()}"
    assert status_of(auth, request(cookie=cookie)) == 200
    assert status_of(auth, request(cookie=f"{SESSION_COOKIE}=forged")) == 401
    # A change authenticated by the cookie needs the UI's header and the same origin.
    ui = {UI_HEADER: UI_HEADER_VALUE}
    assert status_of(auth, request("POST", cookie=cookie)) == 403
    assert status_of(auth, request("POST", cookie=cookie, **ui)) == 200
    assert status_of(auth, request("POST", cookie=cookie, origin="http://evil.example",
                                   **ui)) == 403
    # No token configured: open, but a browser of another origin changes nothing.
    open_auth = BearerAuth(None)
    assert status_of(open_auth, request("POST")) == 200
    assert status_of(open_auth, request("GET", origin="http://evil.example")) == 200
    assert status_of(open_auth, request("POST", origin="http://evil.example")) == 403


def call(app, headers: list[tuple[bytes, bytes]], chunks=(b"",)) -> tuple[int, dict]:
    """One HTTP request through an ASGI app: its status and JSON body."""
    sent: list[dict] = []
    messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
                for i, c in enumerate(chunks)]

    async def receive() -> dict:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/", "headers": headers}
    asyncio.run(app(scope, receive, send))
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return sent[0]["status"], json.loads(body)


async def echo(scope, receive, send) -> None:
    """Reads the whole body, answers its length."""
    size = 0
    while True:
        message = await receive()
        size += len(message.get("body", b""))
        if not message.get("more_body"):
            break
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": json.dumps({"size": size}).encode()})


def test_the_host_check_answers_only_loopback_and_allowed_names():
    app = HostCheckMiddleware(echo, allowed=["dmsae.internal"])
    for host in (b"localhost", b"127.0.0.1:8000", b"[::1]:8000", b"DMSAE.internal:80"):
        assert call(app, [(b"host", host)])[0] == 200, host
    for headers in ([(b"host", b"evil.example")], [(b"host", b"127.0.0.2")], [],
                    [(b"host", b"localhost"), (b"host", b"evil.example")]):
        assert call(app, headers) == (400, {"detail": "invalid Host header"}), headers


def test_the_body_cap_by_length_and_by_counting():
    app = BodyLimitMiddleware(echo, max_bytes=10)
    assert call(app, [(b"content-length", b"10")], [b"x" * 10]) == (200, {"size": 10})
    assert call(app, [(b"content-length", b"11")], [b"x" * 11])[0] == 413
    assert call(app, [(b"content-length", b"ten")])[0] == 400
    assert call(app, [], [b"x" * 6, b"x" * 4]) == (200, {"size": 10})  # chunked, at the cap
    status, body = call(app, [], [b"x" * 6, b"x" * 6])  # chunked, over it
    assert status == 413 and body == {"detail": "request body over 10 bytes"}
