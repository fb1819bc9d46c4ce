"""elasticfleet: a Kubernetes operator for memory-elastic LLM fleets.

The components live in subpackages: `elasticfleet.worker` (the elastic model
and, later, its gRPC server), `elasticfleet.agent` (block profiling and
pruning policies) and `elasticfleet.operator` (the kopf controller).
"""

__version__ = "0.1.0"
