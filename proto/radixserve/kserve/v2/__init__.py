"""Generated protobuf and gRPC stubs of the KServe v2 protocol, protobuf package ``inference`` (see proto/codegen.py)."""
