"""A bare grpcio NodeDaemonService that returns canned messages: the floor the daemon stands on.

usage: baseline_server.py [--stack] PORT CANNED.bin...  (each file: method name, newline, serialized
response). With ``--stack`` it first imports what the design itself requires of any daemon built on
it (twistd, the Twisted reactor, libvirt-python) and nothing of the daemon's own: the design floor.
"""

from __future__ import annotations

import importlib
import sys
from concurrent.futures import ThreadPoolExecutor

import common  # noqa: F401  (puts the checkout on sys.path)
import grpc
from google.protobuf import message_factory

from quantix.rpc.server import SERVICE

#: What a twistd plugin driving libvirt imports before it does anything of its own. The reactor
#: module imports pyOpenSSL and cryptography whenever they are installed (twisted.internet.tcp).
STACK = ("twisted.scripts.twistd", "twisted.internet.reactor", "libvirt")


def main() -> None:
    args = sys.argv[1:]
    if args[0] == "--stack":
        args = args[1:]
        for name in STACK:
            importlib.import_module(name)
    port = int(args[0])
    handlers = {}
    for path in args[1:]:
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
