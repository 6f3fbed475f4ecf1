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
from collections.abc import Mapping
from typing import TypeVar, cast

import attrs
import yaml

from quantix import configspec as spec

DEFAULT_CONFIG_PATH = "/etc/limiquantix/node.yaml"
HYPERVISOR_TYPES = ("libvirt",)
EVENT_LOOPS = ("thread", "reactor")
LOG_LEVELS = ("debug", "info", "warn", "error")
LOG_FORMATS = ("text", "json", "journald")
DOMAIN_TYPES = ("kvm", "qemu")


class ConfigError(Exception):
    """A configuration value is unusable; the message names where it came from."""


class ListenError(Exception):
    """An address cannot be bound; the message is one line naming the listener, its address and
    how to change it (a second daemon on the same host meets this first). Raised by every
    listener (gRPC, metrics, HTTP), so it lives here rather than in one of them."""

    @classmethod
    def of(cls, listener: str, address: str, reason: str, hint: str) -> ListenError:
        return cls(f"{listener} listener: cannot listen on {address}: {reason} ({hint})")


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


def _listen_address(value: str) -> None:
    """gRPC listens on ``host:port`` or on a unix socket path (``unix:/run/quantix.sock``)."""
    if value.startswith("unix:"):
        if len(value) == len("unix:"):
            raise ValueError("missing socket path")
        return
    parse_address(value)


#: libvirt URIs: ``qemu:///system``, ``qemu+ssh://host/system``, ``test:///default``, ``test:///path``.
LIBVIRT_URI = r"[a-z][a-z0-9+.-]*:(//[^\s]*)?"
#: RFC 1123 host names, dots between labels.
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
HOSTNAME = rf"(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*\.?"
#: Node ids: UUIDs in practice; letters, digits and ``._:-``.
NODE_ID = r"[A-Za-z0-9][A-Za-z0-9._:-]*"
#: Bearer tokens go into an HTTP header: printable, no spaces.
TOKEN = r"[!-~]+"
#: OVS bridge names (``IFNAMSIZ`` - 1).
BRIDGE = r"[A-Za-z0-9][A-Za-z0-9._-]*"

DAY = 86_400.0

_C = TypeVar("_C")


# Every key is declared with a quantix.configspec helper: its type and range, checked alike for
# the file, the environment, flags and code (tests walk node.yaml with wrong values for each).


@attrs.frozen
class NodeConfig:
    id: str | None = spec.text(None, optional=True, max_len=128, pattern=NODE_ID, shape="a node id")
    hostname: str | None = spec.text(None, optional=True, max_len=253, pattern=HOSTNAME, shape="a host name")
    management_ip: str | None = spec.ip(None, optional=True)
    labels: dict[str, str] = spec.table(max_items=64)


@attrs.frozen
class HypervisorConfig:
    type: str = spec.choice("libvirt", HYPERVISOR_TYPES)
    uri: str = spec.text("qemu:///system", max_len=1024, pattern=LIBVIRT_URI, shape="a libvirt URI")
    #: ``thread`` runs libvirt's own loop in one thread; ``reactor`` runs it on the reactor.
    event_loop: str = spec.choice("thread", EVENT_LOOPS)
    #: libvirt keepalive: a probe every N seconds, the connection dropped after COUNT misses.
    keepalive_interval: int = spec.integer(5, min=1, max=3600)
    keepalive_count: int = spec.integer(3, min=1, max=100)
    #: libvirt domain type for new VMs: ``kvm`` on real hosts, ``qemu`` for TCG.
    domain_type: str = spec.choice("kvm", DOMAIN_TYPES)
    #: Default for ``StopVM`` when the request says 0.
    stop_timeout: float = spec.number(60.0, min=0, max=DAY, above_min=True)
    #: Listen address put in VNC/SPICE graphics of new VMs.
    console_listen: str = spec.ip("0.0.0.0")
    #: Where libvirt's QEMU driver writes ``<vm name>.log`` (GetVMLogs reads only there).
    log_dir: str = spec.path("/var/log/libvirt/qemu")
    #: GetVMStatus reuses a VM's status for this many seconds (0: never): its counters come from
    #: a query libvirtd answers only after asking QEMU. Every change of state drops it.
    status_max_age: float = spec.number(1.0, min=0, max=60)


