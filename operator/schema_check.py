"""Checks a value against one of our CRD schemas as the API server would:
the OpenAPI v3 keywords those schemas use, their list types, and every CEL
rule through its Python twin (crds.RULES).

FleetSpec.parse runs it on every spec it reads. An object stored before a
CRD upgrade, or served by an API server that validates nothing (an
emulator), reaches the operator unchecked; and the operator must refuse
exactly what a real API server refuses: no more (a fleet the server
admitted and the operator refuses is stuck), no less (one whose children
Kubernetes then refuses is stuck too, with a worse error). The property
tests in tests/operator/test_crd_fuzz.py hold this check to a JSON Schema
validator, RE2 and a CEL evaluator (tests/operator/crd_check.py).

Only the keywords our schemas use are implemented; a schema with another
one is a TypeError, so a schema change that needs more fails in the tests
instead of passing unchecked. Patterns are matched whole (syntax.matches),
as RE2 matches the anchored patterns syntax.py defines. Unknown fields are
ignored: the API server prunes them.
"""

from __future__ import annotations

import json
import reprlib
from collections.abc import Callable, Iterator
from typing import Any

from elasticfleet.operator.crds import RULES
from elasticfleet.operator.syntax import PATTERN_NAMES, matches
from elasticfleet.operator.wire import Schema

# Each OpenAPI type, as the JSON value Python reads (bool is not a number).
JSON_TYPES: dict[str, Callable[[Any], bool]] = {
    "object": lambda value: isinstance(value, dict),
    "array": lambda value: isinstance(value, list),
    "string": lambda value: isinstance(value, str),
    "integer": lambda value: isinstance(value, int) and not isinstance(value, bool),
    "number": lambda value: isinstance(value, int | float) and not isinstance(value, bool),
    "boolean": lambda value: isinstance(value, bool),
}
_KEYWORDS = {
    "type",
    "description",
    "default",
    "format",  # int64 and date-time: the bounds and types already say it
    "enum",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "minLength",
    "maxLength",
    "pattern",
    "minItems",
    "maxItems",
    "items",
    "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys",
    "properties",
    "required",
    "additionalProperties",
    "maxProperties",
    "x-kubernetes-validations",
}

# Values are quoted in messages cut short: a 10,000-character name must not
# make a 10 kB error (or Event).
_REPR = reprlib.Repr()
_REPR.maxstring = 66
_REPR.maxother = 66


def _shown(value: Any) -> str:
    return _REPR.repr(value)


def check(schema: Schema, value: Any, path: str = "") -> list[str]:
    """Every reason the API server would refuse `value` (with the schema's
    defaults already filled in) at `path`; empty if it would store it.
    Rules run only on a value of the schema's shape, as on a server."""
    return _schema_errors(schema, value, path) or _rule_errors(schema, value, path)


def _schema_errors(schema: Schema, value: Any, path: str) -> list[str]:
    unknown = set(schema) - _KEYWORDS
    if unknown:
        raise TypeError(f"{path or '<root>'}: schema_check knows no {', '.join(sorted(unknown))}")
    where = path or "<root>"
    kind = schema["type"]
    if not JSON_TYPES[kind](value):
        return [f"{where}: must be of type {kind}, got {_shown(value)}"]
    if "enum" in schema and value not in schema["enum"]:
        return [f"{where}: {_shown(value)} is not one of {', '.join(map(str, schema['enum']))}"]
    if kind in ("integer", "number"):
        return _number_errors(schema, value, where)
    if kind == "string":
        return _string_errors(schema, value, where)
    if kind == "array":
        return _array_errors(schema, value, path)
    if kind == "object":
        return _object_errors(schema, value, path)
    return []


def _number_errors(schema: Schema, value: float, where: str) -> list[str]:
    errors = []
    if "minimum" in schema:
        low = schema["minimum"]
        if schema.get("exclusiveMinimum") and not value > low:
            errors.append(f"{where}: {_shown(value)} must be more than {low}")
        elif not value >= low:
            errors.append(f"{where}: {_shown(value)} must be at least {low}")
    if "maximum" in schema and not value <= schema["maximum"]:
        errors.append(f"{where}: {_shown(value)} must be at most {schema['maximum']}")
    return errors


def _string_errors(schema: Schema, value: str, where: str) -> list[str]:
    if len(value) < schema.get("minLength", 0):
        return [f"{where}: must have at least {schema['minLength']} characters"]
    if "maxLength" in schema and len(value) > schema["maxLength"]:
        return [f"{where}: {_shown(value)} is longer than {schema['maxLength']} characters"]
    pattern = schema.get("pattern")
    if pattern is not None and not matches(pattern, value):
        return [f"{where}: {_shown(value)} is not {PATTERN_NAMES.get(pattern, pattern)}"]
    return []


def _array_errors(schema: Schema, value: list[Any], path: str) -> list[str]:
    where = path or "<root>"
    errors = []
    if len(value) < schema.get("minItems", 0):
        errors.append(f"{where}: must have at least {schema['minItems']} items")
    if "maxItems" in schema and len(value) > schema["maxItems"]:
        errors.append(f"{where}: has {len(value)} items, at most {schema['maxItems']}")
    for child, item, at in _members(schema, value, path):
        errors += _schema_errors(child, item, at)
    if errors:
        return errors
    # A set holds each item once; a map list each key (x-kubernetes-list-type).
    keys = schema.get("x-kubernetes-list-map-keys")
    if schema.get("x-kubernetes-list-type") == "map" and keys:
        identities = [json.dumps([item.get(key) for key in keys]) for item in value]
    elif schema.get("x-kubernetes-list-type") == "set":
        identities = [json.dumps(item, sort_keys=True) for item in value]
    else:
        return []
    if len(set(identities)) < len(identities):
        return [f"{where}: an item appears twice"]
    return []


def _object_errors(schema: Schema, value: dict[str, Any], path: str) -> list[str]:
    where = path or "<root>"
    errors = [f"{where} lacks {name}" for name in schema.get("required", ()) if name not in value]
    if "maxProperties" in schema and len(value) > schema["maxProperties"]:
        errors.append(f"{where}: has {len(value)} entries, at most {schema['maxProperties']}")
    for child, item, at in _members(schema, value, path):
        errors += _schema_errors(child, item, at)
    return errors


def _rule_errors(schema: Schema, value: Any, path: str) -> list[str]:
    errors = []
    for rule in schema.get("x-kubernetes-validations", ()):
        if "oldSelf" in rule["rule"]:
            continue  # a transition rule: it compares with the stored object on updates
        if not RULES[rule["rule"]].holds(value):
            errors.append(f"{path}: {rule['message']}" if path else rule["message"])
    for child, item, at in _members(schema, value, path):
        errors += _rule_errors(child, item, at)
    return errors


def _members(schema: Schema, value: Any, path: str) -> Iterator[tuple[Schema, Any, str]]:
    """The schema, value and path of each member of an object or array
    (fields the schema does not know are left out: a server prunes them)."""
    if isinstance(value, dict):
        properties: dict[str, Schema] = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        for name, item in value.items():
            if name in properties:
                yield properties[name], item, f"{path}.{name}" if path else name
            elif extra is not None:
                yield extra, item, f"{path or '<root>'}[{_shown(name)}]"
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield schema["items"], item, f"{path}[{index}]"
