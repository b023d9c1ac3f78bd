"""API keys: stored hashed only, atomic writes, duplicate names refused, and a running guard that
sees revocations and new limits within a second, without restart."""

from __future__ import annotations

import json
import os
import stat
import time

import pytest

from backends.errors import InvalidArgumentError
from builder.serve.gateway.auth import KeyGuard, bearer
from builder.serve.gateway.errors import ApiError
from builder.serve.gateway.keys import KEYS_FILE, KeyStore, hash_key


def test_create_returns_a_key_stored_only_as_its_hash(tmp_path):
    store = KeyStore(tmp_path)
    key = store.create("app", rate_limit_per_min=10)
    assert key.startswith("st-") and len(key) == 43
    text = (tmp_path / KEYS_FILE).read_text()
    assert key not in text and hash_key(key) in text
    assert stat.S_IMODE(os.stat(tmp_path / KEYS_FILE).st_mode) == 0o600
    assert store.verify(key).name == "app"
    assert store.verify(key + "x") is None and store.verify("") is None
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_list_shows_names_and_limits_never_keys(tmp_path):
    store = KeyStore(tmp_path)
    key = store.create("a")
    store.create("b", rate_limit_per_min=5)
    listed = store.list()
    assert [(k.name, k.rate_limit_per_min, k.last_used) for k in listed] == [("a", None, None), ("b", 5, None)]
    assert key not in repr(listed)


def test_duplicate_name_is_refused_with_the_fix(tmp_path):
    store = KeyStore(tmp_path)
    store.create("app")
    with pytest.raises(InvalidArgumentError, match="revoke"):
        store.create("app")


@pytest.mark.parametrize("name", ["", "has space", "-lead", "x" * 65, "a/b"])
def test_bad_names_are_refused(tmp_path, name):
    with pytest.raises(InvalidArgumentError):
        KeyStore(tmp_path).create(name)


def test_bad_rate_limit_is_refused(tmp_path):
    with pytest.raises(InvalidArgumentError):
        KeyStore(tmp_path).create("a", rate_limit_per_min=0)


def test_revoke_unknown_name_says_how_to_list(tmp_path):
    with pytest.raises(InvalidArgumentError, match="api-keys list"):
        KeyStore(tmp_path).revoke("nope")


def test_guard_sees_revocation_within_a_second(tmp_path):
    store = KeyStore(tmp_path)
    key = store.create("app")
    guard = KeyGuard(tmp_path)
    assert guard.check(f"Bearer {key}").name == "app"
    store.revoke("app")
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        try:
            guard.check(f"Bearer {key}")
        except ApiError as e:
            assert e.status == 401 and e.code == "invalid_api_key"
            return
        time.sleep(0.02)
    pytest.fail("revocation not seen within a second")


def test_guard_applies_a_new_rate_limit_within_a_second(tmp_path):
    store = KeyStore(tmp_path)
    key = store.create("app")
    guard = KeyGuard(tmp_path)
    guard.check(f"Bearer {key}")
    store.set_rate_limit("app", 1)
    time.sleep(0.3)
    guard.check(f"Bearer {key}")
    with pytest.raises(ApiError) as e:
        guard.check(f"Bearer {key}")
    assert e.value.status == 429 and 1 <= int(e.value.headers["Retry-After"]) <= 60


def test_guard_keeps_last_used_in_memory_and_flushes_to_the_usage_file(tmp_path):
    store = KeyStore(tmp_path)
    key = store.create("app")
    before = (tmp_path / KEYS_FILE).read_bytes()
    guard = KeyGuard(tmp_path)
    guard.check(f"Bearer {key}")
    assert store.list()[0].last_used is None
    guard.flush_usage()
    assert store.list()[0].last_used == pytest.approx(time.time(), abs=5)
    assert (tmp_path / KEYS_FILE).read_bytes() == before, "the key file stays the CLI's"
    assert key not in json.dumps(json.loads((tmp_path / "api-keys-usage.json").read_text()))


def test_no_key_file_means_every_key_is_refused_with_how_to_create_one(tmp_path):
    with pytest.raises(ApiError) as e:
        KeyGuard(tmp_path).check("Bearer st-anything")
    assert e.value.status == 401 and "api-keys create" in e.value.message


@pytest.mark.parametrize("header", [None, "", "Basic abc", "Bearer ", "st-key"])
def test_bearer_header_is_required(header):
    with pytest.raises(ApiError) as e:
        bearer(header)
    assert e.value.status == 401 and e.value.headers["WWW-Authenticate"] == "Bearer"


def test_damaged_key_file_keeps_the_keys_read_before(tmp_path):
    store = KeyStore(tmp_path)
    key = store.create("app")
    guard = KeyGuard(tmp_path)
    guard.check(f"Bearer {key}")
    (tmp_path / KEYS_FILE).write_text("{not json")
    time.sleep(0.3)
    assert guard.check(f"Bearer {key}").name == "app"


def test_a_new_key_works_at_once(tmp_path):
    store = KeyStore(tmp_path)
    store.create("first")
    guard = KeyGuard(tmp_path)
    guard.records()
    key = store.create("second")
    assert guard.check(f"Bearer {key}").name == "second"
