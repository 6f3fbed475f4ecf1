"""DownloadImage, GetDownloadStatus and CancelDownload on the download engine (research note A.2).

The engine lives on the reactor; these handlers run in gRPC threads and reach it through
:mod:`quantix.bridge`. ``DownloadImage`` streams the job: once at each status change and at most
once a second in between, ending normally when the job ends. A client that goes away only stops
its stream; the job carries on (it is also the control plane's 8080 job).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

import grpc
from google.protobuf import empty_pb2
from twisted.internet.interfaces import IReactorFromThreads

from quantix import bridge, errors
from quantix.images.engine import DownloadEngine, DownloadRequest
from quantix.images.jobs import Job
from quantix.images.wire import progress
from quantix.proto import node_pb2
from quantix.rpc.registry import rpc

INTERVAL = 1.0


def _job_id(value: str) -> str:
    if not value:
        raise errors.Invalid("job_id is required")
    return value


class ImageRpcs:
    """``engine`` is the node's :class:`~quantix.images.engine.DownloadEngine` (reactor-only
    methods); ``closed`` is set when the node stops, ending open streams with UNAVAILABLE."""

    def __init__(self, engine: DownloadEngine, reactor: IReactorFromThreads, closed: threading.Event) -> None:
        self.engine = engine
        self.reactor = reactor
        self.closed = closed

    @rpc("DownloadImage")
    def download_image(
        self, request: node_pb2.DownloadImageOnNodeRequest, context: grpc.ServicerContext
    ) -> Iterator[node_pb2.DownloadProgress]:
        engine = self.engine
        job = bridge.call_on_reactor(
            self.reactor,
            engine.submit,
            DownloadRequest(
                url=request.url,
                image_id=request.image_id,
                target_dir=request.target_dir,
                filename=request.filename,
                checksum=request.checksum,
                checksum_type=request.checksum_type,
                job_id=request.job_id,
            ),
        )
        changes: queue.SimpleQueue[Job] = queue.SimpleQueue()
        unwatch = bridge.call_on_reactor(self.reactor, engine.watch, job.job_id, changes.put)
        closed = self.closed
        try:
            job = bridge.call_on_reactor(self.reactor, engine.get, job.job_id)
            while True:
                yield progress(job)
                if job.ended:
                    return
                try:
                    job = changes.get(timeout=INTERVAL)
                except queue.Empty:
                    job = bridge.call_on_reactor(self.reactor, engine.get, job.job_id)
                if closed.is_set():
                    raise errors.Unavailable("node daemon is shutting down")
                if not context.is_active():
                    return
        finally:
            bridge.post_to_reactor(self.reactor, unwatch)

    @rpc("GetDownloadStatus")
    def get_download_status(
        self, request: node_pb2.GetDownloadStatusRequest, context: grpc.ServicerContext
    ) -> node_pb2.DownloadProgress:
        return progress(bridge.call_on_reactor(self.reactor, self.engine.get, _job_id(request.job_id)))

    @rpc("CancelDownload")
    def cancel_download(
        self, request: node_pb2.CancelDownloadRequest, context: grpc.ServicerContext
    ) -> empty_pb2.Empty:
        bridge.call_on_reactor(self.reactor, self.engine.cancel, _job_id(request.job_id))
        return empty_pb2.Empty()
