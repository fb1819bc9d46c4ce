"""The worker's latency histograms: what the engine times, kept as
Prometheus histograms that /metrics renders (worker/serving/metrics.py).

Histograms, not quantile gauges: a quantile over one worker's window cannot
be combined with another worker's, while bucket counts add up across pods,
so `histogram_quantile` gives a fleet's p99 as well as a pod's. They carry
no labels (request ids, adapter names or tasks would grow the series count
without bound): each is 15 or so series per worker.

How the buckets were chosen. The same worker runs on a GPU, where a decode
step of a small model takes a few milliseconds, and on CPU cores, where
SmolLM2's takes 30-100 ms at batch 1 and seconds at batch 64, and a long
prompt's prefill takes seconds. So each family spans about four decades,
from a GPU's fastest case to a loaded CPU's slowest, in 1-2.5-5 steps: a
bucket is at most 2.5 times the one below, which bounds how far
`histogram_quantile`'s linear interpolation inside a bucket can be off, at
11-13 buckets a family.

- per-step times (decode step, time per output token): 1 ms to 2.5 s;
- first-token and queue times (TTFT, queue wait, prefill, plan switch):
  5 ms to 60 s (a switch that restores every SmolLM2 block reads and
  verifies 538 MB: about half a second on CPU);
- whole requests: 50 ms to 10 minutes (512 tokens at CPU speed take
  about a minute).

The gateway's time to first token uses TTFT_BUCKETS too, so the fleet's
figure and each worker's can be compared bucket for bucket.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import Histogram
from prometheus_client.core import Metric

PREFIX = "elasticfleet_"
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
REQUEST_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


def _histogram(name: str, documentation: str, buckets: tuple[float, ...]) -> Histogram:
    # In no registry: each engine owns its histograms and its server's
    # collector yields them, so workers (or tests) in one process never share one.
    return Histogram(PREFIX + name, documentation, buckets=buckets, registry=None)


class LatencyHistograms:
    """The engine's timings; the engine observes them as they happen."""

    def __init__(self) -> None:
        self.time_to_first_token = _histogram(
            "time_to_first_token_seconds",
            "From a request's arrival at the engine to its first token (queue wait and "
            "prefill included).",
            TTFT_BUCKETS,
        )
        self.time_per_output_token = _histogram(
            "time_per_output_token_seconds",
            "A finished request's mean time between output tokens after the first "
            "(requests of two tokens or more).",
            STEP_BUCKETS,
        )
        self.request_duration = _histogram(
            "request_duration_seconds",
            "From a request's arrival at the engine to its last token (finished requests).",
            REQUEST_BUCKETS,
        )
        self.queue_wait = _histogram(
            "queue_wait_seconds",
            "How long admitted requests waited in the queue for memory and a batch row.",
            TTFT_BUCKETS,
        )
        self.prefill = _histogram(
            "prefill_seconds",
            "One prefill forward over the prompts admitted together, with their first tokens.",
            TTFT_BUCKETS,
        )
        self.decode_step = _histogram(
            "decode_step_seconds",
            "One decode step over the running batch, sampling and streaming included.",
            STEP_BUCKETS,
        )
        self.plan_switch = _histogram(
            "plan_switch_seconds",
            "One pruning-plan switch: blocks verified, dropped and restored, the KV cache resized.",
            TTFT_BUCKETS,
        )

    def collect(self) -> Iterator[Metric]:
        for histogram in (
            self.time_to_first_token,
            self.time_per_output_token,
            self.request_duration,
            self.queue_wait,
            self.prefill,
            self.decode_step,
            self.plan_switch,
        ):
            yield from histogram.collect()
