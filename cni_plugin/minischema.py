"""A small validator for the subset of pydantic-core schemas that ``schema_gen`` emits.

The build step turns the pydantic models into a plain schema (literals only); this interpreter validates
decoded JSON against it with pydantic's strict semantics, in well under a millisecond and without loading
pydantic_core's 5 MB extension on every pod start. ``tests/test_config_schema.py`` proves it agrees with
the pydantic models on a corpus of valid and invalid configs. Only the standard library is used.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

SUPPORTED_TYPES = frozenset(
    {"str", "int", "bool", "any", "literal", "list", "dict", "nullable", "default", "typed-dict"}
)


class SchemaError(Exception):
    """Validation failed: ``loc`` is the path of the offending key, ``msg`` says what was expected."""

    def __init__(self, loc: tuple[str | int, ...], msg: str) -> None:
        super().__init__(f"{'.'.join(str(p) for p in loc) or '<root>'}: {msg}")
        self.loc = loc
        self.msg = msg


def _fail(loc: tuple[str | int, ...], msg: str) -> SchemaError:
    return SchemaError(loc, msg)


def validate(schema: dict[str, Any], value: Any, loc: tuple[str | int, ...] = ()) -> Any:
    kind = schema["type"]
    if kind == "default":
        return validate(schema["schema"], value, loc)
    if kind == "nullable":
        return None if value is None else validate(schema["schema"], value, loc)
    if kind == "any":
        return value
    if kind == "str":
        if not isinstance(value, str):
            raise _fail(loc, "Input should be a valid string")
        if len(value) < schema.get("min_length", 0):
            raise _fail(loc, f"String should have at least {schema['min_length']} character(s)")
        if "max_length" in schema and len(value) > schema["max_length"]:
            raise _fail(loc, f"String should have at most {schema['max_length']} character(s)")
        return value
    if kind == "int":
        if not isinstance(value, int) or isinstance(value, bool):
            raise _fail(loc, "Input should be a valid integer")
        if "ge" in schema and value < schema["ge"]:
            raise _fail(loc, f"Input should be greater than or equal to {schema['ge']}")
        if "le" in schema and value > schema["le"]:
            raise _fail(loc, f"Input should be less than or equal to {schema['le']}")
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            raise _fail(loc, "Input should be a valid boolean")
        return value
    if kind == "literal":
        expected = schema["expected"]
        if value not in expected or isinstance(value, bool) != any(isinstance(e, bool) for e in expected):
            raise _fail(loc, "Input should be " + " or ".join(repr(e) for e in expected))
        return value
    if kind == "list":
        if not isinstance(value, list):
            raise _fail(loc, "Input should be a valid list")
        items = schema.get("items_schema")
        if items is None:
            return list(value)
        return [validate(items, item, (*loc, index)) for index, item in enumerate(value)]
    if kind == "dict":
        if not isinstance(value, dict):
            raise _fail(loc, "Input should be a valid dictionary")
        return dict(value)
    if kind == "typed-dict":
        return _validate_typed_dict(schema, value, loc)
    raise _fail(loc, f"unsupported schema type {kind!r}")


def _validate_typed_dict(schema: dict[str, Any], value: Any, loc: tuple[str | int, ...]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _fail(loc, "Input should be a valid dictionary")
    out: dict[str, Any] = {}
    for name, field in schema["fields"].items():
        key = field.get("validation_alias", name)
        field_schema = field["schema"]
        if key in value:
            out[name] = validate(field_schema, value[key], (*loc, key))
        elif field["required"]:
            raise _fail((*loc, key), "Field required")
        else:
            default = field_schema["default"]
            out[name] = list(default) if isinstance(default, list) else default
    return out
