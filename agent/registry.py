"""Every pruning policy by name: the one list the rest of the system reads.

The CRD's `memoryPolicy.policy` enum is the policies a fleet may serve
with, the local demo offers the ones that plan by budget, the policies
benchmark runs them all, and `make_policy` builds any of them. Each reads
this registry, so a new policy is added here once.

The module imports no policy code at load time, so printing the CRDs loads
none of it (nor numpy, which the RL agent computes with). A policy's module
is imported when one is built. No serving policy's module imports torch,
lazily or not: the operator builds them, and its image has no torch
(tests/test_layering.py checks this on the registry's lazy imports too).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from elasticfleet.agent.policy import Policy
    from elasticfleet.worker.model.plan import PruningPlan


@dataclass(frozen=True)
class PolicyOptions:
    """What some policies need beyond their name."""

    static_ratio: float = 0.25
    # The search policy's measured quality of a plan (lower is better).
    score: Callable[[PruningPlan], float] | None = None
    beam_width: int = 4
    # The RL agent's checkpoint; None: the committed one.
    agent_path: Path | None = None


@dataclass(frozen=True)
class PolicyEntry:
    """One policy: how to build it and where it may be used."""

    name: str
    # What it does, in a few words (the CRD's description lists them).
    summary: str
    # A fleet may run it (it needs nothing measured at serving time).
    serving: bool
    # It picks a plan for the budget and load it is given (so it can follow
    # a squeeze); `none` and `static` do not.
    adaptive: bool
    build: Callable[[PolicyOptions], Policy]


def _none(_: PolicyOptions) -> Policy:
    from elasticfleet.agent.policy import NonePolicy

    return NonePolicy()


def _static(options: PolicyOptions) -> Policy:
    from elasticfleet.agent.policy import StaticPolicy

    return StaticPolicy(options.static_ratio)


def _greedy(_: PolicyOptions) -> Policy:
    from elasticfleet.agent.policy import GreedyPolicy

    return GreedyPolicy()


def _search(options: PolicyOptions) -> Policy:
    from elasticfleet.agent.policy import SearchPolicy

    if options.score is None:
        raise ValueError("the search policy needs a score function (e.g. perplexity)")
    return SearchPolicy(options.score, beam_width=options.beam_width)


def _rl(options: PolicyOptions) -> Policy:
    from elasticfleet.agent.rl.policy import DEFAULT_AGENT, RLPolicy

    return RLPolicy.load(options.agent_path or DEFAULT_AGENT)


#: In the order tables and the CRD's enum list them.
REGISTRY: dict[str, PolicyEntry] = {
    entry.name: entry
    for entry in (
        PolicyEntry("rl", "the trained DQN agent", serving=True, adaptive=True, build=_rl),
        PolicyEntry(
            "greedy",
            "least importance per byte first",
            serving=True,
            adaptive=True,
            build=_greedy,
        ),
        PolicyEntry(
            "static",
            "one fixed ratio",
            serving=True,
            adaptive=False,
            build=_static,
        ),
        PolicyEntry("none", "never prune", serving=True, adaptive=False, build=_none),
        PolicyEntry(
            "search",
            "best plan by measured quality (benchmarks only)",
            serving=False,
            adaptive=True,
            build=_search,
        ),
    )
}

#: Every policy's name.
POLICIES = tuple(REGISTRY)
#: The policies a fleet's spec may name.
SERVING_POLICIES = tuple(name for name, entry in REGISTRY.items() if entry.serving)
#: The policies a fleet may name that follow a squeeze (the local demo's choices).
ADAPTIVE_POLICIES = tuple(name for name in SERVING_POLICIES if REGISTRY[name].adaptive)


def make_policy(
    name: str,
    *,
    static_ratio: float = 0.25,
    score: Callable[[PruningPlan], float] | None = None,
    beam_width: int = 4,
    agent_path: Path | None = None,
) -> Policy:
    """A policy by name: none, static, greedy, search (which needs `score`;
    `beam_width` plans per step) or rl (the trained agent at `agent_path`,
    default: the committed one)."""
    entry = REGISTRY.get(name)
    if entry is None:
        raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}")
    return entry.build(PolicyOptions(static_ratio, score, beam_width, agent_path))


def describe_serving_policies() -> str:
    """The policies a fleet may name, each with its summary, as one phrase."""
    parts = [f"{name} ({REGISTRY[name].summary})" for name in SERVING_POLICIES]
    return ", ".join(parts[:-1]) + f" or {parts[-1]}"
