"""The download-job engine: queue, transfers with retries, verification, conversion, persistence.

One engine per node, on the reactor. Jobs are kept in ``<state_dir>/downloads.json``: a job that
was pending or transferring when the daemon stopped is queued again at the next start and
resumes its ``.part``; ended jobs stay answerable for ``downloads.keep_finished_hours``. At most
``downloads.max_concurrent`` jobs transfer; the rest wait as ``pending``.

Every blocking step (realpath/mkdir, stat, sidecar, the writer, qemu-img, the final rename) runs
in a worker thread through :mod:`quantix.bridge`; job records are only touched on the reactor.
"""

from __future__ import annotations

import collections
import os
import re
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING

import attrs
from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python.failure import Failure

from quantix import bridge, errors
from quantix.config import DownloadsConfig
from quantix.images import checksum, jobs, qemu, target, transfer
from quantix.images.jobs import Job
from quantix.util.backoff import Backoff
from quantix.util.files import atomic_write, fsync_dir
from quantix.util.reactor import INodeReactor

if TYPE_CHECKING:
    from treq.client import HTTPClient  # imported by the first download only (idle memory)
    from twisted.web.iweb import IResponse

log = Logger(namespace="quantix.images")

STORE_NAME = "downloads.json"
SAVE_INTERVAL = 5.0
SUMS_LIMIT = 1024 * 1024
SPEED_WINDOW = 5.0
_JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


@attrs.frozen
class DownloadRequest:
    url: str
    image_id: str = ""
    target_dir: str = ""
    filename: str = ""
    checksum: str = ""
    checksum_type: str = ""
    catalog_id: str = ""
    pool_id: str = ""
    job_id: str = ""


class _Run:
    """The live part of an active job: its current attempt and how it should end."""

    def __init__(self) -> None:
        self.attempt: transfer.Attempt | None = None
        self.cancelled = False
        self.stopping = False
        self.sleep: defer.Deferred[None] | None = None
        self.done: defer.Deferred[None] | None = None
        self.samples: collections.deque[tuple[float, int]] = collections.deque()

    def interrupt(self) -> None:
        if self.attempt is not None:
            self.attempt.stop()
        if self.sleep is not None and not self.sleep.called:
            self.sleep.cancel()


