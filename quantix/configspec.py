"""Every configuration key's type and range, declared where the key is declared.

A key of the attrs model in :mod:`quantix.config` is declared with one of the field helpers
here instead of a bare default::

    @attrs.frozen
    class HttpConfig:
        listen: str | None = address("0.0.0.0:8080", optional=True)
        max_body: int = integer(1 << 20, min=1024, max=1 << 30)

The helper records a :class:`Spec` in the field's metadata (``SPEC``) and installs a validator
built from it, so the same rules hold for the YAML file, ``QUANTIX_*`` variables, flags and code
that builds a config directly. :func:`quantix.config.build` uses the spec to read each value:
values from the YAML file must already have the right type (``buffer_size: "100"`` is an error,
not 100), while environment variables and flags are text and are parsed.

``tests/test_config.py`` walks every key of ``etc/limiquantix/node.yaml`` and feeds it a value of
the wrong type and every out-of-range sample its spec offers (:meth:`Spec.wrong_type`,
:meth:`Spec.out_of_range`); a key declared without a helper fails that walk, naming the key.
"""

from __future__ import annotations

import copy
import ipaddress
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Generic, Protocol, TypeVar

import attrs

#: Field metadata key under which the spec is stored.
SPEC = "quantix.spec"
#: Words that turn an optional listener off (``--metrics-listen off``); YAML's ``off`` is False.
OFF_WORDS = ("", "off")
NULL_WORDS = ("", "null", "none")


T = TypeVar("T")
#: What a field helper returns: the field's type, for the attrs class body.
F = TypeVar("F")
#: Text keys: a ``None`` default makes the field ``str | None``.
OptStr = TypeVar("OptStr", str, "str | None")


class Text(str):
    """A value that arrived as text (environment variable or flag) and is parsed, not checked."""


def _show(value: object) -> str:
    kind = type(value).__name__ if not isinstance(value, Text) else "text"
    return f"{value!r} ({'a ' + kind if kind != 'NoneType' else 'null'})"


class Declared(Protocol):
    """What the loader and the walk test use of a declared key's spec, whatever its type."""

    def read(self, value: object) -> object: ...

    def wrong_type(self) -> object: ...

    def out_of_range(self) -> list[object]: ...

    def describe(self) -> str: ...


@attrs.frozen
class Spec(Generic[T]):
    """Type and range of one key, whose values are ``T``. Subclasses implement :meth:`parse`
    and :meth:`check`."""

    optional: bool = False
    #: ``"an integer"``: what :meth:`parse` expects, for messages.
    what: str = "a value"

    def read(self, value: object) -> T | None:
        """Parse and range-check one value; raises ValueError with a one-line reason."""
        if value is None or (
            isinstance(value, Text) and self.optional and value.strip().lower() in NULL_WORDS
        ):
            if self.optional:
                return None
            raise ValueError("a value is required")
        parsed = self.parse(value)
        if parsed is not None:
            self.check(parsed)
        return parsed

    def parse(self, value: object) -> T:
        """The value in this key's type: native values must already have it, :class:`Text` is
        converted. Raises ValueError ``expected ...``."""
        raise NotImplementedError

    def check(self, value: T) -> None:
        """Raise ValueError when ``value`` (already of the right type) is out of range."""

    def wrong_type(self) -> object:
        """A YAML value of the wrong type for this key."""
        raise NotImplementedError

    def out_of_range(self) -> list[object]:
        """YAML values of the right type that the range refuses (empty only for booleans)."""
        raise NotImplementedError

    def describe(self) -> str:
        return self.what

    def _expected(self, value: object) -> ValueError:
        hint = " (write it without quotes)" if isinstance(value, str) and not isinstance(value, Text) else ""
        return ValueError(f"expected {self.what}, got {_show(value)}{hint}")


@attrs.frozen
class Integer(Spec[int]):
    min: int = 0
    max: int = 0
    what: str = "an integer"

    def parse(self, value: object) -> int:
        if isinstance(value, Text):
            try:
                return int(value.strip())
            except ValueError:
                raise self._expected(value) from None
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._expected(value)
        return value

    def check(self, value: int) -> None:
        if not self.min <= value <= self.max:
            raise ValueError(f"must be between {self.min} and {self.max}, got {value}")

    def wrong_type(self) -> object:
        return str(self.min)

    def out_of_range(self) -> list[object]:
        return [self.min - 1, self.max + 1]

    def describe(self) -> str:
        return f"integer {self.min}..{self.max}"


