"""Penalties and structured output on a real CPU engine, in process: the tiny random Llama (fast).

A random model never finishes a JSON object reliably (it pads with whitespace, which JSON allows
anywhere), so object outputs are checked as JSON prefixes while running and as whole documents when
they stop; scalar schemas leave no room for padding and must parse every time. SmolLM2 through the
OpenAI API is in tests/integration/test_openai_api.py.
"""

from __future__ import annotations

import json
import threading
from collections import Counter

import pytest
from conftest import TINY_NAME

from backends.contract.naming import DeploymentName
from backends.guided import Penalties, check_guide
from backends.llm_engine import ContinuousBatchingEngine, GenerationRequest
from backends.sampling import Sampling
from backends.tokenization import ModelTokenizer

pytestmark = pytest.mark.slow
EOS = 2
PROMPTS = ["hello world", "Give me JSON", "The cat", "{", "a b c d e f", "Once upon a time", "1 2 3", "JSON:",
           "Answer in JSON", "x"]
PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"]}


@pytest.fixture(scope="module")
def tiny(tiny_repository):
    dep = DeploymentName(TINY_NAME, "fp32")
    engine = ContinuousBatchingEngine(tiny_repository / dep.llm_engine / "1" / "engine", 256, 4)
    tok = ModelTokenizer.load(tiny_repository / dep.preprocessing / "1" / "tokenizer")
    yield engine, tok
    engine.shutdown()


class Result:
    def __init__(self):
        self.ids: list[int] = []
        self.reason = ""
        self.done = threading.Event()

    def __call__(self, ids, final, reason):
        self.ids += list(ids)
        if final:
            self.reason = reason
            self.done.set()


def start(engine, ids, n=200, **kw) -> tuple[Result, GenerationRequest]:
    r = Result()
    req = GenerationRequest(ids, n, kw.pop("end_id", EOS), Sampling(), r, **kw)
    engine.submit(req)
    return r, req


def generate(engine, ids, n=200, **kw) -> Result:
    r, _ = start(engine, ids, n, **kw)
    assert r.done.wait(120)
    return r


def schema_of(kind: str, schema: dict | None = None) -> str:
    return check_guide(kind, json.dumps(schema) if schema is not None else None).guide


def is_json_prefix(text: str) -> bool:
    """True if `text` is valid JSON or could become valid JSON by appending characters."""
    class End(Exception):
        pass

    s, n = text, len(text)

    def ws(i):
        while i < n and s[i] in " \t\n\r":
            i += 1
        if i == n:
            raise End
        return i

    def value(i):
        i = ws(i)
        c = s[i]
        if c == "{":
            i = ws(i + 1)
            if s[i] == "}":
                return i + 1
            while True:
                if s[ws(i)] != '"':
                    raise ValueError(i)
                i = ws(string(ws(i)))
                if s[i] != ":":
                    raise ValueError(i)
                i = ws(value(i + 1))
                if s[i] == "}":
                    return i + 1
                if s[i] != ",":
                    raise ValueError(i)
                i += 1
        if c == "[":
            i = ws(i + 1)
            if s[i] == "]":
                return i + 1
            while True:
                i = ws(value(i))
                if s[i] == "]":
                    return i + 1
                if s[i] != ",":
                    raise ValueError(i)
                i += 1
        if c == '"':
            return string(i)
        for word in ("true", "false", "null"):
            if word.startswith(s[i:i + len(word)]) and s[i] == word[0]:
                if n - i < len(word):
                    raise End
                return i + len(word)
        j = i + (s[i] == "-")
        if j == n:
            raise End
        if not s[j].isdigit():
            raise ValueError(i)
        while j < n and (s[j].isdigit() or s[j] in ".eE+-"):
            j += 1
        return j

    def string(i):
        i += 1
        while i < n:
            if s[i] == "\\":
                i += 2
                continue
            if s[i] == '"':
                return i + 1
            i += 1
        raise End

    try:
        end = value(0)
        return s[end:].strip() == ""
    except End:
        return True
    except (ValueError, IndexError):
        return False


def test_prefix_checker():
    for ok in ('{"a": [1, 2', '{"a', '{"a": tr', '{', '{"a": {"b": -1.5e3}, "c": nul', '{"x": "y"}'):
        assert is_json_prefix(ok), ok
    for bad in ('{"a" 1', '{"a": x', '{} extra', "[1,, 2]", "{1: 2}"):
        assert not is_json_prefix(bad), bad


