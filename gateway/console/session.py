"""Console sessions: sign-in with the admin key, a signed cookie with an expiry, and a CSRF
token bound to the session.

The cookie holds a random session id and its issue time, signed with a key derived from the
admin key (HMAC-SHA256, itsdangerous), never the admin key itself: every replica accepts it,
and changing the admin key ends every session. It is HttpOnly (no script reads it),
SameSite=Strict (no other site's page sends it) and Secure over HTTPS. Each form carries the
CSRF token, an HMAC of the session id, so a request that only has the cookie changes nothing.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from itsdangerous import BadSignature, Signer
from starlette.requests import Request
from starlette.responses import Response

COOKIE = "gw_console"
SESSION_SECONDS = 8 * 3600


@dataclass(frozen=True, slots=True)
class Session:
    id: str
    issued: int  # unix seconds
    csrf: str  # the token every form of this session carries


class Sessions:
    def __init__(self, admin_key: str, *, max_age: int = SESSION_SECONDS,
                 clock: Callable[[], float] = time.time) -> None:
        self._admin = admin_key.encode()
        self._key = hmac.new(self._admin, b"rag-gateway console session",
                             hashlib.sha256).digest()
        self._signer = Signer(self._key, salt="console-session",
                              digest_method=hashlib.sha256)
        self.max_age = max_age
        self.clock = clock

    def admits(self, presented: str) -> bool:
        """Whether `presented` is the admin key (constant time)."""
        return hmac.compare_digest(presented.encode(), self._admin)

    def _csrf(self, session_id: str) -> str:
        return hmac.new(self._key, b"csrf\0" + session_id.encode(), hashlib.sha256).hexdigest()

    def issue(self) -> tuple[Session, str]:
        """A new session and its cookie value."""
        session_id, issued = secrets.token_urlsafe(18), int(self.clock())
        value = self._signer.sign(f"{session_id}.{issued}").decode()
        return Session(session_id, issued, self._csrf(session_id)), value

    def read(self, cookie: str | None) -> Session | None:
        """The session of a cookie value: None when unsigned, forged or expired."""
        if not cookie:
            return None
        try:
            session_id, _, issued = self._signer.unsign(cookie).decode().rpartition(".")
            started = int(issued)
        except (BadSignature, ValueError):
            return None
        if not session_id or not 0 <= self.clock() - started < self.max_age:
            return None
        return Session(session_id, started, self._csrf(session_id))

    def set_cookie(self, response: Response, value: str, *, secure: bool, path: str) -> None:
        response.set_cookie(COOKIE, value, max_age=self.max_age, path=path, secure=secure,
                            httponly=True, samesite="strict")


def csrf_ok(session: Session, presented: str | None) -> bool:
    return hmac.compare_digest(session.csrf.encode(), (presented or "").encode())


def same_origin(request: Request) -> bool:
    """False when the browser says the request comes from a page of another host (a
    request without ``Origin`` is not a cross-site form post of a current browser)."""
    origin = request.headers.get("origin")
    if origin is None:
        return True
    return urlsplit(origin).netloc == request.headers.get("host", "")