@attrs.frozen
class StorageConfig:
    root: str = spec.path("/var/lib/limiquantix")
    vm_images: str = spec.path("/var/lib/limiquantix/vms")
    cloud_images: str = spec.path("/var/lib/limiquantix/cloud-images")
    iso_images: str = spec.path("/var/lib/limiquantix/isos")
    #: More places request paths (disk images, backing files, ISOs, block devices) may point,
    #: beside the directories above and active pools.
    allowed_paths: list[str] = spec.items(
        [],
        spec.String(max_len=4096, pattern=r"/.*", shape="an absolute path", bad_sample="relative"),
        max_items=256,
    )


@attrs.frozen
class AgentConfig:
    socket_dir: str = spec.path("/var/run/quantix-kvm/vms")
    timeout: float = spec.number(30.0, min=0, max=DAY, above_min=True)
    #: How often guests send telemetry; three missed intervals mark the agent disconnected.
    telemetry_interval: float = spec.number(5.0, min=0, max=3600, above_min=True)
    #: Linux agent binary that ``agent/install`` copies into guests through the QEMU guest agent.
    binary_path: str | None = spec.path(None, optional=True)


@attrs.frozen
class ServerConfig:
    #: Worker threads for unary calls (0: sized to the host, see :meth:`unary_workers`).
    max_workers: int = spec.integer(0, min=0, max=10_000)
    #: Streams (StreamEvents, StreamMetrics, reflection) open at once; each holds a thread of a
    #: pool of its own, so open streams never take the unary workers. Over it: RESOURCE_EXHAUSTED.
    max_streams: int = spec.integer(128, min=1, max=100_000)
    grace_seconds: float = spec.number(5.0, min=0, max=3600, above_min=True)
    #: ``host:port`` of the Prometheus endpoint; null, empty or ``off`` turns it off.
    metrics_listen: str | None = spec.address("0.0.0.0:9091", optional=True)
    #: grpc keeps message sizes in a signed 32-bit int.
    max_message_bytes: int = spec.integer(64 * 1024 * 1024, min=1024, max=2**31 - 1)
    #: Concurrent streams one client connection may open (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS).
    max_streams_per_connection: int = spec.integer(1000, min=1, max=2**31 - 1)
    #: PEM server certificate and key: set both to serve TLS instead of plaintext.
    tls_cert: str | None = spec.path(None, optional=True)
    tls_key: str | None = spec.path(None, optional=True)
    #: PEM CA bundle: when set, clients must present a certificate signed by it (mTLS).
    tls_client_ca: str | None = spec.path(None, optional=True)
    #: Python's GIL switch interval in milliseconds (0: leave the interpreter's 5 ms). With a pool
    #: sized to the host, 1 ms measured worse than 5 ms for reactor lag and throughput alike.
    switch_interval_ms: float = spec.number(0.0, min=0, max=1000)

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
    buffer_size: int = spec.integer(10_000, min=1, max=10_000_000)
    #: Events queued per subscriber before it is cut off. Queued events are shared objects (a
    #: reference each), so the default matches the resume buffer: a subscriber is cut off only
    #: when it could not have resumed either.
    subscriber_queue: int = spec.integer(10_000, min=1, max=1_000_000)
    reconcile_interval: float = spec.number(300.0, min=0, max=DAY, above_min=True)


@attrs.frozen
class ControlPlaneConfig:
    #: The control plane marks a node offline after 90 s without one.
    heartbeat_interval: float = spec.number(30.0, min=0, max=3600, above_min=True)
    ca_bundle: str | None = spec.path(None, optional=True)
    token: str | None = spec.text(None, optional=True, max_len=8192, pattern=TOKEN, shape="a token")
    #: Registration starts after a random delay up to this many seconds, so hosts that boot
    #: together do not all register at once.
    startup_jitter: float = spec.number(5.0, min=0, max=3600)


def _host_template(value: str) -> None:
    if "{host}" not in value or "://" not in value:
        raise ValueError("it must contain {host}")
    value.format(host="node")  # no other placeholders


