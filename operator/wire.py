"""Typed API objects: dataclasses from which the JSON, its parsing and the
OpenAPI schema all come.

A status kept as a free-form dict drifts from the schema the API server
enforces (ours did: the control loop wrote a device source the schema's
enum refused, so a real server would have answered the whole status patch
with 422). Here, as kubebuilder does with Go structs and markers, each field
is declared once, with its metadata (`api(...)`: description, wire name,
bounds), and everything else is derived from that declaration:

- `ApiObject.to_dict()` is the JSON-ready object (a status patch), in the
  wire's camelCase names; fields that are None are left out, which in a
  merge patch means "leave as it is";
- `ApiObject.from_dict()` reads what a cluster holds leniently: a missing
  field takes its default, an unknown key is ignored, an enum value this
  code does not know reads as unknown (`OpenEnum`), so a status written by
  an older or newer operator still reads;
- `schema_of()` is the OpenAPI v3 schema of the type, for the CRD (crds.py);
- construction enforces the schema's bounds, so that nothing the model holds
  can be refused: strings longer than their maxLength are cut (a worker
  decides the plan id and error text it reports, and one overlong string
  would lose the whole patch), lists longer than their maxItems keep their
  last (newest) items, times are kept in UTC to the second (what the wire
  holds, so an object equals itself read back), and a number below its
  minimum, a non-finite float or a string off its pattern is a ValueError
  (a bug, or a worker reporting nonsense: the control loop then fails that
  worker alone, never the patch).

The schema node builders (`obj`, `string`, ...) are the ones the
hand-written spec schemas use too, so both halves of a CRD share one shape.
See docs/architecture.md, "The status model".
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from enum import Enum, StrEnum
from typing import Any, ClassVar, Self, Union, get_args, get_origin, get_type_hints

Schema = dict[str, Any]

# The key of a field's FieldSpec in its dataclass field metadata.
_SPEC = "elasticfleet.api"


def timestamp(moment: datetime) -> str:
    """RFC 3339 in UTC with second precision, as Kubernetes writes times."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclasses.dataclass(frozen=True)
class Rule:
    """A CEL validation rule, the message the API server answers when it
    fails, and the same predicate in Python (`holds`, given the node's
    value), which the operator runs on what it reads (schema_check.py): the
    API server and the operator must refuse the same objects."""

    cel: str
    message: str
    holds: Callable[[Any], bool]


def validated(node: Schema, *rules: Rule) -> Schema:
    """`node` with `rules` added to its x-kubernetes-validations."""
    added = [{"rule": rule.cel, "message": rule.message} for rule in rules]
    return {**node, "x-kubernetes-validations": [*node.get("x-kubernetes-validations", []), *added]}


def obj(
    description: str,
    properties: dict[str, Schema],
    *,
    required: tuple[str, ...] = (),
    rules: tuple[Rule, ...] = (),
) -> Schema:
    """An object node, validated by `rules`."""
    node: Schema = {"type": "object", "description": description, "properties": properties}
    if required:
        node["required"] = list(required)
    return validated(node, *rules) if rules else node


def string(description: str, **extra: Any) -> Schema:
    return {"type": "string", "description": description, **extra}


def integer(description: str, **extra: Any) -> Schema:
    return {"type": "integer", "format": "int64", "description": description, **extra}


def number(description: str, **extra: Any) -> Schema:
    return {"type": "number", "description": description, **extra}


def boolean(description: str, **extra: Any) -> Schema:
    return {"type": "boolean", "description": description, **extra}


def array(description: str, items: Schema, **extra: Any) -> Schema:
    return {"type": "array", "description": description, "items": items, **extra}


class OpenEnum(StrEnum):
    """An enum on the wire that a newer writer may extend: a value this code
    does not know reads as the member UNKNOWN, which every subclass has."""

    @classmethod
    def _missing_(cls, value: object) -> Self:
        return cls["UNKNOWN"]


@dataclasses.dataclass(frozen=True)
class FieldSpec:
    """What the schema says of one field (or of a list's items, `item`):
    its description, its wire name when that is not the camelCase of the
    Python name, and its bounds. A list of objects is keyed by `map_keys`
    (x-kubernetes-list-type: map), as conditions are by their type."""

    description: str
    name: str | None = None
    minimum: int | None = None
    max_length: int | None = None
    pattern: str | None = None
    max_items: int | None = None
    map_keys: tuple[str, ...] = ()
    item: FieldSpec | None = None


def api(
    description: str,
    *,
    name: str | None = None,
    minimum: int | None = None,
    max_length: int | None = None,
    pattern: str | None = None,
    max_items: int | None = None,
    map_keys: tuple[str, ...] = (),
    item: FieldSpec | None = None,
) -> dict[str, FieldSpec]:
    """A field's metadata: `field(default=..., metadata=api("What it is.", ...))`."""
    spec = FieldSpec(description, name, minimum, max_length, pattern, max_items, map_keys, item)
    return {_SPEC: spec}


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


@dataclasses.dataclass(frozen=True)
class _Field:
    """One field of an ApiObject type, its type taken apart."""

    attr: str
    wire: str
    spec: FieldSpec
    kind: type  # the scalar, Enum, datetime or ApiObject type (of the items, for a list)
    many: bool  # a tuple of `kind`
    required: bool  # no default: the schema requires it
    value_spec: FieldSpec  # what each value is: the field's spec, or its items'


# Each ApiObject type's fields, taken apart once.
_FIELDS: dict[type[ApiObject], tuple[_Field, ...]] = {}


