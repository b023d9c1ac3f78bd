"""Pre/postprocessing logic without Triton: chat templates against transformers, context fitting,
sampling validation, and streaming detokenization on the real SmolLM2 tokenizer."""

from __future__ import annotations

import json

import numpy as np
import pytest

from backends.context import fit_chat, fit_prompt
from backends.detokenize import StreamDetokenizer, detokenize
from backends.errors import RequestError
from backends.postprocess import TextStream, whole
from backends.preprocess import ClientRequest, preprocess
from backends.sampling import check_sampling
from backends.tokenization import ModelTokenizer, parse_messages
from backends.word_lists import list_to_words, words_to_list

TEXTS = [
    "Hello, world! How are you today?",
    "Café crème, déjà vu, naïve façade — ça va très bien.",
    "Emoji: 👩‍💻 writes code 🐍🔥 and 🇫🇷 flags",
    "日本語のテキストと한국어 텍스트",
    "def f(x):\n    return x ** 2  # squares\n\n",
    "   leading and trailing spaces   ",
]

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Explain gravity. 🌍"}],
]


@pytest.fixture(scope="module")
def tok(smollm2) -> ModelTokenizer:
    return ModelTokenizer.load(smollm2.hf_dir)


def test_chat_template_matches_transformers(tok, smollm2):
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(smollm2.hf_dir)
    for chat in CHATS:
        expected = reference.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        assert tok.render_chat(chat) == expected
        assert tok.encode_chat(chat) == reference(expected, add_special_tokens=False)["input_ids"]


def test_encoding_matches_transformers(tok, smollm2):
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(smollm2.hf_dir)
    for text in TEXTS:
        assert tok.encode(text) == reference(text)["input_ids"]


def test_special_ids_come_from_the_model(tok):
    assert tok.tokenizer.id_to_token(tok.eos_token_id) == "<|im_end|>"
    assert tok.pad_token_id >= 0


@pytest.mark.parametrize("text", TEXTS)
def test_stream_detokenization_token_by_token_equals_whole_decode(tok, text):
    ids = tok.encode(text)
    stream = StreamDetokenizer(tok)
    pieces = [stream.add([i]) for i in ids] + [stream.finish()]
    assert "".join(pieces) == tok.decode(ids)
    assert all("\ufffd" not in p for p in pieces)  # no half characters shown


def test_emoji_split_across_tokens_is_held_back(tok):
    ids = tok.encode("🐍")
    assert len(ids) > 1, "the test needs an emoji that spans several tokens"
    stream = StreamDetokenizer(tok)
    assert stream.add(ids[:1]) == ""
    assert "".join(stream.add([i]) for i in ids[1:]) + stream.finish() == "🐍"


def test_stop_string_across_chunks_is_trimmed(tok):
    text = "The answer is 42. END and more text"
    stream = TextStream(tok, end_id=tok.eos_token_id, max_tokens=100, stop_words=["END"])
    shown = ""
    for i in tok.encode(text):
        shown += stream.add([i]).text
        if stream.stopped:
            break
    final = stream.end()
    assert stream.stopped and (shown + final.text) == "The answer is 42. "
    assert final.finish_reason == "stop"


def test_partial_stop_prefix_is_released_at_the_end(tok):
    stream = TextStream(tok, end_id=tok.eos_token_id, max_tokens=3, stop_words=["STOPHERE"])
    shown = "".join(stream.add([i]).text for i in tok.encode("go STOP"))
    assert "STOP" not in shown  # held back: it could have become STOPHERE
    assert shown + stream.end().text == "go STOP"


def test_whole_output_reasons(tok):
    ids = tok.encode("Paris is the capital.") + [tok.eos_token_id]
    assert whole(tok, ids, tok.eos_token_id, 50, []).finish_reason == "stop"
    assert whole(tok, ids[:3], tok.eos_token_id, 3, []).finish_reason == "length"
    text, stopped = detokenize(tok, ids, ["capital"])
    assert stopped and text == "Paris is the "


def test_fit_prompt_refuses_with_the_numbers():
    with pytest.raises(RequestError) as e:
        fit_prompt(list(range(100)), 50, 128, truncate=False)
    msg = str(e.value)
    assert "100 tokens" in msg and "max_tokens is 50" in msg and "128" in msg and "truncate" in msg


def test_fit_prompt_truncates_oldest_and_clamps():
    fitted = fit_prompt(list(range(100)), 50, 128, truncate=True)
    assert fitted.ids == list(range(22, 100)) and fitted.max_tokens == 50
    assert "truncated from 100 to 78" in fitted.notice
    huge = fit_prompt(list(range(100)), 10_000, 128, truncate=True)
    assert len(huge.ids) == 64 and huge.max_tokens == 64 and "clamped from 10000 to 64" in huge.notice


