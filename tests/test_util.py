"""The shared helpers: backoff, atomic file replacement, reference-counted keyed locks."""

from __future__ import annotations

import os
import stat
import tempfile
import threading

from twisted.trial import unittest

from quantix.util import backoff, files
from quantix.util.backoff import Backoff, retry_policy
from quantix.util.locks import KeyedLocks


class BackoffTests(unittest.TestCase):
    def test_grows_to_cap_and_resets(self) -> None:
        b = Backoff(rand=lambda: 0.0)
        self.assertEqual([b.next() for _ in range(9)], [1, 2, 4, 8, 16, 32, 60, 60, 60])
        self.assertEqual(b.attempts, 9)
        b.reset()
        self.assertEqual(b.next(), 1)

    def test_jitter_only_shortens(self) -> None:
        b = Backoff(rand=lambda: 1.0)
        delays = [b.next() for _ in range(10)]
        self.assertAlmostEqual(delays[0], 0.9)
        self.assertAlmostEqual(delays[-1], 54.0)
        self.assertTrue(all(d <= 60 for d in delays))

    def test_huge_attempt_numbers_stay_at_the_cap(self) -> None:
        self.assertEqual(backoff.delay(10**6, initial=0.5, maximum=30.0, rand=lambda: 0.0), 30.0)

    def test_retry_policy_counts_failures_from_one(self) -> None:
        policy = retry_policy(0.5, 30.0, factor=1.5, rand=lambda: 0.0)
        self.assertEqual([policy(n) for n in (1, 2, 3)], [0.5, 0.75, 1.125])
        self.assertEqual(policy(100), 30.0)


class AtomicWriteTests(unittest.TestCase):
    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp()

    def tearDown(self) -> None:
        for name in os.listdir(self.dir):
            path = os.path.join(self.dir, name)
            os.rmdir(path) if os.path.isdir(path) else os.unlink(path)
        os.rmdir(self.dir)

    def test_replaces_privately_and_leaves_nothing_behind(self) -> None:
        path = os.path.join(self.dir, "f")
        files.atomic_write(path, "one")
        files.atomic_write(path, b"two")
        with open(path, "rb") as fh:
            self.assertEqual(fh.read(), b"two")
        self.assertEqual(os.listdir(self.dir), ["f"])
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)

    def test_mode_and_missing_parent(self) -> None:
        path = os.path.join(self.dir, "sub", "f")
        files.atomic_write(path, "x", mode=0o644)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o644)
        os.unlink(path)

    def test_failure_keeps_the_old_file_and_no_temp(self) -> None:
        target = os.path.join(self.dir, "is-a-dir")
        os.mkdir(target)
        with self.assertRaises(OSError):
            files.atomic_write(target, "x")
        self.assertEqual(os.listdir(self.dir), ["is-a-dir"])


class KeyedLocksTests(unittest.TestCase):
    def test_same_key_serialises_other_keys_do_not(self) -> None:
        locks = KeyedLocks()
        inside = threading.Event()
        release = threading.Event()
        order: list[str] = []

        def first() -> None:
            with locks.hold("a"):
                inside.set()
                release.wait(10)
                order.append("first")

        def second() -> None:
            with locks.hold("a"):
                order.append("second")

        t1 = threading.Thread(target=first)
        t1.start()
        self.assertTrue(inside.wait(10))
        t2 = threading.Thread(target=second)
        t2.start()
        with locks.hold("b"):  # another key is free while "a" is held
            order.append("other")
        release.set()
        t1.join(10)
        t2.join(10)
        self.assertEqual(order, ["other", "first", "second"])

    def test_locks_are_freed_when_unused(self) -> None:
        locks = KeyedLocks()
        for key in range(100):
            with locks.hold(key):
                self.assertEqual(len(locks), 1)
        self.assertEqual(len(locks), 0)
        with self.assertRaises(RuntimeError):
            with locks.hold("x"):
                raise RuntimeError("boom")
        self.assertEqual(len(locks), 0)


class RpcObserversTests(unittest.TestCase):
    """Observers live on an object the node owns, not in module globals."""

    def test_each_set_hears_only_its_own_calls_and_a_failing_observer_is_contained(self) -> None:
        import grpc

        from quantix.rpc import status

        ours, theirs = status.RpcObservers(), status.RpcObservers()
        heard: list[tuple] = []

        def broken(*args: object) -> None:
            raise RuntimeError("observer bug")

        ours.add(broken)
        ours.add(lambda *args: heard.append(("plain", *args)))
        ours.add_with_request(lambda *args: heard.append(("request", *args)))
        theirs.add(lambda *args: heard.append(("theirs", *args)))
        call = status.unary("Ping", lambda request, context: "pong", ours)
        self.assertEqual(call("req", None), "pong")
        self.assertEqual([h[0] for h in heard], ["plain", "request"])
        self.assertEqual(heard[0][1:3], ("Ping", grpc.StatusCode.OK))
        self.assertEqual(heard[1][-1], "req")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        ours.remove(broken)
        ours.remove(broken)  # not registered any more: nothing happens

    def test_the_peer_is_asked_only_for_a_request_observer(self) -> None:
        from quantix.rpc import status

        class Context:
            asked = 0

            def peer(self) -> str:
                self.asked += 1
                return "ipv4:127.0.0.1:1"

        observers, context, heard = status.RpcObservers(), Context(), []
        observers.add(lambda *args: heard.append(args))
        call = status.unary("Ping", lambda request, context: "pong", observers)
        call("req", context)
        self.assertEqual((context.asked, len(heard)), (0, 1))  # metrics need no peer
        observers.add_with_request(lambda *args: heard.append(args))
        call("req", context)
        self.assertEqual(context.asked, 1)
        self.assertEqual(heard[-1][3], "ipv4:127.0.0.1:1")


class StateMachineTests(unittest.TestCase):
    def test_table_moves_and_refuses(self) -> None:
        import enum

        from quantix.util.states import IllegalTransition, StateMachine

        class S(enum.Enum):
            A = 1
            B = 2

        class In(enum.Enum):
            GO = 1
            BACK = 2

        seen: list[tuple] = []
        m = StateMachine("t", S.A, {(S.A, In.GO): S.B, (S.B, In.BACK): S.A}, lambda *t: seen.append(t))
        self.assertTrue(m.accepts(In.GO))
        self.assertIs(m.fire(In.GO), S.A)
        self.assertIs(m.state, S.B)
        with self.assertRaises(IllegalTransition) as caught:
            m.fire(In.GO)
        self.assertEqual(str(caught.exception), "t: GO is not accepted in B")
        self.assertIs(m.state, S.B)
        self.assertEqual(seen, [(S.A, In.GO, S.B)])
