"""Every NodeDaemonService RPC gets hostile input through a real client against a real daemon.

The table has rows for each RPC of the service descriptor (a new RPC without rows fails
``test_every_rpc_has_rows``). Each row names the status it must get: NOT_FOUND "VM not found:
<id>" for a missing VM, NOT_FOUND "... not found ..." for a missing pool or volume,
INVALID_ARGUMENT for malformed input, FAILED_PRECONDITION for the wrong state, UNAVAILABLE when no
guest agent answers, UNIMPLEMENTED only for the RPCs in ``NOT_IMPLEMENTED``. No answer may be
UNKNOWN or INTERNAL or carry a traceback, and nothing may be written outside the daemon's own
directories.
"""

from __future__ import annotations

import os
import socket
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Callable
from typing import Any

import attrs
import grpc
from google.protobuf import empty_pb2
from twisted.internet import defer, threads
from twisted.trial import unittest

from quantix.events.bus import RESUME_HEADER
from quantix.proto import node_pb2 as pb
from quantix.rpc.server import SERVICE
from tests import badinput as b
from tests.libvirtd import NAME_PREFIX
from tests.support import Daemon, storage_dir

C = grpc.StatusCode

#: RPCs no box implements: the only ones that may answer UNIMPLEMENTED (none left).
NOT_IMPLEMENTED: frozenset[str] = frozenset()


@attrs.frozen
class Expect:
    code: grpc.StatusCode
    check: Callable[[str], bool] = lambda details: True
    what: str = ""


OK = Expect(C.OK)
INVALID = Expect(C.INVALID_ARGUMENT, bool, "a message")
#: A path outside the node's storage locations: refused without saying whether anything is there.
OUTSIDE = Expect(
    C.INVALID_ARGUMENT,
    lambda d: "outside the storage locations" in d and "not found" not in d and "exist" not in d,
    "outside the storage locations, nothing about existence",
)
CONTROL = Expect(C.INVALID_ARGUMENT, lambda d: "character (U+" in d, "names the control character")


def over_limit(field: str, limit: int) -> Expect:
    """INVALID_ARGUMENT naming the field and its limit, checked before any work."""
    return Expect(
        C.INVALID_ARGUMENT, lambda d: field in d and f"the limit is {limit}" in d, f"{field} .. {limit}"
    )


WRONG_STATE = Expect(C.FAILED_PRECONDITION, bool, "a message")
NO_AGENT = Expect(C.UNAVAILABLE, lambda d: "agent" in d, "mentions the agent")


def vm_missing(vm_id: str) -> Expect:
    """The control plane matches on "VM not found"; long ids may be shortened in the message."""
    want = f"VM not found: {vm_id}"
    return Expect(C.NOT_FOUND, lambda d: d == want or (len(want) > 1000 and d.startswith(want[:200])), want)


def not_found(text: str = "not found") -> Expect:
    return Expect(C.NOT_FOUND, lambda d: text in d, f"contains {text!r}")


def unimplemented(rpc: str) -> Expect:
    want = f"{rpc} is not implemented on this node"
    return Expect(C.UNIMPLEMENTED, lambda d: d == want, want)


@attrs.frozen
class Row:
    rpc: str
    label: str
    request: Any  # a message, or a callable returning one (fresh ids per run)
    expect: Expect
    metadata: tuple[tuple[str, str], ...] | None = None
    #: (rpc, request) calls that must succeed (or find it done) before the row.
    setup: tuple[tuple[str, Any], ...] = ()
    #: The test driver cannot hot-plug; ``QemuFallbackTests`` covers these on the real libvirtd.
    driver_limit: bool = False


def vm_id_rows(rpc: str, make: Callable[[str], Any], empty: Expect = INVALID) -> list[Row]:
    """The id cases every VM RPC shares."""
    return [
        Row(rpc, "empty vm_id", make(""), empty),
        Row(rpc, "non-UUID vm_id", make(b.MARK), vm_missing(b.MARK)),
        Row(rpc, "unknown vm_id", make(b.UNKNOWN), vm_missing(b.UNKNOWN)),
        Row(rpc, "1 MiB vm_id", make(b.BIG), vm_missing(b.BIG)),
        Row(rpc, "XML vm_id", make(b.XML), vm_missing(b.XML)),
        Row(rpc, "'..' vm_id", make(b.DOTS), vm_missing(b.DOTS)),
        Row(rpc, "absolute-path vm_id", make(b.ABS), vm_missing(b.ABS)),
        Row(rpc, "NUL in vm_id", make(b.NUL), CONTROL),
        Row(rpc, "control characters in vm_id", make(b.CTRL), CONTROL),
    ]


def vmreq(vm_id: str) -> Any:
    return pb.VMIdRequest(vm_id=vm_id)


def spec(**kw: Any) -> Any:
    base = {"cpu_cores": 1, "memory_mib": 64}
    base.update(kw)
    return pb.VMSpec(**base)


def create(name: str | None = None, labels: dict | None = None, **spec_kw: Any) -> Callable[[], Any]:
    """A CreateVM request with a fresh id (each success defines a new VM)."""

    def make() -> Any:
        vm_id = b.fresh_id()
        return pb.CreateVMOnNodeRequest(
            vm_id=vm_id,
            name=name if name is not None else f"{b.MARK}-{vm_id[:8]}",
            spec=spec(**spec_kw),
            labels=labels or {},
        )

    return make


def disk(**kw: Any) -> Any:
    return pb.DiskSpec(**{"id": "d0", "size_gib": 1, **kw})


