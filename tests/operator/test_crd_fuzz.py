"""Property-based fuzzing (hypothesis) of the CRD schemas.

The invariant: the schema never admits a spec the operator or Kubernetes
would later refuse, and the operator refuses no spec the schema admits.

- Fleets: specs drawn from the schema itself (every field, at and inside
  its bounds), then changed in up to three places to something hostile (at
  and past bounds, wrong types, odd unicode, missing and unknown fields).
  For each, the API server's verdict (crd_check: JSON Schema, RE2, CEL) must
  equal FleetSpec.parse's, and for every admitted spec the children
  operator/build.py makes must be valid Kubernetes objects: kubernetes-
  validate (strict, 1.35) for their shape, and for what its schemas do not
  check, the rules Kubernetes and the kubelet apply, ported in k8s_rules.py
  (DNS names, label keys and values, quantities, image references, Secret
  names and keys, the StatefulSet revision label); the worker's command line
  must parse with the real CLI and its environment must be what the worker
  reads the same way (the Redis URL through redis-py's own parser).
- AdapterSets: what the schema admits the store accepts (names, tasks,
  rank, modules, pinned version), and every adapter the store accepts has an
  AdapterSet the schema admits.
- The syntax itself: each pattern reads the same in Python and RE2; the
  quantity and image patterns admit exactly what the ported parsers do.

Bounded and reproducible: derandomized, no example database, a fixed number
of examples per test; the module takes about 30 s on 2 busy cores.
"""

from __future__ import annotations

import copy
import functools
import re
from collections import Counter
from collections.abc import Callable
from typing import Any

import kubernetes_validate
import pytest
import re2
import redis
from crd_check import openapi_schema, validation_errors
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from k8s_rules import (
    is_config_map_key,
    is_dns1035_label,
    is_dns1123_label,
    is_dns1123_subdomain,
    is_image_reference,
    is_label_value,
    is_qualified_name,
    is_resource_quantity,
    parses_as_quantity,
)

from elasticfleet.cli import build_parser
from elasticfleet.operator.adapters import mismatches, store_name
from elasticfleet.operator.build import build_children, owner_reference
from elasticfleet.operator.crds import (
    API_VERSION,
    LABEL_KEYS,
    ONE_BUDGET,
    ONE_URL,
    PORTS_DIFFER,
    RULES,
    adapter_crd,
    adapter_spec_schema,
    fleet_crd,
    fleet_spec_schema,
    with_defaults,
)
from elasticfleet.operator.schema_check import JSON_TYPES
from elasticfleet.operator.spec import DefaultStore, FleetSpec, RedisSettings, SpecError
from elasticfleet.operator.syntax import IMAGE, IMAGE_ID, LABEL_KEY, MAX_IMAGE, QUANTITY, matches
from elasticfleet.worker.adapters.format import AdapterFormatError, AdapterSpec, check_name
from elasticfleet.worker.adapters.host import _version
from elasticfleet.worker.adapters.names import NAME, is_valid_name
from elasticfleet.worker.adapters.store import AdapterManifest, AdapterStore
from elasticfleet.worker.errors import InvalidArgument

Schema = dict[str, Any]
NAMESPACE = "ml"
UID = "5e1f0c3a-8d5e-4b7a-9a43-0f1f4c2d9b11"
# Fleets without spec.redis get a store, so that the operator's one check
# the API server cannot make (adapters need a store) never differs.
DEFAULT_STORE = DefaultStore(NAMESPACE, RedisSettings(url="redis://store:6379"))
WORKER_COMMAND = build_parser()
HEX = "0123456789abcdef" * 4


def bounded(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,  # the cores are shared; the module's total is what is bounded
        derandomize=True,
        database=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
        ],
    )


# -- strategies ---------------------------------------------------------------------

