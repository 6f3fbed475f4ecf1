"""The agent socket directory's permissions, and the checks before connecting to a socket."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import tempfile

from twisted.internet import defer, reactor, task
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from quantix.agent import sockets
from quantix.errors import WrongState
from tests.guestpeer import ChannelFixture


class SocketDirTests(unittest.TestCase):
    def setUp(self) -> None:
        self.root = tempfile.mkdtemp(prefix="qtx-sockdir-")
        self.addCleanup(shutil.rmtree, self.root, True)
        self.path = os.path.join(self.root, "run", "vms")
        old = os.umask(0)
        self.addCleanup(os.umask, old)

    def test_created_0750_even_under_umask_zero_with_qemu_group(self) -> None:
        sockets.ensure_socket_dir(self.path)
        st = os.lstat(self.path)
        self.assertEqual(stat.S_IMODE(st.st_mode), 0o750)
        self.assertEqual(st.st_uid, os.geteuid())
        if sockets.qemu_gid() is not None and os.geteuid() == 0:
            self.assertEqual(st.st_gid, sockets.qemu_gid())

    def test_an_existing_world_writable_dir_is_tightened(self) -> None:
        os.makedirs(self.path, 0o777)
        sockets.ensure_socket_dir(self.path)
        self.assertEqual(stat.S_IMODE(os.lstat(self.path).st_mode), 0o750)

    def test_symlinked_dir_is_refused(self) -> None:
        target = os.path.join(self.root, "elsewhere")
        os.mkdir(target, 0o777)
        os.makedirs(os.path.dirname(self.path))
        os.symlink(target, self.path)
        self.assertRaises(WrongState, sockets.ensure_socket_dir, self.path)
        self.assertEqual(stat.S_IMODE(os.stat(target).st_mode), 0o777)  # not touched through the link

    def test_dir_owned_by_someone_else_is_refused(self) -> None:
        if os.geteuid() != 0:
            raise unittest.SkipTest("needs root to hand the directory to another user")
        os.makedirs(self.path)
        os.chown(self.path, 65534, 65534)
        self.assertRaises(WrongState, sockets.ensure_socket_dir, self.path)


class SocketCheckTests(unittest.TestCase):
    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="qtx-sock-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.sock_path = os.path.join(self.dir, "real.sock")
        self.listener = socket.socket(socket.AF_UNIX)
        self.addCleanup(self.listener.close)
        self.listener.bind(self.sock_path)
        self.owners = sockets.expected_owners()

    def test_own_socket_is_accepted(self) -> None:
        self.assertIsNone(sockets.socket_refusal(self.sock_path, self.owners))

    def test_symlink_file_and_fifo_are_refused(self) -> None:
        link = os.path.join(self.dir, "link.sock")
        os.symlink(self.sock_path, link)
        self.assertEqual(sockets.socket_refusal(link, self.owners), "is a symlink")
        plain = os.path.join(self.dir, "plain.sock")
        open(plain, "w").close()
        self.assertEqual(sockets.socket_refusal(plain, self.owners), "is not a socket")
        fifo = os.path.join(self.dir, "fifo.sock")
        os.mkfifo(fifo)
        self.assertEqual(sockets.socket_refusal(fifo, self.owners), "is not a socket")

    def test_socket_of_another_user_is_refused(self) -> None:
        if os.geteuid() != 0:
            raise unittest.SkipTest("needs root to hand the socket to another user")
        os.chown(self.sock_path, 65534, 65534)
        self.assertIn("owned by uid 65534", sockets.socket_refusal(self.sock_path, self.owners))


class ManagerRefusesSymlinkTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_symlinked_agent_socket_is_never_connected(self):
        """A link at the VM's socket path (pointing at a live agent) is refused and logged."""
        f = ChannelFixture()
        f.setup(self)
        real = f.path + ".real"
        yield f.stop_listening()
        f.path, link = real, f.path
        f.listen()
        os.symlink(real, link)
        logged = []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        f.manager.vm_started(f.vm)
        yield task.deferLater(reactor, 0.5, lambda: None)
        self.assertEqual(f.peer.connections, [])
        self.assertFalse(f.manager.is_channel_open(f.vm))
        texts = [formatEvent(e) for e in logged]
        self.assertEqual(sum("refused: it is a symlink" in t for t in texts), 1, texts)


class DaemonStartTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_the_daemon_prepares_the_socket_dir_before_any_vm_runs(self) -> None:
        from tests.support import Daemon

        old = os.umask(0)
        self.addCleanup(os.umask, old)
        daemon = yield Daemon(self).start()
        st = os.lstat(daemon.config.agent.socket_dir)
        self.assertTrue(stat.S_ISDIR(st.st_mode))
        self.assertEqual(stat.S_IMODE(st.st_mode), sockets.DIR_MODE)