@attrs.frozen
class MigrationConfig:
    #: libvirt URI of a target given as a bare host; ``qemu+tcp://{host}/system`` or
    #: ``qemu+ssh://root@{host}/system`` where TLS certificates are not set up.
    uri_template: str = spec.text(
        "qemu+tls://{host}/system",
        max_len=1024,
        pattern=LIBVIRT_URI,
        shape="a libvirt URI with {host}",
        bad_sample="qemu+tls://node/system",
        validate=_host_template,
    )
    #: Migration bandwidth limit in MiB/s (0: unlimited).
    bandwidth_mib: int = spec.integer(0, min=0, max=1_000_000)
    #: Encrypt QEMU's data channel with TLS too (needs QEMU's own certificates on both hosts).
    tls: bool = spec.boolean(False)
    #: Directories mounted at the same path on every node (cluster file systems); disks there
    #: move without a copy, like those in NFS, Ceph and other network pools.
    shared_paths: list[str] = spec.items((), spec.String(max_len=4096, shape="a path", bad_sample=""))
    #: Seconds between progress messages of a MigrateVM stream.
    progress_interval: float = spec.number(1.0, min=0, max=60, above_min=True)


@attrs.frozen
class HttpConfig:
    #: Plain-HTTP listener the control plane dials for image downloads (``None``: off).
    listen: str | None = spec.address("0.0.0.0:8080", optional=True)


def _cidr(value: str) -> None:
    ipaddress.ip_network(value, strict=False)


#: An address or a network, ``192.0.2.7`` or ``10.0.0.0/24``.
CIDR = spec.String(max_len=49, shape="an address or CIDR", bad_sample="10.0.0.300/24", validate=_cidr)
#: Update channel names: ``stable``, ``beta``, ``lts-2026``.
CHANNEL = r"[A-Za-z0-9][A-Za-z0-9._-]*"


@attrs.frozen
class HttpsConfig:
    """The TLS side API on 8443 (VM logs, guest agents, execute, updates, registration)."""

    #: ``host:port``; null or ``off`` turns the listener off.
    listen: str | None = spec.address("0.0.0.0:8443", optional=True)
    #: PEM certificate and key; when unset a self-signed one is generated into the state dir.
    cert: str | None = spec.path(None, optional=True)
    key: str | None = spec.path(None, optional=True)
    #: Addresses or CIDRs allowed besides loopback and the control plane's resolved addresses.
    allowed_clients: list[str] = spec.items((), CIDR, max_items=256)
    #: Serve the read-only routes (logs, pings, updates status) to any client.
    open_read_only: bool = spec.boolean(False)
    #: When set, guarded and read-only routes also need ``Authorization: Bearer <token>``.
    token: str | None = spec.text(None, optional=True, max_len=8192, pattern=TOKEN, shape="a token")
    #: PEM CA bundle: when set, guarded and read-only routes need a client certificate it signed.
    client_ca: str | None = spec.path(None, optional=True)

    def __attrs_post_init__(self) -> None:
        if bool(self.cert) != bool(self.key):
            raise ValueError("https.cert and https.key must be set together")


@attrs.frozen
class UpdatesConfig:
    #: Update channel reported to the control plane; no update source is built in.
    channel: str = spec.text("stable", max_len=64, pattern=CHANNEL, shape="a channel name")


@attrs.frozen
class DownloadsConfig:
    #: Transfers running at once; further jobs wait as ``pending``.
    max_concurrent: int = spec.integer(2, min=1, max=64)
    connect_timeout: float = spec.number(30.0, min=0, max=3600, above_min=True)
    #: Seconds without a byte from the server before the attempt is dropped and resumed.
    idle_timeout: float = spec.number(60.0, min=0, max=DAY, above_min=True)
    #: Consecutive failed attempts without progress before a job fails.
    retries: int = spec.integer(5, min=0, max=1000)
    retry_initial_delay: float = spec.number(1.0, min=0, max=3600, above_min=True)
    retry_max_delay: float = spec.number(60.0, min=0, max=DAY, above_min=True)
    #: Ended jobs stay answerable (GET, GetDownloadStatus) this long, across restarts.
    keep_finished_hours: float = spec.number(24.0, min=0, max=24 * 365, above_min=True)
    #: Without a checksum in the request, look for SHA256SUMS/SHA512SUMS/CHECKSUM beside the URL.
    verify_sums: bool = spec.boolean(True)


@attrs.frozen
class OvsConfig:
    #: OVSDB's unix socket (ovsdb-server ``--remote=punix:``).
    db_socket: str = spec.path("/run/openvswitch/db.sock")
    #: Seconds an OVSDB call (connect included) may take.
    timeout: float = spec.number(5.0, min=0, max=3600, above_min=True)
    #: Bridge VM NICs bound to OVN ports join when OVSDB names none (``external_ids:ovn-bridge``).
    integration_bridge: str = spec.text("br-int", max_len=15, pattern=BRIDGE, shape="a bridge name")


