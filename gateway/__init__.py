"""The fleet's front door: one HTTP (TGI and OpenAI APIs) and gRPC endpoint
in front of a fleet's workers, routing each request by what the fleet knows
about them: the plan each worker runs and its predicted quality, its free
KV and queue, and the adapters it has loaded (docs/architecture.md, "The
path of a request").

Routing decisions are plain functions (routing.py) over worker views that
GetStats refreshes (pool.py); the APIs (tgi.py, openai_api.py, grpc_api.py)
only convert. Nothing here imports the operator: the command line hands
the gateway its worker source and its profile lookup.
"""