@pytest.mark.parametrize("schema,check", [
    ({"type": "integer", "minimum": 0, "maximum": 99}, lambda v: type(v) is int and 0 <= v <= 99),
    ({"type": "boolean"}, lambda v: isinstance(v, bool)),
    ({"enum": ["red", "green", "blue"]}, lambda v: v in ("red", "green", "blue")),
])
def test_scalar_schemas_always_parse_and_follow_the_schema(tiny, schema, check):
    engine, tok = tiny
    guide = schema_of("json_schema", schema)
    free = [tok.decode(generate(engine, tok.encode(p), 20).ids) for p in PROMPTS]
    assert sum(_parses(t) for t in free) <= 2, "the random model itself does not write JSON"
    for p in PROMPTS:
        r = generate(engine, tok.encode(p), json_schema=guide)
        value = json.loads(tok.decode(r.ids))
        assert r.reason == "stop" and check(value), (p, value)


def _parses(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except ValueError:
        return False


@pytest.mark.parametrize("kind,schema", [("json", None), ("json_schema", PERSON)])
def test_objects_are_grammar_constrained(tiny, kind, schema):
    """Every output is an object's prefix while it runs, and a whole valid object when it stops."""
    engine, tok = tiny
    guide = schema_of(kind, schema)
    stopped = 0
    for p in PROMPTS:
        r = generate(engine, tok.encode(p), json_schema=guide)
        text = tok.decode(r.ids)
        assert text.startswith("{") and is_json_prefix(text), (p, text)
        if r.reason == "stop":
            value = json.loads(text)
            stopped += 1
            assert isinstance(value, dict)
            if schema:
                assert isinstance(value["name"], str) and type(value["age"]) is int, value
        else:
            assert r.reason == "length" and len(r.ids) == 200
    assert stopped >= 1


def test_penalties_change_a_greedy_output_that_repeats_itself(tiny):
    """Under the grammar the random model repeats whitespace tokens; penalties must change that
    (and the same request without them must give the same tokens again: greedy is deterministic)."""
    engine, tok = tiny
    guide = schema_of("json_schema", PERSON)
    changed = 0
    repeats = {"none": 0, "frequency": 0, "presence": 0}
    for p in PROMPTS:
        ids = tok.encode(p)
        base = generate(engine, ids, 120, json_schema=guide).ids
        assert generate(engine, ids, 120, json_schema=guide).ids == base
        freq = generate(engine, ids, 120, json_schema=guide, penalties=Penalties(0.0, 2.0)).ids
        pres = generate(engine, ids, 120, json_schema=guide, penalties=Penalties(2.0, 0.0)).ids
        changed += (freq != base) + (pres != base)
        for name, out in (("none", base), ("frequency", freq), ("presence", pres)):
            repeats[name] += Counter(out).most_common(1)[0][1]
        assert is_json_prefix(tok.decode(freq)) and is_json_prefix(tok.decode(pres)), "the grammar still holds"
    assert changed >= 16, changed
    assert repeats["frequency"] < repeats["none"] and repeats["presence"] < repeats["none"], repeats
    # negative penalties are accepted too (they favour repetition)
    assert generate(engine, tok.encode(PROMPTS[0]), 20, penalties=Penalties(-2.0, -2.0)).reason == "length"


def test_a_structured_request_leaves_its_neighbours_alone(tiny):
    engine, tok = tiny
    ids = tok.encode("hello world")
    alone = generate(engine, ids, 60).ids
    plain, _ = start(engine, ids, 60)
    structured, _ = start(engine, ids, 60, json_schema=schema_of("json", None))
    assert plain.done.wait(120) and structured.done.wait(120)
    assert plain.ids == alone and tok.decode(structured.ids).startswith("{")


def test_a_schema_the_compiler_refuses_fails_alone_and_the_engine_recovers(tiny_repository):
    """backends.guided refuses what it knows xgrammar refuses; should a schema still fail inside a step,
    that request gets a 400-style refusal, the others in flight a retryable error, and the pipeline
    is built again (a failed step leaves openvino-genai's pipeline unusable)."""
    dep = DeploymentName(TINY_NAME, "fp32")
    engine = ContinuousBatchingEngine(tiny_repository / dep.llm_engine / "1" / "engine", 256, 2)
    try:
        reference = generate(engine, [5, 6, 7], 20).ids
        running, _ = start(engine, [10, 11, 12], 200, streaming=True, end_id=-1)
        bad, req = start(engine, [8, 9], 5, json_schema='{"type": "string", "pattern": "(?=a)a"}')
        assert bad.done.wait(60) and running.done.wait(60)
        assert bad.reason == "refused" and "Lookahead is not supported" in req.refusal, req.refusal
        assert "JSON schema" in req.refusal and ".cc" not in req.refusal
        assert running.reason == "error"
        assert generate(engine, [5, 6, 7], 20).ids == reference, "same settings after the rebuild"
        assert engine.rebuilds == 1
    finally:
        engine.shutdown()
