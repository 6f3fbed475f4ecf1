"""The download job record, its wire shapes and the file it is kept in.

A job lives on the reactor (the engine mutates it); readers get a copy (:meth:`Job.copy`). The
statuses are the engine's; the REST shape folds ``verifying`` into ``downloading`` and
``cancelled`` into ``failed`` (the control plane knows only five), gRPC has all seven.
"""

from __future__ import annotations

import json
import os
import time
from datetime import UTC, datetime
from typing import TypeVar

import attrs

from quantix.util.jsontypes import JsonObject, JsonValue

PENDING = "pending"
DOWNLOADING = "downloading"
VERIFYING = "verifying"
CONVERTING = "converting"
COMPLETED = "completed"
FAILED = "failed"
CANCELLED = "cancelled"
ENDED = frozenset({COMPLETED, FAILED, CANCELLED})
_REST_STATUS = {VERIFYING: DOWNLOADING, CANCELLED: FAILED}


def rfc3339(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@attrs.define
class Job:
    job_id: str
    image_id: str
    url: str
    target_path: str
    catalog_id: str = ""
    pool_id: str | None = None
    checksum: str = ""
    checksum_type: str = ""
    status: str = PENDING
    bytes_downloaded: int = 0
    bytes_total: int = 0
    error: str | None = None
    started_at: float = attrs.field(factory=time.time)
    completed_at: float | None = None
    #: Bytes per second over the last few seconds (not persisted).
    speed: float = attrs.field(default=0.0, eq=False)

    @property
    def ended(self) -> bool:
        return self.status in ENDED

    @property
    def part_path(self) -> str:
        return self.target_path + ".part"

    @property
    def sidecar_path(self) -> str:
        return self.target_path + ".part.json"

    @property
    def percent(self) -> int:
        if self.status == COMPLETED:
            return 100
        if not self.bytes_total:
            return 0
        return min(99, self.bytes_downloaded * 100 // self.bytes_total)

    @property
    def eta_seconds(self) -> int:
        if self.speed <= 0 or not self.bytes_total or self.ended:
            return 0
        return int(max(self.bytes_total - self.bytes_downloaded, 0) / self.speed)

    def copy(self) -> Job:
        return attrs.evolve(self)

    def rest(self) -> JsonObject:
        """The control plane's shape (research note B.1): camelCase, integers, ``null`` unknowns."""
        error = self.error
        if self.status == CANCELLED:
            error = "cancelled"
        return {
            "jobId": self.job_id,
            "imageId": self.image_id,
            "catalogId": self.catalog_id,
            "url": self.url,
            "targetPath": self.target_path,
            "poolId": self.pool_id or None,
            "status": _REST_STATUS.get(self.status, self.status),
            "progressPercent": self.percent,
            "bytesDownloaded": int(self.bytes_downloaded),
            "bytesTotal": int(self.bytes_total),
            "errorMessage": error if self.status in (FAILED, CANCELLED) else None,
            "startedAt": rfc3339(self.started_at),
            "completedAt": rfc3339(self.completed_at),
        }

    def to_dict(self) -> JsonObject:
        data = attrs.asdict(self)
        data.pop("speed")
        return data

    @classmethod
    def from_dict(cls, data: JsonValue) -> Job:
        """A job as :meth:`to_dict` wrote it; ``TypeError`` when the record is not one (the
        store is damaged)."""
        if not isinstance(data, dict):
            raise TypeError("a job record is not a JSON object")
        started = _seconds(data, "started_at")
        return cls(
            job_id=_field(data, "job_id", str),
            image_id=_field(data, "image_id", str),
            url=_field(data, "url", str),
            target_path=_field(data, "target_path", str),
            catalog_id=_field(data, "catalog_id", str, ""),
            pool_id=_optional(data, "pool_id", str),
            checksum=_field(data, "checksum", str, ""),
            checksum_type=_field(data, "checksum_type", str, ""),
            status=_field(data, "status", str, PENDING),
            bytes_downloaded=_field(data, "bytes_downloaded", int, 0),
            bytes_total=_field(data, "bytes_total", int, 0),
            error=_optional(data, "error", str),
            started_at=started if started is not None else time.time(),
            completed_at=_seconds(data, "completed_at"),
        )


_T = TypeVar("_T")
_REQUIRED = object()


def _field(data: JsonObject, key: str, kind: type[_T], default: _T | object = _REQUIRED) -> _T:
    value = data.get(key, default)
    if value is _REQUIRED:
        raise TypeError(f"job record without {key}")
    if not isinstance(value, kind):
        raise TypeError(f"job record's {key} is not a {kind.__name__}")
    return value


def _optional(data: JsonObject, key: str, kind: type[_T]) -> _T | None:
    value = data.get(key)
    return None if value is None else _field(data, key, kind)


def _seconds(data: JsonObject, key: str) -> float | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"job record's {key} is not a number")
    return value


def load(path: str) -> list[Job]:
    """Blocking: the jobs kept at ``path``; a missing or unreadable file is an empty list."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
        return [Job.from_dict(item) for item in data.get("jobs", [])]
    except FileNotFoundError:
        return []
    except (OSError, ValueError, TypeError, AttributeError):
        # A damaged file must not keep the daemon from starting; keep it for a post-mortem.
        os.replace(path, path + ".damaged")
        return []


def dump(jobs: list[Job]) -> str:
    return json.dumps({"version": 1, "jobs": [j.to_dict() for j in jobs]}, indent=1)
