"""Dashboard sessions: a signed cookie, so that any daemon behind a load balancer accepts the
sessions of every other, and nothing is stored. The cookie holds the role (admin or viewer), an
expiry and a nonce, signed with a key derived from both tokens: changing either signs every
session out. The key is derived with scrypt, so that a viewer, who holds signed cookies and
CSRF tokens, cannot try guesses at the admin token offline at the speed of a hash. The CSRF
token of a session is derived from its nonce."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass
from typing import Literal

Role = Literal["admin", "viewer"]
COOKIE = "stoker_session"
LIFETIME = 12 * 3600  # seconds a sign-in lasts


@dataclass(frozen=True)
class Session:
    role: Role
    expires: int
    nonce: str

    @property
    def can_act(self) -> bool:
        return self.role == "admin"


class Sessions:
    """Issues and checks session cookies and their CSRF tokens."""

    def __init__(self, admin_token: str, viewer_token: str | None) -> None:
        self._admin = admin_token.encode()
        self._viewer = viewer_token.encode() if viewer_token else None
        salt = b"stoker dashboard session " + hashlib.sha256(self._viewer or b"").digest()
        self._key = hashlib.scrypt(self._admin, salt=salt, n=2**14, r=8, p=1, dklen=32)

    def sign_in(self, token: str) -> Role | None:
        """The role a token gives, or None; the comparisons take the same time whatever the
        guess, and both are always made."""
        given = token.strip().encode("utf-8", "replace")
        is_admin = hmac.compare_digest(given, self._admin)
        is_viewer = self._viewer is not None and hmac.compare_digest(given, self._viewer)
        if is_admin:
            return "admin"
        return "viewer" if is_viewer else None

    def issue(self, role: Role, now: float | None = None) -> tuple[Session, str]:
        session = Session(role, int((now or time.time()) + LIFETIME), secrets.token_hex(16))
        body = json.dumps([session.role, session.expires, session.nonce]).encode()
        payload = base64.urlsafe_b64encode(body).decode().rstrip("=")
        return session, f"{payload}.{self._sign(payload)}"

    def read(self, cookie: str | None, now: float | None = None) -> Session | None:
        """The session a cookie carries, or None when it is absent, forged or expired."""
        if not cookie or "." not in cookie:
            return None
        payload, _, signature = cookie.rpartition(".")
        if not _same(signature, self._sign(payload)):
            return None
        try:
            role, expires, nonce = json.loads(base64.urlsafe_b64decode(payload + "=" * 4))
        except (ValueError, TypeError):
            return None
        if role not in ("admin", "viewer") or not isinstance(expires, int):
            return None
        if role == "viewer" and self._viewer is None:
            return None  # the viewer token was removed: its sessions end
        if expires < (now or time.time()):
            return None
        return Session(role, expires, str(nonce))

    def csrf(self, session: Session) -> str:
        return self._sign(f"csrf:{session.nonce}")

    def csrf_ok(self, session: Session, given: str | None) -> bool:
        return given is not None and _same(given, self.csrf(session))

    def _sign(self, text: str) -> str:
        return hmac.new(self._key, text.encode(), hashlib.sha256).hexdigest()


def _same(given: str, expected: str) -> bool:
    """Constant-time equality of what a client sent (any text) and what we expect."""
    return hmac.compare_digest(given.encode("utf-8", "replace"), expected.encode())
