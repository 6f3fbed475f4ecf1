"""``quantix-nodectl``: look at a running node daemon over its own gRPC API.

Exit codes (for scripts): 0 ok, 1 the RPC failed (the status code name is printed), 2 usage
error, 3 daemon unreachable or UNAVAILABLE, 4 ``health`` answered but the node is not healthy.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import UTC, datetime
from types import ModuleType
from typing import IO, TYPE_CHECKING, Protocol, TypeVar

if TYPE_CHECKING:
    from _typeshed import SupportsWrite
    from google.protobuf.descriptor import MethodDescriptor
    from google.protobuf.message import Message
    from google.protobuf.timestamp_pb2 import Timestamp

    from quantix.proto import node_pb2

M = TypeVar("M", bound="Message")
M_co = TypeVar("M_co", bound="Message", covariant=True)
#: Table cells: whatever prints.
Cell = object

EXIT_OK = 0
EXIT_RPC_ERROR = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_UNHEALTHY = 4

RESUME_METADATA = "x-quantix-resume-after"


# -- formatting (pure) ------------------------------------------------------------------------


def human_bytes(n: int | float) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"  # not reached


def human_duration(seconds: int | float) -> str:
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [(days, "d"), (hours, "h"), (minutes, "m"), (secs, "s")]
    shown = [f"{v}{u}" for v, u in parts if v][:2]
    return " ".join(shown) or "0s"


def yes_no(flag: bool) -> str:
    return "yes" if flag else "no"


def enum_name(value: str, prefix: str) -> str:
    """``POWER_STATE_RUNNING`` → ``running``."""
    return value[len(prefix) :].lower() if value.startswith(prefix) else value.lower()


class _Stream(Protocol[M_co]):
    """A server-streaming call: its messages, and a way to end it early."""

    def __iter__(self) -> Iterator[M_co]: ...

    def cancel(self) -> bool: ...


def timestamp(ts: Timestamp) -> str:
    if not ts.seconds and not ts.nanos:
        return "-"
    return datetime.fromtimestamp(ts.seconds + ts.nanos / 1e9, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _numeric(text: str) -> bool:
    return bool(text) and text.replace(".", "", 1).replace("%", "").replace("-", "", 1).isdigit()


def table(headers: Sequence[str], rows: Iterable[Sequence[Cell]]) -> str:
    """Columns separated by two spaces; numeric columns right-aligned."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    right = [bool(cells) and all(_numeric(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        out = [c.rjust(w) if r else c.ljust(w) for c, w, r in zip(row, widths, right, strict=True)]
        return "  ".join(out).rstrip()

    return "\n".join([line(headers), *(line(row) for row in cells)])


def key_values(pairs: Iterable[tuple[str, Cell]]) -> str:
    pairs = [(k, str(v)) for k, v in pairs]
    width = max((len(k) for k, _ in pairs), default=0)
    return "\n".join(f"{k + ':':<{width + 1}}  {v}".rstrip() for k, v in pairs)


def format_health(r: node_pb2.HealthCheckResponse) -> str:
    return key_values(
        [
            ("healthy", yes_no(r.healthy)),
            ("version", r.version),
            ("hypervisor", f"{r.hypervisor} {r.hypervisor_version}".strip() or "-"),
            ("uptime", human_duration(r.uptime_seconds)),
        ]
    )


