"""The daemon's configuration: attrs model, YAML loading and the precedence merge (pure).

Precedence, lowest first: built-in defaults < YAML file < ``QUANTIX_*`` environment < flags the
user actually gave. A flag's default never overrides the file: the plugin passes only the flags
that were given on the command line.

Every error is a :class:`ConfigError` whose message names the file (or variable) and the key, so
the daemon can print one line and exit non-zero.
"""

from __future__ import annotations

import ipaddress
import os
import typing
from collections.abc import Mapping
from typing import Any

import attrs
import yaml

#: A setting as read (a YAML value, an environment string or a flag) before it is coerced to
#: its field's type: what it holds is only known once checked against that field.
Raw = Any


DEFAULT_CONFIG_PATH = "/etc/limiquantix/node.yaml"
HYPERVISOR_TYPES = ("libvirt",)
EVENT_LOOPS = ("thread", "reactor")
LOG_LEVELS = ("debug", "info", "warn", "error")
LOG_FORMATS = ("text", "json", "journald")


class ConfigError(Exception):
    """A configuration value is unusable; the message names where it came from."""


def parse_address(value: str, default_port: int | None = None) -> tuple[str, int]:
    """Split ``host:port`` (IPv6 as ``[::1]:9090``); raises ValueError on anything else."""
    if not isinstance(value, str) or not value:
        raise ValueError("expected host:port")
    host, sep, port = value.rpartition(":")
    if not sep:
        if default_port is None:
            raise ValueError("expected host:port")
        host, port = value, str(default_port)
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        ipaddress.IPv6Address(host)
    if not host:
        raise ValueError("missing host")
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"bad port {port!r}")
    return host, int(port)


def _address(inst: object, attribute: attrs.Attribute, value: str) -> None:
    parse_address(value)


def _one_of(choices: tuple[str, ...]):
    def check(inst: object, attribute: attrs.Attribute, value: str) -> None:
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}, not {value!r}")

    return check


def _not_negative(inst: object, attribute: attrs.Attribute, value: float) -> None:
    if value < 0:
        raise ValueError("must not be negative")


def _positive(inst: object, attribute: attrs.Attribute, value: float) -> None:
    if value <= 0:
        raise ValueError("must be positive")


@attrs.frozen
class NodeConfig:
    id: str | None = None
    hostname: str | None = None
    management_ip: str | None = None
    labels: dict[str, str] = attrs.field(factory=dict)


@attrs.frozen
class HypervisorConfig:
    type: str = attrs.field(default="libvirt", validator=_one_of(HYPERVISOR_TYPES))
    uri: str = "qemu:///system"
    #: ``thread`` runs libvirt's own loop in one thread; ``reactor`` runs it on the reactor.
    event_loop: str = attrs.field(default="thread", validator=_one_of(EVENT_LOOPS))
    keepalive_interval: int = 5
    keepalive_count: int = 3
    #: libvirt domain type for new VMs: ``kvm`` on real hosts, ``qemu`` for TCG.
    domain_type: str = "kvm"
    #: Default for ``StopVM`` when the request says 0.
    stop_timeout: float = attrs.field(default=60.0, validator=_positive)
    #: Listen address put in VNC/SPICE graphics of new VMs.
    console_listen: str = "0.0.0.0"
    #: Where libvirt's QEMU driver writes ``<vm name>.log`` (GetVMLogs reads only there).
    log_dir: str = "/var/log/libvirt/qemu"


@attrs.frozen
class StorageConfig:
    root: str = "/var/lib/limiquantix"
    vm_images: str = "/var/lib/limiquantix/vms"
    cloud_images: str = "/var/lib/limiquantix/cloud-images"
    iso_images: str = "/var/lib/limiquantix/isos"


@attrs.frozen
class AgentConfig:
    socket_dir: str = "/var/run/quantix-kvm/vms"
    timeout: float = attrs.field(default=30.0, validator=_positive)
    #: How often guests send telemetry; three missed intervals mark the agent disconnected.
    telemetry_interval: float = attrs.field(default=5.0, validator=_positive)


