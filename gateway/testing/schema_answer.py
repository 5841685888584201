"""A valid instance of a JSON schema, for the sample upstreams that answer structured requests.

`schema_instance(schema, text=...)` walks the schema the way the schemas OpenAI clients send
are written (pydantic's and zod's output included): ``type`` (or a list of types), ``enum``,
``const``, ``properties`` / ``required`` / ``additionalProperties``, ``items`` /
``prefixItems`` with ``minItems`` / ``maxItems``, string lengths and common ``format``s,
number bounds and ``multipleOf``, ``anyOf`` / ``oneOf`` / ``allOf``, and ``$ref`` into
``$defs`` / ``definitions``. The answer is deterministic: the first free-form string gets
`text` (the sample's answer), other strings say which field they fill. ``pattern`` is not
honoured (a sample needs no regex engine). Every property is filled, optional ones too, except
where a recursive schema would not end.
"""

from __future__ import annotations

import math
from typing import Any

MAX_DEPTH = 8  # below it, optional properties and arrays are left empty so recursion ends
MAX_NESTING = 64  # a schema that still requires more nesting never ends
MAX_SIZE = 1000  # the longest string or array a sample answer makes
_FORMATS = {
    "date-time": "2026-01-01T00:00:00Z", "date": "2026-01-01", "time": "00:00:00Z",
    "email": "sample@example.com", "uri": "https://example.com/sample",
    "url": "https://example.com/sample", "uuid": "00000000-0000-4000-8000-000000000000",
    "hostname": "example.com", "ipv4": "192.0.2.1", "ipv6": "2001:db8::1",
    "duration": "P1D",
}


class SchemaError(ValueError):
    """The schema cannot be followed (an unresolvable ``$ref``, an unknown type)."""


def schema_instance(schema: dict[str, Any], *, text: str = "sample") -> Any:
    """A value that validates against `schema`; `text` fills the first free-form string.
    Raises `SchemaError` for a schema it cannot follow, whatever is wrong with it."""
    try:
        return _Generator(schema, text).value(schema, "value", 0)
    except (TypeError, ValueError, AttributeError, KeyError, IndexError) as exc:
        raise SchemaError(f"malformed schema ({type(exc).__name__})") from None


