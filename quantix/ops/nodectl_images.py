"""``quantix-nodectl images download URL`` and ``images jobs``: cloud-image downloads by hand.

``download`` runs the daemon's DownloadImage (gRPC) and shows a live progress bar (tqdm) on a
terminal, plain lines when piped; Ctrl-C only stops watching, the job carries on. ``--pool``
puts the image where the control plane would: ``<pool path>/cloud-images``. ``jobs`` lists the
kept jobs from the 8080 listener (``--http``).
"""

from __future__ import annotations

import argparse
import json
import urllib.request
from typing import IO, TYPE_CHECKING

from tqdm import tqdm

if TYPE_CHECKING:
    from quantix.ops.nodectl import _Ctl
    from quantix.proto import node_pb2

STATUS = {
    1: "pending",
    2: "downloading",
    3: "verifying",
    4: "converting",
    5: "completed",
    6: "failed",
    7: "cancelled",
}


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    images = sub.add_parser("images", help="cloud-image downloads: download, jobs")
    isub = images.add_subparsers(dest="images_command", required=True, metavar="SUBCOMMAND")
    dl = isub.add_parser("download", help="download an image on the node, with a progress bar")
    dl.add_argument("url")
    where = dl.add_mutually_exclusive_group()
    where.add_argument("--pool", metavar="ID", help="storage pool: into <pool path>/cloud-images")
    where.add_argument("--dir", metavar="DIR", help="target directory [storage.cloud_images]")
    dl.add_argument("--filename", default="", help="file name [derived from the URL]")
    dl.add_argument("--checksum", default="", help="expected checksum (sha256:<hex>, or hex)")
    dl.add_argument("--job-id", default="", help="job id [generated]")
    jobs = isub.add_parser("jobs", help="download jobs the node keeps")
    jobs.add_argument("--http", default="127.0.0.1:8080", metavar="ADDRESS", help="the node's http.listen")


def describe(message: node_pb2.DownloadProgress) -> str:
    """One plain line for a progress message (pure)."""
    from quantix.ops.nodectl import human_bytes

    text = f"{STATUS.get(message.status, message.status)} {message.progress_percent}%"
    text += f" {human_bytes(message.bytes_downloaded)}"
    if message.bytes_total:
        text += f" of {human_bytes(message.bytes_total)}"
    if message.error:
        text += f": {message.error}"
    return text


def run(ctl: _Ctl, err: IO[str]) -> int:
    from quantix.ops.nodectl import EXIT_OK, EXIT_RPC_ERROR

    args: argparse.Namespace = ctl.args
    if args.images_command == "jobs":
        return jobs(args, ctl.out, err)
    pb = ctl.pb
    target = args.dir or ""
    if args.pool:
        info = ctl.stub.GetStoragePoolInfo(pb.StoragePoolIdRequest(pool_id=args.pool), timeout=args.timeout)
        if not info.mount_path:
            err.write(f"quantix-nodectl: pool {args.pool} has no directory\n")
            return EXIT_RPC_ERROR
        target = info.mount_path.rstrip("/") + "/cloud-images"
    request = pb.DownloadImageOnNodeRequest(
        url=args.url, target_dir=target, filename=args.filename, checksum=args.checksum, job_id=args.job_id
    )
    call = ctl.stub.DownloadImage(request)
    tty = hasattr(err, "isatty") and err.isatty() and not args.json
    bar = tqdm(total=0, unit="B", unit_scale=True, unit_divisor=1024, file=err, disable=not tty, leave=True)
    last = None
    try:
        for message in call:
            if args.json:
                ctl.emit(message, describe)
            elif not tty and (last is None or last.status != message.status or message.status == 2):
                ctl.out.write(describe(message) + "\n")
            elif tty:
                if message.bytes_total and bar.total != message.bytes_total:
                    bar.total = message.bytes_total
                bar.set_description(STATUS.get(message.status, ""))
                bar.update(message.bytes_downloaded - bar.n)
            last = message
    except KeyboardInterrupt:
        call.cancel()
        bar.close()
        job = last.job_id if last is not None else "the job"
        err.write(f"quantix-nodectl: stopped watching; {job} continues on the node\n")
        return EXIT_OK
    finally:
        bar.close()
    if last is None or last.status != pb.DownloadProgress.Status.STATUS_COMPLETED:
        reason = last.error if last is not None else "the stream ended without a result"
        err.write(f"quantix-nodectl: download failed: {reason}\n")
        return EXIT_RPC_ERROR
    if not args.json:
        ctl.out.write(f"{last.path} ({last.bytes_downloaded} bytes)\n")
    return EXIT_OK


def jobs(args: argparse.Namespace, out: IO[str], err: IO[str]) -> int:
    from quantix.ops.nodectl import EXIT_OK, EXIT_UNREACHABLE, human_bytes, table

    url = f"http://{args.http}/api/v1/images/download"
    try:
        with urllib.request.urlopen(url, timeout=args.timeout) as response:
            listing = json.load(response)["jobs"]
    except (OSError, ValueError, KeyError) as exc:
        err.write(f"quantix-nodectl: {url}: {exc}\n")
        return EXIT_UNREACHABLE
    if args.json:
        for job in listing:
            out.write(json.dumps(job) + "\n")
        return EXIT_OK
    rows = [
        (
            j["jobId"],
            j["status"],
            f"{j['progressPercent']}%",
            human_bytes(j["bytesDownloaded"]),
            j["targetPath"],
            j["errorMessage"] or "",
        )
        for j in listing
    ]
    out.write(table(("JOB", "STATUS", "DONE", "BYTES", "PATH", "ERROR"), rows) + "\n")
    return EXIT_OK