def _rows() -> list[Row]:
    R, S = b.RUNNING, b.STOPPED
    rows: list[Row] = []
    add = rows.extend

    # -- lifecycle ------------------------------------------------------------------------------
    for rpc in ("StartVM", "ForceStopVM", "RebootVM", "PauseVM", "ResumeVM", "DeleteVM", "GetVMStatus"):
        add(vm_id_rows(rpc, vmreq))
    add(vm_id_rows("StopVM", lambda v: pb.StopVMRequest(vm_id=v, timeout_seconds=b.U32)))
    add(
        [
            Row(
                "StopVM", "huge timeout on a stopped VM", pb.StopVMRequest(vm_id=S, timeout_seconds=b.U32), OK
            ),
            Row("RebootVM", "stopped VM", vmreq(S), WRONG_STATE),
            Row("PauseVM", "stopped VM", vmreq(S), WRONG_STATE),
            Row("ResumeVM", "stopped VM", vmreq(S), WRONG_STATE),
            Row("DeleteVM", "running VM", vmreq(R), WRONG_STATE),
            Row("ForceStopVM", "stopped VM (idempotent)", vmreq(S), OK),
            Row("StartVM", "running VM (idempotent)", vmreq(R), OK),
            Row("GetVMStatus", "VM name instead of id", vmreq("vm-running"), OK),
        ]
    )

    cr = "CreateVM"
    add(
        [
            Row(cr, "empty vm_id", pb.CreateVMOnNodeRequest(name=b.MARK, spec=spec()), INVALID),
            Row(cr, "non-UUID vm_id", pb.CreateVMOnNodeRequest(vm_id=b.MARK, spec=spec()), INVALID),
            Row(cr, "'..' vm_id", pb.CreateVMOnNodeRequest(vm_id=b.DOTS, spec=spec()), INVALID),
            Row(cr, "1 MiB vm_id", pb.CreateVMOnNodeRequest(vm_id=b.BIG, spec=spec()), INVALID),
            Row(cr, "no spec", lambda: pb.CreateVMOnNodeRequest(vm_id=b.fresh_id(), name=b.MARK), INVALID),
            Row(
                cr,
                "existing id, other spec",
                pb.CreateVMOnNodeRequest(vm_id=S, spec=spec()),
                Expect(C.ALREADY_EXISTS),
            ),
            Row(cr, "1 MiB name", create(name=b.BIG), INVALID),
            Row(cr, "XML name", create(name=b.XML), OK),
            Row(cr, "'..' name", create(name=b.DOTS), INVALID),
            Row(cr, "absolute-path name", create(name=b.ABS), INVALID),
            Row(cr, "name '..'", create(name=".."), OK),
            Row(cr, "XML labels", create(labels={b.XML: b.XML, "k": "]]>"}), OK),
            Row(cr, "1 MiB label value", create(labels={"k": b.BIG}), INVALID),
            Row(cr, "1 MiB label key", create(labels={b.BIG: "v"}), INVALID),
            Row(cr, "zero CPUs", create(cpu_cores=0), INVALID),
            Row(cr, "uint32-max CPUs", create(cpu_cores=b.U32), INVALID),
            Row(cr, "uint64-max memory", create(memory_mib=b.U64), INVALID),
            Row(cr, "zero memory", create(memory_mib=0), INVALID),
            Row(cr, "unknown DiskBus falls back to virtio", create(disks=[disk(bus=b.BAD_ENUM)]), OK),
            Row(
                cr,
                "unknown NicModel falls back to virtio",
                create(nics=[pb.NicSpec(id="n0", model=b.BAD_ENUM)]),
                OK,
            ),
            Row(cr, "unknown DiskFormat", create(disks=[disk(format=b.BAD_ENUM)]), OK),
            Row(cr, "unknown Firmware", create(firmware=b.BAD_ENUM), OK),
            Row(cr, "unknown BootDevice", create(boot_order=[b.BAD_ENUM]), OK),
            Row(cr, "uint64-max disk size", create(disks=[disk(size_gib=b.U64)]), INVALID),
            Row(cr, "'..' disk path", create(disks=[disk(path=b.DOTS)]), INVALID),
            Row(cr, "XML disk path", create(disks=[disk(path=b.XML)]), INVALID),
            Row(cr, "1 MiB disk path", create(disks=[disk(path="/" + b.BIG)]), INVALID),
            Row(cr, "'..' disk id", create(disks=[disk(id=b.DOTS)]), INVALID),
            Row(cr, "'..' backing file", create(disks=[disk(backing_file=b.DOTS)]), INVALID),
            Row(
                cr, "absolute backing file outside storage", create(disks=[disk(backing_file=b.ABS)]), OUTSIDE
            ),
            Row(cr, "/etc/passwd as backing file", create(disks=[disk(backing_file="/etc/passwd")]), OUTSIDE),
            Row(cr, "/etc/shadow as disk", create(disks=[disk(path="/etc/shadow")]), OUTSIDE),
            Row(cr, "/dev/sda as disk", create(disks=[disk(path="/dev/sda")]), OUTSIDE),
            Row(cr, "/dev/zero as disk", create(disks=[disk(path="/dev/zero")]), OUTSIDE),
            Row(cr, "missing disk outside storage", create(disks=[disk(path=b.ABS)]), OUTSIDE),
            Row(cr, "bad MAC", create(nics=[pb.NicSpec(id="n0", mac_address=b.XML)]), INVALID),
            Row(
                cr,
                "uint64-max NIC bandwidth",
                create(nics=[pb.NicSpec(id="n0", bandwidth_mbps=b.U64)]),
                INVALID,
            ),
            Row(cr, "1 MiB NIC id", create(nics=[pb.NicSpec(id=b.BIG)]), INVALID),
            Row(cr, "XML NIC id", create(nics=[pb.NicSpec(id=b.XML)]), OK),
            Row(cr, "1 MiB bridge name", create(nics=[pb.NicSpec(id="n0", bridge=b.BIG)]), INVALID),
            Row(cr, "'..' ISO path", create(cdroms=[pb.CdromSpec(id="c0", iso_path=b.DOTS)]), INVALID),
            # Not checked at define time: libvirt refuses to start the VM instead.
            Row(cr, "ISO outside storage", create(cdroms=[pb.CdromSpec(id="c0", iso_path=b.ABS)]), OUTSIDE),
            Row(
                cr,
                "/etc/shadow as ISO",
                create(cdroms=[pb.CdromSpec(id="c0", iso_path="/etc/shadow")]),
                OUTSIDE,
            ),
            # Not checked at define time: libvirt refuses to start the VM instead.
            Row(
                cr,
                "missing ISO in the ISO directory",
                create(cdroms=[pb.CdromSpec(id="c0", iso_path=b.MARK + ".iso")]),
                OK,
            ),
            Row(
                cr,
                "uint32-max VNC port",
                create(console=pb.ConsoleSpec(vnc_enabled=True, vnc_port=b.U32)),
                INVALID,
            ),
            Row(
                cr,
                "XML cloud-init",
                create(cloud_init=pb.CloudInitConfig(user_data=b.XML, meta_data=b.XML)),
                OK,
            ),
            Row(
                cr,
                "100,000 labels",
                create(labels={f"k{i}": "v" for i in range(100_000)}),
                over_limit("labels", 64),
            ),
            Row(
                cr,
                "5,000 disks",
                create(disks=[disk(id=f"d{i}") for i in range(5000)]),
                over_limit("disks", 64),
            ),
            Row(
                cr,
                "5,000 NICs",
                create(nics=[pb.NicSpec(id=f"n{i}") for i in range(5000)]),
                over_limit("nics", 32),
            ),
            Row(
                cr,
                "100 CD-ROMs",
                create(cdroms=[pb.CdromSpec(id=f"c{i}") for i in range(100)]),
                over_limit("cdroms", 8),
            ),
            Row(
                cr,
                "2 MiB cloud-init user-data",
                create(cloud_init=pb.CloudInitConfig(user_data="#cloud-config\n" + "x" * (2 << 20))),
                over_limit("user_data", 1 << 20),
            ),
            Row(
                cr,
                "NUL in cloud-init user-data",
                create(cloud_init=pb.CloudInitConfig(user_data=b.NUL)),
                CONTROL,
            ),
            Row(
                cr,
                "tabs and newlines in cloud-init",
                create(cloud_init=pb.CloudInitConfig(user_data="#cloud-config\r\nruncmd:\n\t- [true]\n")),
                OK,
            ),
            Row(cr, "NUL in name", create(name=b.NUL), CONTROL),
            Row(cr, "control characters in name", create(name=b.CTRL), CONTROL),
            Row(cr, "NUL in a label key", create(labels={b.NUL: "v"}), CONTROL),
            Row(cr, "newline in a label value", create(labels={"k": b.CTRL}), CONTROL),
            Row(cr, "NUL in a disk path", create(disks=[disk(path="/" + b.NUL)]), CONTROL),
            Row(
                cr,
                "NUL in an ISO path",
                create(cdroms=[pb.CdromSpec(id="c0", iso_path="/" + b.NUL)]),
                CONTROL,
            ),
            Row(
                cr,
                "control character in a bridge",
                create(nics=[pb.NicSpec(id="n0", bridge=b.CTRL)]),
                CONTROL,
            ),
        ]
    )

    # -- status, console, logs -------------------------------------------------------------------
    add(vm_id_rows("GetConsole", vmreq))
    add([Row("GetConsole", "stopped VM", vmreq(S), WRONG_STATE)])
    add(vm_id_rows("GetVMLogs", lambda v: pb.GetVMLogsRequest(vm_id=v, lines=b.U32)))
    add([Row("GetVMLogs", "uint32-max lines", pb.GetVMLogsRequest(vm_id=R, lines=b.U32), OK)])
    add([Row("ListVMs", "empty request", empty_pb2.Empty(), OK)])

    # -- snapshots -------------------------------------------------------------------------------
    add(vm_id_rows("CreateSnapshot", lambda v: pb.CreateSnapshotRequest(vm_id=v, name="s1")))
    add(vm_id_rows("ListSnapshots", vmreq))
    for rpc, cls in (
        ("RevertSnapshot", pb.RevertSnapshotRequest),
        ("DeleteSnapshot", pb.DeleteSnapshotRequest),
    ):
        add(vm_id_rows(rpc, lambda v, cls=cls: cls(vm_id=v, snapshot_id="s1")))
        for label, snap in (
            ("empty", ""),
            ("unknown", b.MARK),
            ("XML", b.XML),
            ("'..'", b.DOTS),
            ("1 MiB", b.BIG),
        ):
            add(
                [
                    Row(
                        rpc,
                        f"{label} snapshot id",
                        cls(vm_id=S, snapshot_id=snap),
                        not_found("snapshot not found"),
                    )
                ]
            )
    cs = "CreateSnapshot"
    add(
        [
            Row(cs, "XML name", pb.CreateSnapshotRequest(vm_id=S, name=b.XML), INVALID),
            Row(cs, "'..' name", pb.CreateSnapshotRequest(vm_id=S, name=".."), INVALID),
            Row(cs, "absolute-path name", pb.CreateSnapshotRequest(vm_id=S, name=b.ABS), INVALID),
            Row(cs, "1 MiB name", pb.CreateSnapshotRequest(vm_id=S, name=b.BIG), INVALID),
            Row(
                cs,
                "1 MiB description",
                pb.CreateSnapshotRequest(vm_id=S, name="s1", description=b.BIG),
                INVALID,
            ),
            Row(cs, "XML description", pb.CreateSnapshotRequest(vm_id=S, name="s2", description=b.XML), OK),
            Row(cs, "NUL in name", pb.CreateSnapshotRequest(vm_id=S, name=b.NUL), CONTROL),
            Row(
                cs,
                "NUL in description",
                pb.CreateSnapshotRequest(vm_id=S, name="s4", description=b.NUL),
                CONTROL,
            ),
            Row(
                cs,
                "multi-line description",
                pb.CreateSnapshotRequest(vm_id=S, name="s5", description="line 1\n\tline 2\r\n"),
                OK,
            ),
            Row(
                cs,
                "quiesce without an agent",
                pb.CreateSnapshotRequest(vm_id=R, name="s3", quiesce=True),
                NO_AGENT,
            ),
        ]
    )

    # -- devices ---------------------------------------------------------------------------------
    add(vm_id_rows("AttachDisk", lambda v: pb.AttachDiskRequest(vm_id=v, disk=disk())))
    add(vm_id_rows("AttachNIC", lambda v: pb.AttachNICRequest(vm_id=v, nic=pb.NicSpec(id="n0"))))
    add(vm_id_rows("DetachDisk", lambda v: pb.DetachDiskRequest(vm_id=v, disk_id="d0")))
    add(vm_id_rows("DetachNIC", lambda v: pb.DetachNICRequest(vm_id=v, nic_id="n0")))
    add(vm_id_rows("ChangeMedia", lambda v: pb.ChangeMediaRequest(vm_id=v, device="sda")))
    ad, an = "AttachDisk", "AttachNIC"
    add(
        [
            Row(ad, "no disk", pb.AttachDiskRequest(vm_id=S), INVALID),
            Row(
                ad,
                "unknown bus falls back",
                pb.AttachDiskRequest(vm_id=S, disk=disk(id="bus", bus=b.BAD_ENUM)),
                OK,
                driver_limit=True,
            ),
            Row(ad, "'..' path", pb.AttachDiskRequest(vm_id=S, disk=disk(id="dots", path=b.DOTS)), INVALID),
            Row(ad, "XML id", pb.AttachDiskRequest(vm_id=S, disk=disk(id=b.XML)), INVALID),
            Row(ad, "1 MiB id", pb.AttachDiskRequest(vm_id=S, disk=disk(id=b.BIG)), INVALID),
            Row(
                ad,
                "uint64-max size",
                pb.AttachDiskRequest(vm_id=S, disk=disk(id="huge", size_gib=b.U64)),
                INVALID,
            ),
            Row(
                ad,
                "unknown pool",
                pb.AttachDiskRequest(vm_id=S, disk=disk(id="p", pool_id=b.UNKNOWN)),
                not_found(),
            ),
            Row(an, "no NIC", pb.AttachNICRequest(vm_id=S), INVALID),
            Row(
                an,
                "unknown model falls back",
                pb.AttachNICRequest(vm_id=S, nic=pb.NicSpec(id="m", model=b.BAD_ENUM)),
                OK,
                driver_limit=True,
            ),
            Row(
                an,
                "XML MAC",
                pb.AttachNICRequest(vm_id=S, nic=pb.NicSpec(id="x", mac_address=b.XML)),
                INVALID,
            ),
            Row(
                an,
                "1 MiB bridge",
                pb.AttachNICRequest(vm_id=S, nic=pb.NicSpec(id="y", bridge=b.BIG)),
                INVALID,
            ),
            Row(an, "XML id", pb.AttachNICRequest(vm_id=S, nic=pb.NicSpec(id=b.XML)), OK, driver_limit=True),
            Row(an, "1 MiB id", pb.AttachNICRequest(vm_id=S, nic=pb.NicSpec(id=b.BIG)), INVALID),
        ]
    )
    for rpc, cls, field, what in (
        ("DetachDisk", pb.DetachDiskRequest, "disk_id", "disk not found"),
        ("DetachNIC", pb.DetachNICRequest, "nic_id", "NIC not found"),
    ):
        for label, value in (("empty", ""), ("XML", b.XML), ("'..'", b.DOTS), ("1 MiB", b.BIG)):
            add([Row(rpc, f"{label} {field}", cls(vm_id=S, **{field: value}), not_found(what))])
    cm = "ChangeMedia"
    cd_vm = b.fresh_id()
    has_cd = (
        (
            cr,
            pb.CreateVMOnNodeRequest(
                vm_id=cd_vm, name=f"{b.MARK}-cd", spec=spec(cdroms=[pb.CdromSpec(id="c0")])
            ),
        ),
    )

    def media(iso: str, device: str = "c0") -> Any:
        return pb.ChangeMediaRequest(vm_id=cd_vm, device=device, iso_path=iso)

    add(
        [
            Row(cm, "'..' ISO path", media(b.DOTS), INVALID, setup=has_cd),
            Row(cm, "absolute ISO outside storage", media(b.ABS), OUTSIDE, setup=has_cd),
            Row(cm, "/etc/shadow as ISO", media("/etc/shadow"), OUTSIDE, setup=has_cd),
            Row(cm, "XML ISO name", media(b.XML), not_found("ISO not found"), setup=has_cd),
            Row(cm, "1 MiB ISO path", media("/" + b.BIG), INVALID, setup=has_cd),
            Row(cm, "unknown device", media("", device=b.XML), OK, setup=has_cd, driver_limit=True),
            Row(
                cm,
                "no CD-ROM",
                pb.ChangeMediaRequest(vm_id=S, device="sda", iso_path=b.ABS),
                not_found("CD-ROM not found"),
            ),
            Row(
                cm, "XML device", pb.ChangeMediaRequest(vm_id=S, device=b.XML), not_found("CD-ROM not found")
            ),
        ]
    )

    # -- guest agent -----------------------------------------------------------------------------
    agent_rpcs = {
        "PingAgent": lambda v: pb.VMIdRequest(vm_id=v),
        "ExecuteInGuest": lambda v: pb.ExecuteInGuestRequest(vm_id=v, command="true", timeout_seconds=b.U32),
        "ReadGuestFile": lambda v: pb.ReadGuestFileRequest(
            vm_id=v, path=b.DOTS, offset=b.U64, max_size=b.U64
        ),
        "WriteGuestFile": lambda v: pb.WriteGuestFileRequest(
            vm_id=v, path=b.ABS, data=b.BIG.encode(), mode=b.U32
        ),
        "GuestShutdown": lambda v: pb.GuestShutdownRequest(vm_id=v, delay_seconds=b.U32, message=b.XML),
        "QuiesceFilesystems": lambda v: pb.QuiesceFilesystemsRequest(
            vm_id=v, mount_points=[b.DOTS], timeout_seconds=b.U32
        ),
        "ThawFilesystems": lambda v: pb.ThawFilesystemsRequest(vm_id=v, quiesce_token=b.XML),
        "SyncTime": lambda v: pb.SyncTimeRequest(vm_id=v, force=True),
    }
    for rpc, make in agent_rpcs.items():
        add(vm_id_rows(rpc, make))
        add([Row(rpc, "running VM without an agent", make(R), NO_AGENT)])
        add([Row(rpc, "stopped VM", make(S), NO_AGENT)])
    add(
        [
            Row("ExecuteInGuest", "empty command", pb.ExecuteInGuestRequest(vm_id=R), INVALID),
            Row(
                "ExecuteInGuest", "1 MiB command", pb.ExecuteInGuestRequest(vm_id=R, command=b.BIG), NO_AGENT
            ),
            Row("ReadGuestFile", "empty path", pb.ReadGuestFileRequest(vm_id=R), INVALID),
            Row("ReadGuestFile", "NUL in path", pb.ReadGuestFileRequest(vm_id=R, path="/" + b.NUL), CONTROL),
            Row(
                "ExecuteInGuest",
                "NUL in an argument",
                pb.ExecuteInGuestRequest(vm_id=R, command="echo", args=[b.NUL]),
                CONTROL,
            ),
            Row(
                "ExecuteInGuest",
                "escape sequences in arguments reach the guest",
                pb.ExecuteInGuestRequest(vm_id=R, command="printf", args=[b.CTRL]),
                NO_AGENT,
            ),
            Row(
                "ExecuteInGuest",
                "2,000 arguments",
                pb.ExecuteInGuestRequest(vm_id=R, command="echo", args=["a"] * 2000),
                over_limit("args", 1024),
            ),
            Row(
                "ExecuteInGuest",
                "newline in an environment name",
                pb.ExecuteInGuestRequest(vm_id=R, command="env", environment={b.CTRL: "v"}),
                CONTROL,
            ),
            Row("WriteGuestFile", "empty path", pb.WriteGuestFileRequest(vm_id=R), INVALID),
        ]
    )

    # -- network ports (no Open vSwitch on this daemon) -------------------------------------------
    def nport(**kw: Any) -> Any:
        base = {"port_id": "p1", "vm_id": S, "mac_address": "52:54:00:00:00:01", "ovn_port_name": "lsp-1"}
        return pb.ConfigureNetworkPortRequest(**{**base, **kw})

    add(
        [
            Row("GetOVSStatus", "no OVS on the host", empty_pb2.Empty(), OK),
            Row("ListNetworkPorts", "empty request", empty_pb2.Empty(), OK),
            Row("ConfigureNetworkPort", "unknown VM", nport(vm_id=b.UNKNOWN), vm_missing(b.UNKNOWN)),
            Row("ConfigureNetworkPort", "malformed MAC", nport(mac_address=b.XML), INVALID),
            Row("ConfigureNetworkPort", "missing port name", nport(ovn_port_name=""), INVALID),
            Row("ConfigureNetworkPort", "empty port id", nport(port_id=""), INVALID),
            Row("ConfigureNetworkPort", "1 MiB port name", nport(ovn_port_name=b.BIG), INVALID),
            Row("ConfigureNetworkPort", "unknown binding type", nport(binding_type=b.BAD_ENUM), INVALID),
            Row(
                "ConfigureNetworkPort",
                "QoS out of range",
                nport(qos=pb.NetworkPortQoS(ingress_rate_kbps=b.U64)),
                INVALID,
            ),
            Row(
                "GetNetworkPortStatus",
                "empty port id",
                pb.GetNetworkPortStatusRequest(port_id=""),
                not_found(),
            ),
            Row(
                "GetNetworkPortStatus",
                "1 MiB port id",
                pb.GetNetworkPortStatusRequest(port_id=b.BIG),
                not_found(),
            ),
            Row("DeleteNetworkPort", "unknown port", pb.DeleteNetworkPortRequest(port_id=b.BIG), OK),
        ]
    )

    # -- storage ---------------------------------------------------------------------------------
    def local_pool(pool_id: str, path: str = "") -> Any:
        return pb.InitStoragePoolRequest(
            pool_id=pool_id,
            type=pb.STORAGE_POOL_TYPE_LOCAL_DIR,
            config=pb.StoragePoolConfig(local=pb.LocalDirPoolConfig(path=path)),
        )

    def ceph_pool(keyring: str) -> Any:
        return pb.InitStoragePoolRequest(
            pool_id=b.MARK + "ceph",
            type=4,
            config=pb.StoragePoolConfig(
                ceph=pb.CephPoolConfig(pool_name="p", monitors=["m"], keyring_path=keyring)
            ),
        )

    ip = "InitStoragePool"
    add(
        [
            Row(ip, "empty pool_id", local_pool(""), INVALID),
            Row(ip, "'..' pool_id", local_pool(b.DOTS), INVALID),
            Row(ip, "pool_id '..'", local_pool(".."), INVALID),
            Row(ip, "1 MiB pool_id", local_pool(b.BIG), INVALID),
            Row(ip, "reserved pool_id", local_pool("default"), INVALID),
            Row(ip, "XML pool_id", local_pool(b.XML), OK),
            Row(ip, "relative path", local_pool(b.MARK + "r", b.DOTS), INVALID),
            Row(ip, "NUL in pool_id", local_pool(b.NUL), CONTROL),
            Row(ip, "pool at /", local_pool(b.MARK + "root", "/"), INVALID),
            Row(ip, "pool at /etc", local_pool(b.MARK + "etc", "/etc"), INVALID),
            Row(ip, "pool under /usr", local_pool(b.MARK + "usr", f"/usr/lib/{b.MARK}"), INVALID),
            Row(ip, "pool at /var/lib", local_pool(b.MARK + "vl", "/var/lib"), INVALID),
            Row(
                ip,
                "NFS mounted on /boot",
                pb.InitStoragePoolRequest(
                    pool_id=b.MARK + "nfs",
                    type=3,
                    config=pb.StoragePoolConfig(
                        nfs=pb.NfsPoolConfig(server="192.0.2.1", export_path="/x", mount_point="/boot")
                    ),
                ),
                INVALID,
            ),
            Row(ip, "/dev/zero as Ceph keyring", ceph_pool("/dev/zero"), OUTSIDE),
            Row(ip, "/etc/shadow as Ceph keyring", ceph_pool("/etc/shadow"), OUTSIDE),
            Row(ip, "NUL in path", local_pool(b.MARK + "n", "/tmp/" + b.NUL), CONTROL),
            Row(ip, "1 MiB path", local_pool(b.MARK + "b", "/" + b.BIG), INVALID),
            Row(ip, "unknown type", pb.InitStoragePoolRequest(pool_id=b.MARK, type=b.BAD_ENUM), INVALID),
            Row(ip, "LVM (no backend)", pb.InitStoragePoolRequest(pool_id=b.MARK, type=2), INVALID),
            Row(ip, "NFS without server", pb.InitStoragePoolRequest(pool_id=b.MARK, type=3), INVALID),
            Row(ip, "Ceph without monitors", pb.InitStoragePoolRequest(pool_id=b.MARK, type=4), INVALID),
            Row(
                ip,
                "Ceph with a '..' keyring",
                pb.InitStoragePoolRequest(
                    pool_id=b.MARK,
                    type=4,
                    config=pb.StoragePoolConfig(
                        ceph=pb.CephPoolConfig(pool_name="p", monitors=["m"], keyring_path=b.DOTS)
                    ),
                ),
                INVALID,
            ),
            Row(ip, "iSCSI without portal", pb.InitStoragePoolRequest(pool_id=b.MARK, type=6), INVALID),
        ]
    )

    def pool_id_rows(rpc: str, make: Callable[[str], Any], missing: Expect) -> list[Row]:
        return [
            Row(rpc, "unknown pool_id", make(b.UNKNOWN), missing),
            Row(rpc, "XML pool_id", make(b.XML + "y"), missing),
            Row(rpc, "'..' pool_id", make(b.DOTS), missing),
            Row(rpc, "absolute pool_id", make(b.ABS), missing),
            Row(rpc, "1 MiB pool_id", make(b.BIG), missing),
        ]

    gone = not_found()
    add(pool_id_rows("GetStoragePoolInfo", lambda p: pb.StoragePoolIdRequest(pool_id=p), gone))
    add(pool_id_rows("ListVolumes", lambda p: pb.ListVolumesRequest(pool_id=p), gone))
    add(pool_id_rows("ListStoragePoolFiles", lambda p: pb.ListStoragePoolFilesRequest(pool_id=p), gone))
    add(
        pool_id_rows(
            "CreateVolume", lambda p: pb.CreateVolumeRequest(pool_id=p, volume_id="v", size_bytes=1), gone
        )
    )
    add(pool_id_rows("DeleteVolume", lambda p: pb.VolumeIdRequest(pool_id=p, volume_id="v"), gone))
    add(
        pool_id_rows(
            "ResizeVolume", lambda p: pb.ResizeVolumeRequest(pool_id=p, volume_id="v", new_size_bytes=1), gone
        )
    )
    add(
        pool_id_rows(
            "CloneVolume",
            lambda p: pb.CloneVolumeRequest(pool_id=p, source_volume_id="v", dest_volume_id="w"),
            gone,
        )
    )
    add(
        pool_id_rows(
            "CreateVolumeSnapshot",
            lambda p: pb.CreateVolumeSnapshotRequest(pool_id=p, volume_id="v", snapshot_id="s"),
            gone,
        )
    )
    add(pool_id_rows("GetVolumeAttachInfo", lambda p: pb.VolumeIdRequest(pool_id=p, volume_id="v"), gone))
    dp = "DestroyStoragePool"
    add(
        [
            Row(dp, "unknown pool (idempotent)", pb.StoragePoolIdRequest(pool_id=b.UNKNOWN), OK),
            Row(dp, "empty pool_id", pb.StoragePoolIdRequest(pool_id=""), INVALID),
            Row(dp, "reserved pool_id", pb.StoragePoolIdRequest(pool_id="default"), INVALID),
            Row(dp, "'..' pool_id", pb.StoragePoolIdRequest(pool_id=b.DOTS), INVALID),
            Row(dp, "1 MiB pool_id", pb.StoragePoolIdRequest(pool_id=b.BIG), INVALID),
        ]
    )
    lf = "ListStoragePoolFiles"
    add(
        [
            Row(lf, "'..' path", pb.ListStoragePoolFilesRequest(path=b.DOTS), INVALID),
            Row(lf, "absolute path", pb.ListStoragePoolFilesRequest(path="/etc"), INVALID),
            Row(lf, "missing path", pb.ListStoragePoolFilesRequest(path=b.MARK), not_found()),
            Row(lf, "1 MiB path", pb.ListStoragePoolFilesRequest(path=b.BIG), not_found()),
        ]
    )
    # Volumes in the VM-disk pool (pool_id "" or "default").
    cv = "CreateVolume"
    vol = b.MARK + "-vol"

    def newvol(**kw: Any) -> Any:
        return pb.CreateVolumeRequest(**{"pool_id": "default", "volume_id": vol, "size_bytes": 1 << 20, **kw})

    add(
        [
            Row(cv, "empty volume_id", newvol(volume_id=""), INVALID),
            Row(cv, "'..' volume_id", newvol(volume_id=b.DOTS), INVALID),
            Row(cv, "volume_id '..'", newvol(volume_id=".."), INVALID),
            Row(cv, "1 MiB volume_id", newvol(volume_id=b.BIG), INVALID),
            Row(cv, "zero size", newvol(size_bytes=0), INVALID),
            Row(cv, "uint64-max size", newvol(volume_id=vol + "h", size_bytes=b.U64), INVALID),
            Row(cv, "unknown source type", newvol(source_type=b.BAD_ENUM), INVALID),
            Row(cv, "clone of an unknown volume", newvol(source_type=1, source_id=b.UNKNOWN), not_found()),
            Row(
                cv,
                "image outside the image dirs",
                newvol(source_type=2, source_id="/etc/passwd"),
                not_found(),
            ),
            Row(cv, "'..' image", newvol(source_type=2, source_id=b.DOTS), not_found()),
            Row(cv, "unknown snapshot", newvol(source_type=3, source_id=b.MARK), not_found()),
            Row(cv, "XML volume_id", newvol(volume_id=b.XML), OK),
            Row(cv, "a real volume", newvol(), OK),
            Row(cv, "the same volume again", newvol(), Expect(C.ALREADY_EXISTS)),
        ]
    )
    vid = pb.VolumeIdRequest
    for rpc in ("DeleteVolume", "GetVolumeAttachInfo"):
        bad_vol = OK if rpc == "DeleteVolume" else not_found()
        add(
            [
                Row(rpc, "empty volume_id", vid(pool_id="default", volume_id=""), INVALID),
                Row(rpc, "'..' volume_id", vid(pool_id="default", volume_id=b.DOTS), INVALID),
                Row(rpc, "unknown volume_id", vid(pool_id="default", volume_id=b.UNKNOWN), bad_vol),
                Row(rpc, "XML volume_id", vid(pool_id="default", volume_id=b.XML + "z"), bad_vol),
            ]
        )
    has_vol = ((cv, newvol()),)
    rv = "ResizeVolume"
    add(
        [
            Row(
                rv,
                "unknown volume",
                pb.ResizeVolumeRequest(pool_id="default", volume_id=b.UNKNOWN, new_size_bytes=1),
                not_found(),
            ),
            Row(
                rv,
                "'..' volume",
                pb.ResizeVolumeRequest(pool_id="default", volume_id=b.DOTS, new_size_bytes=1),
                INVALID,
            ),
            Row(
                rv,
                "shrink",
                pb.ResizeVolumeRequest(pool_id="default", volume_id=vol, new_size_bytes=1),
                INVALID,
                setup=has_vol,
            ),
            Row(
                rv,
                "uint64-max size",
                pb.ResizeVolumeRequest(pool_id="default", volume_id=vol, new_size_bytes=b.U64),
                INVALID,
                setup=has_vol,
            ),
        ]
    )
    cl = "CloneVolume"
    add(
        [
            Row(
                cl,
                "unknown source",
                pb.CloneVolumeRequest(source_volume_id=b.UNKNOWN, dest_volume_id="w"),
                not_found(),
            ),
            Row(
                cl,
                "'..' destination",
                pb.CloneVolumeRequest(source_volume_id=vol, dest_volume_id=b.DOTS),
                INVALID,
                setup=has_vol,
            ),
            Row(
                cl,
                "empty destination",
                pb.CloneVolumeRequest(source_volume_id=vol, dest_volume_id=""),
                INVALID,
            ),
            Row(
                cl,
                "1 MiB destination",
                pb.CloneVolumeRequest(source_volume_id=vol, dest_volume_id=b.BIG),
                INVALID,
                setup=has_vol,
            ),
            Row(
                cl,
                "XML destination",
                pb.CloneVolumeRequest(source_volume_id=vol, dest_volume_id=b.XML),
                OK,
                setup=has_vol,
            ),
        ]
    )
    sn = "CreateVolumeSnapshot"
    add(
        [
            Row(
                sn,
                "unknown volume",
                pb.CreateVolumeSnapshotRequest(volume_id=b.UNKNOWN, snapshot_id="s"),
                not_found(),
            ),
            Row(
                sn,
                "'..' snapshot id",
                pb.CreateVolumeSnapshotRequest(volume_id=vol, snapshot_id=b.DOTS),
                INVALID,
                setup=has_vol,
            ),
            Row(
                sn,
                "XML snapshot id",
                pb.CreateVolumeSnapshotRequest(volume_id=vol, snapshot_id=b.XML),
                OK,
                setup=has_vol,
            ),
            Row(
                sn,
                "'@' snapshot id",
                pb.CreateVolumeSnapshotRequest(volume_id=vol, snapshot_id="a@b"),
                INVALID,
            ),
            Row(
                sn,
                "empty snapshot id",
                pb.CreateVolumeSnapshotRequest(volume_id=vol, snapshot_id=""),
                INVALID,
            ),
        ]
    )
    add(
        [
            Row("ListStoragePools", "empty request", empty_pb2.Empty(), OK),
            Row("ListImages", "empty request", empty_pb2.Empty(), OK),
            Row("GetStoragePoolInfo", "empty pool_id is the VM-disk pool", pb.StoragePoolIdRequest(), OK),
        ]
    )

    # -- node and events -------------------------------------------------------------------------
    add(
        [
            Row("HealthCheck", "empty request", pb.HealthCheckRequest(), OK),
            Row("GetNodeInfo", "empty request", empty_pb2.Empty(), OK),
            Row("StreamEvents", "no resume header", empty_pb2.Empty(), OK),
            Row(
                "StreamEvents", "non-numeric resume id", empty_pb2.Empty(), INVALID, ((RESUME_HEADER, b.XML),)
            ),
            Row("StreamEvents", "negative resume id", empty_pb2.Empty(), OK, ((RESUME_HEADER, "-1"),)),
            Row("StreamEvents", "huge resume id", empty_pb2.Empty(), OK, ((RESUME_HEADER, str(b.U64 * 10)),)),
            Row("StreamMetrics", "uint32-max interval", pb.StreamMetricsRequest(interval_seconds=b.U32), OK),
        ]
    )

    # -- migration (nothing here reaches a network: each is refused before the target is dialled) --
    far = "192.0.2.1"  # TEST-NET-1: never dialled, every row fails earlier

    def migrate(vm_id: str = R, target: str = far, **kw: Any) -> Any:
        return pb.MigrateVMRequest(vm_id=vm_id, target_node_uri=target, **kw)

    def target_rows(rpc: str, make: Callable[[str], Any]) -> list[Row]:
        """Targets (or sources) that name no other node."""
        bad = {
            "empty": "",
            "blank": "   ",
            "malformed URI": "qemu+tcp://[::1/system",
            "not a host": "bad host!",
            "1 MiB": b.BIG,
            "XML": b.XML,
            "local qemu:///": "qemu:///system",
            "unix socket": "qemu+unix:///system",
            "test driver": "test:///default",
            "session URI": f"qemu+tcp://{far}/session",
            "own loopback": "127.0.0.1",
            "own name": socket.gethostname(),
            "own address with port": "127.0.0.1:9090",
            "own URI": "qemu+tls://localhost/system",
        }
        return [Row(rpc, f"{label} target", make(value), INVALID) for label, value in bad.items()]

    add(vm_id_rows("MigrateVM", lambda v: migrate(v)))
    add(target_rows("MigrateVM", lambda t: migrate(target=t)))
    add(
        [
            Row("MigrateVM", "storage copy of a stopped VM", migrate(S, storage=True), INVALID),
            Row("PrepareMigration", "empty vm_id", pb.PrepareMigrationRequest(source_node_uri=far), INVALID),
            Row("PrepareMigration", "non-UUID vm_id", pb.PrepareMigrationRequest(vm_id=b.BIG), INVALID),
            Row(
                "PrepareMigration",
                "VM already here",
                pb.PrepareMigrationRequest(vm_id=R, source_node_uri=far),
                Expect(C.ALREADY_EXISTS, lambda d: R in d, "names the VM"),
            ),
            Row("ReceiveMigration", "empty token", pb.MigrationToken(vm_id=R), INVALID),
            Row("ReceiveMigration", "unknown token", pb.MigrationToken(token=b.XML, vm_id=R), not_found()),
            Row("ReceiveMigration", "1 MiB token", pb.MigrationToken(token=b.BIG), not_found()),
        ]
    )
    prepare = lambda t: pb.PrepareMigrationRequest(vm_id=b.UNKNOWN, source_node_uri=t)  # noqa: E731
    add(target_rows("PrepareMigration", prepare))

    # -- image downloads (no row reaches a server: every one fails before the transfer) -----------
    dl = pb.DownloadImageOnNodeRequest
    url = "http://127.0.0.1:9/x.img"
    add(
        [
            Row("DownloadImage", "no url", dl(), INVALID),
            Row("DownloadImage", "XML url", dl(url=b.XML), INVALID),
            Row("DownloadImage", "file url", dl(url=f"file:///etc/{b.MARK}"), INVALID),
            Row("DownloadImage", "ftp url", dl(url=f"ftp://h/{b.MARK}.img"), INVALID),
            Row("DownloadImage", "target with ..", dl(url=url, target_dir=b.DOTS), INVALID),
            Row("DownloadImage", "target outside", dl(url=url, target_dir=b.ABS), INVALID),
            Row("DownloadImage", "absolute filename", dl(url=url, filename=b.ABS), INVALID),
            Row("DownloadImage", "dotted filename", dl(url=url, filename=b.DOTS), INVALID),
            Row("DownloadImage", "huge filename", dl(url=url, filename=b.BIG), INVALID),
            Row("DownloadImage", "bad checksum", dl(url=url, checksum=b.XML), INVALID),
            Row(
                "DownloadImage",
                "bad checksum type",
                dl(url=url, checksum="a" * 32, checksum_type="md5"),
                INVALID,
            ),
            Row("DownloadImage", "bad job id", dl(url=url, job_id=b.XML), INVALID),
            Row(
                "GetDownloadStatus", "unknown job", pb.GetDownloadStatusRequest(job_id=b.UNKNOWN), not_found()
            ),
            Row("GetDownloadStatus", "empty job id", pb.GetDownloadStatusRequest(), INVALID),
            Row("GetDownloadStatus", "XML job id", pb.GetDownloadStatusRequest(job_id=b.XML), not_found()),
            Row("CancelDownload", "unknown job", pb.CancelDownloadRequest(job_id=b.UNKNOWN), not_found()),
            Row("CancelDownload", "huge job id", pb.CancelDownloadRequest(job_id=b.BIG), not_found()),
            Row("CancelDownload", "empty job id", pb.CancelDownloadRequest(), INVALID),
        ]
    )

    return rows


