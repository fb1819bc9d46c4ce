"""Bounds on what `elasticfleet worker` takes on its command line where a
larger value would crash the worker instead of being refused.

The worker's flags (cli/worker_commands.py) and the ElasticFleet CRD
(operator/crds.py, which turns spec.worker into those flags) both read
them, so the API server refuses a fleet whose workers could not start.
Nothing heavy is imported here: printing the CRDs loads no torch.
"""

from __future__ import annotations

#: Torch threads per worker. torch.set_num_threads takes a C int (10**12
#: raises at start; 2**31-1 is taken, and the first parallel operation then
#: tries to start that many threads); no node has anywhere near 1024 cores,
#: and 1024 threads start and run.
MAX_THREADS = 1024
