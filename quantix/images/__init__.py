"""Cloud images on this node: verified, resumable download jobs and the local image scan.

The engine (:mod:`.engine`) is the one implementation behind both front doors, the 8080 JSON
routes (:mod:`quantix.web.images`) and the gRPC download RPCs (:mod:`quantix.rpc.image_rpcs`).
Pure parts (checksums, names and paths, the job record) are kept apart from the I/O (HTTP
transfer, ``qemu-img``, the job store) so they are tested without a reactor.
"""
