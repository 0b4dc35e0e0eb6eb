"""Generated protobuf and gRPC stubs of radixserve.v1 (see proto/codegen.py)."""
