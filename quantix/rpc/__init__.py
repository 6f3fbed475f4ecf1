"""gRPC hosting: the server service, the RPC registry and the error-to-status map."""