ROWS = _rows()
METHODS = {m.name: m for m in SERVICE.methods}


def _run_rows(stub: Any, rows: list[Row]) -> list[tuple[Row, grpc.StatusCode, str]]:
    """Blocking: every row's outcome, in table order."""
    out = []
    for row in rows:
        for rpc, req in row.setup:
            code, details = b.outcome_unary(stub, rpc, req)
            if code not in (C.OK, C.ALREADY_EXISTS):
                out.append((attrs.evolve(row, label=f"{row.label}: setup {rpc}", expect=OK), code, details))
        request = row.request() if callable(row.request) else row.request
        if METHODS[row.rpc].server_streaming:
            code, details = b.outcome_stream(stub, row.rpc, request, row.metadata)
        else:
            code, details = b.outcome_unary(stub, row.rpc, request, row.metadata)
        out.append((row, code, details))
    return out


def problems(results: list[tuple[Row, grpc.StatusCode, str]]) -> list[str]:
    out = []
    for row, code, details in results:
        if (
            row.driver_limit
            and code is C.UNIMPLEMENTED
            and "not supported by the connection driver" in details
        ):
            continue
        shown = details if len(details) < 300 else details[:300] + f"... ({len(details)} chars)"
        where = f"{row.rpc} [{row.label}]: got {code.name} {shown!r}"
        if code in (C.UNKNOWN, C.INTERNAL):
            out.append(f"{where}: UNKNOWN/INTERNAL is never a valid answer")
        if any(sign in details for sign in b.TRACEBACK_SIGNS):
            out.append(f"{where}: traceback in the message")
        if code is C.UNIMPLEMENTED and row.rpc not in NOT_IMPLEMENTED:
            out.append(f"{where}: UNIMPLEMENTED for an implemented RPC")
        if code is not row.expect.code or (code is not C.OK and not row.expect.check(details)):
            want = row.expect.code.name + (f" ({row.expect.what})" if row.expect.what else "")
            out.append(f"{where}; want {want}")
    return out


