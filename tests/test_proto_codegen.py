"""Generated code cannot go stale: a changed .proto is caught and regenerated under a new key."""

from __future__ import annotations

import io
import os
import shutil
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

from twisted.trial import unittest

from quantix.proto import cli, codegen


class CodegenTests(unittest.TestCase):
    def setUp(self):
        self.root = Path(self.mktemp()).resolve()
        shutil.copytree(codegen.source_root(), self.root / "proto")
        self.src = self.root / "proto"
        self.out = self.root / "gen"

    def run_cli(self, *argv: str) -> tuple[int, str]:
        buf = io.StringIO()
        with redirect_stdout(buf), redirect_stderr(buf):
            rc = cli.main(list(argv))
        return rc, buf.getvalue()

    def test_check_regenerate_and_catch_a_change(self):
        args = ("--proto-root", str(self.src), "--out", str(self.out))
        rc, text = self.run_cli("--check", *args)
        self.assertEqual(rc, 1)
        self.assertIn("quantix-proto --regenerate", text)

        rc, _ = self.run_cli("--regenerate", *args)
        self.assertEqual(rc, 0)
        self.assertTrue((self.out / "limiquantix/node/v1/node_daemon_pb2.py").is_file())
        self.assertTrue((self.out / "limiquantix/node/v1/node_daemon_pb2_grpc.py").is_file())
        self.assertEqual(self.run_cli("--check", *args)[0], 0)

        before = codegen.fingerprint(self.src)
        proto = self.src / "limiquantix/node/v1/node_daemon.proto"
        proto.write_text(proto.read_text().replace("string vm_id = 4;", "string vm_id = 40;", 1))
        self.assertNotEqual(codegen.fingerprint(self.src), before)
        rc, text = self.run_cli("--check", *args)
        self.assertEqual(rc, 1)
        self.assertIn("stale", text)

    def test_locate_uses_fingerprint_keyed_cache(self):
        os.environ["QUANTIX_PROTO_CACHE"] = str(self.root / "cache")
        self.addCleanup(os.environ.pop, "QUANTIX_PROTO_CACHE")
        here = codegen.locate()
        fp = codegen.fingerprint(codegen.source_root())
        self.assertTrue(codegen.is_current(here, fp))
        if here != codegen.bundled_dir():
            self.assertEqual(here, self.root / "cache" / fp)

    def test_no_regenerate_refuses_with_the_fix(self):
        os.environ["QUANTIX_PROTO_CACHE"] = str(self.root / "empty-cache")
        self.addCleanup(os.environ.pop, "QUANTIX_PROTO_CACHE")
        if codegen.is_current(codegen.bundled_dir(), codegen.fingerprint(codegen.source_root())):
            raise unittest.SkipTest("running from an installed build with bundled code")
        with self.assertRaises(codegen.ProtoError) as caught:
            codegen.locate(regenerate=False)
        self.assertIn("quantix-proto --regenerate", str(caught.exception))

    def test_broken_proto_fails_cleanly(self):
        proto = self.src / "limiquantix/agent/v1/agent.proto"
        proto.write_text(proto.read_text() + "\nmessage Broken { nonsense }\n")
        rc, text = self.run_cli("--regenerate", "--proto-root", str(self.src), "--out", str(self.out))
        self.assertEqual(rc, 1)
        self.assertIn("protoc failed", text)
        self.assertFalse(self.out.exists())
