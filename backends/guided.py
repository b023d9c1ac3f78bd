"""Structured output (guided decoding) and OpenAI's penalties: what a request may ask for, checked
once for both engines.

Tensor names are tensorrtllm_backend's: `guided_decoding_guide_type` and `guided_decoding_guide`.
Preprocessing accepts the two guide types the CPU engine can honour and hands the engine one form:

- `json`: any JSON object (OpenAI's `response_format: {"type": "json_object"}`). No guide is sent.
  The engine gets `json_schema` with ANY_OBJECT, so the CPU and GPU engines both produce an
  object (TensorRT-LLM's own `json` guide would also admit arrays, strings and numbers).
- `json_schema`: the guide is a JSON schema (a JSON object); the output follows it.

`regex` and `ebnf_grammar` (TensorRT-LLM's other guide types) are refused with what to send
instead. Decoding is constrained by a grammar inside the engine (xgrammar in both openvino-genai
and TensorRT-LLM), never retried. The grammar ends the output only where the JSON is complete, so
a max_tokens that runs out first leaves it cut short (finish_reason "length"), as with OpenAI.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from backends.errors import RequestError

JSON, JSON_SCHEMA = "json", "json_schema"
GUIDE_TYPES = (JSON, JSON_SCHEMA)
NOT_ON_CPU = ("regex", "ebnf_grammar")     # TensorRT-LLM's other guide types
ANY_OBJECT = '{"type": "object", "additionalProperties": true}'
MAX_GUIDE_BYTES = 256 * 1024
PENALTY_RANGE = (-2.0, 2.0)                # OpenAI's, and openvino-genai's GenerationConfig checks

# What xgrammar's JSON-schema converter understands; anything else it refuses while the engine steps,
# which would fail every request in flight, so it is refused here first.
_TYPES = {"null", "boolean", "object", "array", "number", "string", "integer"}
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMAS = ("items", "additionalProperties", "additionalItems", "unevaluatedProperties",
               "unevaluatedItems", "propertyNames", "contains", "not", "if", "then", "else")


@dataclass(frozen=True)
class Penalties:
    presence: float = 0.0    # subtracted once from the logit of every token already generated
    frequency: float = 0.0   # subtracted once per earlier occurrence

    @property
    def any(self) -> bool:
        return bool(self.presence or self.frequency)


def check_penalties(presence: float | None, frequency: float | None) -> Penalties:
    low, high = PENALTY_RANGE
    for name, value in (("presence_penalty", presence), ("frequency_penalty", frequency)):
        if value is not None and not (low <= value <= high):    # also refuses NaN
            raise RequestError(f"{name} must be between {low:g} and {high:g} (0 = off), got {value}")
    return Penalties(presence or 0.0, frequency or 0.0)


@dataclass(frozen=True)
class Guide:
    """What the engine is told: always json_schema and a schema (a `json` request becomes ANY_OBJECT)."""

    type: str
    guide: str


def _text(value: bytes | str | None, what: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        if len(value) > MAX_GUIDE_BYTES:
            raise RequestError(f"{what} is {len(value)} bytes; at most {MAX_GUIDE_BYTES} are allowed")
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as e:
            raise RequestError(f"{what} is not valid UTF-8 (bad byte at position {e.start}): send UTF-8 text") from None
    return value


def check_guide(guide_type: bytes | str | None, guide: bytes | str | None) -> Guide | None:
    """Validate a request's guide; None when it asks for none. Raises RequestError with the fix."""
    kind = (_text(guide_type, "guided_decoding_guide_type") or "").strip()
    text = _text(guide, "guided_decoding_guide") or ""
    if not kind:
        if text.strip():
            raise RequestError("guided_decoding_guide was sent without guided_decoding_guide_type: "
                               "send guided_decoding_guide_type json_schema with it")
        return None
    if kind in NOT_ON_CPU:
        raise RequestError(f"guided_decoding_guide_type {kind} is not supported (the CPU engine constrains output "
                           "to JSON only): use json (any JSON object) or json_schema (a JSON schema as the guide)")
    if kind not in GUIDE_TYPES:
        raise RequestError(f"unknown guided_decoding_guide_type {kind!r}: use json (any JSON object) or "
                           "json_schema (a JSON schema as the guide)")
    if kind == JSON:
        if text.strip():
            raise RequestError("guided_decoding_guide_type json takes no guide (it means any JSON object): "
                               "send the schema with guided_decoding_guide_type json_schema, or drop the guide")
        return Guide(JSON_SCHEMA, ANY_OBJECT)
    if not text.strip():
        raise RequestError("guided_decoding_guide_type json_schema needs the schema: send it as "
                           "guided_decoding_guide (a JSON object)")
    return Guide(JSON_SCHEMA, check_schema(text))


