"""Generated gRPC stubs for proto/elasticfleet/v1/worker.proto.

Do not edit: regenerate with `bash scripts/gen-proto`.
"""
