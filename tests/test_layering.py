"""The package's layering, as docs/architecture.md states it, checked on the
import graph of the source (tests/import_graph.py): no import cycles, no
layer importing a higher one, the operator never loading what only runs
offline nor torch, and the `operator` dependency group (what the operator's
image installs) covering what the operator imports."""

from __future__ import annotations

import importlib.metadata
import re
import sys
import tomllib

import pytest
from import_graph import (
    ROOT,
    Contract,
    Graph,
    build_graph,
    cycles,
    module_files,
    package_dirs,
    reachable,
    third_party,
    violations,
)

P = "elasticfleet"
#: Lowest first: each may import the ones before it, never one after it.
LAYERS = (
    f"{P}.worker.errors",
    f"{P}.worker.model",
    f"{P}.worker.adapters",
    f"{P}.worker.serving",
    f"{P}.agent",
    f"{P}.operator",
    f"{P}.demo",
    f"{P}.gateway",
    f"{P}.cli",
)
#: What a fleet's operator never loads: offline procedures and training.
OFFLINE = (
    f"{P}.agent.corpus",
    f"{P}.agent.perplexity",
    f"{P}.agent.profiling",
    f"{P}.agent.rl.training",
    f"{P}.agent.tasks",
    f"{P}.worker.adapters.training",
)
CONTRACTS = (
    *(
        Contract(lower, LAYERS[i + 1 :], "a layer never imports a higher one")
        for i, lower in enumerate(LAYERS)
    ),
    Contract(f"{P}.agent", (f"{P}.worker.serving",), "policy code has no gRPC imports"),
    Contract(f"{P}.agent.rl.policy", (f"{P}.agent.rl.training",), "serving never loads training"),
    *(
        Contract(f"{P}.agent.{record}", OFFLINE, "what the operator reads has no offline code")
        for record in ("profile", "quality", "policy", "registry", "rl.policy")
    ),
    Contract(
        f"{P}.gateway",
        (f"{P}.operator", f"{P}.demo", *OFFLINE),
        "the gateway never imports the operator; the command line hands it what it needs",
    ),
)
#: What the operator's commands load (`operator run`, `crds`, `loop`): the
#: kopf handlers, the control loop and the command group. The command line's
#: own start (`cli.main`, whose command groups import every command's code
#: lazily) is checked where it runs: tests/operator/test_without_torch.py.
#: The gateway (`elasticfleet gateway`) runs from the same torch-free layer.
OPERATOR_ENTRIES = (
    f"{P}.operator.handlers",
    f"{P}.operator.control",
    f"{P}.cli.operator_commands",
    f"{P}.gateway.server",
    f"{P}.cli.gateway_commands",
)
#: Modules whose every import, lazy ones included, stays clear of torch, and why.
TORCH_FREE = (
    *((entry, "the operator's image has no torch") for entry in OPERATOR_ENTRIES),
    (f"{P}.agent.profile", "the profile record loads without torch"),
    (f"{P}.agent.quality", "the quality estimate loads without torch"),
)
#: Third-party packages a part must never import, and why.
FORBIDDEN_PACKAGES = (
    (f"{P}.agent", ("grpc", "kopf", "kubernetes"), "policies have no Kubernetes or gRPC imports"),
    (f"{P}.worker", ("kopf",), "the worker never depends on the operator's framework"),
    (f"{P}.worker.model", ("grpc", "redis"), "the model knows nothing of serving or stores"),
    (f"{P}.gateway", ("kopf", "kubernetes", "torch"), "the gateway is a router, no model"),
)


@pytest.fixture(scope="module")
def graph() -> Graph:
    return build_graph(module_files(package_dirs()))


def test_every_component_is_found(graph: Graph) -> None:
    """The check reads what pyproject installs: an empty graph would pass anything."""
    for layer in LAYERS:
        assert any(m == layer or m.startswith(layer + ".") for m in graph), layer
    assert f"{P}.worker.serving.engine" in graph[f"{P}.worker.serving.server"]


def test_no_import_cycles(graph: Graph) -> None:
    found = cycles(graph)
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_no_layer_imports_a_higher_one(graph: Graph) -> None:
    found = violations(graph, CONTRACTS)
    assert not found, "layering broken:\n" + "\n".join(found)


def test_the_operator_never_loads_offline_code(graph: Graph) -> None:
    for entry in (f"{P}.operator.handlers", f"{P}.operator.control"):
        loaded = reachable(graph, entry)
        assert not loaded & set(OFFLINE), (entry, sorted(loaded & set(OFFLINE)))


def test_parts_keep_away_from_foreign_frameworks() -> None:
    imports = third_party(module_files(package_dirs()))
    for prefix, packages, why in FORBIDDEN_PACKAGES:
        for module, names in imports.items():
            if module == prefix or module.startswith(prefix + "."):
                assert not names & set(packages), f"{module} imports {names & set(packages)}: {why}"


def test_torch_stays_out_of_the_operator_and_the_profile_record(graph: Graph) -> None:
    imports = third_party(module_files(package_dirs()))
    for entry, why in TORCH_FREE:
        heavy = sorted(m for m in reachable(graph, entry) if "torch" in imports[m])
        assert not heavy, f"{entry} reaches {heavy}, which import torch: {why}"


def _distribution(requirement: str) -> str:
    """A requirement's distribution name, normalised (PEP 503)."""
    name = re.match(r"[A-Za-z0-9._-]+", requirement)
    assert name is not None, requirement
    return re.sub(r"[-_.]+", "-", name[0]).lower()


def test_the_operator_group_installs_what_the_operator_and_gateway_import(graph: Graph) -> None:
    """The operator's image installs the package with --no-deps plus the
    `operator` group: every third-party package the operator's modules
    import must come from it, and the main list must hold each of its
    requirements as it is (a plain install still gets everything)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    group = project["optional-dependencies"]["operator"]
    assert set(group) <= set(project["dependencies"])
    installs = {_distribution(requirement) for requirement in group}
    imports = third_party(module_files(package_dirs()))
    loaded = set().union(*(reachable(graph, entry) for entry in OPERATOR_ENTRIES))
    names = set().union(*(imports[m] for m in loaded)) - set(sys.stdlib_module_names)
    providers = importlib.metadata.packages_distributions()
    for name in sorted(names):
        found = {_distribution(d) for d in providers.get(name, [])}
        assert found & installs, f"the operator imports {name}; the operator group lacks {found}"


# -- the checks themselves ---------------------------------------------------------


def test_cycles_are_found_with_a_path() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}, "f": set()}
    assert sorted(cycles(graph)) == [["a", "b", "c", "a"], ["e", "e"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_violations_name_the_edge_and_the_reason() -> None:
    graph = {"p.low.x": {"p.high.y"}, "p.high.y": {"p.low.x"}, "p.lower": {"p.high"}}
    contract = Contract("p.low", ("p.high",), "down only")
    # p.lower is not under p.low: prefixes match whole names.
    assert violations(graph, [contract]) == ["p.low.x imports p.high.y: down only"]
