"""A private libvirtd, in its own mount namespace, that a test may kill and restart at will.

The shared ``qemu:///system`` daemon must never be disturbed by one test. This one bind-mounts
private directories over libvirt's run, state, cache, log and config directories inside a new
mount namespace, so its socket appears at ``<dir>/run/libvirt-sock`` and nothing it does reaches
the system daemon. Needs root, ``unshare`` and ``tini``; otherwise the test skips (fails in CI).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time

from twisted.trial.unittest import FailTest, SkipTest

_MOUNTS = ("/run/libvirt", "/var/lib/libvirt", "/var/cache/libvirt", "/var/log/libvirt", "/etc/libvirt")


def _unavailable(why: str) -> None:
    if os.environ.get("CI"):
        raise FailTest(f"a private libvirtd is required in CI: {why}")
    raise SkipTest(f"no private libvirtd: {why}")


class PrivateLibvirtd:
    """``extra_mounts`` are more directories made private (e.g. Open vSwitch's run dir);
    ``netns`` adds a network namespace; ``prelude`` is shell run in the namespaces first."""

    def __init__(self, extra_mounts: tuple[str, ...] = (), netns: bool = False, prelude: str = "") -> None:
        if os.geteuid() != 0:
            _unavailable("needs root")
        for tool in ("unshare", "tini", "virsh"):
            if shutil.which(tool) is None:
                _unavailable(f"{tool} is not installed")
        if not os.path.exists("/usr/sbin/libvirtd"):
            _unavailable("libvirtd is not installed")
        # AF_UNIX paths are short: keep the directory in /tmp.
        self.dir = tempfile.mkdtemp(prefix="qtx-plv-")
        self.sources = []
        self.netns = netns
        self.prelude = prelude
        for target in (*_MOUNTS, *extra_mounts):
            source = os.path.join(self.dir, target.strip("/").replace("/", "_"))
            os.makedirs(source)
            self.sources.append((source, target))
        etc = dict((t, s) for s, t in self.sources)["/etc/libvirt"]
        with open(os.path.join(etc, "qemu.conf"), "w") as fh:
            fh.write('user = "root"\ngroup = "root"\nstdio_handler = "file"\n')
        self.conf = os.path.join(self.dir, "libvirtd.conf")
        with open(self.conf, "w") as fh:
            fh.write(f'log_outputs="3:file:{self.dir}/libvirtd.log"\n')
        self.socket = os.path.join(self.outside("/run/libvirt"), "libvirt-sock")
        self.uri = f"qemu+unix:///system?socket={self.socket}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30.0) -> float:
        """Start the daemon; returns when its socket answers (seconds it took)."""
        mounts = " && ".join(f"mkdir -p {t} && mount --bind {s} {t}" for s, t in self.sources)
        prelude = f"{self.prelude} && " if self.prelude else ""
        script = (
            f"{mounts} && {prelude}"
            f"exec tini -s -- /usr/sbin/libvirtd --config {self.conf} --pid-file {self.dir}/pid"
        )
        if os.path.exists(self.socket):
            os.unlink(self.socket)
        started = time.monotonic()
        self.proc = subprocess.Popen(
            [
                "unshare",
                "-m",
                *(["-n"] if self.netns else []),
                "--propagation",
                "private",
                "sh",
                "-c",
                script,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        while time.monotonic() - started < timeout:
            if self.proc.poll() is not None:
                _unavailable(f"libvirtd exited with {self.proc.returncode}")
            probe = subprocess.run(["virsh", "-c", self.uri, "uri"], capture_output=True, check=False)
            if probe.returncode == 0:
                return time.monotonic() - started
            time.sleep(0.02)
        raise AssertionError(f"private libvirtd did not answer within {timeout}s")

    def outside(self, target: str) -> str:
        """Where a private directory of the namespace is seen from outside it."""
        return dict((t, s) for s, t in self.sources)[target]

    def kill(self) -> None:
        """SIGKILL the daemon (tini forwards nothing: kill libvirtd itself, then reap tini)."""
        if self.proc is None:
            return
        pid = self._libvirtd_pid()
        if pid:
            os.kill(pid, signal.SIGKILL)
        self.proc.wait(10)
        self.proc = None

    def _libvirtd_pid(self) -> int | None:
        try:
            with open(os.path.join(self.dir, "pid")) as fh:
                return int(fh.read().strip())
        except (OSError, ValueError):
            return None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
            self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)
