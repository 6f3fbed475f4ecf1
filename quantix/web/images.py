"""The 8080 routes the control plane's image catalog uses (research note B.1).

``POST /api/v1/images/download`` answers exactly 200 with ``{jobId, imageId, targetPath,
message}`` for a new, running or already-present image (the control plane fails on anything
else); ``GET /api/v1/images/download/{jobId}`` answers the job's full shape. The work is the
download engine's; these functions only check the JSON and map errors.
"""

from __future__ import annotations

from quantix import errors
from quantix.images import jobs
from quantix.images.engine import DownloadEngine, DownloadRequest
from quantix.images.target import InvalidTarget
from quantix.util.jsontypes import JsonObject
from quantix.util.reactor import INodeReactor
from quantix.web.errors import HttpError
from quantix.web.listener import WebListener
from quantix.web.router import Call, Router

REQUIRED = ("url", "imageId", "targetDir")
OPTIONAL = ("catalogId", "poolId", "checksum", "filename")


def add_routes(router: Router, engine: DownloadEngine) -> None:
    """Serve ``engine`` (a :class:`~quantix.images.engine.DownloadEngine`) on ``router``."""

    async def start(call: Call) -> JsonObject:
        body = call.json()
        fields: dict[str, str] = {}
        for key in REQUIRED + OPTIONAL:
            value = body.get(key)
            if value is None:
                value = ""
            if not isinstance(value, str):
                raise HttpError(400, "invalid_request", f"{key} must be a string")
            if key in REQUIRED and not value.strip():
                raise HttpError(400, "invalid_request", f"{key} is required")
            fields[key] = value
        request = DownloadRequest(
            url=fields["url"],
            image_id=fields["imageId"],
            target_dir=fields["targetDir"],
            filename=fields["filename"],
            checksum=fields["checksum"],
            catalog_id=fields["catalogId"],
            pool_id=fields["poolId"],
        )
        try:
            job = await engine.submit(request)
        except errors.QuantixError as exc:
            raise http_error(exc) from None
        if job.status == jobs.COMPLETED:
            message = "image already present"
        elif job.ended:
            message = f"download {job.status}"
        else:
            message = "download started"
        return {
            "jobId": job.job_id,
            "imageId": job.image_id,
            "targetPath": job.target_path,
            "message": message,
        }

    def status(call: Call) -> JsonObject:
        try:
            return engine.get(call.params["jobId"]).rest()
        except errors.NotFound:
            raise HttpError(404, "job_not_found", f"download job not found: {call.params['jobId']}") from None

    def listing(call: Call) -> JsonObject:
        """Not used by the control plane: ``quantix-nodectl images jobs`` reads it."""
        return {"jobs": [job.rest() for job in engine.list()]}

    router.add("POST", "/api/v1/images/download", start)
    router.add("GET", "/api/v1/images/download", listing)
    router.add("GET", "/api/v1/images/download/{jobId}", status)


def http_error(exc: errors.QuantixError) -> HttpError:
    if isinstance(exc, InvalidTarget):
        return HttpError(400, "invalid_target", str(exc))
    if isinstance(exc, errors.Invalid):
        return HttpError(400, "invalid_request", str(exc))
    if isinstance(exc, errors.AlreadyExists):
        return HttpError(409, "already_exists", str(exc))
    if isinstance(exc, errors.NotFound):
        return HttpError(404, "not_found", str(exc))
    return HttpError(503, "unavailable", str(exc))


def listener(reactor: INodeReactor, listen: str | None, engine: DownloadEngine) -> WebListener:
    """The plain-HTTP listener (``http.listen``) with the download routes."""
    router = Router()
    add_routes(router, engine)
    return WebListener(reactor, listen, router, name="http")
