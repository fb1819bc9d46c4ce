"""Serving: the continuous-batching engine, memory-safe admission, the gRPC
server and its clients (proto_gen/: generated stubs), metrics, device
telemetry, and worker processes for launchers outside Kubernetes, which
learn where a worker serves from its ready file (readiness.py)."""
