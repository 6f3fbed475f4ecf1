"""The download engine's protobuf mapping: a job → ``DownloadProgress`` (pure).

As everywhere in the daemon, protobuf ⇄ domain conversions live in the box that owns the
domain type; :mod:`quantix.rpc.image_rpcs` calls this.
"""

from __future__ import annotations

from quantix.images import jobs
from quantix.images.jobs import Job
from quantix.proto import node_pb2

_STATUS = node_pb2.DownloadProgress.Status
STATUS = {
    jobs.PENDING: _STATUS.STATUS_PENDING,
    jobs.DOWNLOADING: _STATUS.STATUS_DOWNLOADING,
    jobs.VERIFYING: _STATUS.STATUS_VERIFYING,
    jobs.CONVERTING: _STATUS.STATUS_CONVERTING,
    jobs.COMPLETED: _STATUS.STATUS_COMPLETED,
    jobs.FAILED: _STATUS.STATUS_FAILED,
    jobs.CANCELLED: _STATUS.STATUS_CANCELLED,
}


def progress(job: Job) -> node_pb2.DownloadProgress:
    return node_pb2.DownloadProgress(
        job_id=job.job_id,
        image_id=job.image_id,
        status=STATUS[job.status],
        progress_percent=job.percent,
        bytes_downloaded=job.bytes_downloaded,
        bytes_total=job.bytes_total,
        download_speed=int(job.speed),
        eta_seconds=min(job.eta_seconds, 2**32 - 1),
        path=job.target_path,
        error=job.error or "",
    )
