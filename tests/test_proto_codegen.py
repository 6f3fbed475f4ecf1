"""Generated code cannot go stale: a changed .proto is caught and regenerated under a new key."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

from twisted.trial import unittest

from quantix.proto import cli, codegen
from tests.stderr import capture_stderr


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
        capture_stderr(self, expect="Expected field name.")  # protoc's own report of the break
        rc, text = self.run_cli("--regenerate", "--proto-root", str(self.src), "--out", str(self.out))
        self.assertEqual(rc, 1)
        self.assertIn("protoc failed", text)
        self.assertFalse(self.out.exists())


class LoadingTests(unittest.TestCase):
    """``quantix.proto`` loads through importlib: no sys.path change, nothing done at import."""

    def test_import_has_no_side_effects_and_loads_from_the_cache(self):
        cache = Path(self.mktemp()).resolve()
        script = (
            "import sys\n"
            "before = list(sys.path)\n"
            "import quantix.proto\n"
            "assert 'limiquantix' not in sys.modules, 'loaded at import'\n"
            "from quantix.proto import node_grpc, node_pb2\n"
            "assert sys.path == before, set(sys.path) ^ set(before)\n"
            "print(node_pb2.__file__)\n"
            "print(quantix.proto.generated_dir())\n"
        )
        env = {**os.environ, "QUANTIX_PROTO_CACHE": str(cache), "PYTHONPATH": os.pathsep.join(sys.path)}
        out = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120, check=False
        )
        self.assertEqual(out.returncode, 0, out.stderr)
        module_file, generated = out.stdout.split()
        self.assertTrue(Path(module_file).is_relative_to(generated))
        if Path(generated) != codegen.bundled_dir():
            self.assertEqual(Path(generated).parent, cache)
        # mypy-protobuf's stubs sit beside the code, for the type checker.
        for stub in (
            "node/v1/node_daemon_pb2.pyi",
            "node/v1/node_daemon_pb2_grpc.pyi",
            "agent/v1/agent_pb2.pyi",
        ):
            self.assertTrue((Path(generated) / "limiquantix" / stub).is_file(), stub)

    def test_unknown_name_is_an_attribute_error(self):
        import quantix.proto

        with self.assertRaises(AttributeError):
            quantix.proto.nothing_pb2  # noqa: B018
