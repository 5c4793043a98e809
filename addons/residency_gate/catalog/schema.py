"""JSON Schema validation that reports located problems.

The schemas live in the shipped catalog (`catalog/schema/`) so editors can use them too.
"""

from __future__ import annotations

import json
from functools import cache

import jsonschema

from .data import schema_dir
from .source import Problem, SourceDoc


@cache
def _validator(name: str) -> jsonschema.protocols.Validator:
    schema = json.loads((schema_dir() / f"{name}.schema.json").read_text(encoding="utf-8"))
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def _message(error: jsonschema.ValidationError) -> str:
    where = "/".join(str(p) for p in error.absolute_path)
    if error.validator == "additionalProperties":
        extra = sorted(
            set(error.instance) - set(error.schema.get("properties", {}))
            if isinstance(error.instance, dict)
            else []
        )
        keys = ", ".join(repr(k) for k in extra)
        return f"{where or 'top level'}: unknown key {keys}" if extra else error.message
    return f"{where}: {error.message}" if where else error.message


def schema_problems(doc: SourceDoc, schema: str) -> list[Problem]:
    """Every schema violation in `doc`, each at the line of the offending value."""
    problems = []
    for error in _validator(schema).iter_errors(doc.data):
        path = tuple(error.absolute_path)
        if error.validator == "additionalProperties" and isinstance(error.instance, dict):
            extra = [k for k in error.instance if k not in error.schema.get("properties", {})]
            if extra:
                path = (*path, extra[0])
        problems.append(doc.problem(path, _message(error)))
    return problems