@attrs.frozen
class ServerConfig:
    #: Worker threads for unary calls (0: sized to the host, see :meth:`unary_workers`).
    max_workers: int = attrs.field(default=0, validator=_not_negative)
    #: Streams (StreamEvents, StreamMetrics, reflection) open at once; each holds a thread of a
    #: pool of its own, so open streams never take the unary workers. Over it: RESOURCE_EXHAUSTED.
    max_streams: int = attrs.field(default=128, validator=_positive)
    grace_seconds: float = attrs.field(default=5.0, validator=_positive)
    metrics_listen: str | None = "0.0.0.0:9091"
    max_message_bytes: int = attrs.field(default=64 * 1024 * 1024, validator=_positive)
    #: Concurrent streams one client connection may open (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS).
    max_streams_per_connection: int = attrs.field(default=1000, validator=_positive)
    #: PEM server certificate and key: set both to serve TLS instead of plaintext.
    tls_cert: str | None = None
    tls_key: str | None = None
    #: PEM CA bundle: when set, clients must present a certificate signed by it (mTLS).
    tls_client_ca: str | None = None
    #: Python's GIL switch interval in milliseconds (0: leave the interpreter's 5 ms). Shorter lets
    #: the reactor and woken stream threads take the GIL sooner from busy gRPC threads.
    switch_interval_ms: float = attrs.field(default=0.0, validator=_not_negative)

    def unary_workers(self) -> int:
        """``max_workers``, or for 0 a pool sized to the host: more runnable threads than that
        only queue for the GIL (and delay the reactor) instead of adding throughput."""
        if self.max_workers:
            return self.max_workers
        return min(32, 4 * (os.cpu_count() or 1) + 4)

    def __attrs_post_init__(self) -> None:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("server.tls_cert and server.tls_key must be set together")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("server.tls_client_ca needs server.tls_cert and server.tls_key")


@attrs.frozen
class EventsConfig:
    buffer_size: int = attrs.field(default=10_000, validator=_positive)
    subscriber_queue: int = attrs.field(default=1_000, validator=_positive)
    reconcile_interval: float = attrs.field(default=300.0, validator=_positive)


def _http_url(inst: object, attribute: attrs.Attribute, value: str | None) -> None:
    if value is not None and not value.startswith(("http://", "https://")):
        raise ValueError(f"must be an http:// or https:// URL, not {value!r}")


@attrs.frozen
class ControlPlaneConfig:
    heartbeat_interval: float = attrs.field(default=30.0, validator=_positive)
    ca_bundle: str | None = None
    token: str | None = None
    #: Registration starts after a random delay up to this many seconds, so hosts that boot
    #: together do not all register at once.
    startup_jitter: float = attrs.field(default=5.0, validator=_not_negative)


def _optional_address(inst: object, attribute: attrs.Attribute, value: str | None) -> None:
    if value is not None:
        parse_address(value)


@attrs.frozen
class HttpConfig:
    #: Plain-HTTP listener the control plane dials for image downloads (``None``: off).
    listen: str | None = attrs.field(default="0.0.0.0:8080", validator=_optional_address)


@attrs.frozen
class DownloadsConfig:
    #: Transfers running at once; further jobs wait as ``pending``.
    max_concurrent: int = attrs.field(default=2, validator=_positive)
    connect_timeout: float = attrs.field(default=30.0, validator=_positive)
    #: Seconds without a byte from the server before the attempt is dropped and resumed.
    idle_timeout: float = attrs.field(default=60.0, validator=_positive)
    #: Consecutive failed attempts without progress before a job fails.
    retries: int = attrs.field(default=5, validator=_not_negative)
    retry_initial_delay: float = attrs.field(default=1.0, validator=_positive)
    retry_max_delay: float = attrs.field(default=60.0, validator=_positive)
    #: Ended jobs stay answerable (GET, GetDownloadStatus) this long, across restarts.
    keep_finished_hours: float = attrs.field(default=24.0, validator=_positive)
    #: Without a checksum in the request, look for SHA256SUMS/SHA512SUMS/CHECKSUM beside the URL.
    verify_sums: bool = True


