"""The operator's own Prometheus metrics, `elasticfleet_operator_*`.

What the control loop did (tick and decision times, plan changes, worker
failures) and what it concluded per worker (the budget it derived, the
predicted perplexity ratio of the plan in force, whether the worker
answered). The workers export what they hold and serve; these are the
operator's side of the same picture, so a dashboard can put a worker's
budget (its own gauge) beside the operator's reasons for it.

Labels are bounded by what the cluster holds and the code names: a fleet's
`namespace` and `fleet`, a worker's `pod` (series of a pod that left are
removed), `reason` from the fixed sets below, `policy` from the policy
registry. A Prometheus scraping the operator keeps these labels with
`honor_labels` (the chart's ServiceMonitor sets honorLabels), so `namespace`
and `pod` name the fleet's and the worker's, which the workers' own series
carry too and queries can join on.

`operator run --metrics-port` serves OPERATOR_METRICS, registered with
prometheus_client's default registry (with the process and runtime
figures); tests give a controller metrics in a registry of their own.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

PREFIX = "elasticfleet_operator_"
# A tick: GetStats everywhere (milliseconds), decisions, and ApplyPlan, which
# may wait for running requests (up to 35 s) and adapter loads (up to 60 s).
TICK_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# One policy decision: greedy and static take well under a millisecond, the
# RL agent a few milliseconds per dropped block (benchmarks/results/policies.md).
DECISION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
# Why a plan changed: the plan in force no longer fit the budget at the
# planned load (the worker shrinks), or it fit and the policy chose another
# (memory came back, or the fleet's policy or floor changed).
OVER_BUDGET = "over_budget"
WITHIN_BUDGET = "within_budget"
PLAN_REASONS = (OVER_BUDGET, WITHIN_BUDGET)

FLEET = ("namespace", "fleet")
WORKER = ("namespace", "fleet", "pod")


class OperatorMetrics:
    """The operator's metric families in `registry`."""

    def __init__(self, registry: CollectorRegistry | None = REGISTRY) -> None:
        self.tick_duration = Histogram(
            PREFIX + "tick_duration_seconds",
            "One control tick over a fleet: stats, decisions, plan pushes, adapters, status.",
            FLEET,
            buckets=TICK_BUCKETS,
            registry=registry,
        )
        self.decision_duration = Histogram(
            PREFIX + "policy_decision_seconds",
            "One policy decision (decisions remembered from earlier ticks are not timed).",
            (*FLEET, "policy"),
            buckets=DECISION_BUCKETS,
            registry=registry,
        )
        self.plan_changes = Counter(
            PREFIX + "plan_changes",
            "Plans pushed that changed a worker's blocks, by reason (over_budget: the plan "
            "in force no longer fit; within_budget: it fit and a better one does too).",
            (*FLEET, "reason"),
            registry=registry,
        )
        self.worker_failures = Counter(
            PREFIX + "worker_failures",
            "Ticks in which a worker was not planned, by the Degraded reason it got.",
            (*FLEET, "reason"),
            registry=registry,
        )
        self.budget = Gauge(
            PREFIX + "worker_budget_bytes",
            "The memory budget the operator derived for a worker at its last tick (pushed "
            "with its plan, unless no plan may follow it).",
            WORKER,
            registry=registry,
        )
        self.perplexity_ratio = Gauge(
            PREFIX + "worker_predicted_perplexity_ratio",
            "Predicted perplexity of the worker's plan over the dense model's (1 is dense).",
            WORKER,
            registry=registry,
        )
        self.reachable = Gauge(
            PREFIX + "worker_reachable",
            "1 when the worker answered GetStats at the last tick, else 0.",
            WORKER,
            registry=registry,
        )

    def start_fleet(self, namespace: str, fleet: str, failure_reasons: Iterable[str]) -> None:
        """Create the fleet's counters at zero, so that `increase` sees their
        first change (a counter that appears at 1 shows no increase)."""
        for reason in PLAN_REASONS:
            self.plan_changes.labels(namespace, fleet, reason)
        for reason in failure_reasons:
            self.worker_failures.labels(namespace, fleet, reason)

    def forget_worker(self, namespace: str, fleet: str, pod: str) -> None:
        """Remove a worker's series (its pod left the fleet)."""
        for gauge in (self.budget, self.perplexity_ratio, self.reachable):
            gauge.remove(namespace, fleet, pod)  # a series never set is no error


# The process's metrics: what `operator run --metrics-port` serves.
OPERATOR_METRICS = OperatorMetrics()
