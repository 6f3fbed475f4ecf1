"""Storage RPCs: convert messages (the box's :mod:`~quantix.hypervisor.storage.wire`), call the
storage box, convert back. Nothing else lives here."""

from __future__ import annotations

import grpc
from google.protobuf import empty_pb2

from quantix.hypervisor.storage import manager as sm
from quantix.hypervisor.storage.wire import (
    attach_info_message,
    images_message,
    pool_files_message,
    pool_message,
    pool_request,
    volume_message,
    volume_source,
)
from quantix.proto import node_pb2
from quantix.rpc.registry import rpc


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
        return pool_files_message(request.path, self.storage.list_pool_files(request.pool_id, request.path))

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
        source = volume_source(request.source_type)
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
        return attach_info_message(self.storage.attach_info(request.pool_id, request.volume_id))

    @rpc("ListImages")
    def list_images(
        self, request: empty_pb2.Empty, context: grpc.ServicerContext
    ) -> node_pb2.ListImagesResponse:
        return images_message(self.storage.list_images())
