"""Penalties and structured output without an engine: what preprocessing accepts, refuses (with the
field and the fix) and hands the engine, and that every preprocessing output reaches an engine input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from backends.contract import tensors as contract
from backends.errors import RequestError
from backends.guided import ANY_OBJECT, Guide, Penalties, check_guide, check_penalties, check_schema
from backends.preprocess import ClientRequest, preprocess
from backends.tokenization import ModelTokenizer

PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"]}


@pytest.fixture(scope="module")
def tok(smollm2) -> ModelTokenizer:
    return ModelTokenizer.load(smollm2.hf_dir)


@pytest.mark.parametrize("presence,frequency", [(None, None), (-2.0, 2.0), (0.0, -1.5), (2.0, None)])
def test_penalties_in_range(presence, frequency):
    assert check_penalties(presence, frequency) == Penalties(presence or 0.0, frequency or 0.0)


@pytest.mark.parametrize("presence,frequency,name", [
    (2.01, None, "presence_penalty"), (None, -3.0, "frequency_penalty"), (float("nan"), None, "presence_penalty"),
    (None, float("inf"), "frequency_penalty")])
def test_penalties_out_of_range_name_the_field_and_range(presence, frequency, name):
    with pytest.raises(RequestError, match=rf"^{name} must be between -2 and 2 \(0 = off\), got"):
        check_penalties(presence, frequency)


def test_guides_the_engine_gets():
    assert check_guide(None, None) is None and check_guide(b"", b"") is None and check_guide(b"  ", None) is None
    assert check_guide(b"json", None) == Guide("json_schema", ANY_OBJECT)
    assert check_guide("json", "  ") == Guide("json_schema", ANY_OBJECT)
    assert json.loads(ANY_OBJECT) == {"type": "object", "additionalProperties": True}
    g = check_guide(b"json_schema", json.dumps(PERSON).encode())
    assert g.type == "json_schema" and json.loads(g.guide) == PERSON


@pytest.mark.parametrize("kind,guide,match", [
    (None, b'{"type": "object"}', "sent without guided_decoding_guide_type: send guided_decoding_guide_type json_schema"),
    (b"json_schema", None, "json_schema needs the schema"),
    (b"json_schema", b"  ", "json_schema needs the schema"),
    (b"json", b'{"type": "object"}', "json takes no guide"),
    (b"regex", b"\\d+", "regex is not supported .*use json .* or json_schema"),
    (b"ebnf_grammar", b"root ::= x", "ebnf_grammar is not supported"),
    (b"yaml", None, "unknown guided_decoding_guide_type 'yaml'"),
    (b"json_schema", b"{not json", "not valid JSON .*send a JSON schema"),
    (b"json_schema", b"[1, 2]", "must be a JSON schema object, got a JSON array"),
    (b"json_schema", b"\xff", "not valid UTF-8"),
    (b"json_schema", b"x" * (256 * 1024 + 1), "at most 262144"),
])
def test_bad_guides_are_refused_with_the_fix(kind, guide, match):
    with pytest.raises(RequestError, match=match):
        check_guide(kind, guide)


@pytest.mark.parametrize("schema,match", [
    ({"type": "foo"}, "type 'foo'"),
    ({"type": ["string", "date"]}, "type 'date'"),
    ({"type": "object", "properties": {"a": {"type": "str"}}}, r"schema.properties.a has type 'str'"),
    ({"$ref": "#/$defs/missing"}, "points at nothing"),
    ({"$ref": "https://example.com/s.json"}, "not a reference inside the schema"),
    ({"type": "string", "pattern": "(?=a)a"}, "lookaround"),
    ({"type": "string", "pattern": "(?P<x>a)"}, "named groups"),
    ({"type": "string", "pattern": "(a)\\1"}, "backreference"),
    ({"type": "string", "pattern": "[unclosed"}, "not a valid regular expression"),
    ({"type": "array", "items": [{"type": "string"}]}, "use prefixItems"),
    ({"type": "integer", "minimum": 5, "maximum": 2}, "minimum 5 above maximum 2"),
    ({"type": "object", "required": "a"}, "required must be a list"),
    ({"enum": []}, "enum must be a non-empty list"),
    ({"anyOf": []}, "anyOf must be a non-empty list"),
    ({"properties": {"a": 3}}, "schema.properties.a must be a schema object"),
])
def test_schemas_the_grammar_compiler_would_refuse(schema, match):
    """Each of these fails xgrammar's compiler inside the engine's step (verified on openvino-genai
    2026.4), which would fail every request in flight: refused before."""
    with pytest.raises(RequestError, match=match):
        check_schema(json.dumps(schema))


@pytest.mark.parametrize("schema", [
    PERSON, {}, {"type": ["string", "null"]}, {"const": {"a": 1}}, {"enum": ["a", 1, None]},
    {"type": "string", "pattern": "^\\d{3}-(?:[a-z]+)$", "maxLength": 9}, {"type": "string", "format": "email"},
    {"$defs": {"p": {"type": "integer"}}, "type": "object", "properties": {"x": {"$ref": "#/$defs/p"}}},
    {"type": "object", "properties": {"child": {"$ref": "#"}}}, {"oneOf": [{"type": "string"}, {"type": "integer"}]},
    {"type": "array", "prefixItems": [{"type": "string"}], "items": False, "minItems": 1},
    {"type": "object", "additionalProperties": {"type": "number"}, "title": "t", "description": "d"},
])
def test_schemas_that_compile_pass_unchanged(schema):
    assert json.loads(check_schema(json.dumps(schema))) == schema


def test_preprocess_sends_penalties_and_guide(tok):
    out = preprocess(tok, ClientRequest(text_input=b"hi", max_tokens=4), 2048)
    assert out["OUT_PRESENCE_PENALTY"].tolist() == [0.0] and out["OUT_FREQUENCY_PENALTY"].tolist() == [0.0]
    assert out["OUT_GUIDE_TYPE"].tolist() == [b""] and out["OUT_GUIDE"].tolist() == [b""]
    out = preprocess(tok, ClientRequest(text_input=b"hi", max_tokens=4, presence_penalty=1.5, frequency_penalty=-0.5,
                                        guided_decoding_guide_type=b"json"), 2048)
    assert np.isclose(out["OUT_PRESENCE_PENALTY"][0], 1.5) and np.isclose(out["OUT_FREQUENCY_PENALTY"][0], -0.5)
    assert out["OUT_PRESENCE_PENALTY"].dtype == np.float32
    assert out["OUT_GUIDE_TYPE"].tolist() == [b"json_schema"] and out["OUT_GUIDE"].tolist() == [ANY_OBJECT.encode()]
    out = preprocess(tok, ClientRequest(text_input=b"hi", max_tokens=4, guided_decoding_guide_type=b"json_schema",
                                        guided_decoding_guide=json.dumps(PERSON).encode()), 2048)
    assert json.loads(out["OUT_GUIDE"][0]) == PERSON
    # every preprocessing output has a place: an engine input (or what postprocessing needs)
    produced = {t.name for t in contract.PREPROCESSING_OUTPUTS}
    assert set(out) == produced
    assert {"OUT_PRESENCE_PENALTY", "OUT_FREQUENCY_PENALTY", "OUT_GUIDE_TYPE", "OUT_GUIDE"} <= set(
        contract.PREPROCESSING_TO_ENGINE)
    engine = {t.name: t for t in contract.ENGINE_INPUTS}
    pre = {t.name: t for t in contract.PREPROCESSING_OUTPUTS}
    for src, dst in contract.PREPROCESSING_TO_ENGINE.items():
        assert (pre[src].dtype, pre[src].dims) == (engine[dst].dtype, engine[dst].dims), (src, dst)
    ensemble = {t.name for t in contract.ENSEMBLE_INPUTS}
    assert {"presence_penalty", "frequency_penalty", "guided_decoding_guide_type", "guided_decoding_guide"} <= ensemble


@pytest.mark.parametrize("req,match", [
    (ClientRequest(text_input=b"hi", max_tokens=4, presence_penalty=2.5), "presence_penalty must be between -2 and 2"),
    (ClientRequest(text_input=b"hi", max_tokens=4, frequency_penalty=-2.5), "frequency_penalty must be between"),
    (ClientRequest(text_input=b"hi", max_tokens=4, guided_decoding_guide=b"{}"), "without guided_decoding_guide_type"),
    (ClientRequest(text_input=b"hi", max_tokens=4, guided_decoding_guide_type=b"json_schema"), "needs the schema"),
    (ClientRequest(text_input=b"hi", max_tokens=4, guided_decoding_guide_type=b"json", end_id=-1),
     "end_id -1 .* cannot be combined with guided decoding"),
])
def test_preprocess_refuses(tok, req, match):
    with pytest.raises(RequestError, match=match):
        preprocess(tok, req, 2048)
