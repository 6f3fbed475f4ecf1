"""Types of decoded JSON documents, for code that reads or builds them.

``json.loads`` (and ``yaml.safe_load``, whose safe subset decodes to the same shapes) returns
untyped values; annotate them with :data:`JsonValue` (or :data:`JsonObject` for a document whose
top level must be an object) and narrow with ``isinstance`` before use, as hostile input needs
anyway. Values merely passed on as data can be ``Mapping[str, object]``.
"""

from __future__ import annotations

from typing import TypeAlias

#: A JSON value of any kind: what ``json.loads`` can return.
JsonValue: TypeAlias = bool | int | float | str | list["JsonValue"] | dict[str, "JsonValue"] | None
#: A JSON object (``{...}``) with values of any JSON type.
JsonObject: TypeAlias = dict[str, JsonValue]