class BadInputTests(unittest.TestCase):
    """One daemon per RPC, so rows that change state do not leak into another RPC's rows."""

    def test_every_rpc_has_rows(self):
        self.assertEqual(len(METHODS), 57)
        covered = {row.rpc for row in ROWS}
        self.assertEqual(sorted(set(METHODS) - covered), [], "RPCs without bad-input rows")
        self.assertEqual(sorted(covered - set(METHODS)), [], "rows for RPCs not in the contract")
        self.assertTrue(NOT_IMPLEMENTED <= set(METHODS))

    @defer.inlineCallbacks
    def check_rpc(self, rpc: str):
        daemon = Daemon(self)
        yield daemon.start()
        before = b.snapshot(os.getcwd())
        results = yield threads.deferToThread(_run_rows, daemon.stub, [r for r in ROWS if r.rpc == rpc])
        after = b.snapshot(os.getcwd())
        health = yield daemon.call("HealthCheck", pb.HealthCheckRequest())
        self.assertTrue(health.healthy, "the daemon stopped serving after the bad input")
        found = problems(results)
        outside = b.new_outside(before, after, (b.MARK, b.UNKNOWN))
        found += [f"{rpc}: wrote outside the daemon's directories: {p}" for p in outside]
        if found:
            self.fail("\n".join(found))

    def test_outside_check_sees_a_stray_file(self):
        """The write check itself: a marked file in /tmp is reported, an unmarked one is not."""
        before = b.snapshot()
        marked, unmarked = f"/tmp/{b.MARK}-probe", f"/tmp/qtx-unrelated-{os.getpid()}"
        for path in (marked, unmarked):
            with open(path, "w"):
                pass
            self.addCleanup(os.unlink, path)
        self.assertEqual(b.new_outside(before, b.snapshot(), (b.MARK,)), [marked])

    @defer.inlineCallbacks
    def test_unknown_enums_fall_back_to_virtio(self):
        """Open enums: CreateVM with DiskBus/NicModel 999 succeeds with virtio devices, and a name
        and labels full of XML metacharacters come back unchanged."""
        daemon = Daemon(self)
        yield daemon.start()
        vm_id, name = b.fresh_id(), b.XML
        req = pb.CreateVMOnNodeRequest(
            vm_id=vm_id,
            name=name,
            labels={b.XML: "]]>"},
            spec=spec(
                disks=[disk(bus=b.BAD_ENUM, format=b.BAD_ENUM)],
                nics=[pb.NicSpec(id="n0", model=b.BAD_ENUM)],
            ),
        )
        reply = yield daemon.call("CreateVM", req)
        self.assertTrue(reply.created)
        status = yield daemon.call("GetVMStatus", pb.VMIdRequest(vm_id=vm_id))
        self.assertEqual(status.name, name)
        self.assertEqual([d.bus for d in status.disks], [pb.DISK_BUS_VIRTIO])
        xml = yield threads.deferToThread(
            lambda: daemon.node.hypervisor.conn().lookupByUUIDString(vm_id).XMLDesc(0)
        )
        root = ET.fromstring(xml)
        self.assertEqual([t.get("bus") for t in root.iter("target") if t.get("bus")], ["virtio"])
        self.assertEqual([m.get("type") for m in root.findall("devices/interface/model")], ["virtio"])
        self.assertEqual(root.findtext("name"), name)

    @defer.inlineCallbacks
    def test_malformed_protobuf(self):
        """Bytes that do not decode as the request message: INVALID_ARGUMENT on every RPC."""
        daemon = Daemon(self)
        yield daemon.start()

        def run():
            out = []
            for m in SERVICE.methods:
                path = f"/{SERVICE.full_name}/{m.name}"
                # Field 1, length-delimited, claiming more bytes than follow.
                code, details = b.raw_outcome(
                    daemon.channel, path, b"\x0a\xff\xff\x01abc", m.server_streaming
                )
                out.append((Row(m.name, "malformed protobuf", None, INVALID), code, details))
            return out

        found = problems((yield threads.deferToThread(run)))
        if found:
            self.fail("\n".join(found))