class DownloadEngine(Service):
    """See the module docstring. Public methods are reactor-only."""

    def __init__(
        self,
        reactor: INodeReactor,
        settings: DownloadsConfig,
        state_dir: str,
        default_dir: str,
        roots: Callable[[], list[str]],
        client_factory: Callable[[INodeReactor, DownloadsConfig], HTTPClient] | None = None,
    ) -> None:
        self.reactor = reactor
        self.settings = settings
        self.store = os.path.join(state_dir, STORE_NAME)
        self.default_dir = default_dir
        self.roots = roots
        self._client_factory = client_factory or default_client
        self.client: HTTPClient | None = None
        self.jobs: dict[str, Job] = {}
        self._queue: collections.deque[str] = collections.deque()
        self._active: dict[str, _Run] = {}
        self._watchers: dict[str, list[Callable[[Job], None]]] = {}
        self._dirty = False
        self._saving: defer.Deferred[None] | None = None
        self._saver: task.LoopingCall | None = None
        self._started: defer.Deferred[None] | None = None

    def _http(self) -> HTTPClient:
        """The HTTP client, made on the first download: treq and Twisted's web client are
        imported only by a daemon that downloads (idle memory)."""
        if self.client is None:
            self.client = self._client_factory(self.reactor, self.settings)
        return self.client

    # -- service ---------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._saver = task.LoopingCall(self._save)
        self._saver.clock = self.reactor
        self._saver.start(SAVE_INTERVAL, now=False)
        loading = bridge.run_in_worker(jobs.load, self.store, reactor=self.reactor).addCallback(self._loaded)
        self._started = loading.addErrback(lambda f: log.failure("cannot read {store}", f, store=self.store))

    def _loaded(self, loaded: list[Job]) -> None:
        now = time.time()
        keep = self.settings.keep_finished_hours * 3600
        for job in loaded:
            if job.ended and (job.completed_at or job.started_at) < now - keep:
                continue
            if not job.ended:
                job.status = jobs.PENDING
                self._queue.append(job.job_id)
            self.jobs[job.job_id] = job
        if self._queue:
            log.info("resuming {n} download(s)", n=len(self._queue))
        self._pump()

    def ready(self) -> defer.Deferred[None]:
        """Fires once the persisted jobs are loaded (tests and front doors may wait on it)."""
        d: defer.Deferred[None] = defer.Deferred()

        def fire(result: None) -> None:
            d.callback(None)
            return result

        if self._started is None:
            d.callback(None)
        else:
            self._started.addBoth(fire)
        return d

    def stopService(self) -> defer.Deferred[None]:
        return defer.Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        super().stopService()
        if self._saver is not None and self._saver.running:
            self._saver.stop()
        runs = list(self._active.values())
        for run in runs:
            run.stopping = True
            run.interrupt()
        await defer.DeferredList([r.done for r in runs if r.done is not None])
        self._dirty = True
        saving = self._save()
        if saving is not None:
            await saving

    # -- queries ---------------------------------------------------------------------------

    @bridge.reactor_only
    def get(self, job_id: str) -> Job:
        job = self.jobs.get(job_id)
        if job is None:
            raise errors.NotFound(f"download job not found: {job_id[:200]}")
        snapshot = job.copy()
        run = self._active.get(job_id)
        if run is not None:
            snapshot.speed = _speed(run.samples, time.monotonic())
        return snapshot

    @bridge.reactor_only
    def list(self) -> list[Job]:
        """Copies of every kept job, oldest first."""
        return sorted((job.copy() for job in self.jobs.values()), key=lambda j: j.started_at)

    @bridge.reactor_only
    def watch(self, job_id: str, fn: Callable[[Job], None]) -> Callable[[], None]:
        """Call ``fn(copy)`` on the reactor at every status change of ``job_id``."""
        self.get(job_id)
        self._watchers.setdefault(job_id, []).append(fn)

        def unwatch() -> None:
            watchers = self._watchers.get(job_id, [])
            if fn in watchers:
                watchers.remove(fn)
            if not watchers:
                self._watchers.pop(job_id, None)

        return unwatch

    # -- commands --------------------------------------------------------------------------

    def submit(self, req: DownloadRequest) -> defer.Deferred[Job]:
        """Start (or find) the job for ``req``; fires with a copy of it. Idempotent: the same
        URL and target while active is the same job; a final file already there is a job
        that is already completed."""
        return defer.Deferred.fromCoroutine(self._submit(req))

    async def _submit(self, req: DownloadRequest) -> Job:
        target.check_url(req.url)
        if req.job_id and not _JOB_ID.fullmatch(req.job_id):
            raise errors.Invalid("job id must be 1-128 letters, digits, '.', '_' or '-'")
        name = target.local_name(req.url, req.filename)
        expected = checksum.parse(req.checksum, req.checksum_type)
        directory = req.target_dir or self.default_dir
        roots = await bridge.run_in_worker(self.roots, reactor=self.reactor)
        real_dir = await bridge.run_in_worker(target.prepare_dir, directory, roots, reactor=self.reactor)
        final = os.path.join(real_dir, name)
        await self.ready()
        existing = self._find(req, final)
        if existing is not None:
            return existing.copy()
        job = Job(
            job_id=req.job_id or str(uuid.uuid4()),
            image_id=req.image_id or req.job_id or name,
            url=req.url,
            target_path=final,
            catalog_id=req.catalog_id,
            pool_id=req.pool_id or None,
            checksum=expected.hexdigest if expected else "",
            checksum_type=expected.algorithm if expected else "",
        )
        size = await bridge.run_in_worker(_final_size, final, reactor=self.reactor)
        if job.job_id in self.jobs:  # raced with an identical submit
            return self._find(req, final) or self.jobs[job.job_id].copy()
        if size is not None:
            job.status, job.bytes_downloaded, job.bytes_total = jobs.COMPLETED, size, size
            job.completed_at = time.time()
        else:
            self._queue.append(job.job_id)
        self.jobs[job.job_id] = job
        self._changed(job)
        self._pump()
        return job.copy()

    def _find(self, req: DownloadRequest, final: str) -> Job | None:
        if req.job_id and req.job_id in self.jobs:
            job = self.jobs[req.job_id]
            if job.url != req.url or job.target_path != final:
                raise errors.AlreadyExists(f"download job {req.job_id} exists for another URL or target")
            return job
        for job in self.jobs.values():
            if job.ended or job.target_path != final:
                continue
            if job.url != req.url:
                raise errors.AlreadyExists(f"{final} is being downloaded from another URL")
            return job
        return None

    def cancel(self, job_id: str) -> defer.Deferred[Job]:
        """Stop ``job_id`` and remove its partial file; a job that has ended stays as it is.
        Fires with a copy of the job."""
        return defer.Deferred.fromCoroutine(self._cancel(job_id))

    async def _cancel(self, job_id: str) -> Job:
        job = self.jobs.get(job_id)
        if job is None:
            raise errors.NotFound(f"download job not found: {job_id[:200]}")
        if job.ended:
            return job.copy()
        run = self._active.get(job_id)
        if run is not None:
            run.cancelled = True
            run.interrupt()
            if run.done is not None:
                await run.done
        else:
            if job_id in self._queue:
                self._queue.remove(job_id)
            await bridge.run_in_worker(_remove_partial, job, reactor=self.reactor)
            self._end(job, jobs.CANCELLED, "cancelled")
        return job.copy()

    # -- running jobs ----------------------------------------------------------------------

    def _pump(self) -> None:
        while self.running and self._queue and len(self._active) < self.settings.max_concurrent:
            job_id = self._queue.popleft()
            job = self.jobs.get(job_id)
            if job is None or job.ended:
                continue
            run = self._active[job_id] = _Run()
            done = run.done = defer.Deferred.fromCoroutine(self._run(job, run))
            done.addErrback(self._crashed, job).addBoth(self._finished, job_id)

    def _finished(self, _: None, job_id: str) -> None:
        self._active.pop(job_id, None)
        self._pump()

    def _crashed(self, failure: Failure, job: Job) -> None:
        log.failure("download {job_id} failed unexpectedly", failure, job_id=job.job_id)
        if not job.ended:
            self._end(job, jobs.FAILED, "internal error")

    async def _run(self, job: Job, run: _Run) -> None:
        self._set(job, jobs.DOWNLOADING)
        expected = checksum.parse(job.checksum, job.checksum_type)
        if expected is None and self.settings.verify_sums:
            expected = await self._sums(job)
        result = await self._transfer(job, run, expected)
        if result is None:
            return  # cancelled or stopping: already handled
        try:
            if expected is not None:
                self._set(job, jobs.VERIFYING)
                if result.hexdigest != expected.hexdigest:
                    raise errors.Invalid(
                        f"checksum mismatch: expected {expected.algorithm} {expected.hexdigest}, "
                        f"got {result.hexdigest}"
                    )
            info = await bridge.run_in_worker(qemu.info, job.part_path, reactor=self.reactor)
            if job.target_path.endswith(".qcow2") and info.format != "qcow2":
                self._set(job, jobs.CONVERTING)
                await bridge.run_in_worker(_convert, job.part_path, info.format, reactor=self.reactor)
            size = await bridge.run_in_worker(_finalize, job, reactor=self.reactor)
        except errors.QuantixError as exc:
            await bridge.run_in_worker(_remove_partial, job, reactor=self.reactor)
            self._end(job, jobs.FAILED, str(exc))
            return
        job.bytes_downloaded = size
        job.bytes_total = max(job.bytes_total, size)
        self._end(job, jobs.COMPLETED, None)
        log.info("downloaded {url} to {path} ({size} bytes)", url=job.url, path=job.target_path, size=size)

    async def _transfer(
        self, job: Job, run: _Run, expected: checksum.Expected | None
    ) -> transfer.Result | None:
        """Attempts until one succeeds; ``None`` when cancelled or stopping (handled here)."""
        s = self.settings
        backoff = Backoff(initial=s.retry_initial_delay, maximum=s.retry_max_delay, jitter=0.3)
        failures = 0
        request = transfer.Request(
            url=job.url,
            part=job.part_path,
            sidecar=job.sidecar_path,
            algorithm=transfer.expected_algorithm(expected),
            idle_timeout=s.idle_timeout,
        )
        while True:
            attempt = run.attempt = transfer.Attempt(
                self.reactor, self._http(), request, self._progress(job, run)
            )
            progress_before = job.bytes_downloaded
            try:
                return await attempt.run()
            except transfer.TransferError as exc:
                error = exc
            finally:
                run.attempt = None
                job.bytes_total = attempt.total or job.bytes_total
            if run.cancelled or run.stopping:
                if run.cancelled:
                    await bridge.run_in_worker(_remove_partial, job, reactor=self.reactor)
                    self._end(job, jobs.CANCELLED, "cancelled")
                return None
            failures = 0 if job.bytes_downloaded > progress_before else failures + 1
            if failures == 0:
                backoff.reset()
            if not error.retryable or failures > s.retries:
                await bridge.run_in_worker(_remove_partial, job, reactor=self.reactor)
                self._end(job, jobs.FAILED, str(error))
                return None
            delay = backoff.next()
            log.info(
                "download {job_id}: {error}; retrying in {delay:.1f} s",
                job_id=job.job_id,
                error=error,
                delay=delay,
            )
            run.sleep = task.deferLater(self.reactor, delay, lambda: None)
            try:
                await run.sleep
            except defer.CancelledError:
                pass
            run.sleep = None

    def _progress(self, job: Job, run: _Run) -> Callable[[int], None]:
        first = [True]

        def on_bytes(n: int) -> None:
            if first[0]:
                first[0] = False
                attempt = run.attempt
                if attempt is not None:
                    job.bytes_downloaded = attempt.offset
                    job.bytes_total = attempt.total or job.bytes_total
            job.bytes_downloaded += n
            now = time.monotonic()
            run.samples.append((now, job.bytes_downloaded))
            while run.samples and run.samples[0][0] < now - SPEED_WINDOW:
                run.samples.popleft()

        return on_bytes

    async def _sums(self, job: Job) -> checksum.Expected | None:
        """The expected checksum from a SUMS file beside the URL, or ``None``; never fails."""
        base = job.url.split("?", 1)[0].rsplit("/", 1)[0]
        name = target.remote_name(job.url)
        for sums in checksum.SUMS_FILES:
            url = f"{base}/{sums}"
            try:
                response: IResponse = await self._http().get(
                    url, timeout=self.settings.idle_timeout, unbuffered=True
                )
                if response.code != 200:
                    transfer.drop(response)
                    continue
                body = await _read_limited(response, SUMS_LIMIT)
            except Exception as exc:
                log.debug("no {sums} for {url}: {exc}", sums=sums, url=job.url, exc=exc)
                continue
            found = checksum.find_in_sums(body.decode("utf-8", "replace"), name, "sha256", url)
            if found is not None:
                log.info("verifying {name} against {url}", name=name, url=url)
                return found
        return None

    # -- state changes ---------------------------------------------------------------------

    def _set(self, job: Job, status: str) -> None:
        job.status = status
        self._changed(job)

    def _end(self, job: Job, status: str, error: str | None) -> None:
        job.error = error
        job.completed_at = time.time()
        if status == jobs.FAILED:
            log.warn(
                "download {job_id} of {url} failed: {error}", job_id=job.job_id, url=job.url, error=error
            )
        self._set(job, status)

    def _changed(self, job: Job) -> None:
        self._dirty = True
        for fn in list(self._watchers.get(job.job_id, ())):
            fn(job.copy())
        self._save()

    def _save(self) -> defer.Deferred[None] | None:
        """Write the store when something changed; one write at a time, the last state wins."""
        if not self._dirty or self._saving is not None:
            return self._saving
        self._dirty = False
        text = jobs.dump(list(self.jobs.values()))
        d = self._saving = bridge.run_in_worker(atomic_write, self.store, text, reactor=self.reactor)
        d.addErrback(lambda f: log.failure("cannot write {store}", f, store=self.store))

        def written(_: None) -> defer.Deferred[None] | None:
            self._saving = None
            return self._save() if self._dirty else None

        d.addCallback(written)
        return d