class _Generator:
    def __init__(self, root: dict[str, Any], text: str) -> None:
        self._root = root
        self._text: str | None = text

    def value(self, schema: Any, name: str, depth: int) -> Any:
        if depth > MAX_NESTING:
            raise SchemaError("the schema requires endless nesting")
        if schema is True or not isinstance(schema, dict):
            return self._string({}, name)
        schema = self._resolved(schema)
        if "const" in schema:
            return schema["const"]
        if schema.get("enum"):
            return schema["enum"][0]
        for combinator in ("anyOf", "oneOf"):
            if schema.get(combinator):
                return self.value(self._preferred(schema[combinator]), name, depth)
        if schema.get("allOf"):
            return self.value(self._merged(schema), name, depth)
        return self._typed(schema, _type_of(schema), name, depth)

    def _typed(self, schema: dict[str, Any], kind: str, name: str, depth: int) -> Any:
        if kind == "object":
            return self._object(schema, depth)
        if kind == "array":
            return self._array(schema, name, depth)
        if kind == "string":
            return self._string(schema, name)
        if kind in ("number", "integer"):
            return _number(schema, integer=kind == "integer")
        if kind == "boolean":
            return True
        if kind == "null":
            return None
        raise SchemaError(f"unknown JSON schema type {kind!r}")

    def _resolved(self, schema: dict[str, Any]) -> dict[str, Any]:
        """The schema a ``$ref`` points to (only local refs: ``#/$defs/X``), merged with
        the keywords beside it."""
        seen = 0
        while "$ref" in schema:
            ref = schema["$ref"]
            if not isinstance(ref, str) or not ref.startswith("#") or seen > 32:
                raise SchemaError(f"cannot follow $ref {ref!r}")
            target: Any = self._root
            for part in filter(None, ref[1:].split("/")):
                if not isinstance(target, dict) or part not in target:
                    raise SchemaError(f"cannot follow $ref {ref!r}")
                target = target[part]
            rest = {k: v for k, v in schema.items() if k != "$ref"}
            schema = {**target, **rest}
            seen += 1
        return schema

    def _preferred(self, options: list[Any]) -> Any:
        """Of ``anyOf`` branches, the first that is not ``null`` (the answer is more useful)."""
        for option in options:
            if not (isinstance(option, dict) and self._resolved(option).get("type") == "null"):
                return option
        return options[0]

    def _merged(self, schema: dict[str, Any]) -> dict[str, Any]:
        merged: dict[str, Any] = {k: v for k, v in schema.items() if k != "allOf"}
        for part in schema["allOf"]:
            part = self._resolved(part) if isinstance(part, dict) else {}
            for key, value in part.items():
                if key == "properties":
                    merged["properties"] = {**merged.get("properties", {}), **value}
                elif key == "required":
                    merged["required"] = [*merged.get("required", []), *value]
                else:
                    merged.setdefault(key, value)
        return merged

    def _object(self, schema: dict[str, Any], depth: int) -> dict[str, Any]:
        required = set(schema.get("required") or ())
        result: dict[str, Any] = {}
        for key, sub in (schema.get("properties") or {}).items():
            if depth < MAX_DEPTH or key in required:
                result[key] = self.value(sub, key, depth + 1)
        for key in sorted(required - result.keys()):  # required but not described
            result[key] = self.value(schema.get("additionalProperties", True), key, depth + 1)
        return result

    def _array(self, schema: dict[str, Any], name: str, depth: int) -> list[Any]:
        prefix = schema.get("prefixItems") or []
        wanted = int(schema.get("minItems", 0))
        if depth < MAX_DEPTH:
            wanted = max(wanted, 1)
        wanted = min(max(wanted, len(prefix)), int(schema.get("maxItems", wanted)))
        if wanted > MAX_SIZE:
            raise SchemaError(f"more than {MAX_SIZE} items required")
        items = [self.value(sub, name, depth + 1) for sub in prefix[:wanted]]
        rest = schema.get("items", True)
        while len(items) < wanted:
            items.append(self.value(rest, name, depth + 1))
        return items

    def _string(self, schema: dict[str, Any], name: str) -> str:
        fmt = schema.get("format")
        if fmt in _FORMATS:
            return _FORMATS[fmt]
        if self._text is not None:
            value, self._text = self._text, None
        else:
            value = f"sample {name}"
        low, high = int(schema.get("minLength", 0)), schema.get("maxLength")
        if low > MAX_SIZE:
            raise SchemaError(f"strings longer than {MAX_SIZE} characters required")
        value = value.ljust(low, ".")
        return value if high is None else value[:int(high)]


def _type_of(schema: dict[str, Any]) -> str:
    """The schema's type; a list of types means its first non-null one."""
    kind = schema.get("type")
    if isinstance(kind, list):
        kinds = [k for k in kind if k != "null"] or ["null"]
        return str(kinds[0])
    if isinstance(kind, str):
        return kind
    if "properties" in schema or "additionalProperties" in schema:
        return "object"
    if "items" in schema or "prefixItems" in schema:
        return "array"
    return "string"


def _number(schema: dict[str, Any], *, integer: bool) -> int | float:
    """1 when the bounds allow it, else the allowed value nearest to it, on ``multipleOf``."""
    step = schema.get("multipleOf") or 1
    low = _bound(schema, "minimum", step, up=True)
    high = _bound(schema, "maximum", step, up=False)
    value: float = math.ceil(max(1.0, -math.inf if low is None else low) / step) * step
    if high is not None and value > high:
        value = math.floor(high / step) * step
    if not integer and low is not None and value < low:  # a range narrower than a step
        value = (_raw(schema, "minimum") + _raw(schema, "maximum")) / 2
    return int(value) if integer else value


def _bound(schema: dict[str, Any], name: str, step: float, *, up: bool) -> float | None:
    """``minimum``/``maximum``, or the first multiple of `step` strictly inside the
    exclusive one."""
    exclusive = "exclusive" + name.capitalize()
    if exclusive in schema:
        bound = float(schema[exclusive]) / step
        return (math.floor(bound) + 1 if up else math.ceil(bound) - 1) * step
    return float(schema[name]) if name in schema else None


def _raw(schema: dict[str, Any], name: str) -> float:
    return float(schema.get(name, schema.get("exclusive" + name.capitalize(), 0)))