@attrs.frozen
class Number(Spec[float]):
    min: float = 0.0
    max: float = 0.0
    #: ``min`` itself is refused (a timeout of 0 seconds).
    above_min: bool = False
    what: str = "a number"

    def parse(self, value: object) -> float:
        if isinstance(value, Text):
            try:
                value = float(value.strip())
            except ValueError:
                raise self._expected(value) from None
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self._expected(value)
        if not math.isfinite(value):
            raise ValueError(f"expected a finite number, got {value}")
        return float(value)

    def check(self, value: float) -> None:
        low = value <= self.min if self.above_min else value < self.min
        if low or value > self.max:
            lower = f"above {self.min:g}" if self.above_min else f"at least {self.min:g}"
            raise ValueError(f"must be {lower} and at most {self.max:g}, got {value:g}")

    def wrong_type(self) -> object:
        return str(self.max)

    def out_of_range(self) -> list[object]:
        return [self.min if self.above_min else self.min - 1, self.max + 1]

    def describe(self) -> str:
        return f"number {'(' if self.above_min else '['}{self.min:g}, {self.max:g}]"


@attrs.frozen
class Boolean(Spec[bool]):
    what: str = "true or false"

    def parse(self, value: object) -> bool:
        if isinstance(value, Text):
            lowered = value.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise self._expected(value)
        if not isinstance(value, bool):
            raise self._expected(value)
        return value

    def wrong_type(self) -> object:
        return "maybe"

    def out_of_range(self) -> list[object]:
        return []  # true and false are the whole range


@attrs.frozen
class Choice(Spec[str]):
    choices: tuple[str, ...] = ()
    what: str = "a string"

    def parse(self, value: object) -> str:
        if not isinstance(value, str):
            raise self._expected(value)
        return str(value)

    def check(self, value: str) -> None:
        if value not in self.choices:
            raise ValueError(f"must be one of {', '.join(self.choices)}, not {value!r}")

    def wrong_type(self) -> object:
        return 5

    def out_of_range(self) -> list[object]:
        return ["no-such-choice"]

    def describe(self) -> str:
        return " | ".join(self.choices)


@attrs.frozen
class String(Spec[str]):
    """Text of at most ``max_len`` characters, never containing control characters, optionally
    matching ``pattern`` and passing ``validate`` (which raises ValueError)."""

    max_len: int = 255
    min_len: int = 1
    pattern: str | None = None
    #: Extra check, e.g. an address parser; raises ValueError.
    validate: Callable[[str], object] | None = None
    #: An in-type value the range refuses, used by the walk test (besides a too long one).
    bad_sample: str | None = None
    what: str = "a string"
    #: Shown in range errors: ``an absolute path``.
    shape: str = "text"

    def parse(self, value: object) -> str:
        if not isinstance(value, str):
            raise self._expected(value)
        return str(value)

    def check(self, value: str) -> None:
        if not self.min_len <= len(value) <= self.max_len:
            raise ValueError(f"must be {self.shape} of {self.min_len} to {self.max_len} characters")
        if any(ord(c) < 32 or ord(c) == 127 for c in value):
            raise ValueError(f"must be {self.shape} without control characters")
        if self.pattern is not None and not re.fullmatch(self.pattern, value):
            raise ValueError(f"must be {self.shape}, not {value!r}")
        if self.validate is not None:
            try:
                self.validate(value)
            except ValueError as exc:
                raise ValueError(f"must be {self.shape}, not {value!r}: {exc}") from None

    def wrong_type(self) -> object:
        return ["not", "a", "string"]

    def out_of_range(self) -> list[object]:
        samples: list[object] = ["x" * (self.max_len + 1), "bad\nvalue"]
        if self.bad_sample is not None:
            samples.append(self.bad_sample)
        return samples

    def describe(self) -> str:
        return self.shape


@attrs.frozen
class Address(String):
    """``host:port``; an optional one is turned off by null, ``off`` or an empty string."""

    shape: str = "host:port"
    bad_sample: str | None = "localhost:99999"

    def read(self, value: object) -> str | None:
        if self.optional and (
            value is False or (isinstance(value, str) and value.strip().lower() in OFF_WORDS)
        ):
            return None
        return super().read(value)


@attrs.frozen
class Table(Spec[dict[str, str]]):
    """A mapping of strings to strings (labels)."""

    max_items: int = 64
    key: String = String(max_len=63, pattern=r"[A-Za-z0-9][A-Za-z0-9._/-]*", shape="a label name")
    value: String = String(max_len=255, min_len=0, shape="a label value")
    what: str = "a mapping"

    def parse(self, value: object) -> dict[str, str]:
        if isinstance(value, Text):  # k=v,k2=v2
            pairs = [p.partition("=") for p in value.split(",") if p.strip()]
            if any(not sep for _, sep, _ in pairs):
                raise ValueError(f"expected key=value[,key=value...], got {value!r}")
            return {k.strip(): v.strip() for k, _, v in pairs}
        if not isinstance(value, Mapping):
            raise self._expected(value)
        out = {}
        for k, v in value.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise ValueError(f"expected string keys and values, got {k!r}: {_show(v)}")
            out[k] = v
        return out

    def check(self, value: Mapping[str, str]) -> None:
        if len(value) > self.max_items:
            raise ValueError(f"must have at most {self.max_items} entries, has {len(value)}")
        for k, v in value.items():
            self.key.check(k)
            self.value.check(v)

    def wrong_type(self) -> object:
        return ["not", "a", "mapping"]

    def out_of_range(self) -> list[object]:
        return [{f"k{i}": "v" for i in range(self.max_items + 1)}, {"bad key!": "v"}]

    def describe(self) -> str:
        return f"mapping of up to {self.max_items} entries"


