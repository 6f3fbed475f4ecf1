"""Checks every request gets before its handler runs: how many entries, and which characters.

One generic walk over the fields a request actually sets, so a new RPC or field is covered
without code: every repeated field and map has an entry limit (``REPEATED_LIMITS``, else
``DEFAULT_REPEATED``), checked before its entries are looked at; every string (map keys and
values too) is refused if it holds characters libvirt, XML or the OS cannot carry. Strings are
``STRICT`` (ids, names, paths, addresses: no control characters at all) unless
``STRING_RULES`` allows more for a free-text field. A refusal is ``INVALID_ARGUMENT`` naming
the field and the limit, never echoing the value.

The limits are documented in the README's "Reliability and limits" section.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sized

import attrs
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from quantix.errors import Invalid

_P = "limiquantix.node.v1."


@attrs.frozen
class Rule:
    """Characters a string field may not contain, and its longest length (None: no limit here)."""

    name: str
    forbidden: re.Pattern[str]
    max_chars: int | None = None


#: ids, names, paths, URIs, addresses: no C0/C1 control characters, no DEL
STRICT = Rule("control character", re.compile(r"[\x00-\x1f\x7f-\x9f]"))
#: free text that ends up in XML or YAML (descriptions, cloud-init): tab, newline, CR allowed
TEXT = Rule("control character", re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]"), 64 * 1024)
#: text handed to the guest agent (commands, arguments, environment): anything but NUL
GUEST = Rule("NUL character", re.compile(r"\x00"))

CLOUD_INIT_MAX = 1024 * 1024  # per cloud-init document; the NoCloud ISO is built in memory

STRING_RULES: dict[str, Rule] = {
    _P + "CreateSnapshotRequest.description": TEXT,
    _P + "GuestShutdownRequest.message": TEXT,
    _P + "CloudInitConfig.user_data": attrs.evolve(TEXT, max_chars=CLOUD_INIT_MAX),
    _P + "CloudInitConfig.meta_data": attrs.evolve(TEXT, max_chars=CLOUD_INIT_MAX),
    _P + "CloudInitConfig.network_config": attrs.evolve(TEXT, max_chars=CLOUD_INIT_MAX),
    _P + "CloudInitConfig.vendor_data": attrs.evolve(TEXT, max_chars=CLOUD_INIT_MAX),
    _P + "ExecuteInGuestRequest.command": GUEST,
    _P + "ExecuteInGuestRequest.args": GUEST,
    _P + "ExecuteInGuestRequest.environment": GUEST,  # map values; keys stay STRICT
    _P + "CreateVMOnNodeRequest.labels": attrs.evolve(STRICT, max_chars=1024),
}
#: map keys: STRICT, and short
MAP_KEY = attrs.evolve(STRICT, max_chars=256)

DEFAULT_REPEATED = 256
REPEATED_LIMITS: dict[str, int] = {
    _P + "CreateVMOnNodeRequest.labels": 64,
    _P + "VMSpec.disks": 64,
    _P + "VMSpec.nics": 32,
    _P + "VMSpec.cdroms": 8,
    _P + "VMSpec.boot_order": 8,
    _P + "ExecuteInGuestRequest.args": 1024,
}


def check(request: object) -> None:
    """Raise :class:`Invalid` when any field of ``request`` is over its limit or badly formed."""
    if isinstance(request, Message):
        _message(request, "")


def _message(msg: Message, prefix: str) -> None:
    for field, value in msg.ListFields():
        path = prefix + field.name
        kind = field.message_type
        if field.type == FieldDescriptor.TYPE_MESSAGE and kind is not None and kind.GetOptions().map_entry:
            _map(field, value, path)
        elif field.is_repeated:
            _count(field, value, path)
            for i, item in enumerate(value):
                _value(field, item, f"{path}[{i}]")
        else:
            _value(field, value, path)


def _count(field: FieldDescriptor, value: Sized, path: str) -> None:
    limit = REPEATED_LIMITS.get(field.full_name, DEFAULT_REPEATED)
    if len(value) > limit:
        raise Invalid(f"{path} has {len(value)} entries; the limit is {limit}")


def _map(field: FieldDescriptor, value: Mapping[object, object], path: str) -> None:
    _count(field, value, path)
    entry = field.message_type
    if entry is None:  # pragma: no cover - a map field always has its entry type
        return
    value_field = entry.fields_by_name["value"]
    for key, item in value.items():
        if isinstance(key, str):
            _string(MAP_KEY, key, f"{path} key")
        if value_field.type == FieldDescriptor.TYPE_MESSAGE:
            if isinstance(item, Message):
                _message(item, f"{path} value.")
        elif isinstance(item, str):
            _string(STRING_RULES.get(field.full_name, STRICT), item, f"{path} value")


def _value(field: FieldDescriptor, value: object, path: str) -> None:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        kind = field.message_type
        if (
            kind is not None
            and not kind.full_name.startswith("google.protobuf.")
            and isinstance(value, Message)
        ):
            _message(value, path + ".")
    elif field.type == FieldDescriptor.TYPE_STRING and isinstance(value, str):
        _string(STRING_RULES.get(field.full_name, STRICT), value, path)


def _string(rule: Rule, value: str, path: str) -> None:
    if rule.max_chars is not None and len(value) > rule.max_chars:
        raise Invalid(f"{path} is {len(value)} characters; the limit is {rule.max_chars}")
    bad = rule.forbidden.search(value)
    if bad is not None:
        raise Invalid(f"{path} contains a {rule.name} (U+{ord(bad.group()):04X}) at offset {bad.start()}")
