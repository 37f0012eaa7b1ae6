"""The JSON schemas a request may hold its output to (response_format, forced tool calls).

Each engine compiles the schema into a grammar: llama.cpp through llama-cpp-python's GBNF converter,
OpenVINO through xgrammar. A schema xgrammar rejects fails inside the OpenVINO pipeline's step,
which then stays broken for every request, and the two converters differ in what they enforce. So
a schema is first reduced to the keywords below, each checked (a 400 otherwise); every other keyword
(title, description, default, multipleOf, uniqueItems, not, prefixItems, ...) is dropped, that is
not enforced, as llama.cpp's converter does with what it does not know; so are bounds on anything
but integers (llama.cpp's converter ignores them, xgrammar's number ranges can loop on whitespace).
The frontend normalizes every schema it sends; the engines accept only normalized ones.
"""

from __future__ import annotations

import math
import re
from typing import Any

TYPES = {"string", "number", "integer", "boolean", "null", "object", "array"}
SCHEMA_MAPS = ("properties", "$defs", "definitions")  # name -> schema
SCHEMA_LISTS = ("anyOf", "oneOf", "allOf")  # non-empty lists of schemas (oneOf is enforced as anyOf)
SCHEMAS = ("items", "additionalProperties")  # one schema (additionalProperties may be true or false)
COUNTS = ("minLength", "maxLength", "minItems", "maxItems")
MAX_COUNT = 10_000  # a grammar spells out each repetition up to the maximum
BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
MAX_INTEGER = 2**53  # integer bounds past this lose precision in xgrammar's doubles
PAIRS = (("minLength", "maxLength"), ("minItems", "maxItems"))
UPPER_COUNTS = ("maxLength", "maxItems")
OTHERS = ("type", "enum", "const", "required", "pattern", "format", "$ref")
KEYWORDS = {*SCHEMA_MAPS, *SCHEMA_LISTS, *SCHEMAS, *COUNTS, *BOUNDS, *OTHERS}
# Regex features neither grammar can express (xgrammar refuses them, GBNF has no equivalent).
UNSUPPORTED_REGEX = re.compile(r"\(\?[=!]|\(\?<[=!]|\\[1-9]|\\[pP]\{")


def normalize(schema: Any) -> dict[str, Any]:
    """`schema` with only the keywords both engines enforce; ValueError naming where and what is wrong."""
    refs: list[tuple[str, str]] = []
    normal = _normalize(schema, "#", refs)
    for ref, where in refs:
        _check_ref(ref, normal, where)
    return normal


def rebase(schema: dict[str, Any], root: str) -> dict[str, Any]:
    """A normalized schema moved to `root` (a "#/..." pointer) inside another: its references follow it."""
    moved: dict[str, Any] = {}
    for key, value in schema.items():
        if key == "$ref":
            moved[key] = root + value[1:]
        elif key in SCHEMA_MAPS:
            moved[key] = {name: rebase(item, root) for name, item in value.items()}
        elif key in SCHEMA_LISTS:
            moved[key] = [rebase(item, root) for item in value]
        elif key in SCHEMAS and isinstance(value, dict):
            moved[key] = rebase(value, root)
        else:
            moved[key] = value
    return moved


def integer_bounds(node: dict[str, Any], where: str = "#") -> tuple[int | None, int | None]:
    """The smallest and largest integer an integer schema allows (None: unbounded); ValueError if none."""
    low, high = node.get("minimum"), node.get("maximum")
    if any(b is not None and b != math.floor(b) for b in (low, high)):
        raise ValueError(f"{where}: an integer's minimum and maximum must be whole numbers")
    if "exclusiveMinimum" in node:
        low = max(low if low is not None else -math.inf, math.floor(node["exclusiveMinimum"]) + 1)
    if "exclusiveMaximum" in node:
        high = min(high if high is not None else math.inf, math.ceil(node["exclusiveMaximum"]) - 1)
    if any(b is not None and abs(b) > MAX_INTEGER for b in (low, high)):
        raise ValueError(f"{where}: an integer's bounds must lie within ±2^53")
    low = None if low is None else int(low)
    high = None if high is None else int(high)
    if low is not None and high is not None and low > high:
        raise ValueError(f"{where}: no integer lies between its bounds")
    return low, high