def _fields(cls: type[ApiObject]) -> tuple[_Field, ...]:
    if cls not in _FIELDS:
        _FIELDS[cls] = _take_apart(cls)
    return _FIELDS[cls]


def _take_apart(cls: type[ApiObject]) -> tuple[_Field, ...]:
    hints = get_type_hints(cls)
    found = []
    for field in dataclasses.fields(cls):
        kind = hints[field.name]
        if get_origin(kind) in (Union, types.UnionType):
            (kind,) = [arg for arg in get_args(kind) if arg is not type(None)]
        many = get_origin(kind) is tuple
        if many:
            kind = get_args(kind)[0]
        spec: FieldSpec = field.metadata[_SPEC]
        value_spec = spec.item if many else spec
        if value_spec is None:
            raise TypeError(f"{cls.__name__}.{field.name}: a list needs an item spec")
        required = field.default is dataclasses.MISSING and (
            field.default_factory is dataclasses.MISSING
        )
        wire = spec.name or _camel(field.name)
        found.append(_Field(field.name, wire, spec, kind, many, required, value_spec))
    return tuple(found)


def _bounded(owner: str, kind: type, spec: FieldSpec, value: Any) -> Any:
    """`value` within the schema's bounds (see the module docstring)."""
    if kind is datetime:
        return value.astimezone(UTC).replace(microsecond=0)
    if kind is str:
        if spec.max_length is not None:
            value = value[: spec.max_length]
        # Whole-string, as RE2 matches the anchored patterns the API server
        # checks (Python's `$` would also let a final newline through).
        if spec.pattern is not None and not re.fullmatch(spec.pattern, value):
            raise ValueError(f"{owner}: {value!r} does not match {spec.pattern}")
    elif kind in (int, float):
        if kind is float and not math.isfinite(value):
            raise ValueError(f"{owner}: {value!r} is not a finite number")
        if spec.minimum is not None and not value >= spec.minimum:
            raise ValueError(f"{owner}: {value!r} is below the minimum {spec.minimum}")
    return value


def _dump(value: Any) -> Any:
    if isinstance(value, ApiObject):
        return value.to_dict()
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, datetime):
        return timestamp(value)
    return value


def _load(kind: type[Any], raw: Any) -> Any:
    if issubclass(kind, ApiObject):
        return kind.from_dict(raw)
    if kind is datetime:
        return datetime.fromisoformat(raw)
    return kind(raw)


class ApiObject:
    """The base of typed API objects (frozen dataclasses whose fields all
    carry `api(...)` metadata); see the module docstring."""

    __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]

    def __post_init__(self) -> None:
        for field in _fields(type(self)):
            value = getattr(self, field.attr)
            if value is None:
                continue
            owner = f"{type(self).__name__}.{field.attr}"
            if field.many:
                limit = field.spec.max_items
                items = tuple(value)[-limit:] if limit is not None else tuple(value)
                value = tuple(_bounded(owner, field.kind, field.value_spec, v) for v in items)
            else:
                value = _bounded(owner, field.kind, field.value_spec, value)
            object.__setattr__(self, field.attr, value)

    def to_dict(self) -> dict[str, Any]:
        """The object as JSON, in wire names; None fields left out."""
        out: dict[str, Any] = {}
        for field in _fields(type(self)):
            value = getattr(self, field.attr)
            if value is not None:
                out[field.wire] = [_dump(v) for v in value] if field.many else _dump(value)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        """The object `data` holds, read leniently (see the module docstring);
        ValueError only when a field the schema requires is missing."""
        values: dict[str, Any] = {}
        for field in _fields(cls):
            raw = data.get(field.wire)
            if raw is None:
                if field.required:
                    raise ValueError(f"a {cls.__name__} needs {field.wire}, got {dict(data)!r}")
                continue
            if field.many:
                values[field.attr] = tuple(_load(field.kind, v) for v in raw)
            else:
                values[field.attr] = _load(field.kind, raw)
        return cls(**values)


def _node(kind: type, spec: FieldSpec) -> Schema:
    """The schema of one value of type `kind`."""
    if issubclass(kind, ApiObject):
        return schema_of(kind, spec.description)
    bounds = {
        key: value
        for key, value in (
            ("maxLength", spec.max_length),
            ("pattern", spec.pattern),
            ("minimum", spec.minimum),
        )
        if value is not None
    }
    if kind is bool:
        return boolean(spec.description)
    if kind is int:
        return integer(spec.description, **bounds)
    if kind is float:
        return number(spec.description, **bounds)
    if kind is datetime:
        return string(spec.description, format="date-time")
    if issubclass(kind, Enum):
        return string(spec.description, enum=[member.value for member in kind], **bounds)
    if kind is str:
        return string(spec.description, **bounds)
    raise TypeError(f"no schema for {kind!r}")


def schema_of(cls: type[ApiObject], description: str) -> Schema:
    """The OpenAPI v3 schema of an ApiObject type: every field with its
    description and bounds, enums from their Enum type, the fields without
    a default required."""
    properties: dict[str, Schema] = {}
    for field in _fields(cls):
        node = _node(field.kind, field.value_spec)
        if field.many:
            spec = field.spec
            extra: dict[str, Any] = {}
            if spec.max_items is not None:
                extra["maxItems"] = spec.max_items
            if spec.map_keys:
                extra["x-kubernetes-list-type"] = "map"
                extra["x-kubernetes-list-map-keys"] = list(spec.map_keys)
            node = array(spec.description, node, **extra)
        properties[field.wire] = node
    required = tuple(field.wire for field in _fields(cls) if field.required)
    return obj(description, properties, required=required)