def _add_rpc_tests() -> None:
    for name in METHODS:

        def test(self, name=name):
            return self.check_rpc(name)

        test.__name__ = f"test_{name}"
        test.__doc__ = f"Bad input to {name}."
        setattr(BadInputTests, test.__name__, test)


_add_rpc_tests()


class QemuFallbackTests(unittest.TestCase):
    """The hot-plug rows the test driver cannot run: unknown DiskBus/NicModel on AttachDisk and
    AttachNIC against the real libvirtd (skipped when it does not answer, failed under CI)."""

    timeout = 60

    @defer.inlineCallbacks
    def test_unknown_enums_on_hotplug_fall_back_to_virtio(self):
        from tests.libvirtd import real_libvirt_uri, virsh

        real_libvirt_uri()
        daemon = Daemon(self, **{"hypervisor.uri": "qemu:///system", "hypervisor.domain_type": "qemu"})
        yield daemon.start()
        pool = daemon.node.storage.vm_pool_name
        self.addCleanup(virsh, "pool-undefine", pool)
        self.addCleanup(virsh, "pool-destroy", pool)
        vm_id = b.fresh_id()
        name = f"{NAME_PREFIX}-{vm_id[:8]}"
        self.addCleanup(virsh, "undefine", name, "--nvram")
        images = []
        for n in range(2):
            path = os.path.join(storage_dir(daemon), f"d{n}.qcow2")
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", path, "1M"], check=True)
            images.append(path)
        nic = pb.NicSpec(id="n0", bridge="qtxnobr0", model=b.BAD_ENUM)
        req = pb.CreateVMOnNodeRequest(
            vm_id=vm_id,
            name=name,
            labels={b.XML: "]]>"},
            spec=spec(disks=[pb.DiskSpec(id="d0", path=images[0], bus=b.BAD_ENUM)], nics=[nic]),
        )
        yield daemon.call("CreateVM", req)
        yield daemon.call(
            "AttachDisk",
            pb.AttachDiskRequest(vm_id=vm_id, disk=pb.DiskSpec(id="d1", path=images[1], bus=b.BAD_ENUM)),
        )
        nic1 = pb.NicSpec(id="n1", bridge="qtxnobr0", model=b.BAD_ENUM)
        yield daemon.call("AttachNIC", pb.AttachNICRequest(vm_id=vm_id, nic=nic1))
        xml = yield threads.deferToThread(
            lambda: daemon.node.hypervisor.conn().lookupByUUIDString(vm_id).XMLDesc(0)
        )
        root = ET.fromstring(xml)
        buses = [t.get("bus") for t in root.findall("devices/disk/target")]
        self.assertEqual(buses, ["virtio", "virtio"])
        self.assertEqual([m.get("type") for m in root.findall("devices/interface/model")], ["virtio"] * 2)
        yield daemon.call("DeleteVM", pb.VMIdRequest(vm_id=vm_id))