def format_info(r: node_pb2.NodeInfoResponse, built: dict[str, str] | None = None) -> str:
    """``built``: the ``x-quantix-*`` response metadata (daemon version, proto fingerprint,
    libvirt version), shown when the daemon sent it."""
    cpu, mem, caps = r.cpu, r.memory, r.capabilities
    built = built or {}
    supports = [
        name
        for name, flag in (
            ("live-migration", caps.supports_live_migration),
            ("snapshots", caps.supports_snapshots),
            ("hotplug", caps.supports_hotplug),
            ("gpu-passthrough", caps.supports_gpu_passthrough),
            ("nested", caps.supports_nested_virtualization),
        )
        if flag
    ]
    head = key_values(
        [
            ("node id", r.node_id),
            ("hostname", r.hostname),
            ("management ip", r.management_ip or "-"),
            ("cpu", f"{cpu.model or '-'} @ {cpu.frequency_mhz} MHz"),
            (
                "topology",
                f"{cpu.sockets} sockets x {cpu.cores_per_socket} cores x {cpu.threads_per_core} threads"
                f" = {cpu.total_threads}",
            ),
            ("memory", f"{human_bytes(mem.used_bytes)} used of {human_bytes(mem.total_bytes)}"),
            ("hypervisor", f"{caps.name} {caps.version}".strip()),
            *daemon_build(built),
            ("max vcpus", caps.max_vcpus),
            ("supports", ", ".join(supports) or "-"),
        ]
    )
    storage = table(
        ["DEVICE", "MOUNT", "FS", "SIZE", "USED", "AVAIL"],
        [
            (
                d.device,
                d.mount_point,
                d.filesystem,
                human_bytes(d.total_bytes),
                human_bytes(d.used_bytes),
                human_bytes(d.available_bytes),
            )
            for d in r.storage
        ],
    )
    network = table(
        ["NIC", "MAC", "UP", "SPEED", "ADDRESSES"],
        [
            (
                n.name,
                n.mac_address or "-",
                yes_no(n.up),
                f"{n.speed_mbps} Mb/s" if n.speed_mbps else "-",
                ", ".join(n.ip_addresses) or "-",
            )
            for n in r.network
        ],
    )
    return f"{head}\n\n{storage}\n\n{network}"


def daemon_build(built: dict[str, str]) -> list[tuple[str, str]]:
    from quantix import versions

    if versions.VERSION_KEY not in built:
        return []
    return [
        ("daemon", built[versions.VERSION_KEY]),
        ("proto", built.get(versions.PROTO_KEY, "-")[:12]),
        ("libvirt", built.get(versions.LIBVIRT_KEY, "-")),
    ]


def _state(vm: node_pb2.VMStatusResponse, pb: ModuleType) -> str:
    return (
        enum_name(pb.PowerState.Name(vm.state), "POWER_STATE_")
        if vm.state in pb.PowerState.values()
        else str(vm.state)
    )


def format_vms(r: node_pb2.ListVMsOnNodeResponse, pb: ModuleType) -> str:
    rows = [
        (
            vm.vm_id,
            vm.name,
            _state(vm, pb),
            f"{vm.resource_usage.cpu_usage_percent:.1f}",
            human_bytes(vm.resource_usage.memory_used_bytes),
            human_bytes(vm.resource_usage.memory_total_bytes),
            yes_no(vm.guest_agent.connected),
        )
        for vm in sorted(r.vms, key=lambda v: v.name)
    ]
    return table(["VM ID", "NAME", "STATE", "CPU%", "MEM USED", "MEM TOTAL", "AGENT"], rows)


def format_vm(vm: node_pb2.VMStatusResponse, pb: ModuleType) -> str:
    usage, agent = vm.resource_usage, vm.guest_agent
    pairs = [
        ("vm id", vm.vm_id),
        ("name", vm.name),
        ("state", _state(vm, pb)),
        ("started", timestamp(vm.started_at)),
        ("cpu", f"{usage.cpu_usage_percent:.1f}%"),
        ("memory", f"{human_bytes(usage.memory_used_bytes)} used of {human_bytes(usage.memory_total_bytes)}"),
        (
            "disk i/o",
            f"{human_bytes(usage.disk_read_bytes)} read, {human_bytes(usage.disk_write_bytes)} written",
        ),
        ("network", f"{human_bytes(usage.network_rx_bytes)} rx, {human_bytes(usage.network_tx_bytes)} tx"),
        ("guest agent", f"connected {agent.version}".strip() if agent.connected else "not connected"),
    ]
    if agent.connected:
        pairs += [
            ("guest os", f"{agent.os_name} {agent.os_version}".strip() or "-"),
            ("guest hostname", agent.hostname or "-"),
            ("guest ips", ", ".join(agent.ip_addresses) or "-"),
        ]
    out = key_values(pairs)
    if vm.disks:
        disks = table(
            ["DISK", "PATH", "SIZE", "BUS", "FORMAT", "RO", "BOOT"],
            [
                (
                    d.id,
                    d.path,
                    f"{d.size_gib} GiB",
                    enum_name(pb.DiskBus.Name(d.bus), "DISK_BUS_") if d.bus in pb.DiskBus.values() else d.bus,
                    enum_name(pb.DiskFormat.Name(d.format), "DISK_FORMAT_")
                    if d.format in pb.DiskFormat.values()
                    else d.format,
                    yes_no(d.readonly),
                    yes_no(d.bootable),
                )
                for d in vm.disks
            ],
        )
        out += "\n\n" + disks
    return out


