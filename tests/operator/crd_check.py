"""Validates custom resources against a CRD the way an API server would,
offline: defaults first, then the OpenAPI v3 schema (JSON Schema draft 4
semantics, which OpenAPI v3.0 follows: boolean exclusiveMinimum), then every
CEL `x-kubernetes-validations` rule with a real CEL evaluator. Transition
rules (those naming `oldSelf`) run only on updates and only where the old
object had a value, as in Kubernetes.

Where Kubernetes differs from plain JSON Schema, this follows Kubernetes:
patterns are RE2 (Go's regexp: `$` is the end of the text, where Python's
`re` also matches before a final newline; cel-python's `matches` is RE2
already), list types set and map refuse duplicates, and a custom resource's
name must be a DNS-1123 subdomain (ObjectMeta validation, before the schema).

kubernetes-validate skips custom resources, so this is where the schemas'
rules are proven; the Kubernetes API emulator the integration tests use
prunes every write of a custom resource (`prune`) and checks the object it
makes (`validation_errors`).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from typing import Any

import celpy
import jsonschema
import re2
from celpy.adapter import json_to_cel
from k8s_rules import is_dns1123_subdomain

from elasticfleet.operator.crds import with_defaults

_MISSING = object()
_CEL = celpy.Environment()


def _pattern(
    validator: Any, pattern: str, instance: Any, schema: dict[str, Any]
) -> Iterator[jsonschema.ValidationError]:
    if validator.is_type(instance, "string") and re2.search(pattern, instance) is None:
        yield jsonschema.ValidationError(f"{instance!r} does not match {pattern!r}")


def _list_type(
    validator: Any, kind: str, instance: Any, schema: dict[str, Any]
) -> Iterator[jsonschema.ValidationError]:
    if not validator.is_type(instance, "array"):
        return
    keys = schema.get("x-kubernetes-list-map-keys", [])
    seen = set()
    for item in instance:
        if kind == "map" and isinstance(item, dict):
            item = [item.get(key) for key in keys]
        identity = json.dumps(item, sort_keys=True)
        if identity in seen:
            yield jsonschema.ValidationError(f"Duplicate value: {identity}")
        seen.add(identity)


_Validator = jsonschema.validators.extend(  # type: ignore[no-untyped-call]
    jsonschema.Draft4Validator, {"pattern": _pattern, "x-kubernetes-list-type": _list_type}
)


@functools.cache
def _program(rule: str) -> Any:
    return _CEL.program(_CEL.compile(rule))


def openapi_schema(crd: dict[str, Any]) -> dict[str, Any]:
    schema: dict[str, Any] = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def validation_errors(
    crd: dict[str, Any], obj: dict[str, Any], old: dict[str, Any] | None = None
) -> list[str]:
    """Every reason an API server would refuse to store `obj` (an update of
    `old` when given); empty when it is valid."""
    name = obj.get("metadata", {}).get("name")
    if not isinstance(name, str) or not is_dns1123_subdomain(name):
        return [f"metadata.name: {name!r} is not a DNS-1123 subdomain"]
    schema = openapi_schema(crd)
    value = with_defaults(schema, _decoded(obj))
    previous = _MISSING if old is None else with_defaults(schema, _decoded(old))
    errors = _schema_errors(schema, value)
    if not errors:
        errors.extend(_cel_errors(schema, value, previous, ""))
    return errors


def _decoded(value: Any) -> Any:
    """`value` as the API server decodes its JSON: an integer that does not
    fit an int64 becomes a float64."""
    if isinstance(value, dict):
        return {key: _decoded(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_decoded(item) for item in value]
    if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**63:
        return float(value)
    return value


def status_errors(schema: dict[str, Any], status: Any) -> list[str]:
    """Every reason an API server would refuse `status` in a write to the
    status subresource (which validates the status alone); `schema` is the
    CRD's status schema (which has no defaults)."""
    errors = _schema_errors(schema, status, "status")
    if not errors:
        errors.extend(_cel_errors(schema, status, _MISSING, ".status"))
    return errors


def _schema_errors(schema: dict[str, Any], value: Any, *prefix: str) -> list[str]:
    validator = _Validator(schema, format_checker=jsonschema.FormatChecker())
    return [
        f"{'.'.join(str(p) for p in (*prefix, *error.absolute_path))}: {error.message}"
        for error in validator.iter_errors(value)
    ]


def prune(schema: dict[str, Any], obj: dict[str, Any]) -> dict[str, Any]:
    """`obj` without the fields its structural schema does not declare, as
    an API server stores a custom resource: unknown fields are dropped
    silently, not refused (unless x-kubernetes-preserve-unknown-fields).
    The root's `metadata` is the server's own and is kept whole."""
    pruned: dict[str, Any] = _prune(schema, obj)
    if "metadata" in obj:
        pruned["metadata"] = obj["metadata"]
    return pruned


def _prune(schema: dict[str, Any], value: Any) -> Any:
    if isinstance(value, list) and "items" in schema:
        return [_prune(schema["items"], item) for item in value]
    if not isinstance(value, dict) or schema.get("x-kubernetes-preserve-unknown-fields"):
        return value
    if isinstance(schema.get("additionalProperties"), dict):
        return {key: _prune(schema["additionalProperties"], item) for key, item in value.items()}
    properties: dict[str, Any] = schema.get("properties", {})
    return {key: _prune(properties[key], item) for key, item in value.items() if key in properties}


def _cel_errors(schema: dict[str, Any], value: Any, old: Any, path: str) -> list[str]:
    errors = []
    for rule in schema.get("x-kubernetes-validations", []):
        transition = "oldSelf" in rule["rule"]
        if transition and old is _MISSING:
            continue
        activation = {"self": json_to_cel(value)}
        if transition:
            activation["oldSelf"] = json_to_cel(old)
        if not bool(_program(rule["rule"]).evaluate(activation)):
            errors.append(f"{path or '<root>'}: {rule['message']}")
    if isinstance(value, dict):
        extra = schema.get("additionalProperties")
        for name, item in value.items():
            child = schema.get("properties", {}).get(name, extra)
            if child is not None:
                previous = old.get(name, _MISSING) if isinstance(old, dict) else _MISSING
                errors.extend(_cel_errors(child, item, previous, f"{path}.{name}"))
    elif isinstance(value, list) and "items" in schema:
        # Items are not matched to the old list's: no transition rule there.
        for index, item in enumerate(value):
            errors.extend(_cel_errors(schema["items"], item, _MISSING, f"{path}[{index}]"))
    return errors


def schema_nodes(schema: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    """Every node of a schema with its dotted path (items as `[]`)."""
    nodes = [(path or "<root>", schema)]
    for name, child in schema.get("properties", {}).items():
        nodes.extend(schema_nodes(child, f"{path}.{name}"))
    if "items" in schema:
        nodes.extend(schema_nodes(schema["items"], f"{path}[]"))
    return nodes
