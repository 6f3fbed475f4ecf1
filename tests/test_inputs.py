"""The request checks every RPC runs before its handler (pure: no daemon)."""

from __future__ import annotations

from twisted.trial import unittest

from quantix.errors import Invalid
from quantix.proto import node_pb2 as pb
from quantix.rpc import inputs
from quantix.rpc.server import SERVICE


def refused(request) -> str:
    try:
        inputs.check(request)
    except Invalid as exc:
        return str(exc)
    raise AssertionError("accepted")


class LimitTests(unittest.TestCase):
    def test_labels_disks_nics_name_their_limit(self) -> None:
        labels = pb.CreateVMOnNodeRequest(labels={f"k{i}": "v" for i in range(65)})
        self.assertEqual(refused(labels), "labels has 65 entries; the limit is 64")
        disks = pb.CreateVMOnNodeRequest(spec=pb.VMSpec(disks=[pb.DiskSpec() for _ in range(65)]))
        self.assertEqual(refused(disks), "spec.disks has 65 entries; the limit is 64")
        nics = pb.AttachNICRequest()  # one NIC field only: nothing repeated
        inputs.check(nics)

    def test_at_the_limit_is_accepted(self) -> None:
        inputs.check(pb.CreateVMOnNodeRequest(labels={f"k{i}": "v" for i in range(64)}))
        inputs.check(pb.CreateVMOnNodeRequest(spec=pb.VMSpec(nics=[pb.NicSpec() for _ in range(32)])))

    def test_count_is_checked_before_the_entries(self) -> None:
        """100,000 labels with bad keys are refused for their number, not walked."""
        req = pb.CreateVMOnNodeRequest(labels={f"\x00{i}": "v" for i in range(100_000)})
        self.assertIn("the limit is 64", refused(req))

    def test_every_repeated_request_field_has_a_limit(self) -> None:
        """A new repeated field gets DEFAULT_REPEATED; none is unbounded."""
        for method in SERVICE.methods:
            for field in method.input_type.fields:
                if field.is_repeated:
                    limit = inputs.REPEATED_LIMITS.get(field.full_name, inputs.DEFAULT_REPEATED)
                    self.assertLessEqual(limit, 1024, field.full_name)

    def test_cloud_init_size(self) -> None:
        big = pb.CloudInitConfig(user_data="x" * (inputs.CLOUD_INIT_MAX + 1))
        msg = refused(pb.CreateVMOnNodeRequest(spec=pb.VMSpec(cloud_init=big)))
        self.assertEqual(
            msg, f"spec.cloud_init.user_data is {inputs.CLOUD_INIT_MAX + 1} characters; the limit is 1048576"
        )


class CharacterTests(unittest.TestCase):
    def test_control_characters_in_ids_names_paths(self) -> None:
        self.assertEqual(
            refused(pb.VMIdRequest(vm_id="a\x00b")), "vm_id contains a control character (U+0000) at offset 1"
        )
        self.assertIn("U+000A", refused(pb.CreateVMOnNodeRequest(name="web\n01")))
        self.assertIn("U+007F", refused(pb.ListStoragePoolFilesRequest(pool_id="p", path="a\x7f")))
        self.assertIn("U+009B", refused(pb.ChangeMediaRequest(vm_id="v", iso_path="/x\x9b")))
        disk = pb.AttachDiskRequest(vm_id="v", disk=pb.DiskSpec(id="d", path="/a\tb"))
        self.assertEqual(refused(disk), "disk.path contains a control character (U+0009) at offset 2")
        spec = pb.VMSpec(disks=[pb.DiskSpec(id="ok"), pb.DiskSpec(id="x", backing_file="\x01")])
        self.assertIn("spec.disks[1].backing_file", refused(pb.CreateVMOnNodeRequest(spec=spec)))
        ceph = pb.StoragePoolConfig(ceph=pb.CephPoolConfig(monitors=["m1", "m2\r"]))
        self.assertIn("config.ceph.monitors[1]", refused(pb.InitStoragePoolRequest(config=ceph)))

    def test_map_keys_and_values(self) -> None:
        self.assertIn("labels key", refused(pb.CreateVMOnNodeRequest(labels={"a\x00": "v"})))
        self.assertIn("labels value", refused(pb.CreateVMOnNodeRequest(labels={"a": "v\n"})))
        env = pb.ExecuteInGuestRequest(vm_id="v", command="env", environment={"A": "x\ny\x1b"})
        inputs.check(env)  # values go to the guest as they are
        self.assertIn("environment key", refused(pb.ExecuteInGuestRequest(environment={"A\n": "x"})))

    def test_free_text_allowances(self) -> None:
        inputs.check(pb.CreateSnapshotRequest(vm_id="v", name="s", description="one\n\ttwo\r\n"))
        self.assertIn("U+0007", refused(pb.CreateSnapshotRequest(description="bell\x07")))
        cloud = pb.CloudInitConfig(user_data="#cloud-config\nruncmd:\n\t- [ls]\n")
        inputs.check(pb.CreateVMOnNodeRequest(spec=pb.VMSpec(cloud_init=cloud)))
        inputs.check(pb.ExecuteInGuestRequest(vm_id="v", command="printf", args=["\x1b[1m\n"]))
        self.assertIn("NUL character", refused(pb.ExecuteInGuestRequest(command="a\x00")))

    def test_unicode_names_are_fine(self) -> None:
        inputs.check(pb.CreateVMOnNodeRequest(name="wébserver-ñ-数据库", labels={"équipe": "€"}))