EVENT_COLUMNS = ("TIME", "ID", "TYPE", "VM ID", "MESSAGE")


def format_event_header() -> str:
    time_, id_, kind, vm, message = EVENT_COLUMNS
    return f"{time_:19}  {id_:>16}  {kind:18}  {vm:36}  {message}"


def format_event(e: node_pb2.NodeEvent, pb: ModuleType) -> str:
    kind = (
        enum_name(pb.EventType.Name(e.type), "EVENT_TYPE_")
        if e.type in pb.EventType.values()
        else str(e.type)
    )
    return f"{timestamp(e.timestamp):19}  {e.id:>16}  {kind:18}  {e.vm_id or '-':36}  {e.message}".rstrip()


def format_metrics(m: node_pb2.NodeMetrics) -> str:
    head = key_values(
        [
            ("time", timestamp(m.timestamp)),
            ("cpu", f"{m.cpu_usage_percent:.1f}%"),
            ("memory", f"{human_bytes(m.memory_used_bytes)} used of {human_bytes(m.memory_total_bytes)}"),
        ]
    )
    parts = [head]
    if m.vms:
        parts.append(
            table(
                ["VM ID", "NAME", "CPU%", "MEM USED", "DISK RD", "DISK WR", "NET RX", "NET TX"],
                [
                    (
                        v.vm_id,
                        v.name,
                        f"{v.cpu_usage_percent:.1f}",
                        human_bytes(v.memory_used_bytes),
                        human_bytes(v.disk_read_bytes),
                        human_bytes(v.disk_write_bytes),
                        human_bytes(v.network_rx_bytes),
                        human_bytes(v.network_tx_bytes),
                    )
                    for v in m.vms
                ],
            )
        )
    if m.disks:
        parts.append(
            table(
                ["DEVICE", "READ", "WRITTEN", "R IOPS", "W IOPS", "UTIL%"],
                [
                    (
                        d.device,
                        human_bytes(d.read_bytes),
                        human_bytes(d.write_bytes),
                        d.read_iops,
                        d.write_iops,
                        f"{d.utilization_percent:.1f}",
                    )
                    for d in m.disks
                ],
            )
        )
    if m.networks:
        parts.append(
            table(
                ["NIC", "RX", "TX", "RX ERR", "TX ERR"],
                [
                    (n.interface, human_bytes(n.rx_bytes), human_bytes(n.tx_bytes), n.rx_errors, n.tx_errors)
                    for n in m.networks
                ],
            )
        )
    return "\n\n".join(parts)


def format_metrics_line(m: node_pb2.NodeMetrics) -> str:
    return (
        f"{timestamp(m.timestamp):19}  cpu {m.cpu_usage_percent:5.1f}%  "
        f"mem {human_bytes(m.memory_used_bytes)} / {human_bytes(m.memory_total_bytes)}  vms {len(m.vms)}"
    )


# -- command line -----------------------------------------------------------------------------


class UsageError(Exception):
    """A request nodectl cannot send (unknown RPC, bad JSON): exit code 2."""


class _Parser(argparse.ArgumentParser):
    """Writes to the streams ``main`` was given (subclassed per call: subparsers share the class)."""

    out: IO[str] = sys.stdout
    err: IO[str] = sys.stderr

    def _print_message(self, message: str, file: SupportsWrite[str] | None = None) -> None:
        if message:
            (self.out if file is sys.stdout else self.err).write(message)