@attrs.frozen
class OvsConfig:
    #: OVSDB's unix socket (ovsdb-server ``--remote=punix:``).
    db_socket: str = "/run/openvswitch/db.sock"
    #: Seconds an OVSDB call (connect included) may take.
    timeout: float = attrs.field(default=5.0, validator=_positive)
    #: Bridge VM NICs bound to OVN ports join when OVSDB names none (``external_ids:ovn-bridge``).
    integration_bridge: str = "br-int"


@attrs.frozen
class LoggingConfig:
    level: str = attrs.field(default="info", validator=_one_of(LOG_LEVELS))
    format: str = attrs.field(default="text", validator=_one_of(LOG_FORMATS))


@attrs.frozen
class Config:
    listen_address: str = attrs.field(default="0.0.0.0:9090", validator=_address)
    control_plane_url: str | None = attrs.field(default=None, validator=_http_url)
    auto_register: bool = False
    state_dir: str = "/var/lib/quantix"
    node: NodeConfig = attrs.field(factory=NodeConfig)
    hypervisor: HypervisorConfig = attrs.field(factory=HypervisorConfig)
    storage: StorageConfig = attrs.field(factory=StorageConfig)
    agent: AgentConfig = attrs.field(factory=AgentConfig)
    server: ServerConfig = attrs.field(factory=ServerConfig)
    events: EventsConfig = attrs.field(factory=EventsConfig)
    control_plane: ControlPlaneConfig = attrs.field(factory=ControlPlaneConfig)
    ovs: OvsConfig = attrs.field(factory=OvsConfig)
    http: HttpConfig = attrs.field(factory=HttpConfig)
    downloads: DownloadsConfig = attrs.field(factory=DownloadsConfig)
    logging: LoggingConfig = attrs.field(factory=LoggingConfig)


#: Flag name -> dotted config key. Only flags the user gave are applied.
FLAG_KEYS = {
    "listen": "listen_address",
    "libvirt-uri": "hypervisor.uri",
    "control-plane": "control_plane_url",
    "register": "auto_register",
    "node-id": "node.id",
    "state-dir": "state_dir",
    "agent-socket-dir": "agent.socket_dir",
    "log-level": "logging.level",
}

ENV_PREFIX = "QUANTIX_"


def _sections(cls: type = Config) -> dict[str, type]:
    return {f.name: f.type for f in attrs.fields(cls) if attrs.has(f.type)}


def env_overrides(environ: Mapping[str, str]) -> dict[str, tuple[str, str]]:
    """``QUANTIX_HYPERVISOR_URI=...`` → ``{"hypervisor.uri": (value, "QUANTIX_HYPERVISOR_URI")}``.

    A section name is matched first, so ``QUANTIX_STATE_DIR`` is the top-level ``state_dir``
    while ``QUANTIX_STORAGE_VM_IMAGES`` is ``storage.vm_images``.
    """
    out: dict[str, tuple[str, str]] = {}
    top = {f.name for f in attrs.fields(Config)}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or name == "QUANTIX_PROTO_CACHE":
            continue
        rest = name[len(ENV_PREFIX) :].lower()
        key = None
        for section, cls in _sections().items():
            prefix = section + "_"
            if rest.startswith(prefix) and rest[len(prefix) :] in {f.name for f in attrs.fields(cls)}:
                key = f"{section}.{rest[len(prefix) :]}"
                break
        if key is None and rest in top and rest not in _sections():
            key = rest
        if key is not None:
            out[key] = (value, name)
    return out


def _coerce(value: Raw, typ: object, where: str) -> Raw:
    """Turn YAML/env/flag values into the field's type; strings from env and flags included."""
    text = str(typ)
    if value is None:
        if "None" in text:
            return None
        raise ConfigError(f"{where}: a value is required")
    if typ is bool or text == "bool":
        if isinstance(value, bool):
            return value
        lowered = str(value).strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if typ is int or text == "int":
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
    if typ is float or text == "float":
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if text.startswith("dict"):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping")
        return {str(k): str(v) for k, v in value.items()}
    if isinstance(value, (dict, list)):
        raise ConfigError(f"{where}: expected a single value, got a {type(value).__name__}")
    return str(value)


