"""Keep what a test provokes on purpose out of the run's output.

C libraries write their diagnostics straight to file descriptor 2: grpc's core logs every failed
TLS handshake, protoc reports a broken ``.proto``, libxml2 (inside libvirt) warns about a file it
cannot load. A test that provokes one of these on purpose would leave a line in the output that
reads like a failure. :func:`capture_stderr` points descriptor 2 at a file for the rest of the
test; at cleanup the text goes into the test log (``_trial_temp/test.log``) instead.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable
from typing import Any

from twisted.logger import Logger

log = Logger(namespace="tests.stderr")


def capture_stderr(testcase: Any, expect: str | None = None) -> Callable[[], str]:
    """Capture descriptor 2 until ``testcase``'s cleanups run; returns a reader of the text so
    far. Register it before starting what will write (cleanups run last-added first, so the
    capture ends after, say, the daemon it wraps has stopped). With ``expect``, the captured
    text must contain it: the test shows it provoked the message it hides."""
    sys.stderr.flush()
    saved = os.dup(2)
    sink = tempfile.TemporaryFile(mode="w+b")
    os.dup2(sink.fileno(), 2)

    def read() -> str:
        sys.stderr.flush()
        sink.seek(0)
        return sink.read().decode("utf-8", "replace")

    def restore() -> None:
        text = read()
        os.dup2(saved, 2)
        os.close(saved)
        sink.close()
        if text:
            log.info("captured stderr of {test}:\n{text}", test=testcase.id(), text=text)
        if expect is not None and expect not in text:
            testcase.fail(f"expected {expect!r} on stderr, captured: {text!r}")

    testcase.addCleanup(restore)
    return read