@attrs.frozen
class Items(Spec[list[str]]):
    """A list of strings, every one obeying ``item``; from text, comma-separated."""

    item: String = String()
    max_items: int = 64
    what: str = "a list"

    def parse(self, value: object) -> list[str]:
        if isinstance(value, Text):
            return [self._item(Text(v.strip())) for v in value.split(",") if v.strip()]
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise self._expected(value)
        return [self._item(v) for v in value]

    def _item(self, value: object) -> str:
        item = self.item.read(value)
        if item is None:  # an optional item spec let a null through
            raise ValueError("a list item is required")
        return item

    def check(self, value: Sequence[str]) -> None:
        if len(value) > self.max_items:
            raise ValueError(f"must have at most {self.max_items} entries, has {len(value)}")
        for v in value:
            self.item.check(v)

    def wrong_type(self) -> object:
        return "not-a-list"

    def out_of_range(self) -> list[object]:
        return [[self.item.out_of_range()[0]]]

    def describe(self) -> str:
        return f"list of up to {self.max_items} {self.item.describe()}"


# -- field helpers ----------------------------------------------------------------------------


def field(spec: Spec[T], default: F) -> F:
    """An attrs field checked by ``spec`` (what the helpers below return); the field's type is
    the default's, as with ``attrs.field``."""

    def validate(inst: object, attribute: attrs.Attribute[F], value: F) -> None:
        if value is None:
            if not spec.optional:
                raise ValueError(f"{attribute.name}: a value is required")
            return
        spec.check(spec.parse(value))

    metadata = {SPEC: spec}
    if isinstance(default, (dict, list)):
        return attrs.field(factory=lambda: copy.copy(default), validator=validate, metadata=metadata)
    if isinstance(spec, Address) and spec.optional:
        # Optional listeners accept "off" in code too (flags arrive as text).
        return attrs.field(default=default, validator=validate, converter=spec.read, metadata=metadata)
    return attrs.field(default=default, validator=validate, metadata=metadata)


def integer(default: int, *, min: int, max: int) -> int:
    return field(Integer(min=min, max=max), default)


def number(default: float, *, min: float, max: float, above_min: bool = False) -> float:
    return field(Number(min=min, max=max, above_min=above_min), default)


def boolean(default: bool) -> bool:
    return field(Boolean(), default)


def choice(default: str, choices: Sequence[str]) -> str:
    return field(Choice(choices=tuple(choices)), default)


def text(
    default: OptStr,
    *,
    optional: bool = False,
    max_len: int = 255,
    pattern: str | None = None,
    shape: str = "text",
    bad_sample: str | None = None,
    validate: Callable[[str], object] | None = None,
) -> OptStr:
    spec = String(
        optional=optional,
        max_len=max_len,
        pattern=pattern,
        shape=shape,
        bad_sample=bad_sample,
        validate=validate,
    )
    return field(spec, default)


def path(default: OptStr, *, optional: bool = False) -> OptStr:
    """A filesystem path (relative paths are relative to the daemon's working directory)."""
    return field(String(optional=optional, max_len=4096, shape="a path", bad_sample=""), default)


def _parse_address(value: str) -> None:
    from quantix.config import parse_address

    parse_address(value)


def address(default: OptStr, *, optional: bool = False) -> OptStr:
    """``host:port`` to listen on; optional ones are turned off by null or ``off``."""
    return field(Address(optional=optional, validate=_parse_address), default)


def _ip(value: str) -> None:
    ipaddress.ip_address(value)


def ip(default: OptStr, *, optional: bool = False) -> OptStr:
    return field(
        String(optional=optional, max_len=45, shape="an IP address", bad_sample="999.0.0.1", validate=_ip),
        default,
    )


def url(default: OptStr, *, optional: bool = False, schemes: Sequence[str] = ("http", "https")) -> OptStr:
    pattern = rf"(?:{'|'.join(map(re.escape, schemes))})://[^\s/]+(?:/\S*)?"
    shape = f"a {' or '.join(s + '://' for s in schemes)} URL"
    return field(
        String(optional=optional, max_len=2048, pattern=pattern, shape=shape, bad_sample="ftp://host"),
        default,
    )


def table(*, max_items: int = 64) -> dict[str, str]:
    return field(Table(max_items=max_items), dict[str, str]())


def items(default: Sequence[str], item: String, *, max_items: int = 64) -> list[str]:
    return field(Items(item=item, max_items=max_items), list(default))


def spec_of(attribute: attrs.Attribute[object]) -> Declared | None:
    """The declared spec of a model field, or None when it was declared without a helper."""
    return attribute.metadata.get(SPEC)
