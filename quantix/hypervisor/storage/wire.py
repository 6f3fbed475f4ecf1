"""The storage box's protobuf mapping: node API messages ⇄ the box's plain values (pure).

Every protobuf ⇄ domain conversion lives in the box that owns the domain type (see the README's
architecture section); the gRPC handlers (:mod:`quantix.rpc.storage_rpcs`) and the control-plane
link's pool assignment (:mod:`quantix.controlplane.sources`) both use these.
"""

from __future__ import annotations

from collections.abc import Iterable

from quantix import errors
from quantix.hypervisor.storage import files
from quantix.hypervisor.storage import manager as sm
from quantix.proto import node_pb2

#: StoragePoolType number → the box's type name; LVM and CephFS have no backend here.
POOL_TYPES = {1: sm.LOCAL_DIR, 3: sm.NFS, 4: sm.CEPH_RBD, 6: sm.ISCSI}
TYPE_NUMBERS = {sm.LOCAL_DIR: 1, sm.LOCAL_LVM: 2, sm.NFS: 3, sm.CEPH_RBD: 4, sm.ISCSI: 6}
VOLUME_SOURCES = {0: "empty", 1: "clone", 2: "image", 3: "snapshot"}


def pool_request(req: node_pb2.InitStoragePoolRequest) -> sm.PoolRequest:
    """``InitStoragePoolRequest`` → plain values; an unsupported type is named in the error."""
    kind = POOL_TYPES.get(req.type)
    if kind is None:
        try:
            name = node_pb2.StoragePoolType.Name(req.type)
        except ValueError:
            name = f"STORAGE_POOL_TYPE_{req.type}"
        raise errors.Invalid(f"unsupported storage pool type: {name}")
    c = req.config
    return sm.PoolRequest(
        pool_id=req.pool_id,
        type=kind,
        local_path=c.local.path,
        nfs_server=c.nfs.server,
        nfs_export=c.nfs.export_path,
        nfs_version=c.nfs.version,
        nfs_options=c.nfs.options,
        nfs_mount_point=c.nfs.mount_point,
        ceph_pool=c.ceph.pool_name,
        ceph_monitors=tuple(c.ceph.monitors),
        ceph_user=c.ceph.user,
        ceph_keyring=c.ceph.keyring_path,
        ceph_secret_uuid=c.ceph.secret_uuid,
        iscsi_portal=c.iscsi.portal,
        iscsi_target=c.iscsi.target,
        iscsi_chap=c.iscsi.chap_enabled,
        iscsi_chap_user=c.iscsi.chap_user,
        iscsi_chap_password=c.iscsi.chap_password,
    )


def pool_message(info: sm.PoolInfo) -> node_pb2.StoragePoolInfoResponse:
    return node_pb2.StoragePoolInfoResponse(
        pool_id=info.pool_id,
        type=node_pb2.StoragePoolType.ValueType(TYPE_NUMBERS.get(info.type, 0)),
        mount_path=info.mount_path,
        device_path=info.device_path,
        rbd_pool=info.rbd_pool,
        total_bytes=info.total_bytes,
        available_bytes=info.available_bytes,
        used_bytes=info.used_bytes,
        volume_count=info.volume_count,
    )


def volume_message(info: sm.VolumeInfo) -> node_pb2.VolumeInfoResponse:
    return node_pb2.VolumeInfoResponse(
        volume_id=info.volume_id,
        pool_id=info.pool_id,
        size_bytes=info.size_bytes,
        format=info.format,
        path=info.path,
        attached_to=info.attached_to,
    )


def volume_source(number: int) -> str:
    """``VolumeSourceType`` → the box's source name; an unknown one is named in the error."""
    source = VOLUME_SOURCES.get(number)
    if source is None:
        raise errors.Invalid(f"unsupported volume source type: {number}")
    return source


def pool_files_message(
    path: str, entries: Iterable[files.FileEntry]
) -> node_pb2.ListStoragePoolFilesResponse:
    return node_pb2.ListStoragePoolFilesResponse(
        current_path=path,
        entries=[
            node_pb2.StoragePoolFileEntry(
                name=e.name,
                path=e.path,
                is_directory=e.is_directory,
                size_bytes=e.size_bytes,
                modified_at=e.modified_at,
                file_type=e.file_type,
                permissions=e.permissions,
            )
            for e in entries
        ],
    )


def attach_info_message(info: sm.AttachInfo) -> node_pb2.VolumeAttachInfoResponse:
    return node_pb2.VolumeAttachInfoResponse(volume_id=info.volume_id, path=info.path, disk_xml=info.disk_xml)


def images_message(images: Iterable[files.ImageFile]) -> node_pb2.ListImagesResponse:
    return node_pb2.ListImagesResponse(
        images=[
            node_pb2.ImageInfo(
                image_id=i.image_id, name=i.name, path=i.path, size_bytes=i.size_bytes, format=i.format
            )
            for i in images
        ]
    )
