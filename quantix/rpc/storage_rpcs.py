"""Storage RPCs: convert messages, call the storage box, convert back. Nothing else lives here."""

from __future__ import annotations

import grpc
from google.protobuf import empty_pb2

from quantix import errors
from quantix.hypervisor.storage import manager as sm
from quantix.proto import node_pb2
from quantix.rpc.registry import rpc

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


class StorageRpcs:
    """Handlers over the storage box (every call: worker thread, blocking on libvirt)."""

    def __init__(self, storage: sm.StorageManager) -> None:
        self.storage = storage

    @rpc("InitStoragePool")
    def init_storage_pool(
        self, request: node_pb2.InitStoragePoolRequest, context: grpc.ServicerContext
    ) -> node_pb2.StoragePoolInfoResponse:
        info = self.storage.init_pool(pool_request(request))
        reply = pool_message(info)
        reply.type = request.type  # echo what was asked, as the control plane stores it
        return reply

    @rpc("DestroyStoragePool")
    def destroy_storage_pool(
        self, request: node_pb2.StoragePoolIdRequest, context: grpc.ServicerContext
    ) -> empty_pb2.Empty:
        self.storage.destroy_pool(request.pool_id)
        return empty_pb2.Empty()

    @rpc("GetStoragePoolInfo")
    def get_storage_pool_info(
        self, request: node_pb2.StoragePoolIdRequest, context: grpc.ServicerContext
    ) -> node_pb2.StoragePoolInfoResponse:
        return pool_message(self.storage.pool_info(request.pool_id))

    @rpc("ListStoragePools")
    def list_storage_pools(
        self, request: empty_pb2.Empty, context: grpc.ServicerContext
    ) -> node_pb2.ListStoragePoolsResponse:
        return node_pb2.ListStoragePoolsResponse(pools=[pool_message(p) for p in self.storage.list_pools()])

    @rpc("ListStoragePoolFiles")
    def list_storage_pool_files(
        self, request: node_pb2.ListStoragePoolFilesRequest, context: grpc.ServicerContext
    ) -> node_pb2.ListStoragePoolFilesResponse:
        entries = self.storage.list_pool_files(request.pool_id, request.path)
        return node_pb2.ListStoragePoolFilesResponse(
            current_path=request.path,
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

    @rpc("ListVolumes")
    def list_volumes(
        self, request: node_pb2.ListVolumesRequest, context: grpc.ServicerContext
    ) -> node_pb2.ListVolumesResponse:
        vols = self.storage.list_volumes(request.pool_id)
        return node_pb2.ListVolumesResponse(volumes=[volume_message(v) for v in vols])

    @rpc("CreateVolume")
    def create_volume(
        self, request: node_pb2.CreateVolumeRequest, context: grpc.ServicerContext
    ) -> node_pb2.VolumeInfoResponse:
        source = VOLUME_SOURCES.get(request.source_type)
        if source is None:
            raise errors.Invalid(f"unsupported volume source type: {request.source_type}")
        info = self.storage.create_volume(
            request.pool_id, request.volume_id, request.size_bytes, source, request.source_id
        )
        return volume_message(info)

    @rpc("DeleteVolume")
    def delete_volume(
        self, request: node_pb2.VolumeIdRequest, context: grpc.ServicerContext
    ) -> empty_pb2.Empty:
        self.storage.delete_volume(request.pool_id, request.volume_id)
        return empty_pb2.Empty()

    @rpc("ResizeVolume")
    def resize_volume(
        self, request: node_pb2.ResizeVolumeRequest, context: grpc.ServicerContext
    ) -> empty_pb2.Empty:
        self.storage.resize_volume(request.pool_id, request.volume_id, request.new_size_bytes)
        return empty_pb2.Empty()

    @rpc("CloneVolume")
    def clone_volume(
        self, request: node_pb2.CloneVolumeRequest, context: grpc.ServicerContext
    ) -> empty_pb2.Empty:
        self.storage.clone_volume(request.pool_id, request.source_volume_id, request.dest_volume_id)
        return empty_pb2.Empty()

    @rpc("CreateVolumeSnapshot")
    def create_volume_snapshot(
        self, request: node_pb2.CreateVolumeSnapshotRequest, context: grpc.ServicerContext
    ) -> empty_pb2.Empty:
        self.storage.snapshot_volume(request.pool_id, request.volume_id, request.snapshot_id)
        return empty_pb2.Empty()

    @rpc("GetVolumeAttachInfo")
    def get_volume_attach_info(
        self, request: node_pb2.VolumeIdRequest, context: grpc.ServicerContext
    ) -> node_pb2.VolumeAttachInfoResponse:
        info = self.storage.attach_info(request.pool_id, request.volume_id)
        return node_pb2.VolumeAttachInfoResponse(
            volume_id=info.volume_id, path=info.path, disk_xml=info.disk_xml
        )

    @rpc("ListImages")
    def list_images(
        self, request: empty_pb2.Empty, context: grpc.ServicerContext
    ) -> node_pb2.ListImagesResponse:
        return node_pb2.ListImagesResponse(
            images=[
                node_pb2.ImageInfo(
                    image_id=i.image_id, name=i.name, path=i.path, size_bytes=i.size_bytes, format=i.format
                )
                for i in self.storage.list_images()
            ]
        )
