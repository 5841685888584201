"""The sample upstreams' schema instances: every one validates against its schema."""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Literal

import jsonschema
import pytest
from pydantic import BaseModel, Field

from gateway.testing.schema_answer import SchemaError, schema_instance


class Colour(StrEnum):
    RED = "red"
    BLUE = "blue"


class Address(BaseModel):
    street: str
    city: str = Field(min_length=2, max_length=40)


class Person(BaseModel):
    name: str
    age: int = Field(ge=18, le=130)
    score: float = Field(gt=0, lt=1)
    active: bool
    colour: Colour
    kind: Literal["customer", "staff"]
    nickname: str | None = None
    address: Address
    previous: list[Address] = Field(min_length=2)
    tags: list[str]
    email: str = Field(json_schema_extra={"format": "email"})


class Tree(BaseModel):
    label: str
    children: list[Tree] = []


SCHEMAS: list[dict[str, Any]] = [
    Person.model_json_schema(),
    Tree.model_json_schema(),
    {"type": "object", "properties": {"a": {"type": "integer", "multipleOf": 5, "minimum": 7}},
     "required": ["a"], "additionalProperties": False},
    {"type": "object", "properties": {"x": {"type": ["null", "number"], "exclusiveMinimum": 2,
                                            "exclusiveMaximum": 2.5}}},
    {"type": "array", "prefixItems": [{"type": "string"}, {"type": "boolean"}],
     "items": {"const": 3}, "minItems": 4, "maxItems": 4},
    {"type": "object", "required": ["undescribed"], "additionalProperties": {"type": "integer"}},
    {"allOf": [{"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]},
               {"properties": {"b": {"enum": [2, 3]}}, "required": ["b"]}]},
    {"oneOf": [{"type": "null"}, {"type": "string", "format": "date-time"}]},
    {"type": "string", "minLength": 50},
    {"type": "integer", "maximum": -4},
    {"type": "number", "multipleOf": 0.25, "exclusiveMinimum": 1},
    {"type": "integer", "multipleOf": 5},
]


@pytest.mark.parametrize("schema", SCHEMAS)
def test_the_instance_validates(schema: dict[str, Any]) -> None:
    jsonschema.validate(schema_instance(schema), schema)


def test_a_pydantic_model_reads_the_instance_back() -> None:
    person = Person.model_validate(schema_instance(Person.model_json_schema(), text="Ada"))
    assert person.name == "Ada"  # the first free-form string is the sample's text
    assert person.address.street == "sample street"
    assert len(person.previous) == 2 and person.colour is Colour.RED
    assert 0 < person.score < 1 and person.age == 18


def test_recursive_schemas_end() -> None:
    tree = Tree.model_validate(schema_instance(Tree.model_json_schema()))
    depth = 0
    while tree.children:
        tree, depth = tree.children[0], depth + 1
    assert 1 <= depth < 10


@pytest.mark.parametrize("schema", [
    {"$ref": "#/$defs/Missing"},
    {"$ref": "#"},
    {"type": "object", "properties": {"again": {"$ref": "#"}}, "required": ["again"]},
    {"type": "martian"},
    {"type": "array", "minItems": 10**9},
    {"type": "string", "minLength": "long"},
])
def test_a_schema_it_cannot_follow_is_a_schema_error(schema: dict[str, Any]) -> None:
    with pytest.raises(SchemaError):
        schema_instance(schema)