def _flatten(data: Mapping[str, Raw], origin: str, warnings: list[str]) -> dict[str, tuple[Raw, str]]:
    """YAML mapping → ``{dotted key: (value, where)}``; unknown keys become warnings."""
    out: dict[str, tuple[Raw, str]] = {}
    sections = _sections()
    for key, value in data.items():
        key = str(key)
        if key in sections:
            if value is None:
                continue
            if not isinstance(value, Mapping):
                raise ConfigError(f"{origin}: key {key}: expected a mapping")
            names = {f.name for f in attrs.fields(sections[key])}
            for sub, subval in value.items():
                if sub in names:
                    out[f"{key}.{sub}"] = (subval, f"{origin}: key {key}.{sub}")
                else:
                    warnings.append(f"{origin}: unknown key {key}.{sub} ignored")
        elif key in {f.name for f in attrs.fields(Config)}:
            out[key] = (value, f"{origin}: key {key}")
        else:
            warnings.append(f"{origin}: unknown key {key} ignored")
    return out


def read_file(path: str) -> Mapping[str, Raw]:
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}:{where}: invalid YAML: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def build(values: Mapping[str, tuple[Raw, str]]) -> Config:
    """Assemble a :class:`Config` from dotted keys; each value knows where it came from."""
    top: dict[str, Raw] = {}
    nested: dict[str, dict[str, Raw]] = {}
    fields = {f.name: f for f in attrs.fields(Config)}
    for key, (value, where) in values.items():
        section, _, sub = key.partition(".")
        if sub:
            cls = typing.cast(type, fields[section].type)
            typ = attrs.fields_dict(cls)[sub].type
            nested.setdefault(section, {})[sub] = (_coerce(value, typ, where), where)
        else:
            top[key] = (_coerce(value, fields[key].type, where), where)
    sections = {name: _construct(typing.cast(type, fields[name].type), subs) for name, subs in nested.items()}
    return _construct(Config, top, extra=sections)


def _construct(cls: type, values: Mapping[str, tuple[Raw, str]], extra: Mapping[str, Raw] | None = None):
    kwargs = {k: v for k, (v, _) in values.items()}
    kwargs.update(extra or {})
    try:
        return cls(**kwargs)
    except ValueError as exc:
        # attrs validators raise with the attribute name unknown to us: find it by re-checking.
        for name, (value, where) in values.items():
            try:
                cls(**{name: value})
            except ValueError as one:
                raise ConfigError(f"{where}: {one}") from None
        raise ConfigError(f"{cls.__name__}: {exc}") from None


def load(
    path: str | None,
    *,
    path_explicit: bool = False,
    environ: Mapping[str, str] | None = None,
    flags: Mapping[str, Raw] | None = None,
    warnings: list[str] | None = None,
) -> Config:
    """Merge defaults, the file, the environment and given flags into one :class:`Config`.

    ``path`` is used when it exists; when ``path_explicit`` (the user named it) a missing file
    is an error rather than silently ignored.
    """
    warnings = warnings if warnings is not None else []
    values: dict[str, tuple[Raw, str]] = {}
    if path and (path_explicit or os.path.exists(path)):
        values.update(_flatten(read_file(path), path, warnings))
    for key, (value, name) in env_overrides(os.environ if environ is None else environ).items():
        values[key] = (value, f"environment {name}")
    for flag, value in (flags or {}).items():
        values[FLAG_KEYS[flag]] = (value, f"--{flag}")
    return build(values)


for _cls in (
    NodeConfig,
    HypervisorConfig,
    StorageConfig,
    AgentConfig,
    ServerConfig,
    EventsConfig,
    ControlPlaneConfig,
    HttpConfig,
    DownloadsConfig,
    LoggingConfig,
    Config,
):
    attrs.resolve_types(_cls)
