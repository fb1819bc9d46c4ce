"""The worker: what runs in a fleet's pods.

Three layers, each its own subpackage (docs/architecture.md has the rules):
`model` (the elastic Llama, its plans, KV cache, memory model and
generation), `adapters` (AsymLoRA layers, their format, Redis store, cache
and training) and `serving` (the engine, gRPC server and clients, metrics,
telemetry and worker processes). Serving may use the other two, adapters may
use the model, and never the reverse.
"""