@attrs.frozen
class LoggingConfig:
    level: str = spec.choice("info", LOG_LEVELS)
    format: str = spec.choice("text", LOG_FORMATS)


@attrs.frozen
class Config:
    #: ``host:port``, or ``unix:<path>`` for a local socket.
    listen_address: str = spec.field(
        spec.Address(validate=_listen_address, shape="host:port or unix:<path>"), "0.0.0.0:9090"
    )
    control_plane_url: str | None = spec.url(None, optional=True)
    auto_register: bool = spec.boolean(False)
    state_dir: str = spec.path("/var/lib/quantix")
    node: NodeConfig = attrs.field(factory=NodeConfig)
    hypervisor: HypervisorConfig = attrs.field(factory=HypervisorConfig)
    storage: StorageConfig = attrs.field(factory=StorageConfig)
    agent: AgentConfig = attrs.field(factory=AgentConfig)
    server: ServerConfig = attrs.field(factory=ServerConfig)
    events: EventsConfig = attrs.field(factory=EventsConfig)
    control_plane: ControlPlaneConfig = attrs.field(factory=ControlPlaneConfig)
    migration: MigrationConfig = attrs.field(factory=MigrationConfig)
    ovs: OvsConfig = attrs.field(factory=OvsConfig)
    http: HttpConfig = attrs.field(factory=HttpConfig)
    https: HttpsConfig = attrs.field(factory=HttpsConfig)
    updates: UpdatesConfig = attrs.field(factory=UpdatesConfig)
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
    "metrics-listen": "server.metrics_listen",
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


def _read(field: attrs.Attribute[object], value: object, where: str) -> object:
    """One value in its field's type and range (see :mod:`quantix.configspec`)."""
    declared = spec.spec_of(field)
    if declared is None:  # declared without a helper: only its type is known (tests flag it)
        return _coerce(value, field.type, where)
    try:
        return declared.read(value)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _coerce(value: object, typ: object, where: str) -> object:
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
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
    if typ is float or text == "float":
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
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


def _flatten(
    data: Mapping[object, object], origin: str, warnings: list[str]
) -> dict[str, tuple[object, str]]:
    """YAML mapping → ``{dotted key: (value, where)}``; unknown keys become warnings."""
    out: dict[str, tuple[object, str]] = {}
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


def read_file(path: str) -> Mapping[object, object]:
    """The YAML file's top-level mapping (keys not yet checked to be strings)."""
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


def build(values: Mapping[str, tuple[object, str]]) -> Config:
    """Assemble a :class:`Config` from dotted keys; each value knows where it came from."""
    top: dict[str, tuple[object, str]] = {}
    nested: dict[str, dict[str, tuple[object, str]]] = {}
    fields = {f.name: f for f in attrs.fields(Config)}
    for key, (value, where) in values.items():
        section, _, sub = key.partition(".")
        if sub:
            field = attrs.fields_dict(cast(type, fields[section].type))[sub]
            nested.setdefault(section, {})[sub] = (_read(field, value, where), where)
        else:
            top[key] = (_read(fields[key], value, where), where)
    sections: dict[str, object] = {
        name: _construct(cast(type, fields[name].type), subs) for name, subs in nested.items()
    }
    return _construct(Config, top, extra=sections)


def _construct(
    cls: type[_C], values: Mapping[str, tuple[object, str]], extra: Mapping[str, object] | None = None
) -> _C:
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
    flags: Mapping[str, object] | None = None,
    warnings: list[str] | None = None,
) -> Config:
    """Merge defaults, the file, the environment and given flags into one :class:`Config`.

    ``path`` is used when it exists; when ``path_explicit`` (the user named it) a missing file
    is an error rather than silently ignored.
    """
    warnings = warnings if warnings is not None else []
    values: dict[str, tuple[object, str]] = {}
    if path and (path_explicit or os.path.exists(path)):
        values.update(_flatten(read_file(path), path, warnings))
    # Environment variables and flags are text, parsed into the key's type; the file's values
    # must already have it (a quoted number in YAML is a mistake worth reporting).
    for key, (value, name) in env_overrides(os.environ if environ is None else environ).items():
        values[key] = (spec.Text(value), f"environment {name}")
    for flag, given in (flags or {}).items():
        values[FLAG_KEYS[flag]] = (spec.Text(given) if isinstance(given, str) else given, f"--{flag}")
    return build(values)


attrs.resolve_types(Config)
for _section in _sections().values():
    attrs.resolve_types(_section)