# Characters that break names, flags, environments and parsers; unicode
# that looks like ASCII (or digits) but is not.
HOSTILE = [" ", "\t", "\n", "\x00", "\x7f", "/", ".", "-", "_", ":", "@", "A", "\u00e9"]
HOSTILE += ["\u0130", "\u0661", "\uff10", "\u200b", "\u2028", "\ufeff", "\U0001f600", "'"]
HOSTILE += ['"', "\\", "$", "%", "*", "?", "=", "+", "e", "E", "i", "0", "9"]
TEXT = st.characters(exclude_categories=["Cs"])  # what UTF-8 can carry
WRONG_TYPES: list[Any] = [None, True, False, 0, -1, 2.0, 1.5, "", "1", [], {}, ["x"], {"a": 1}]
# Objects whose CEL rule wants exactly one of two fields.
EXCLUSIVE = {ONE_BUDGET.cel: ("fraction", "bytes"), ONE_URL.cel: ("url", "urlSecretRef")}


def _rules(schema: Schema) -> set[str]:
    return {rule["rule"] for rule in schema.get("x-kubernetes-validations", [])}


@functools.cache
def _pattern_strings(pattern: str, max_length: int | None) -> st.SearchStrategy[str]:
    strings = st.from_regex(pattern, fullmatch=True, alphabet=TEXT)
    return strings.filter(lambda s: max_length is None or len(s) <= max_length)


def _once(
    make: Callable[[Schema], st.SearchStrategy[Any]],
) -> Callable[[Schema], st.SearchStrategy[Any]]:
    """`make`, building each schema node's strategy once (building them is
    what took most of the time, not drawing)."""
    # By identity, and each schema kept, so that no other node reuses its id.
    built: dict[int, tuple[Schema, st.SearchStrategy[Any]]] = {}

    def cached(schema: Schema) -> st.SearchStrategy[Any]:
        if id(schema) not in built:
            built[id(schema)] = (schema, make(schema))
        return built[id(schema)][1]

    return cached


@_once
def valid(schema: Schema) -> st.SearchStrategy[Any]:
    """Values the schema means to admit, bounds included."""
    kind = schema["type"]
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    if kind == "string":
        if "pattern" in schema:
            return _pattern_strings(schema["pattern"], schema.get("maxLength"))
        low, high = schema.get("minLength", 0), min(schema.get("maxLength", 64), 300)
        return st.text(TEXT, min_size=low, max_size=high) | st.just("x" * high)
    if kind == "integer":
        low, high = schema["minimum"], schema["maximum"]
        return st.integers(low, high) | st.sampled_from([low, high])
    if kind == "number":
        low, high = schema["minimum"], schema.get("maximum", 1e6)
        exclusive = bool(schema.get("exclusiveMinimum"))
        floats = st.floats(low, high, exclude_min=exclusive, allow_nan=False)
        return floats | st.just(high)
    if kind == "boolean":
        return st.booleans()
    if kind == "array":
        items = valid(schema["items"])
        keys = schema.get("x-kubernetes-list-map-keys", [])
        unique = (lambda item: tuple(item[k] for k in keys)) if keys else (lambda item: item)
        high = min(schema.get("maxItems", 3), 3)
        return st.lists(items, min_size=schema.get("minItems", 0), max_size=high, unique_by=unique)
    if "additionalProperties" in schema:  # nodeSelector: label keys
        keys = _pattern_strings(LABEL_KEY, None).filter(lambda k: len(k.split("/")[0]) <= 253)
        return st.dictionaries(keys, valid(schema["additionalProperties"]), max_size=3)
    return _valid_object(schema)


def _valid_object(schema: Schema) -> st.SearchStrategy[dict[str, Any]]:
    properties: dict[str, Schema] = schema["properties"]
    required = set(schema.get("required", ()))
    for rule in _rules(schema) & set(EXCLUSIVE):
        pair = EXCLUSIVE[rule]
        others = {k: v for k, v in properties.items() if k not in pair}
        return st.one_of(
            *[_fields({**others, one: properties[one]}, required | {one}) for one in pair]
        )
    if PORTS_DIFFER.cel in _rules(schema):
        return _fields(properties, required).filter(
            lambda worker: worker.get("port", 50051) != worker.get("metricsPort", 9090)
        )
    return _fields(properties, required)


def _fields(properties: dict[str, Schema], required: set[str]) -> st.SearchStrategy[Any]:
    return st.fixed_dictionaries(
        {k: valid(v) for k, v in properties.items() if k in required},
        optional={k: valid(v) for k, v in properties.items() if k not in required},
    )


