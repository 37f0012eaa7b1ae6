"""JSON schema -> GBNF for llama.cpp's grammar sampler.

llama-cpp-python's converter (llama_cpp.llama_grammar) does the work; it leaves integer bounds out
(its TODO), so an integer schema with minimum/maximum gets a rule here that spells exactly the
integers in range; patterns are anchored and grouped as it needs.
"""

from __future__ import annotations

import json
from functools import lru_cache

from llama_cpp.llama_grammar import RESERVED_NAMES, SchemaConverter

from infersnap import json_schema

MAX_DIGITS = 16  # as the converter's own integral-part rule
CLASSES = {"d": "0-9", "w": "a-zA-Z0-9_", "s": " \\t\\n\\r"}


class _Converter(SchemaConverter):
    def visit(self, schema: dict, name: str) -> str:
        bounded = isinstance(schema, dict) and any(k in schema for k in json_schema.BOUNDS)
        if bounded and schema.get("type") == "integer":  # normalized: bounds are left on integers only
            low, high = json_schema.integer_bounds(schema)
            rule_name = name + "-" if name in RESERVED_NAMES else name or "root"
            return self._add_rule(rule_name, f"({integer_range(low, high)}) space")
        return super().visit(schema, name)

    def _visit_pattern(self, pattern: str, name: str) -> str:
        # The converter wants ^...$ and loses a top-level | without a group around it. The pattern is a
        # whole-string match either way, as in xgrammar (OpenVINO).
        inner = pattern.removeprefix("^")
        if not inner.endswith("\\$"):
            inner = inner.removesuffix("$")
        return super()._visit_pattern(f"^({_spell_out_classes(inner)})$", name)


def _spell_out_classes(pattern: str) -> str:
    """\\d, \\w and \\s as the character classes they stand for: the converter takes them for literals."""
    out, in_class, i = [], False, 0
    while i < len(pattern):
        if pattern[i] == "\\" and i + 1 < len(pattern):
            escape = pattern[i + 1]
            if escape in CLASSES:
                out.append(CLASSES[escape] if in_class else f"[{CLASSES[escape]}]")
            elif escape.lower() in CLASSES:  # \D, \W, \S: a negated class, which can't go inside [...]
                if in_class:
                    raise ValueError(f"pattern: \\{escape} inside [...] is not supported")
                out.append(f"[^{CLASSES[escape.lower()]}]")
            else:
                out.append(pattern[i : i + 2])
            i += 2
            continue
        if pattern[i] == "[" and not in_class:
            in_class = True
        elif pattern[i] == "]" and in_class:
            in_class = False
        out.append(pattern[i])
        i += 1
    return "".join(out)


@lru_cache(maxsize=64)  # tool schemas come back with every request of a conversation
def schema_to_gbnf(schema: str) -> str:
    """The GBNF grammar (root rule "root") of a checked JSON schema (JSON text); ValueError if it can't be made."""
    try:
        parsed = json.loads(schema)
        converter = _Converter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
        converter.visit(converter.resolve_refs(parsed, "input"), "")
        return converter.format_grammar()
    except ValueError:
        raise
    except Exception as exc:  # the converter asserts on what it cannot express
        raise ValueError(str(exc) or type(exc).__name__) from None


def integer_range(low: int | None, high: int | None) -> str:
    """GBNF alternatives matching the decimal integers from `low` to `high` (None: unbounded), as JSON writes them."""
    alternatives = []
    if low is None or low < 0:  # negatives: "-" and a magnitude
        smallest = 1 if high is None or high >= 0 else -high
        alternatives.append(f'"-" ({_naturals(smallest, None if low is None else -low)})')
    if high is None or high >= 0:
        alternatives.append(_naturals(max(low or 0, 0), high))
    return " | ".join(f"({a})" for a in alternatives)


def _naturals(low: int, high: int | None) -> str:
    """low..high (high None: up to MAX_DIGITS digits), split by digit count since only 0 starts with 0."""
    top = 10**MAX_DIGITS - 1 if high is None else high
    parts = []
    for digits in range(len(str(low)), len(str(top)) + 1):
        first, last = max(low, 10 ** (digits - 1) if digits > 1 else 0), min(top, 10**digits - 1)
        parts.append(_same_length(str(first), str(last)))
    return " | ".join(f"({p})" for p in parts)


def _same_length(low: str, high: str) -> str:
    """Digit strings of one length from `low` to `high`: the low end, the full middle, the high end."""
    if low == high:
        return f'"{low}"'
    if low[0] == high[0]:
        return f'"{low[0]}" ({_same_length(low[1:], high[1:])})'
    rest = len(low) - 1
    any_rest = " [0-9]" * rest
    first, last = int(low[0]), int(high[0])
    parts = []
    if low[1:] != "0" * rest:
        parts.append(f'"{low[0]}" ({_same_length(low[1:], "9" * rest)})')
        first += 1
    high_end = None
    if high[1:] != "9" * rest:
        high_end = f'"{high[0]}" ({_same_length("0" * rest, high[1:])})'
        last -= 1
    if first <= last:
        parts.append(f"[{first}-{last}]{any_rest}")
    if high_end:
        parts.append(high_end)
    return " | ".join(parts)