def default_client(reactor: INodeReactor, settings: DownloadsConfig) -> HTTPClient:
    """treq over an Agent with the connect timeout; redirects are followed by treq."""
    from treq.client import HTTPClient
    from twisted.web.client import Agent, HTTPConnectionPool

    pool = HTTPConnectionPool(reactor, persistent=False)
    return HTTPClient(Agent(reactor, connectTimeout=settings.connect_timeout, pool=pool))


def _read_limited(response: IResponse, limit: int) -> defer.Deferred[bytes]:
    """The body of ``response``, failing (and closing it) past ``limit`` bytes."""
    import treq

    chunks: list[bytes] = []
    size = [0]

    def collect(data: bytes) -> None:
        size[0] += len(data)
        if size[0] > limit:
            raise ValueError(f"longer than {limit} bytes")
        chunks.append(data)

    return treq.collect(response, collect).addCallback(lambda _: b"".join(chunks))


def _speed(samples: collections.deque[tuple[float, int]], now: float) -> float:
    if len(samples) < 2:
        return 0.0
    (t0, b0), (t1, b1) = samples[0], samples[-1]
    return (b1 - b0) / max(t1 - t0, 1e-3) if now - t1 < SPEED_WINDOW else 0.0


def _final_size(path: str) -> int | None:
    try:
        return os.path.getsize(path) if os.path.isfile(path) else None
    except OSError:
        return None


def _remove_partial(job: Job) -> None:
    for path in (job.part_path, job.sidecar_path, job.part_path + ".qcow2"):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def _convert(part: str, fmt: str) -> None:
    tmp = part + ".qcow2"
    try:
        qemu.convert_to_qcow2(part, tmp, fmt)
        os.replace(tmp, part)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _finalize(job: Job) -> int:
    """fsync, 0644, atomic rename onto the final name, fsync the directory; the final size."""
    fd = os.open(job.part_path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.fchmod(fd, 0o644)
    finally:
        os.close(fd)
    os.replace(job.part_path, job.target_path)
    try:
        os.unlink(job.sidecar_path)
    except FileNotFoundError:
        pass
    fsync_dir(os.path.dirname(job.target_path))
    return os.path.getsize(job.target_path)