def check_schema(text: str) -> str:
    """A JSON schema the engine's grammar compiler accepts, as compact JSON; RequestError otherwise."""
    try:
        schema = json.loads(text)
    except ValueError as e:
        raise RequestError(f"guided_decoding_guide is not valid JSON ({e}): send a JSON schema") from None
    if not isinstance(schema, dict):
        raise RequestError(f"guided_decoding_guide must be a JSON schema object, got a JSON {_kind(schema)}: "
                           'send e.g. {"type": "object", "properties": {...}}')
    _check_node(schema, schema, "schema")
    return json.dumps(schema, separators=(",", ":"), ensure_ascii=False)


def _kind(value) -> str:
    return {list: "array", str: "string", bool: "boolean", type(None): "null"}.get(type(value), "number")


def _check_node(node, root: dict, where: str) -> None:
    if isinstance(node, bool):
        return                          # true / false schemas
    if not isinstance(node, dict):
        raise RequestError(f"guided_decoding_guide: {where} must be a schema object, got a JSON {_kind(node)}")
    kinds = node.get("type")
    if kinds is not None:
        for k in (kinds if isinstance(kinds, list) else [kinds]):
            if k not in _TYPES:
                raise RequestError(f"guided_decoding_guide: {where} has type {k!r}; JSON schema types are "
                                   f"{', '.join(sorted(_TYPES))}")
    ref = node.get("$ref")
    if ref is not None:
        _resolve(ref, root, where)
    pattern = node.get("pattern")
    if pattern is not None:
        _check_pattern(pattern, f"{where}.pattern")
    for low, high in (("minimum", "maximum"), ("minLength", "maxLength"), ("minItems", "maxItems"),
                      ("minProperties", "maxProperties")):
        a, b = node.get(low), node.get(high)
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and a > b:
            raise RequestError(f"guided_decoding_guide: {where} has {low} {a} above {high} {b}: nothing can match")
    if "required" in node and not (isinstance(node["required"], list)
                                   and all(isinstance(r, str) for r in node["required"])):
        raise RequestError(f"guided_decoding_guide: {where}.required must be a list of property names")
    if "enum" in node and not (isinstance(node["enum"], list) and node["enum"]):
        raise RequestError(f"guided_decoding_guide: {where}.enum must be a non-empty list")
    for key in _SUBSCHEMA_MAPS:
        sub = node.get(key)
        if sub is not None:
            if not isinstance(sub, dict):
                raise RequestError(f"guided_decoding_guide: {where}.{key} must be an object of schemas")
            for name, child in sub.items():
                _check_node(child, root, f"{where}.{key}.{name}")
    for key in _SUBSCHEMA_LISTS:
        sub = node.get(key)
        if sub is not None:
            if not isinstance(sub, list) or not sub:
                raise RequestError(f"guided_decoding_guide: {where}.{key} must be a non-empty list of schemas")
            for i, child in enumerate(sub):
                _check_node(child, root, f"{where}.{key}[{i}]")
    for key in _SUBSCHEMAS:
        if key in node:
            child = node[key]
            if key == "items" and isinstance(child, list):     # draft-7 tuple form
                raise RequestError(f"guided_decoding_guide: {where}.items is a list: use prefixItems for "
                                   "per-position schemas (items takes one schema)")
            _check_node(child, root, f"{where}.{key}")


def _check_pattern(pattern, where: str) -> None:
    """A pattern Python compiles and without what xgrammar's regex converter refuses: lookaround,
    named groups and inline flags ("(?" other than "(?:"), backreferences."""
    try:
        re.compile(pattern)
    except (re.error, TypeError) as e:
        raise RequestError(f"guided_decoding_guide: {where} is not a valid regular expression ({e})") from None
    for m in re.finditer(r"\\.|\(\?.?", pattern):
        token = m.group()
        if token.startswith("(?") and token != "(?:":
            raise RequestError(f"guided_decoding_guide: {where} uses {token!r}: lookaround, named groups and "
                               "inline flags are not supported; use plain and (?:...) groups")
        if token[0] == "\\" and token[1:].isdigit() and token[1] != "0":
            raise RequestError(f"guided_decoding_guide: {where} uses the backreference {token!r}, which is not "
                               "supported")


def _resolve(ref, root: dict, where: str) -> None:
    if not isinstance(ref, str) or not (ref == "#" or ref.startswith("#/")):
        raise RequestError(f"guided_decoding_guide: {where}.$ref {ref!r} is not a reference inside the schema: "
                           "put the definition under $defs and refer to it as #/$defs/<name>")
    node = root
    for part in ref[2:].split("/") if ref != "#" else []:
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            raise RequestError(f"guided_decoding_guide: {where}.$ref {ref!r} points at nothing in the schema")
