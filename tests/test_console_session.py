"""Console sessions: signed, expiring, bound to the admin key; CSRF tokens per session."""

from __future__ import annotations

from gateway.console.session import Sessions, csrf_ok


class Clock:
    def __init__(self) -> None:
        self.now = 1_763_856_000.0

    def __call__(self) -> float:
        return self.now


def test_a_cookie_holds_a_signed_session_that_expires() -> None:
    clock = Clock()
    sessions = Sessions("admin-secret", max_age=3600, clock=clock)
    session, cookie = sessions.issue()
    assert "admin-secret" not in cookie
    assert sessions.read(cookie) == session
    clock.now += 3599
    assert sessions.read(cookie) == session
    clock.now += 1
    assert sessions.read(cookie) is None  # expired
    clock.now -= 7200
    assert sessions.read(cookie) is None  # from the future: not ours


def test_only_this_admin_key_signs_sessions() -> None:
    _, cookie = Sessions("admin-secret").issue()
    assert Sessions("another-admin-key").read(cookie) is None  # a new key ends sessions
    tampered = cookie.replace(cookie.split(".")[1], "1", 1)
    assert Sessions("admin-secret").read(tampered) is None
    for junk in ("", "no-dots", "a.b.c", None):
        assert Sessions("admin-secret").read(junk) is None


def test_the_csrf_token_belongs_to_one_session() -> None:
    sessions = Sessions("admin-secret")
    one, cookie = sessions.issue()
    two, _ = sessions.issue()
    assert one.csrf != two.csrf and len(one.csrf) == 64
    again = sessions.read(cookie)
    assert again is not None and csrf_ok(again, one.csrf)
    assert not csrf_ok(again, two.csrf) and not csrf_ok(again, None)
    assert not csrf_ok(again, "")


def test_the_admin_key_is_compared_whole() -> None:
    sessions = Sessions("admin-secret")
    assert sessions.admits("admin-secret")
    for guess in ("", "admin", "admin-secret ", "ADMIN-SECRET"):
        assert not sessions.admits(guess)