def _mutated_strings(strings: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """A string with a hostile character in, a case changed, or cut."""

    @st.composite
    def mutate(draw: st.DrawFn) -> str:
        text = draw(strings)
        where = draw(st.integers(0, len(text)))
        change = draw(st.sampled_from(["insert", "upper", "cut", "double"]))
        if change == "insert":
            return text[:where] + draw(st.sampled_from(HOSTILE)) + text[where:]
        if change == "upper":
            return text[:where] + text[where:].upper()
        if change == "cut":
            return text[:where]
        return text + text

    return mutate()


@_once
def hostile(schema: Schema) -> st.SearchStrategy[Any]:
    """Values at and past the schema's bounds, of the wrong type, or odd."""
    kind = schema["type"]
    wrong = st.sampled_from([v for v in WRONG_TYPES if not JSON_TYPES[kind](v)])
    if kind == "string":
        high = schema.get("maxLength", 64)
        odd = st.text(TEXT, max_size=8) | st.sampled_from(HOSTILE)
        long = valid(schema).map(lambda s: (s * (high // max(len(s), 1) + 2))[: high + 1])
        return wrong | odd | _mutated_strings(valid(schema)) | long
    if kind in ("integer", "number"):
        low, high = schema.get("minimum", 0), schema.get("maximum", 2**63)
        edges = [low - 1, low, high + 1, 2**63, -(2**63) - 1, 10**12, float(low), 1e308]
        return wrong | st.sampled_from(edges)
    if kind == "array":
        items = valid(schema["items"]) | hostile(schema["items"])
        high = schema.get("maxItems", 3)
        past = st.lists(valid(schema["items"]), min_size=high + 1, max_size=high + 1)
        doubled = st.lists(items, min_size=1, max_size=2).map(lambda xs: xs + xs)
        return wrong | past | doubled | st.just([])
    if kind == "object":
        extra = valid(schema).map(lambda value: {**value, "unknownField": [1]})
        return wrong | extra
    return wrong


@st.composite
def changed(draw: st.DrawFn, schema: Schema, value: Any) -> Any:
    """`value` with one member (at any depth) replaced, removed or hostile."""
    members: list[tuple[Any, Schema]] = []
    if isinstance(value, dict) and schema["type"] == "object":
        properties = schema.get("properties", {})
        members = [(k, properties[k]) for k in value if k in properties]
        members += [(k, properties[k]) for k in properties if k not in value]
        extra = schema.get("additionalProperties")
        members += [(k, extra) for k in value if extra is not None]
    elif isinstance(value, list) and value and schema["type"] == "array":
        members = [(i, schema["items"]) for i in range(len(value))]
    if not members or draw(st.integers(0, 3)) == 0:
        return draw(hostile(schema) | valid(schema))
    key, child = draw(st.sampled_from(members))
    value = copy.deepcopy(value)
    if isinstance(value, dict) and key in value and draw(st.integers(0, 4)) == 0:
        del value[key]
    else:
        current = value[key] if (isinstance(value, list) or key in value) else None
        value[key] = draw(changed(child, current))
    return value


@st.composite
def specs(draw: st.DrawFn, schema: Schema) -> Any:
    """A spec from the schema, changed in zero to three places."""
    value = draw(valid(schema))
    for _ in range(draw(st.integers(0, 3))):
        value = draw(changed(schema, value))
    return value


FLEET_NAMES = (
    _pattern_strings(r"^[a-z]([-a-z0-9]{0,60}[a-z0-9])?$", None)
    | st.sampled_from(["1fleet", "my.fleet", "Fleet", "a" * 45, "a" * 46, "a" * 56, "a" * 57])
    | _mutated_strings(st.sampled_from(["smollm2", "fleet-a"]))
)


# -- fleets -----------------------------------------------------------------------


def _fleet(name: str, spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": "ElasticFleet",
        "metadata": {"name": name},
        "spec": spec,
    }


def _labels_are_valid(labels: dict[str, str]) -> None:
    for key, value in labels.items():
        assert is_qualified_name(key) and is_label_value(value), (key, value)


def _assert_children_valid(spec: FleetSpec) -> None:
    """What Kubernetes, the kubelet and the worker would refuse in the
    children of an admitted fleet (see the module docstring)."""
    children = build_children(spec, owner_reference(spec.name, UID))
    service, workload, *gateway = children
    for child in children:
        kubernetes_validate.validate(child, "1.35", strict=True)
        _labels_are_valid(child["metadata"]["labels"])
    for child in gateway:
        assert is_dns1035_label(child["metadata"]["name"])
        if child["kind"] == "Deployment":
            (container,) = child["spec"]["template"]["spec"]["containers"]
            assert is_image_reference(container["image"])
    assert is_dns1035_label(service["metadata"]["name"])
    _labels_are_valid(service["spec"]["selector"])
    name = workload["metadata"]["name"]
    assert is_dns1123_subdomain(name)
    if workload["kind"] == "StatefulSet":
        # Pods <name>-<ordinal> (their hostnames) and the label
        # controller-revision-hash: <name>-<hash of up to 10 characters>.
        assert is_label_value(f"{name}-0123456789")
        assert is_dns1123_label(f"{name}-{max(spec.replicas - 1, 0)}")
    template = workload["spec"]["template"]
    _labels_are_valid(template["metadata"]["labels"])
    _labels_are_valid(workload["spec"]["selector"]["matchLabels"])
    pod = template["spec"]
    _labels_are_valid(pod.get("nodeSelector", {}))
    for volume in pod["volumes"]:
        if "secret" in volume:
            assert is_dns1123_subdomain(volume["secret"]["secretName"])
            for item in volume["secret"].get("items", []):
                assert is_config_map_key(item["key"])
    (container,) = pod["containers"]
    assert is_image_reference(container["image"])
    for amounts in container.get("resources", {}).values():
        for resource, amount in amounts.items():
            assert resource == "nvidia.com/gpu" or is_resource_quantity(amount), amount
    command = container["command"]
    assert all("\x00" not in part for part in command)
    try:
        args = WORKER_COMMAND.parse_args(command[1:])
    except SystemExit:
        pytest.fail(f"the worker refuses its command line {command}")
    assert (args.port, args.threads, str(args.model or "")) == (
        spec.worker.port,
        spec.worker.threads,
        spec.model_path or "",
    )
    env = {item["name"]: item for item in container["env"]}
    for item in env.values():
        ref = item.get("valueFrom", {}).get("secretKeyRef")
        if ref is not None:
            assert is_dns1123_subdomain(ref["name"]) and is_config_map_key(ref["key"])
        assert "\x00" not in item.get("value", "")
    url = env.get("ELASTICFLEET_REDIS_URL", {}).get("value")
    if url is not None:
        # Every option redis-py reads from it exists; the store takes it.
        options = redis.connection.parse_url(url)  # type: ignore[no-untyped-call]
        assert set(options) <= {"host", "port", "db", "username", "connection_class"}, options
        AdapterStore.from_url(url).close()
    prefix = env.get("ELASTICFLEET_REDIS_PREFIX", {}).get("value")
    if prefix is not None:
        assert prefix and prefix.strip() == prefix  # the worker strips what it reads


def test_the_operator_and_kubernetes_accept_exactly_the_fleets_the_schema_admits() -> None:
    schema = fleet_spec_schema()
    verdicts: Counter[str] = Counter()

    @bounded(250)
    @given(name=FLEET_NAMES, spec=specs(schema))
    def run(name: str, spec: Any) -> None:
        errors = validation_errors(fleet_crd(), _fleet(name, spec))
        try:
            parsed = FleetSpec.parse(name, NAMESPACE, copy.deepcopy(spec), DEFAULT_STORE)
        except SpecError as refused:
            assert errors, f"the operator refuses a fleet the API server admits: {refused}"
            assert len(str(refused)) < 4000
            verdicts["refused"] += 1
            return
        assert not errors, f"the operator takes a fleet the API server refuses: {errors}"
        _assert_children_valid(parsed)
        verdicts["admitted"] += 1

    run()
    # Neither verdict is rare, or the property says little.
    assert min(verdicts.values()) >= 70, verdicts


# -- adapter sets ----------------------------------------------------------------


def _store_spec(name: str, spec: dict[str, Any]) -> AdapterSpec:
    return AdapterSpec(
        name=name,
        base_model=spec["baseModel"],
        num_layers=1,
        rank=spec["rank"],
        alpha=float(spec.get("alpha", spec["rank"])),
        modules=tuple(spec["modules"]),
        tasks=tuple(spec["tasks"]),
        router=spec.get("router", False),
    )


ADAPTER_SET_NAMES = (
    _pattern_strings(NAME, None)
    | st.sampled_from(["team.tasks", "my.adapter", "a" * 63, "a" * 64])
    | _mutated_strings(st.sampled_from(["tasks", "qa-set"]))
).filter(is_dns1123_subdomain)  # the API server refuses other names first


def test_the_store_accepts_every_adapter_set_the_schema_admits() -> None:
    schema = adapter_spec_schema()
    verdicts: Counter[str] = Counter()

    @bounded(300)
    @given(name=ADAPTER_SET_NAMES, spec=specs(schema))
    def run(name: str, spec: Any) -> None:
        obj = {"apiVersion": API_VERSION, "kind": "AdapterSet", "metadata": {"name": name}}
        errors = validation_errors(adapter_crd(), {**obj, "spec": spec})
        if errors:
            verdicts["refused"] += 1
            return
        verdicts["admitted"] += 1
        spec = with_defaults(schema, spec)
        adapter = store_name(name, spec)
        try:
            described = _store_spec(adapter, spec)
            _version(spec.get("store", {}).get("version", ""))
        except (AdapterFormatError, InvalidArgument) as refused:
            pytest.fail(f"the store refuses an AdapterSet the API server admits: {refused}")
        # The operator's check compares the spec with the version found.
        manifest = AdapterManifest(described, 1, "2026-01-01T00:00:00Z", {})
        assert mismatches(spec, manifest) == []

    run()
    assert min(verdicts.values()) >= 60, verdicts


@st.composite
def store_specs(draw: st.DrawFn) -> AdapterSpec:
    """Adapters the store accepts, names from its own rule and near misses."""
    names = _pattern_strings(NAME, None) | _mutated_strings(st.sampled_from(["tasks", "a_b"]))
    name = draw(names.filter(is_valid_name))
    tasks = draw(st.lists(names.filter(is_valid_name), min_size=1, max_size=64, unique=True))
    modules = draw(st.lists(st.sampled_from(adapter_modules()), min_size=1, unique=True))
    return AdapterSpec(
        name=name,
        base_model=draw(st.text(TEXT, min_size=1, max_size=253)),
        num_layers=1,
        rank=draw(st.integers(1, 4096)),
        alpha=draw(st.floats(0, 1e300, exclude_min=True)),
        modules=tuple(modules),
        tasks=tuple(tasks),
        router=draw(st.booleans()),
    )


def adapter_modules() -> list[str]:
    return list(adapter_spec_schema()["properties"]["modules"]["items"]["enum"])


@bounded(200)
@given(adapter=store_specs())
def test_every_adapter_the_store_accepts_has_an_adapter_set(adapter: AdapterSpec) -> None:
    """Its own name if that is a Kubernetes name, else any with store.name."""
    name = adapter.name if is_dns1123_subdomain(adapter.name) else "adapter-set"
    spec = {
        "baseModel": adapter.base_model,
        "tasks": list(adapter.tasks),
        "rank": adapter.rank,
        "alpha": adapter.alpha,
        "modules": list(adapter.modules),
        "router": adapter.router,
        "store": {"name": adapter.name},
    }
    obj = {"apiVersion": API_VERSION, "kind": "AdapterSet", "metadata": {"name": name}}
    assert validation_errors(adapter_crd(), {**obj, "spec": spec}) == []


NAME_CANDIDATES = (
    _pattern_strings(NAME, None)
    | _mutated_strings(_pattern_strings(NAME, None))
    | st.text(TEXT, max_size=70)
)


@bounded(400)
@given(name=NAME_CANDIDATES)
def test_a_name_is_an_adapter_name_to_the_crd_exactly_when_the_store_takes_it(
    name: str,
) -> None:
    try:
        check_name("adapter", name)
        store = True
    except AdapterFormatError:
        store = False
    spec = {"baseModel": "m", "tasks": ["qa"], "rank": 8, "modules": ["q_proj"]}
    obj = {"apiVersion": API_VERSION, "kind": "AdapterSet", "metadata": {"name": "set"}}
    named = {**obj, "spec": {**spec, "store": {"name": name}}}
    tasked = {**obj, "spec": {**spec, "tasks": [name]}}
    assert (validation_errors(adapter_crd(), named) == []) == store
    assert (validation_errors(adapter_crd(), tasked) == []) == store


# -- the syntax --------------------------------------------------------------------


def _crd_patterns() -> list[str]:
    """Every regular expression the CRDs hold: patterns and CEL `matches`."""
    found = {part.split("')")[0] for rule in RULES for part in rule.split("matches(r'")[1:]}
    for crd in (fleet_crd(), adapter_crd()):
        stack = [openapi_schema(crd)]
        while stack:
            node = stack.pop()
            if "pattern" in node:
                found.add(node["pattern"])
            stack += node.get("properties", {}).values()
            stack += [node[k] for k in ("items", "additionalProperties") if k in node]
    return sorted(found)


@pytest.mark.parametrize("pattern", _crd_patterns())
def test_a_pattern_reads_the_same_in_python_and_re2(pattern: str) -> None:
    """The API server matches with RE2, the operator (schema_check.py) with
    Python's re. They agree on anchored patterns with ASCII classes and no
    lookaround, matched whole (syntax.matches)."""
    assert pattern.startswith("^") and pattern.endswith("$"), pattern
    for construct in ("\\s", "\\w", "\\d", "\\b", "(?=", "(?!", "(?<"):
        assert construct not in pattern, construct

    @bounded(60)
    @given(text=_mutated_strings(_pattern_strings(pattern, None)) | st.text(TEXT, max_size=20))
    def run(text: str) -> None:
        assert matches(pattern, text) == (re2.search(pattern, text) is not None)

    run()


QUANTITY_TEXT = (
    _pattern_strings(QUANTITY, None)
    | _mutated_strings(_pattern_strings(QUANTITY, None))
    | st.text(st.sampled_from("0123456789.+-eEinumkKMGTPb "), max_size=8)
)


@bounded(500)
@given(text=QUANTITY_TEXT)
def test_the_quantity_pattern_is_the_parsers_grammar(text: str) -> None:
    """Exactly what Kubernetes parses, but for what it trims around a value
    and exponents past 18 digits (an int64 holds some of those)."""
    if matches(QUANTITY, text):
        assert parses_as_quantity(text)
    elif parses_as_quantity(text) and text.strip() == text:
        assert re.search("[eE][+-]?[0-9]{19}", text), text


IMAGE_TEXT = (
    _pattern_strings(IMAGE, None)
    | _mutated_strings(_pattern_strings(IMAGE, None))
    | _mutated_strings(
        st.sampled_from(["elasticfleet-worker:0.1.0", "ghcr.io/a/b@sha256:" + "0" * 64])
    )
)


@bounded(200)
@given(image=IMAGE_TEXT)
def test_the_image_pattern_is_what_the_kubelet_parses(image: str) -> None:
    """Exactly, up to the length bound (stricter than the kubelet for a
    reference with a registry and over 237 characters)."""
    admitted = matches(IMAGE, image) and not matches(IMAGE_ID, image) and len(image) <= MAX_IMAGE
    assert admitted == (is_image_reference(image) and len(image) <= MAX_IMAGE), image


@bounded(200)
@given(keys=st.lists(_pattern_strings(LABEL_KEY, None) | _mutated_strings(st.just("a.b/c"))))
def test_node_selector_keys_are_label_keys(keys: list[str]) -> None:
    selector = dict.fromkeys(keys, "v")
    assert LABEL_KEYS.holds(selector) == all(is_qualified_name(key) for key in keys)
