"""API keys through the README's `serve`: nginx in front of Triton and the OpenAI gateway, keys
required on /v1, Triton's /v2 HTTP API and gRPC, health checks open, revocation and rate limits
applied to the running deployment within a second, keys and allowed IPs combined, `--public`."""

from __future__ import annotations

import json
import stat
import time

import httpx
import openai
import pytest
import tritonclient.grpc as grpcclient
from conftest import TINY_NAME

from tests.support.serve import Serve

pytestmark = pytest.mark.slow
MODEL = f"{TINY_NAME}:fp32"
TRITON_MODEL = f"{TINY_NAME}-fp32"


@pytest.fixture(scope="module")
def deployment(tiny_repository, tmp_path_factory):
    with Serve(tiny_repository, tmp_path_factory.mktemp("serve-keys"), "--allowed-ip", "127.0.0.1") as dep:
        yield dep


def test_first_serve_says_how_to_create_a_key(deployment):
    out = deployment.output.read_text()
    assert f"OpenAI   {deployment.url}/v1" in out and "API keys required" in out
    assert "no API key yet: every call needs one; create it with `serverless-triton api-keys create NAME" in out


def test_keys_are_printed_once_and_stored_hashed(deployment):
    key = deployment.create_key("listing", "--rate-limit", "120/min")
    assert key.startswith("st-") and len(key) > 30
    stored = (deployment.state / "api-keys.json").read_text()
    assert key not in stored and "listing" in stored
    assert stat.S_IMODE((deployment.state / "api-keys.json").stat().st_mode) == 0o600
    listing = deployment.api_keys("list")
    assert listing.returncode == 0 and "listing" in listing.stdout and "120/min" in listing.stdout
    assert key not in listing.stdout and key[:7] in listing.stdout
    again = deployment.api_keys("create", "listing")
    assert again.returncode == 1 and again.stderr.strip().splitlines() == [
        "Error: a key named 'listing' already exists: pick another name, or revoke it first "
        "(serverless-triton api-keys revoke listing)"]
    bad = deployment.api_keys("create", "x", "--rate-limit", "fast")
    assert bad.returncode == 1 and "write e.g. --rate-limit 60/min" in bad.stderr


def test_every_endpoint_needs_a_key_but_health(deployment):
    key = deployment.create_key("app")
    models = deployment.openai(key).models.list()
    assert MODEL in [m.id for m in models]
    answer = deployment.openai(key).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0)
    assert answer.usage.completion_tokens >= 1 and answer.choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.AuthenticationError):
        deployment.openai("st-not-a-key").models.list()
    refused = deployment.generate(TRITON_MODEL, None)
    assert refused.status_code == 401 and "api-keys create" in refused.json()["error"]
    assert deployment.generate(TRITON_MODEL, "st-not-a-key").status_code == 401
    assert deployment.generate(TRITON_MODEL, key).status_code == 200
    assert deployment.grpc_infer(TRITON_MODEL, None) == "UNAUTHENTICATED"
    assert deployment.grpc_infer(TRITON_MODEL, "st-not-a-key") == "UNAUTHENTICATED"
    assert deployment.grpc_infer(TRITON_MODEL, key) == "ok"
    assert httpx.get(f"{deployment.url}/v2/health/ready", timeout=10).status_code == 200   # load balancers
    with grpcclient.InferenceServerClient(f"127.0.0.1:{deployment.grpc}") as c:
        assert c.is_server_ready() and c.is_model_ready(TRITON_MODEL)


def test_revocation_applies_within_a_second(deployment):
    key = deployment.create_key("short-lived")
    assert deployment.generate(TRITON_MODEL, key).status_code == 200 and deployment.grpc_infer(TRITON_MODEL, key) == "ok"
    assert deployment.api_keys("revoke", "short-lived").returncode == 0
    revoked = time.monotonic()
    time.sleep(1.0)
    assert deployment.generate(TRITON_MODEL, key).status_code == 401
    assert deployment.grpc_infer(TRITON_MODEL, key) == "UNAUTHENTICATED"
    with pytest.raises(openai.AuthenticationError):
        deployment.openai(key).models.list()
    assert time.monotonic() - revoked < 10
    missing = deployment.api_keys("revoke", "short-lived")
    assert missing.returncode == 1 and "no key named 'short-lived'" in missing.stderr


def test_rate_limits_answer_429_with_retry_after(deployment):
    key = deployment.create_key("limited", "--rate-limit", "3/min")
    assert [deployment.generate(TRITON_MODEL, key).status_code for _ in range(3)] == [200, 200, 200]
    limited = deployment.generate(TRITON_MODEL, key)
    assert limited.status_code == 429 and 1 <= int(limited.headers["Retry-After"]) <= 60
    assert "rate limit" in limited.json()["error"]
    assert deployment.grpc_infer(TRITON_MODEL, key) == "RESOURCE_EXHAUSTED"
    with pytest.raises(openai.RateLimitError):
        deployment.openai(key).models.list()
    assert deployment.api_keys("limit", "limited", "none").returncode == 0   # lifted on the running deployment
    time.sleep(1.0)
    assert deployment.generate(TRITON_MODEL, key).status_code == 200


def test_keys_and_allowed_ips_both_apply(deployment):
    key = deployment.create_key("elsewhere")
    assert deployment.generate(TRITON_MODEL, key, source="127.0.0.1").status_code == 200
    refused = deployment.generate(TRITON_MODEL, key, source="127.0.0.2")      # a good key from an address not allowed
    assert refused.status_code == 403 and "allowed IPs" in refused.text


def test_public_serve_needs_no_key(tiny_repository, tmp_path):
    with Serve(tiny_repository, tmp_path, "--public") as dep:
        out = dep.output.read_text()
        assert "API keys off (--public)" in out and "no API key yet" not in out
        assert dep.generate(TRITON_MODEL, None).status_code == 200 and dep.grpc_infer(TRITON_MODEL, None) == "ok"
        models = httpx.get(f"{dep.url}/v1/models", timeout=30)
        assert models.status_code == 200 and MODEL in json.dumps(models.json())
