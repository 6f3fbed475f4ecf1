"""Two libvirt hosts on one machine, for the migration tier.

Each host is a set of namespaces created here and nowhere else:

* network: a veth pair joins the two hosts, ``10.250.0.1/30`` and ``.2``; the addresses exist
  only inside these namespaces, so no traffic reaches the machine's own network;
* mount: private libvirt run/state/cache/log/config directories, a private ``/etc/hosts``, and
  two directories that have the same path on both hosts but different contents (``local``:
  disks that are not shared; ``agents``: guest-agent sockets);
* UTS: its own hostname.

Each host runs its own libvirtd (own ``host_uuid``, listening on plain TCP without auth, inside
its namespace only) and its own node daemon (twistd in the same namespaces, gRPC on a unix
socket the test reaches from outside). ``shared`` is outside the private mounts: one directory,
the same path and files on both hosts, like an NFS mount.

The shared ``qemu:///system`` daemon other tests use is never touched. Everything started here
is stopped, and the directory removed, by :meth:`TwoHosts.stop`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid

import grpc
from twisted.trial.unittest import FailTest, SkipTest

from quantix.proto import node_grpc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ADDRESSES = ("10.250.0.1", "10.250.0.2")
PREFIX = 30
#: libvirt's directories, private per host (bind mounts inside the host's mount namespace).
_LIBVIRT_DIRS = ("/run/libvirt", "/var/lib/libvirt", "/var/cache/libvirt", "/var/log/libvirt", "/etc/libvirt")


def _unavailable(why: str) -> None:
    if os.environ.get("CI"):
        raise FailTest(f"the two-host migration tier needs {why}")
    raise SkipTest(f"two-host tier: {why}")


def check_possible() -> None:
    """Skip (one line) where this machine cannot build the hosts; fail in CI for missing tools."""
    if os.geteuid() != 0:
        raise SkipTest("two-host tier: needs root (namespaces, libvirtd)")
    probe = subprocess.run(
        ["unshare", "--net", "--mount", "--uts", "true"], capture_output=True, text=True, check=False
    )
    if probe.returncode != 0:
        raise SkipTest(f"two-host tier: namespaces not allowed here ({probe.stderr.strip()})")
    for tool in ("nsenter", "ip", "tini", "virsh", "qemu-img"):
        if shutil.which(tool) is None:
            _unavailable(f"{tool}")
    if not os.path.exists("/usr/sbin/libvirtd"):
        _unavailable("libvirtd")


def _run(*argv: str) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {proc.stderr.strip() or proc.returncode}")
    return proc.stdout


class Host:
    """One host: its namespaces (held by a sleeping process), libvirtd and node daemon."""

    def __init__(self, top: str, name: str, address: str) -> None:
        self.name = name
        self.hostname = f"qtx-mig-{name}"
        self.address = address
        self.dir = os.path.join(top, "hosts", name)
        self.host_uuid = str(uuid.uuid4())
        self.holder: subprocess.Popen | None = None
        self.libvirtd: subprocess.Popen | None = None
        self.daemon: subprocess.Popen | None = None
        self.channel: grpc.Channel | None = None
        self.stub = None
        #: Private directory -> the path it is mounted at inside this host.
        self.mounts: list[tuple[str, str]] = []
        for target in _LIBVIRT_DIRS:
            self.mounts.append((self._mkdir(target.strip("/").replace("/", "_")), target))
        self.local = self._mkdir("local")
        self.agents = self._mkdir("agents")
        self.mounts += [(self.local, os.path.join(top, "local")), (self.agents, os.path.join(top, "agents"))]
        self.socket = os.path.join(self._private("/run/libvirt"), "libvirt-sock")
        #: libvirt URI of this host's daemon, usable from outside the namespaces.
        self.uri = f"qemu+unix:///system?socket={self.socket}"
        self.grpc_address = f"unix:{os.path.join(self.dir, 'grpc.sock')}"

    def _mkdir(self, name: str) -> str:
        path = os.path.join(self.dir, name)
        os.makedirs(path, exist_ok=True)
        return path

    def _private(self, target: str) -> str:
        return next(source for source, t in self.mounts if t == target)

    def enter(self, *argv: str) -> list[str]:
        """``argv`` run inside this host's namespaces."""
        assert self.holder is not None
        return ["nsenter", "-t", str(self.holder.pid), "-m", "-n", "-u", "--", *argv]

    # -- namespaces ---------------------------------------------------------------------------

    def create_namespaces(self, hosts_file: str) -> None:
        binds = [*self.mounts, (hosts_file, "/etc/hosts")]
        script = " && ".join(
            [
                *(f"mount --bind {src} {dst}" for src, dst in binds),
                f"hostname {self.hostname}",
                "ip link set lo up",
            ]
        )
        self.holder = subprocess.Popen(
            [
                "unshare",
                "--net",
                "--mount",
                "--uts",
                "--propagation",
                "private",
                "sh",
                "-c",
                f"{script} && echo ready && exec sleep infinity",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        line = self.holder.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(
                f"host {self.name}: namespace setup failed: {self.holder.stderr.read().strip()}"
            )

    # -- libvirtd -----------------------------------------------------------------------------

    def write_libvirt_config(self) -> None:
        etc = self._private("/etc/libvirt")
        with open(os.path.join(etc, "qemu.conf"), "w") as fh:
            # Root QEMU, file stdio (no virtlogd), no cgroups: both hosts share this machine's
            # cgroup tree, where each daemon would name its VM's group alike.
            fh.write('user = "root"\ngroup = "root"\nstdio_handler = "file"\ncgroup_controllers = [ ]\n')
        self.conf = os.path.join(self.dir, "libvirtd.conf")
        with open(self.conf, "w") as fh:
            fh.write(
                "listen_tls = 0\nlisten_tcp = 1\n"
                f'listen_addr = "{self.address}"\nauth_tcp = "none"\n'
                f'host_uuid = "{self.host_uuid}"\n'
                f'log_outputs = "3:file:{self.dir}/libvirtd.log"\n'
            )
        cache = os.path.join(self._private("/var/cache/libvirt"), "qemu", "capabilities")
        seed = "/var/cache/libvirt/qemu/capabilities"
        if os.path.isdir(seed) and not os.path.isdir(cache):
            # The system daemon's QEMU capabilities (same binaries): spares a probe per start.
            shutil.copytree(seed, cache)

    def start_libvirtd(self) -> None:
        if os.path.exists(self.socket):
            os.unlink(self.socket)
        self.libvirtd = subprocess.Popen(
            self.enter(
                "tini",
                "-s",
                "--",
                "/usr/sbin/libvirtd",
                "--listen",
                "--config",
                self.conf,
                "--pid-file",
                os.path.join(self.dir, "libvirtd.pid"),
            ),
            stdout=subprocess.DEVNULL,
            stderr=open(os.path.join(self.dir, "libvirtd.out"), "w"),
        )

    def wait_libvirtd(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.libvirtd.poll() is not None:
                raise RuntimeError(f"host {self.name}: libvirtd exited with {self.libvirtd.returncode}")
            probe = subprocess.run(["virsh", "-c", self.uri, "uri"], capture_output=True, check=False)
            if probe.returncode == 0:
                return
            time.sleep(0.05)
        raise RuntimeError(f"host {self.name}: libvirtd did not answer within {timeout}s")

    def stop_libvirtd(self) -> None:
        """Stop this host's libvirtd (its VMs keep running, as with a real daemon restart)."""
        if self.libvirtd is None:
            return
        pid = _read_pid(os.path.join(self.dir, "libvirtd.pid"))
        if pid:
            _signal(pid, signal.SIGTERM)
        try:
            self.libvirtd.wait(15)
        except subprocess.TimeoutExpired:
            if pid:
                _signal(pid, signal.SIGKILL)
            self.libvirtd.wait(10)
        self.libvirtd = None

    # -- node daemon --------------------------------------------------------------------------

    def start_daemon(self, top: str, overrides: dict) -> None:
        """Start this host's daemon; :meth:`wait_daemon` waits for it (both hosts start at once)."""
        config = {
            "listen_address": self.grpc_address,
            "state_dir": os.path.join(self.dir, "state"),
            "node": {"hostname": self.hostname, "management_ip": self.address},
            "hypervisor": {"uri": "qemu:///system", "domain_type": "qemu", "console_listen": "127.0.0.1"},
            "storage": {
                "root": os.path.join(top, "local"),
                "vm_images": os.path.join(top, "local", "vms"),
                "cloud_images": os.path.join(top, "local", "cloud-images"),
                "iso_images": os.path.join(top, "local", "isos"),
            },
            "agent": {"socket_dir": os.path.join(top, "agents")},
            "server": {"metrics_listen": None, "grace_seconds": 1, "max_workers": 16},
            "http": {"listen": None},
            "migration": {
                "uri_template": "qemu+tcp://{host}/system",
                "shared_paths": [os.path.join(top, "shared")],
            },
        }
        for key, value in overrides.items():
            section, _, sub = key.partition(".")
            if sub:
                config.setdefault(section, {})[sub] = value
            else:
                config[key] = value
        path = os.path.join(self.dir, "node.yaml")
        with open(path, "w") as fh:
            json.dump(config, fh)  # YAML is a superset of JSON
        env = dict(os.environ, PYTHONPATH=ROOT)
        env.pop("NOTIFY_SOCKET", None)
        self.daemon = subprocess.Popen(
            self.enter(
                sys.executable,
                "-c",
                "from twisted.scripts.twistd import run; run()",
                "-n",
                "--pidfile=",
                "quantix-node",
                "--config",
                path,
            ),
            cwd=self.dir,
            env=env,
            stdout=open(os.path.join(self.dir, "daemon.log"), "w"),
            stderr=subprocess.STDOUT,
        )
        # Retry the socket every 0.1 s while the daemon starts, not after grpc's growing backoff.
        options = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 100)]
        self.channel = grpc.insecure_channel(self.grpc_address, options=options)
        self.stub = node_grpc.NodeDaemonServiceStub(self.channel)

    def wait_daemon(self, timeout: float = 90.0) -> None:
        from quantix.proto import node_pb2

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.daemon.poll() is not None:
                raise RuntimeError(f"host {self.name}: daemon exited: {self.daemon_log()[-2000:]}")
            try:
                reply = self.stub.HealthCheck(node_pb2.HealthCheckRequest(), timeout=2)
                if reply.healthy:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
        raise RuntimeError(
            f"host {self.name}: daemon not healthy within {timeout}s: {self.daemon_log()[-2000:]}"
        )

    def daemon_log(self) -> str:
        try:
            with open(os.path.join(self.dir, "daemon.log"), errors="replace") as fh:
                return fh.read()
        except OSError:
            return ""

    def stop_daemon(self) -> None:
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        if self.daemon is None:
            return
        self.daemon.terminate()
        try:
            self.daemon.wait(15)
        except subprocess.TimeoutExpired:
            self.daemon.kill()
            self.daemon.wait(10)
        self.daemon = None

    # -- teardown -----------------------------------------------------------------------------

    def destroy_domains(self) -> None:
        if self.libvirtd is None:
            return
        names = subprocess.run(
            ["virsh", "-q", "-c", self.uri, "list", "--all", "--name"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.split()
        for name in names:
            subprocess.run(["virsh", "-q", "-c", self.uri, "destroy", name], capture_output=True, check=False)
            subprocess.run(
                ["virsh", "-q", "-c", self.uri, "undefine", name, "--nvram"], capture_output=True, check=False
            )

    def kill_leftovers(self) -> None:
        """Any process still inside this host's network namespace was started by this test."""
        if self.holder is None:
            return
        try:
            ns = os.readlink(f"/proc/{self.holder.pid}/ns/net")
        except OSError:
            return
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == self.holder.pid:
                continue
            try:
                if os.readlink(f"/proc/{entry}/ns/net") == ns:
                    os.kill(int(entry), signal.SIGKILL)
            except OSError:
                continue

    def remove_namespaces(self) -> None:
        if self.holder is None:
            return
        self.holder.kill()
        self.holder.wait(10)
        for pipe in (self.holder.stdout, self.holder.stderr):
            pipe.close()
        self.holder = None


class TwoHosts:
    """Hosts ``a`` (10.250.0.1) and ``b`` (10.250.0.2); see the module docstring."""

    def __init__(self) -> None:
        check_possible()
        # AF_UNIX paths are short: keep the tree in /tmp.
        self.dir = tempfile.mkdtemp(prefix="qtx-mig-")
        self.shared = os.path.join(self.dir, "shared")
        #: Same path on both hosts, different directories (see :attr:`Host.local`).
        self.local = os.path.join(self.dir, "local")
        for path in (self.shared, self.local, os.path.join(self.dir, "agents")):
            os.makedirs(path)
        self.a = Host(self.dir, "a", ADDRESSES[0])
        self.b = Host(self.dir, "b", ADDRESSES[1])
        self.hosts = (self.a, self.b)

    def start(self, **daemon_overrides) -> TwoHosts:
        """Blocking: namespaces, the veth link, both libvirtds, both daemons."""
        try:
            hosts_file = os.path.join(self.dir, "etc-hosts")
            with open(hosts_file, "w") as fh:
                fh.write("127.0.0.1 localhost\n")
                fh.writelines(f"{h.address} {h.hostname}\n" for h in self.hosts)
            for host in self.hosts:
                host.create_namespaces(hosts_file)
            a, b = self.a, self.b
            _run(
                *a.enter(
                    "ip",
                    "link",
                    "add",
                    "mig0",
                    "type",
                    "veth",
                    "peer",
                    "name",
                    "mig0",
                    "netns",
                    str(b.holder.pid),
                )
            )
            for host in self.hosts:
                _run(*host.enter("ip", "addr", "add", f"{host.address}/{PREFIX}", "dev", "mig0"))
                _run(*host.enter("ip", "link", "set", "mig0", "up"))
                host.write_libvirt_config()
            for host in self.hosts:
                host.start_libvirtd()
            for host in self.hosts:
                host.wait_libvirtd()
            for host in self.hosts:
                host.start_daemon(self.dir, daemon_overrides)
            for host in self.hosts:
                host.wait_daemon()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Blocking: daemons, VMs, libvirtds, namespaces, then the directory tree."""
        for host in self.hosts:
            host.stop_daemon()
        for host in self.hosts:
            host.destroy_domains()
            host.stop_libvirtd()
            host.kill_leftovers()
            host.remove_namespaces()
        shutil.rmtree(self.dir, ignore_errors=True)


def _read_pid(path: str) -> int | None:
    try:
        with open(path) as fh:
            return int(fh.read().strip())
    except (OSError, ValueError):
        return None


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
