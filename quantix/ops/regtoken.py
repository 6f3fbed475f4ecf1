"""The one-hour host registration token of the control plane's "Add host" pull flow.

An operator mints it on the host (``quantix-nodectl registration-token``) and types it into the
control plane, which then reads ``registration/token`` and ``registration/discovery`` from the
node with it as a Bearer token. Upstream lets anyone who reaches 8443 mint one over HTTP; here
minting is local only: the command writes ``<state_dir>/registration-token.json`` (0600, in the
0700 state dir, so only root or the daemon's user can), and the daemon reads that file on every
check, so a token minted while the daemon runs is valid at once and survives restarts.

Blocking (file I/O): call from a worker thread.
"""

from __future__ import annotations

import datetime
import hmac
import json
import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path

import attrs

from quantix import state
from quantix.util.files import atomic_write

FILE_NAME = "registration-token.json"
TTL_SECONDS = 3600
ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"  # RFC 4648 base32: no 0/O or 1/I confusion
_MAX_FILE = 4096


class TokenError(Exception):
    """Why a presented token is refused; ``code`` is the JSON ``error`` value."""

    code = "invalid_token"
    status = 401


class NoToken(TokenError):
    code = "no_token"
    status = 404


class TokenExpired(TokenError):
    code = "token_expired"


class InvalidToken(TokenError):
    code = "invalid_token"


@attrs.frozen
class Token:
    token: str
    created_at: float  # unix seconds
    expires_at: float

    def expires_in(self, now: float) -> int:
        return max(0, int(self.expires_at - now))


def new_token_text() -> str:
    """``QUANTIX-XXXX-XXXX-XXXX`` from the base32 alphabet (60 random bits)."""
    groups = ("".join(secrets.choice(ALPHABET) for _ in range(4)) for _ in range(3))
    return "QUANTIX-" + "-".join(groups)


def rfc3339(stamp: float) -> str:
    return datetime.datetime.fromtimestamp(int(stamp), datetime.UTC).isoformat().replace("+00:00", "Z")


def _path(state_dir: str) -> Path:
    return Path(state_dir) / FILE_NAME


def mint(state_dir: str, now: Callable[[], float] = time.time, ttl: int = TTL_SECONDS) -> Token:
    """Replace any previous token with a new one valid for ``ttl`` seconds."""
    created = now()
    tok = Token(new_token_text(), created, created + ttl)
    folder = state.ensure_dir(state_dir)
    body = json.dumps({"token": tok.token, "createdAt": tok.created_at, "expiresAt": tok.expires_at})
    atomic_write(folder / FILE_NAME, body + "\n", mode=0o600)
    return tok


def current(state_dir: str) -> Token | None:
    """The stored token, expired or not; None when there is none or the file is unreadable."""
    try:
        with open(_path(state_dir), encoding="utf-8") as fh:
            data = json.loads(fh.read(_MAX_FILE))
        return Token(str(data["token"]), float(data["createdAt"]), float(data["expiresAt"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def bearer(header: str | bytes | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header value, else None."""
    if isinstance(header, bytes):
        header = header.decode("latin-1")
    if not header:
        return None
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


def check(state_dir: str, presented: str | None, now: Callable[[], float] = time.time) -> Token:
    """The valid token when ``presented`` matches it; raises :class:`TokenError` subclasses.

    No token minted → NoToken (404, which the control plane reports as "token missing");
    expired → TokenExpired; absent or different → InvalidToken. Compared in constant time.
    """
    tok = current(state_dir)
    if tok is None:
        raise NoToken("no registration token has been generated on this host")
    if now() >= tok.expires_at:
        raise TokenExpired("the registration token has expired; generate a new one on the host")
    if presented is None or not hmac.compare_digest(presented.encode(), tok.token.encode()):
        raise InvalidToken("the registration token does not match")
    return tok


def remove(state_dir: str) -> None:
    """Forget the token (after use, or to revoke it)."""
    try:
        os.unlink(_path(state_dir))
    except FileNotFoundError:
        pass