@pytest.mark.parametrize("max_tokens", [0, -5])
def test_max_tokens_must_be_positive(max_tokens):
    for truncate in (False, True):
        with pytest.raises(RequestError, match="at least 1"):
            fit_prompt([1, 2, 3], max_tokens, 128, truncate)


def test_fit_chat_drops_oldest_non_system_messages(tok):
    chat = [{"role": "system", "content": "Be brief."}]
    chat += [{"role": "user" if i % 2 == 0 else "assistant", "content": f"message {i} " * 30} for i in range(8)]
    full = len(tok.encode_chat(chat))
    fitted = fit_chat(chat, tok.encode_chat, 64, full - 100, truncate=True)
    assert len(fitted.ids) + fitted.max_tokens <= full - 100
    assert fitted.ids[:len(tok.encode_chat(chat[:1])) - 3] == tok.encode_chat(chat[:1])[:-3]  # system kept
    assert "dropped" in fitted.notice and "oldest messages" in fitted.notice
    text = tok.decode(fitted.ids)
    assert "message 7" in text and "message 0 " not in text


@pytest.mark.parametrize("kwargs,match", [
    ({"temperature": -0.1}, "temperature"), ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"),
    ({"top_k": -1}, "top_k"), ({"seed": -1}, "random_seed"),
])
def test_sampling_out_of_range_is_refused(kwargs, match):
    with pytest.raises(RequestError, match=match):
        check_sampling(**kwargs)


def test_sampling_defaults_to_greedy_and_draws_a_seed_when_sampling():
    assert check_sampling().greedy and check_sampling(temperature=0.0, top_k=50).greedy
    a, b = check_sampling(temperature=0.7), check_sampling(temperature=0.7)
    assert not a.greedy and a.seed != b.seed
    assert check_sampling(temperature=0.7, seed=5).seed == 5


def test_words_round_trip(tok):
    words = ["\n\nUser:", "END", "ö"]
    flat = words_to_list(tok, words)
    assert flat.shape[0] == 2
    assert [tok.decode(w) for w in list_to_words(flat)] == words
    assert list_to_words(words_to_list(tok, [])) == []


@pytest.mark.parametrize("raw,match", [
    (b"not json", "not valid JSON"), (b"{}", "non-empty JSON list"), (b"[]", "non-empty JSON list"),
    (b'[{"role": "user"}]', "role and content"), (b'[{"role": "pirate", "content": "arr"}]', "unknown role"),
])
def test_malformed_messages_are_refused(raw, match):
    with pytest.raises(RequestError, match=match):
        parse_messages(raw.decode())


@pytest.mark.parametrize("req,match", [
    (ClientRequest(text_input=b"hi"), "max_tokens is required"),
    (ClientRequest(max_tokens=5), "no prompt"),
    (ClientRequest(text_input=b"   ", max_tokens=5), "empty"),
    (ClientRequest(text_input=b"\xff\xfe bad", max_tokens=5), "not valid UTF-8"),
    (ClientRequest(text_input=b"hi", messages=b"[]", max_tokens=5), "either text_input or messages"),
    (ClientRequest(text_input=b"hi", max_tokens=5, end_id=10**9), "end_id"),
])
def test_preprocess_refuses_bad_requests(tok, req, match):
    with pytest.raises(RequestError, match=match):
        preprocess(tok, req, 2048)


def test_preprocess_outputs_engine_tensors(tok):
    chat = json.dumps(CHATS[0]).encode()
    out = preprocess(tok, ClientRequest(messages=chat, max_tokens=16, stop_words=[b"END"], temperature=0.5,
                                        random_seed=7), 2048)
    assert out["INPUT_ID"].tolist() == tok.encode_chat(CHATS[0])
    assert out["REQUEST_INPUT_LEN"][0] == len(out["INPUT_ID"]) and out["REQUEST_OUTPUT_LEN"][0] == 16
    assert out["OUT_END_ID"][0] == tok.eos_token_id and out["OUT_RANDOM_SEED"][0] == 7
    assert out["OUT_TOP_K"][0] == 0 and np.isclose(out["OUT_TEMPERATURE"][0], 0.5)
    greedy = preprocess(tok, ClientRequest(text_input=b"hi", max_tokens=4), 2048)
    assert greedy["OUT_TOP_K"][0] == 1
