"""Validates custom resources against a CRD the way an API server would,
offline: defaults first, then the OpenAPI v3 schema (JSON Schema draft 4
semantics, which OpenAPI v3.0 follows: boolean exclusiveMinimum), then every
CEL `x-kubernetes-validations` rule with a real CEL evaluator. Transition
rules (those naming `oldSelf`) run only on updates and only where the old
object had a value, as in Kubernetes.

kubernetes-validate skips custom resources, so this is where the schemas'
rules are proven; the Kubernetes API emulator the integration tests use
prunes every write of a custom resource (`prune`) and checks the object it
makes (`validation_errors`).
"""

from __future__ import annotations

from functools import cache
from typing import Any

import celpy
import jsonschema
from celpy.adapter import json_to_cel

from elasticfleet.operator.crds import with_defaults

_MISSING = object()


def openapi_schema(crd: dict[str, Any]) -> dict[str, Any]:
    schema: dict[str, Any] = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def validation_errors(
    crd: dict[str, Any], obj: dict[str, Any], old: dict[str, Any] | None = None
) -> list[str]:
    """Every reason an API server would refuse to store `obj` (an update of
    `old` when given); empty when it is valid."""
    schema = openapi_schema(crd)
    value = with_defaults(schema, obj)
    previous = _MISSING if old is None else with_defaults(schema, old)
    errors = _schema_errors(schema, value)
    if not errors:
        errors.extend(_cel_errors(schema, value, previous, ""))
    return errors


def status_errors(schema: dict[str, Any], status: Any) -> list[str]:
    """Every reason an API server would refuse `status` in a write to the
    status subresource (which validates the status alone); `schema` is the
    CRD's status schema (which has no defaults)."""
    errors = _schema_errors(schema, status, "status")
    if not errors:
        errors.extend(_cel_errors(schema, status, _MISSING, ".status"))
    return errors


def _schema_errors(schema: dict[str, Any], value: Any, *prefix: str) -> list[str]:
    validator = jsonschema.Draft4Validator(schema, format_checker=jsonschema.FormatChecker())
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


@cache
def _program(rule: str) -> celpy.Runner:
    """A rule compiled once: the emulated API server checks every write."""
    environment = celpy.Environment()
    return environment.program(environment.compile(rule))


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
        for name, child in schema.get("properties", {}).items():
            if name in value:
                previous = old.get(name, _MISSING) if isinstance(old, dict) else _MISSING
                errors.extend(_cel_errors(child, value[name], previous, f"{path}.{name}"))
    return errors


def schema_nodes(schema: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    """Every node of a schema with its dotted path (items as `[]`)."""
    nodes = [(path or "<root>", schema)]
    for name, child in schema.get("properties", {}).items():
        nodes.extend(schema_nodes(child, f"{path}.{name}"))
    if "items" in schema:
        nodes.extend(schema_nodes(schema["items"], f"{path}[]"))
    return nodes
