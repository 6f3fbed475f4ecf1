"""Local cloud images reported to the control plane (research note C).

After every (re)registration the whole ``storage.cloud_images`` scan goes out with
``ImageService/ScanLocalImages`` (the control plane keeps what it knows by path and adds the
rest); every ``rescan_interval`` new files go out the same way, and files that disappeared are
reported with ``POST /api/v1/images/notify`` (``event_type: deleted``, snake_case, the only
body shape the control plane decodes), which ScanLocalImages cannot express. The paths last
reported are kept in the state directory, so a file deleted while the daemon was down is
reported too. All of it is best effort beside the link's main loop: it never delays a
heartbeat, and ``unimplemented`` or any error only costs a log line.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING

from twisted.application import service
from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python.failure import Failure

from quantix import bridge
from quantix.controlplane.connect import ConnectError
from quantix.images.scan import LocalImage
from quantix.proto import storage_pb2
from quantix.util.files import atomic_write
from quantix.util.jsontypes import JsonObject
from quantix.util.reactor import INodeReactor

if TYPE_CHECKING:
    from quantix.controlplane.link import CallClient

IMAGE_SERVICE = "limiquantix.storage.v1.ImageService"
NOTIFY_PATH = "/api/v1/images/notify"
STATE_NAME = "reported-images.json"
RESCAN_INTERVAL = 600.0

log = Logger(namespace="quantix.controlplane.images")


def local_image_message(image: LocalImage) -> storage_pb2.LocalImageInfo:
    """Empty ``distribution``: the control plane guesses the OS from the file name only then."""
    return storage_pb2.LocalImageInfo(
        path=image.path,
        filename=image.filename,
        size_bytes=image.size_bytes,
        virtual_size_bytes=image.virtual_size_bytes,
        format=image.format,
        checksum="",
        detected_os=storage_pb2.OsInfo(
            architecture="x86_64",
            cloud_init_enabled=True,
            provisioning_method=storage_pb2.OsInfo.CLOUD_INIT,
        ),
        modified_at=image.modified_at,
    )


def deleted_event(node_id: str, path: str, now: float) -> JsonObject:
    name = os.path.basename(path)
    return {
        "node_id": node_id,
        "event_type": "deleted",
        "id": str(uuid.uuid4()),
        "name": name,
        "filename": name,
        "folder_path": os.path.dirname(path),
        "size_bytes": 0,
        "format": name.rsplit(".", 1)[-1].lower() if "." in name else "",
        "path": path,
        "timestamp": int(now),
    }


def _load(path: str) -> set[str] | None:
    try:
        with open(path, encoding="utf-8") as fh:
            return set(json.load(fh).get("paths", []))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, AttributeError, TypeError):
        return None


class ImageReporter(service.Service):
    """``scan()`` is blocking (a worker runs it); ``client`` is the link's ConnectClient."""

    name = "image-reporter"

    def __init__(
        self,
        reactor: INodeReactor,
        client: CallClient,
        scan: Callable[[], list[LocalImage]],
        state_dir: str,
        rescan_interval: float = RESCAN_INTERVAL,
    ) -> None:
        self.reactor = reactor
        self.client = client
        self.scan = scan
        self.state_path = os.path.join(state_dir, STATE_NAME)
        self.rescan_interval = rescan_interval
        self.node_id: str | None = None
        self.reports = 0  # finished reports, for tests and metrics
        self._unimplemented = False
        self._running: defer.Deferred[None] | None = None
        self._again: bool | None = None
        self._loop: task.LoopingCall | None = None

    def registered(self, node_id: str) -> None:
        """Reactor: the link has (re)registered as ``node_id``; report everything."""
        self.node_id = node_id
        self._unimplemented = False
        self._start(full=True)
        if self._loop is None and self.running:
            self._loop = task.LoopingCall(self.rescan)
            self._loop.clock = self.reactor
            self._loop.start(self.rescan_interval, now=False)

    def rescan(self) -> None:
        """Reactor: report new files and deletions now (also every ``rescan_interval``)."""
        self._start(full=False)

    def idle(self) -> bool:
        return self._running is None

    def stopService(self) -> None:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        self._again = None
        if self._running is not None:
            self._running.cancel()
        return None

    def _start(self, full: bool) -> None:
        if not self.running or self.node_id is None:
            return
        if self._running is not None:
            self._again = bool(self._again) or full  # one more pass after the current one
            return
        self._running = self._report(self.node_id, full)
        self._running.addErrback(self._failed)
        self._running.addBoth(self._done)

    def _done(self, _: object) -> None:
        self._running = None
        again, self._again = self._again, None
        if again is not None:
            self._start(again)

    def _failed(self, failure: Failure) -> None:
        if failure.check(defer.CancelledError):
            return
        log.failure("reporting local images failed", failure)

    @defer.inlineCallbacks
    def _report(self, node_id: str, full: bool):
        images = yield bridge.run_in_worker(self.scan, reactor=self.reactor)
        before = yield bridge.run_in_worker(_load, self.state_path, reactor=self.reactor)
        current = {image.path for image in images}
        send = images if full or before is None else [i for i in images if i.path not in before]
        sent = True
        if send and not self._unimplemented:
            sent = yield self._scan_call(node_id, send)
        if not sent:  # new files go out again at the next scan
            current &= before or set()
        gone = sorted((before or set()) - {image.path for image in images})
        kept = set()
        for path in gone:
            try:
                yield self.client.post_json(NOTIFY_PATH, deleted_event(node_id, path, time.time()))
            except ConnectError as exc:
                log.warn("reporting the deletion of {path} failed: {error}", path=path, error=exc)
                kept.add(path)  # try again at the next scan
        if current | kept != before:
            body = json.dumps({"paths": sorted(current | kept)})
            yield bridge.run_in_worker(atomic_write, self.state_path, body, reactor=self.reactor)
        self.reports += 1

    @defer.inlineCallbacks
    def _scan_call(self, node_id: str, images: list[LocalImage]):
        request = storage_pb2.ScanLocalImagesRequest(
            node_id=node_id, images=[local_image_message(i) for i in images]
        )
        try:
            answer = yield self.client.call(
                IMAGE_SERVICE, "ScanLocalImages", request, storage_pb2.ScanLocalImagesResponse
            )
        except ConnectError as exc:
            if exc.code == "unimplemented":
                self._unimplemented = True
                log.info("control plane does not implement ScanLocalImages; skipping it")
                return True
            log.warn("ScanLocalImages failed: {error}", error=exc)
            return False
        log.info(
            "reported {n} local image(s): {new} new, {known} known",
            n=len(images),
            new=answer.registered_count,
            known=answer.existing_count,
        )
        return True
