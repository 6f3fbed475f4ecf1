"""``scripts/dev.sh``: the install stamp, and what ``test`` leaves behind on the host.

The libvirtd-stopping path is exercised on stand-ins (a ``sleep`` as "the libvirtd this run
started", a temporary QEMU log directory): the shared libvirtd of this machine must never be
touched by a test, and dev.sh never starts one while ``qemu:///system`` answers.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time

from twisted.trial import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVSH = os.path.join(ROOT, "scripts", "dev.sh")
VENV = os.environ.get("QUANTIX_VENV") or os.path.join(ROOT, ".venv")


def sourced(script: str, env: dict[str, str] | None = None, cwd: str = ROOT) -> subprocess.CompletedProcess:
    """Run ``script`` in bash after sourcing dev.sh (its functions, without running main)."""
    return subprocess.run(
        ["bash", "-c", f'source "{DEVSH}"; {script}'],
        env=dict(os.environ, QUANTIX_VENV=VENV, **(env or {})),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as fh:  # a zombie is gone for our purpose
        return fh.read().split(")")[-1].split()[0] != "Z"


class AfterTestsTests(unittest.TestCase):
    def setUp(self) -> None:
        self.logs = os.path.abspath(self.mktemp())
        os.makedirs(self.logs)
        for name in (
            "qtx-test-rMINE1-a1b2.log",
            "qtx-test-rMINE1-agent-c3.log",
            "qtx-test-rOTHER-d4.log",
            "web.log",
        ):
            open(os.path.join(self.logs, name), "w").close()
        self.sleeper = subprocess.Popen(["sleep", "300"])
        self.addCleanup(self._reap)

    def _reap(self) -> None:
        if self.sleeper.poll() is None:
            self.sleeper.kill()
        self.sleeper.wait()

    def after_tests(self, pid: str, **env: str) -> subprocess.CompletedProcess:
        env = {"QUANTIX_QEMU_LOG_DIR": self.logs, "QUANTIX_TEST_RUN": "rMINE1", **env}
        result = sourced(f"LIBVIRTD_PID={pid}; after_tests", env)
        self.assertEqual(result.returncode, 0, result.stderr)
        return result

    def test_stops_the_libvirtd_it_started_and_removes_only_its_vm_logs(self):
        result = self.after_tests(str(self.sleeper.pid))
        self.assertEqual(self.sleeper.wait(10), -signal.SIGTERM)
        self.assertEqual(sorted(os.listdir(self.logs)), ["qtx-test-rOTHER-d4.log", "web.log"])
        self.assertIn("removing 2 QEMU log(s)", result.stdout)

    def test_a_libvirtd_it_did_not_start_is_left_alone(self):
        result = self.after_tests("")  # qemu:///system answered: start_libvirtd set no pid
        self.assertTrue(alive(self.sleeper.pid))
        self.assertNotIn("stopping", result.stdout)

    def test_keep_libvirtd(self):
        result = self.after_tests(str(self.sleeper.pid), QUANTIX_KEEP_LIBVIRTD="1")
        self.assertTrue(alive(self.sleeper.pid))
        self.assertIn("leaving libvirtd running", result.stdout)

    def test_an_answering_libvirtd_is_never_started_nor_recorded(self):
        probe = subprocess.run(["virsh", "-q", "-c", "qemu:///system", "uri"], capture_output=True)
        if probe.returncode != 0:
            raise unittest.SkipTest("qemu:///system does not answer here")
        result = sourced('start_libvirtd; echo "pid=[$LIBVIRTD_PID]"')
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout.strip(), "pid=[]")


class InstallStampTests(unittest.TestCase):
    def fingerprint(self, cwd: str) -> str:
        result = subprocess.run(
            ["bash", os.path.join(cwd, "scripts", "dev.sh"), "install-fingerprint"],
            env=dict(os.environ, QUANTIX_VENV=VENV),
            capture_output=True,
            text=True,
            timeout=60,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        return result.stdout.strip()

    def test_fingerprint_follows_content_not_timestamps(self):
        copy = os.path.abspath(self.mktemp())
        for name in ("setup.cfg", "pyproject.toml", "setup.py"):
            os.makedirs(copy, exist_ok=True)
            shutil.copy2(os.path.join(ROOT, name), copy)
        ignore = shutil.ignore_patterns("__pycache__", "_generated", "*.pyc")
        for name in ("proto", "quantix", "twisted", "scripts"):
            shutil.copytree(os.path.join(ROOT, name), os.path.join(copy, name), ignore=ignore)
        first = self.fingerprint(copy)
        self.assertEqual(first, self.fingerprint(ROOT))
        init = os.path.join(copy, "quantix", "__init__.py")
        os.utime(init)  # touched, unchanged
        self.assertEqual(self.fingerprint(copy), first)
        with open(init, "a") as fh:
            fh.write("# changed\n")
        self.assertNotEqual(self.fingerprint(copy), first)

    def test_second_run_skips_the_install(self):
        try:
            with open(os.path.join(VENV, ".quantix-install-stamp")) as fh:
                stamp = fh.read().strip()
        except OSError:
            stamp = ""
        if stamp != self.fingerprint(ROOT):
            raise unittest.SkipTest("the venv was not installed by scripts/dev.sh from this tree")
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        state = os.path.abspath(self.mktemp())
        out_path = os.path.join(state + ".out")
        config = state + ".yaml"  # no 8080 listener: other runs on this host may hold the port
        with open(config, "w") as fh:
            fh.write("http:\n  listen: null\n")
        began = time.monotonic()
        argv = [DEVSH, "run", "--listen", f"127.0.0.1:{port}", "--metrics-listen", "off", "--config", config]
        with open(out_path, "w") as out:
            proc = subprocess.Popen(
                argv,
                env=dict(os.environ, QUANTIX_VENV=VENV, QUANTIX_STATE_DIR=state),
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.addCleanup(lambda: proc.poll() is None and (proc.kill(), proc.wait()))
        health = [os.path.join(VENV, "bin", "quantix-nodectl"), "--address", f"127.0.0.1:{port}", "health"]
        healthy = False
        while not healthy and time.monotonic() - began < 60 and proc.poll() is None:
            healthy = subprocess.run(health, capture_output=True, timeout=30).returncode == 0
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        with open(out_path) as fh:
            output = fh.read()
        self.assertTrue(healthy, output)
        self.assertIn("is up to date (pip install skipped)", output)
        self.assertNotIn("== pip install", output)
        self.assertEqual(proc.returncode, 0, output)