def build_parser(out: IO[str], err: IO[str]) -> argparse.ArgumentParser:
    parser_class = type("Parser", (_Parser,), {"out": out, "err": err})
    parser = parser_class(
        prog="quantix-nodectl",
        description="Inspect a running Quantix node daemon over gRPC; mint registration tokens.",
        epilog="exit codes: 0 ok, 1 RPC error, 2 usage, 3 unreachable/UNAVAILABLE, 4 node not healthy",
    )
    parser.add_argument("--address", default="127.0.0.1:9090", help="daemon gRPC address [%(default)s]")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per call [%(default)s]")
    parser.add_argument("--json", action="store_true", help="print responses as JSON (one per line)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=parser_class)
    sub.add_parser("health", help="daemon and hypervisor health (exit 4 when not healthy)")
    sub.add_parser("info", help="node facts: CPU, memory, storage, NICs, hypervisor")
    sub.add_parser("vms", help="list VMs")
    vm = sub.add_parser("vm", help="one VM's status")
    vm.add_argument("vm_id")
    events = sub.add_parser("events", help="follow node events (Ctrl-C to stop)")
    events.add_argument("--resume-after", metavar="ID", help="replay events after this id first")
    events.add_argument("--count", type=int, metavar="N", help="stop after N events")
    metrics = sub.add_parser("metrics", help="one node metrics sample, or follow")
    metrics.add_argument("--interval", type=int, default=1, help="seconds between samples [%(default)s]")
    metrics.add_argument("--follow", action="store_true", help="keep printing samples")
    metrics.add_argument("--count", type=int, metavar="N", help="with --follow: stop after N samples")
    token = sub.add_parser(
        "registration-token",
        help="mint the one-hour token for the control plane's Add Host (local: writes the state dir)",
    )
    token.add_argument(
        "--config", default=None, help="daemon config, for state_dir [/etc/limiquantix/node.yaml]"
    )
    token.add_argument("--state-dir", default=None, help="daemon state dir (overrides the config)")
    call = sub.add_parser(
        "call",
        help="call any RPC by name with a JSON request (types learnt from the server's reflection)",
        description='Call any RPC: `call GetVMStatus \'{"vm_id": "..."}\'`. Replies are printed as '
        "JSON (proto field names); a streaming RPC prints one line per message.",
    )
    call.add_argument("rpc", help="RPC name: HealthCheck, or Service/Method with the package")
    call.add_argument("request", nargs="?", default="{}", help="request as JSON [{}]")
    call.add_argument("--count", type=int, metavar="N", help="streaming RPCs: stop after N messages")
    call.add_argument(
        "--metadata", action="append", default=[], metavar="KEY=VALUE", help="request metadata (repeatable)"
    )
    sub.add_parser("list", help="the RPCs the server offers, with request and reply types (reflection)")
    from quantix.ops import nodectl_migrate

    nodectl_migrate.add_parser(sub)
    from quantix.ops import nodectl_images

    nodectl_images.add_parser(sub)
    return parser


def registration_token(args: argparse.Namespace, out: IO[str], err: IO[str]) -> int:
    """Mint a token by writing it into the daemon's state dir (no daemon call: minting is local
    by design, so nothing that can reach a port can mint one)."""
    import json

    from quantix import config as cfg
    from quantix.ops import regtoken

    state_dir = args.state_dir
    if state_dir is None:
        try:
            path = args.config or cfg.DEFAULT_CONFIG_PATH
            state_dir = cfg.load(path, path_explicit=args.config is not None).state_dir
        except cfg.ConfigError as exc:
            err.write(f"quantix-nodectl: {exc}\n")
            return EXIT_USAGE
    try:
        tok = regtoken.mint(state_dir)
    except OSError as exc:
        err.write(f"quantix-nodectl: state dir {state_dir}: {exc.strerror} (run as the daemon's user)\n")
        return EXIT_RPC_ERROR
    if args.json:
        body = {"token": tok.token, "expiresAt": regtoken.rfc3339(tok.expires_at)}
        out.write(json.dumps(body) + "\n")
    else:
        out.write(f"{tok.token}\nvalid until {regtoken.rfc3339(tok.expires_at)} (one hour)\n")
    return EXIT_OK


class _Ctl:
    def __init__(self, args: argparse.Namespace, out: IO[str], err: IO[str] | None = None) -> None:
        import grpc
        from google.protobuf import empty_pb2, json_format

        from quantix.proto import node_grpc, node_pb2

        self.args = args
        self.out = out
        self.err = err if err is not None else sys.stderr
        self.pb = node_pb2
        self.empty = empty_pb2.Empty
        self.json_format = json_format
        self.channel = grpc.insecure_channel(args.address)
        self.stub = node_grpc.NodeDaemonServiceStub(self.channel)

    def emit(self, message: M, render: Callable[[M], str]) -> None:
        if self.args.json:
            text = self.json_format.MessageToJson(message, preserving_proto_field_name=True, indent=None)
        else:
            text = render(message)
        self.out.write(text + "\n")
        self.out.flush()

    def health(self) -> int:
        reply = self.stub.HealthCheck(self.pb.HealthCheckRequest(), timeout=self.args.timeout)
        self.emit(reply, format_health)
        return EXIT_OK if reply.healthy else EXIT_UNHEALTHY

    def info(self) -> int:
        reply, call = self.stub.GetNodeInfo.with_call(self.empty(), timeout=self.args.timeout)
        built = {k: v for k, v in call.initial_metadata() or () if isinstance(v, str)}
        self.emit(reply, lambda r: format_info(r, built))
        return EXIT_OK

    def vms(self) -> int:
        reply = self.stub.ListVMs(self.empty(), timeout=self.args.timeout)
        self.emit(reply, lambda r: format_vms(r, self.pb))
        return EXIT_OK

    def vm(self) -> int:
        request = self.pb.VMIdRequest(vm_id=self.args.vm_id)
        self.emit(self.stub.GetVMStatus(request, timeout=self.args.timeout), lambda r: format_vm(r, self.pb))
        return EXIT_OK

    def events(self) -> int:
        metadata = ((RESUME_METADATA, str(self.args.resume_after)),) if self.args.resume_after else None
        call = self.stub.StreamEvents(self.empty(), metadata=metadata)
        header = None if self.args.json else format_event_header()
        return self._follow(call, lambda e: format_event(e, self.pb), self.args.count, header)

    def metrics(self) -> int:
        interval = max(1, self.args.interval)
        request = self.pb.StreamMetricsRequest(interval_seconds=interval)
        if not self.args.follow:
            call = self.stub.StreamMetrics(request, timeout=interval + self.args.timeout)
            return self._follow(call, format_metrics, 1)
        return self._follow(self.stub.StreamMetrics(request), format_metrics_line, self.args.count)

    def call(self) -> int:
        from quantix.ops import rpccall

        reflector = rpccall.Reflector(self.channel)
        try:
            method = reflector.find(self.args.rpc)
            request = rpccall.request_from_json(method, self.args.request)
            pairs = [kv.partition("=") for kv in self.args.metadata if "=" in kv]
            metadata = tuple((key, value) for key, _, value in pairs) or None
            replies = rpccall.invoke(self.channel, method, request, self._deadline(method), metadata)
        except rpccall.CallError as exc:
            raise UsageError(str(exc)) from None
        indent = None if self.args.json or method.server_streaming else 2
        seen = 0
        for reply in replies:
            self.out.write(rpccall.to_json(reply, indent) + "\n")
            self.out.flush()
            seen += 1
            if self.args.count is not None and seen >= self.args.count:
                break
        return EXIT_OK

    def _deadline(self, method: MethodDescriptor) -> float | None:
        return None if method.server_streaming else self.args.timeout

    def list(self) -> int:
        from quantix.ops import rpccall

        for method in rpccall.Reflector(self.channel).methods():
            self.out.write(rpccall.describe(method) + "\n")
        return EXIT_OK

    def images(self) -> int:
        from quantix.ops import nodectl_images

        return nodectl_images.run(self, self.err)

    def migrate(self) -> int:
        from quantix.ops import nodectl_migrate

        return nodectl_migrate.run(self, self.err)

    def _follow(
        self, call: _Stream[M], render: Callable[[M], str], count: int | None, header: str | None = None
    ) -> int:
        seen = 0
        try:
            for message in call:
                if header is not None and not seen:
                    self.out.write(header + "\n")
                self.emit(message, render)
                seen += 1
                if count is not None and seen >= count:
                    break
        finally:
            call.cancel()
        return EXIT_OK


def main(
    argv: Sequence[str] | None = None, stdout: IO[str] | None = None, stderr: IO[str] | None = None
) -> int:
    """Run one command; returns the exit code (the console script passes it to ``sys.exit``)."""
    out = stdout if stdout is not None else sys.stdout
    err = stderr if stderr is not None else sys.stderr
    parser = build_parser(out, err)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if args.command == "registration-token":
        return registration_token(args, out, err)
    import grpc

    ctl = _Ctl(args, out, err)
    try:
        return getattr(ctl, args.command)()
    except grpc.RpcError as exc:
        code = exc.code()
        if code is grpc.StatusCode.UNAVAILABLE:
            err.write(f"quantix-nodectl: {args.address}: UNAVAILABLE: {exc.details()}\n")
            return EXIT_UNREACHABLE
        err.write(f"quantix-nodectl: {code.name}: {exc.details()}\n")
        return EXIT_RPC_ERROR
    except UsageError as exc:
        err.write(f"quantix-nodectl: {exc}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_OK
    finally:
        ctl.channel.close()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
