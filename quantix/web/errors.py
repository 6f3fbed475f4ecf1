"""The JSON error every listener answers: ``{"error": "<snake_code>", "message": "<text>"}``.

The control plane forwards status and body unchanged (research note B.0), and treats a body that
starts with ``<`` as old firmware, so no error may ever come out as Twisted's HTML page.
"""

from __future__ import annotations

import json


class HttpError(Exception):
    """Raised by a route (or the plumbing) to answer ``status`` with the JSON error shape."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}

    def body(self) -> dict[str, str]:
        return {"error": self.code, "message": self.message}


def encode(body: object) -> bytes:
    """Compact UTF-8 JSON; integers stay JSON numbers (no protobuf stringification). ``body`` is
    whatever a route answered: JSON values, dicts and lists of them (``TypeError`` otherwise)."""
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def not_found(what: str = "no such route") -> HttpError:
    return HttpError(404, "not_found", what)


def bad_request(message: str, code: str = "invalid_request") -> HttpError:
    return HttpError(400, code, message)