def _normalize(node: Any, where: str, refs: list[tuple[str, str]]) -> dict[str, Any]:
    if not isinstance(node, dict):
        raise ValueError(f"{where}: a schema must be a JSON object, got {_short(node)}")
    normal: dict[str, Any] = {}
    for key, value in node.items():
        if key in UPPER_COUNTS and isinstance(value, int) and not isinstance(value, bool) and value > MAX_COUNT:
            continue  # a cap no answer gets near (Claude Code's tools say 100000): the same as none
        if key in KEYWORDS:
            normal[key] = _keyword(key, value, f"{where}/{key}", refs)
    for low, high in PAIRS:
        if low in normal and high in normal and normal[low] > normal[high]:
            raise ValueError(f"{where}: {low} {normal[low]} is greater than {high} {normal[high]}")
    if normal.get("type") == "integer":
        integer_bounds(normal, where)
    else:
        for key in BOUNDS:
            normal.pop(key, None)
    return normal


def _keyword(key: str, value: Any, where: str, refs: list[tuple[str, str]]) -> Any:
    """A kept keyword's value, checked (and normalized where it holds schemas); each "$ref" noted in `refs`."""
    if key in SCHEMA_MAPS:
        if not isinstance(value, dict):
            raise ValueError(f"{where}: must be an object of schemas")
        return {name: _normalize(item, f"{where}/{name}", refs) for name, item in value.items()}
    if key in SCHEMA_LISTS:
        if not isinstance(value, list) or not value:
            raise ValueError(f"{where}: must be a non-empty list of schemas")
        if key == "allOf" and len(value) > 1:
            raise ValueError(f"{where}: only one schema is supported")
        return [_normalize(item, f"{where}/{i}", refs) for i, item in enumerate(value)]
    if key in SCHEMAS:
        return value if key == "additionalProperties" and isinstance(value, bool) else _normalize(value, where, refs)
    if key in COUNTS:
        if not (isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_COUNT):
            raise ValueError(f"{where}: must be an integer from 0 to {MAX_COUNT}")
    elif key in BOUNDS:
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value != value or abs(value) == math.inf:
            raise ValueError(f"{where}: must be a finite number")
    elif key == "type":
        for name in value if isinstance(value, list) else [value]:
            if not isinstance(name, str) or name not in TYPES:
                raise ValueError(f"{where}: unknown type {_short(name)} (one of {', '.join(sorted(TYPES))})")
    elif key == "enum":
        if not isinstance(value, list) or not value:
            raise ValueError(f"{where}: must be a non-empty list")
    elif key == "required":
        if not (isinstance(value, list) and all(isinstance(name, str) for name in value)):
            raise ValueError(f"{where}: must be a list of property names")
    elif key == "pattern":
        _check_pattern(value, where)
    elif key in ("format", "$ref") and not isinstance(value, str):
        raise ValueError(f"{where}: must be a string")
    elif key == "$ref":
        refs.append((value, where))
    return value


def _check_ref(ref: str, root: dict[str, Any], where: str) -> None:
    """A "$ref" points inside the schema (nothing is fetched), at a schema, and not round a loop of refs."""
    seen: set[str] = set()
    while ref not in seen:
        seen.add(ref)
        target = _resolve(ref, root, where)
        if not isinstance(target.get("$ref"), str):
            return
        ref = target["$ref"]
    raise ValueError(f"{where}: the references go round in a loop")


def _resolve(ref: str, root: dict[str, Any], where: str) -> dict[str, Any]:
    """The schema a "#/..." pointer names, walking only through keywords that hold schemas."""
    if not ref.startswith("#/"):
        raise ValueError(f"{where}: only references inside the schema (\"#/...\") are supported, got {_short(ref)}")
    parts = [p.replace("~1", "/").replace("~0", "~") for p in ref[2:].split("/")]
    target: Any = root
    while parts and isinstance(target, dict):
        key = parts.pop(0)
        target = target.get(key) if key in KEYWORDS else None
        if key in SCHEMA_MAPS and parts:
            target = target.get(parts.pop(0)) if isinstance(target, dict) else None
        elif key in SCHEMA_LISTS and parts:
            index = parts.pop(0)
            ok = isinstance(target, list) and index.isdigit() and int(index) < len(target)
            target = target[int(index)] if ok else None
        elif key not in SCHEMAS:
            target = None
    if not isinstance(target, dict):
        raise ValueError(f"{where}: {ref} does not point at a schema inside this one")
    return target


def _check_pattern(pattern: Any, where: str) -> None:
    if not isinstance(pattern, str):
        raise ValueError(f"{where}: must be a string")
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"{where}: not a valid regular expression: {exc}") from None
    if UNSUPPORTED_REGEX.search(pattern):
        raise ValueError(f"{where}: lookarounds, backreferences and \\p{{...}} classes are not supported")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
