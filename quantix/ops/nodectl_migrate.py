"""``quantix-nodectl migrate``: move a VM to another node, with a live progress bar.

The command talks to the source daemon (``--address``). With ``--target-daemon`` it first
prepares the target (PrepareMigration, then ReceiveMigration with the token), which checks
the target and pre-creates disk files for ``--storage``. Ctrl-C cancels the migration: the
daemon aborts libvirt's job and the VM stays on the source.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import IO, TYPE_CHECKING, Protocol

from tqdm import tqdm

if TYPE_CHECKING:
    from quantix.proto import node_grpc, node_pb2

PHASES = {0: "preparing", 1: "transferring", 2: "switching", 3: "complete", 4: "failed"}


class Ctl(Protocol):
    """What the command needs of ``quantix-nodectl``'s context (:class:`quantix.ops.nodectl._Ctl`)."""

    @property
    def args(self) -> argparse.Namespace: ...
    @property
    def out(self) -> IO[str]: ...
    @property
    def stub(self) -> node_grpc.NodeDaemonServiceStub: ...

    def emit(
        self, message: node_pb2.MigrationProgress, render: Callable[[node_pb2.MigrationProgress], str]
    ) -> None: ...


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser("migrate", help="move a VM to another node (live, unless --offline)")
    parser.add_argument("vm_id")
    parser.add_argument(
        "--to",
        required=True,
        metavar="HOST",
        help="target host (or libvirt URI, e.g. qemu+tls://host/system)",
    )
    parser.add_argument(
        "--storage", action="store_true", help="also copy disks that are not on shared storage"
    )
    parser.add_argument(
        "--offline",
        action="store_true",
        help="pause the VM while it is copied instead of moving it live (a stopped VM always moves offline)",
    )
    parser.add_argument(
        "--target-daemon",
        metavar="ADDRESS",
        help="the target's daemon (gRPC address): prepare it first, pre-creating disks for --storage",
    )


def describe(message: node_pb2.MigrationProgress) -> str:
    """One line for a progress message (pure)."""
    from quantix.ops.nodectl import human_bytes

    text = f"{PHASES.get(message.phase, message.phase)} {message.percent_complete}%"
    if message.data_transferred_bytes or message.data_remaining_bytes:
        text += (
            f", {human_bytes(message.data_transferred_bytes)} sent,"
            f" {human_bytes(message.data_remaining_bytes)} left"
        )
    if message.error:
        text += f": {message.error}"
    return text


def prepare_target(ctl: Ctl, address: str) -> None:
    """PrepareMigration and ReceiveMigration on the target daemon at ``address``."""
    import grpc
    from google.protobuf import empty_pb2

    from quantix.proto import node_grpc, node_pb2

    args = ctl.args
    source = ctl.stub.GetNodeInfo(empty_pb2.Empty(), timeout=args.timeout).management_ip
    channel = grpc.insecure_channel(address)
    try:
        stub = node_grpc.NodeDaemonServiceStub(channel)
        request = node_pb2.PrepareMigrationRequest(vm_id=args.vm_id, source_node_uri=source)
        token = stub.PrepareMigration(request, timeout=max(args.timeout, 120))
        stub.ReceiveMigration(token, timeout=args.timeout)
    finally:
        channel.close()


def run(ctl: Ctl, err: IO[str]) -> int:
    """Stream MigrateVM; a bar on stderr (or JSON lines with ``--json``); 0 when COMPLETE."""
    from quantix.ops.nodectl import EXIT_OK, EXIT_RPC_ERROR
    from quantix.proto import node_pb2

    args = ctl.args
    if args.target_daemon:
        prepare_target(ctl, args.target_daemon)
    request = node_pb2.MigrateVMRequest(
        vm_id=args.vm_id, target_node_uri=args.to, live=not args.offline, storage=args.storage
    )
    call = ctl.stub.MigrateVM(request)
    last: node_pb2.MigrationProgress | None = None
    bar = tqdm(total=100, unit="%", file=err, disable=args.json, dynamic_ncols=True, leave=True)
    try:
        for message in call:
            last = message
            if args.json:
                ctl.emit(message, describe)
                continue
            bar.set_description(PHASES.get(message.phase, str(message.phase)))
            bar.set_postfix_str(describe(message).partition("%")[2].lstrip(", "), refresh=False)
            bar.update(message.percent_complete - bar.n)
    except KeyboardInterrupt:
        call.cancel()
        bar.close()
        err.write(f"quantix-nodectl: migration of {args.vm_id} cancelled; it stays on the source\n")
        return EXIT_RPC_ERROR
    finally:
        bar.close()
    if last is None or last.phase != node_pb2.MIGRATION_PHASE_COMPLETE:
        reason = last.error if last is not None else "the stream ended without a result"
        err.write(f"quantix-nodectl: migration of {args.vm_id} failed: {reason}\n")
        return EXIT_RPC_ERROR
    if not args.json:
        ctl.out.write(f"VM {last.vm_id} migrated to {args.to}\n")
    return EXIT_OK
