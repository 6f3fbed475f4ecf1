"""The one spelling of "a JSON document" for the whole package.

A parsed body (``json.loads`` of what a client sent, a guest's reply) is a :data:`JsonValue`:
code narrows it with ``isinstance`` before using it, so a wrong shape is a 400 or an error
message and never an ``AttributeError`` deep inside. Bodies we build are :data:`JsonObject`.
Defined here once so modules do not grow their own slightly different aliases.
"""

from __future__ import annotations

from typing import TypeAlias

JsonValue: TypeAlias = "bool | int | float | str | list[JsonValue] | dict[str, JsonValue] | None"
"""Whatever ``json.loads`` can return (and ``json.dumps`` accepts without a ``default``)."""

JsonObject: TypeAlias = "dict[str, JsonValue]"
"""A JSON object: what the HTTP APIs answer and what a request body must be."""
