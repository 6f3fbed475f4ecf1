"""A bare grpcio NodeDaemonService that returns canned messages: the floor the daemon stands on.

usage: baseline_server.py PORT CANNED.bin...  (each file: method name, newline, serialized response)
"""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor

import common  # noqa: F401  (puts the checkout on sys.path)
import grpc
from google.protobuf import message_factory

from quantix.rpc.server import SERVICE


def main() -> None:
    port = int(sys.argv[1])
    handlers = {}
    for path in sys.argv[2:]:
        with open(path, "rb") as fh:
            name, _, payload = fh.read().partition(b"\n")
        method = SERVICE.methods_by_name[name.decode()]
        request = message_factory.GetMessageClass(method.input_type)
        response = message_factory.GetMessageClass(method.output_type).FromString(payload)
        handlers[method.name] = grpc.unary_unary_rpc_method_handler(
            lambda req, ctx, r=response: r,
            request_deserializer=request.FromString,
            response_serializer=type(response).SerializeToString,
        )
    server = grpc.server(ThreadPoolExecutor(256), options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE.full_name, handlers)])
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    print("ready", flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
