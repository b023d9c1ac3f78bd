"""TLS on the public ports through the README's `serve --tls self-signed` (real nginx, gateway and
Triton): the openai client, tritonclient HTTP and gRPC with their SSL options, plain HTTP refused
with the fix, old protocols refused, a certificate swapped without a restart, and bad pairs
refused in one line before anything starts."""

from __future__ import annotations

import shutil
import socket
import ssl
import stat
import subprocess

import httpx
import numpy as np
import openai
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from click.testing import CliRunner
from conftest import TINY_NAME
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from tritonclient.utils import InferenceServerException

from builder.cli import main
from builder.serve.tls import self_signed
from tests.support.serve import CLI, Serve

pytestmark = pytest.mark.slow
MODEL = f"{TINY_NAME}:fp32"
TRITON_MODEL = f"{TINY_NAME}-fp32"


@pytest.fixture(scope="module")
def deployment(tiny_repository, tmp_path_factory):
    with Serve(tiny_repository, tmp_path_factory.mktemp("serve-tls"), "--tls", "self-signed") as dep:
        dep.key = dep.create_key("tls")
        dep.ca = dep.state / "tls" / "self-signed.crt"
        yield dep


def served_fingerprint(port: int) -> str:
    """SHA-256 of the certificate the server presents on a new connection (no verification)."""
    der = ssl.get_server_certificate(("127.0.0.1", port))
    cert = x509.load_pem_x509_certificate(der.encode())
    return cert.fingerprint(hashes.SHA256()).hex(":").upper()


def file_fingerprint(path) -> str:
    return x509.load_pem_x509_certificate(path.read_bytes()).fingerprint(hashes.SHA256()).hex(":").upper()


def tls_cli(command: str, deployment) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + ["tls", command, "--state-dir", str(deployment.state)], capture_output=True,
                          text=True, timeout=60, check=False)


def tokens_input(client_module):
    text = client_module.InferInput("text_input", [1, 1], "BYTES")
    text.set_data_from_numpy(np.array([[b"Hello"]], dtype=object))
    max_tokens = client_module.InferInput("max_tokens", [1, 1], "INT32")
    max_tokens.set_data_from_numpy(np.array([[4]], dtype=np.int32))
    return [text, max_tokens]


def test_serve_prints_https_endpoints_and_the_fingerprint(deployment):
    out = deployment.output.read_text()
    fingerprint = file_fingerprint(deployment.ca)
    assert f"OpenAI   https://127.0.0.1:{deployment.http}/v1" in out
    assert f"gRPC     127.0.0.1:{deployment.grpc}  (TLS)" in out
    assert f"SHA-256  {fingerprint}" in out and str(deployment.ca) in out
    assert served_fingerprint(deployment.http) == fingerprint == served_fingerprint(deployment.grpc)
    assert stat.S_IMODE((deployment.state / "tls" / "self-signed.key").stat().st_mode) == 0o600


def test_openai_client_over_https_with_the_certificate_as_ca(deployment):
    with httpx.Client(verify=ssl.create_default_context(cafile=deployment.ca), timeout=120) as http:
        client = openai.OpenAI(base_url=f"https://127.0.0.1:{deployment.http}/v1", api_key=deployment.key,
                               http_client=http, max_retries=0)
        answer = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                                max_tokens=4, temperature=0)
        assert answer.usage.completion_tokens >= 1
        chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                                     max_tokens=4, stream=True))
        assert chunks and chunks[-1].choices[0].finish_reason in ("stop", "length")
    with httpx.Client(timeout=30) as untrusting:   # the system CAs do not vouch for a self-signed pair
        client = openai.OpenAI(base_url=f"https://127.0.0.1:{deployment.http}/v1", api_key=deployment.key,
                               http_client=untrusting, max_retries=0)
        with pytest.raises(openai.APIConnectionError):
            client.models.list()


def test_tritonclient_http_with_ssl_options(deployment):
    url = f"127.0.0.1:{deployment.http}"
    headers = {"Authorization": f"Bearer {deployment.key}"}
    with httpclient.InferenceServerClient(url, ssl=True, ssl_options={"ca_certs": str(deployment.ca)}) as c:
        assert c.is_server_ready()
        result = c.infer(TRITON_MODEL, tokens_input(httpclient), headers=headers)
        assert result.as_numpy("text_output").size == 1
    with (httpclient.InferenceServerClient(url, ssl=True) as c,   # default CAs: verification fails
          pytest.raises(Exception, match="(?i)certificate verify failed")):
        c.is_server_ready()


def test_tritonclient_grpc_with_root_certificates(deployment):
    url = f"127.0.0.1:{deployment.grpc}"
    with grpcclient.InferenceServerClient(url, ssl=True, root_certificates=str(deployment.ca)) as c:
        assert c.is_server_ready() and c.is_model_ready(TRITON_MODEL)
        result = c.infer(TRITON_MODEL, tokens_input(grpcclient), headers={"authorization": f"Bearer {deployment.key}"})
        assert result.as_numpy("text_output").size == 1
        with pytest.raises(InferenceServerException) as e:   # keys still apply over TLS
            c.infer(TRITON_MODEL, tokens_input(grpcclient))
        assert "UNAUTHENTICATED" in str(e.value.status())


def test_plain_http_and_cleartext_grpc_fail_clearly(deployment):
    plain = httpx.get(f"http://127.0.0.1:{deployment.http}/v2/health/ready", timeout=10)
    assert plain.status_code == 400
    assert plain.text == f"this port speaks HTTPS only: use https://127.0.0.1:{deployment.http}/v2/health/ready\n"
    with (grpcclient.InferenceServerClient(f"127.0.0.1:{deployment.grpc}") as c,   # h2c to a TLS port
          pytest.raises(InferenceServerException) as e):
        c.is_server_ready(client_timeout=30)
    assert "UNAVAILABLE" in str(e.value.status())       # refused at once, not DEADLINE_EXCEEDED


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
@pytest.mark.parametrize("version, accepted", [
    (ssl.TLSVersion.TLSv1_1, False), (ssl.TLSVersion.TLSv1_2, True), (ssl.TLSVersion.TLSv1_3, True)])
def test_only_tls_12_and_13_are_spoken(deployment, version, accepted):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(deployment.ca)
    ctx.minimum_version = ctx.maximum_version = version
    if version < ssl.TLSVersion.TLSv1_2:
        ctx.set_ciphers("ALL:@SECLEVEL=0")   # let the client offer it at all; the server must refuse
    with socket.create_connection(("127.0.0.1", deployment.http), timeout=10) as raw:
        if accepted:
            with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                assert tls.version() == {ssl.TLSVersion.TLSv1_2: "TLSv1.2", ssl.TLSVersion.TLSv1_3: "TLSv1.3"}[version]
                assert "GCM" in tls.cipher()[0] or "CHACHA20" in tls.cipher()[0]
        else:
            with pytest.raises(ssl.SSLError):
                ctx.wrap_socket(raw, server_hostname="127.0.0.1")


def test_a_swapped_certificate_is_served_after_reload_without_restart(deployment, tmp_path):
    old_ca = tmp_path / "old.crt"
    shutil.copy(deployment.ca, old_ca)
    new = self_signed(tmp_path / "new", ("127.0.0.1",))
    assert new.fingerprint != file_fingerprint(old_ca)
    tls_dir = deployment.state / "tls"
    bad = tmp_path / "bad.key"
    bad.write_text("not a key\n")
    shutil.copy(bad, tls_dir / "self-signed.key")   # a half-done swap: reload refuses, nginx keeps serving
    refused = tls_cli("reload", deployment)
    assert refused.returncode == 1 and "holds no PEM private key" in refused.stderr
    assert served_fingerprint(deployment.http) == file_fingerprint(old_ca)

    shutil.copy(new.key, tls_dir / "self-signed.key")
    shutil.copy(new.cert, tls_dir / "self-signed.crt")
    done = tls_cli("reload", deployment)
    assert done.returncode == 0 and f"SHA-256 {new.fingerprint}" in done.stdout, done.stderr
    assert served_fingerprint(deployment.http) == new.fingerprint == served_fingerprint(deployment.grpc)
    assert deployment.process.poll() is None                      # the same serve, never restarted
    with httpx.Client(verify=ssl.create_default_context(cafile=new.cert), timeout=60) as http:
        ok = http.get(f"https://127.0.0.1:{deployment.http}/v1/models",
                      headers={"Authorization": f"Bearer {deployment.key}"})
        assert ok.status_code == 200 and MODEL in ok.text
    with httpx.Client(verify=ssl.create_default_context(cafile=old_ca), timeout=10) as http, pytest.raises(httpx.ConnectError):
        http.get(f"https://127.0.0.1:{deployment.http}/v2/health/ready")
    shown = tls_cli("show", deployment)
    assert shown.returncode == 0 and new.fingerprint in shown.stdout


@pytest.mark.parametrize("case, says", [
    ("missing", "TLS certificate {d}/missing.crt does not exist: pass an existing file to --tls-cert"),
    ("not pem", "holds no PEM certificate"),
    ("mismatched", "does not belong to the certificate"),
    ("half", "TLS needs both a certificate and its key: add --tls-key"),
    ("no proxy", "TLS is served by the proxy: drop --no-proxy"),
])
def test_bad_tls_options_are_one_line_before_anything_starts(tmp_path, case, says):
    a, b = self_signed(tmp_path / "a", ()), self_signed(tmp_path / "b", ())
    junk = tmp_path / "junk.crt"
    junk.write_text("hello\n")
    options = {"missing": ["--tls-cert", str(tmp_path / "missing.crt"), "--tls-key", str(a.key)],
               "not pem": ["--tls-cert", str(junk), "--tls-key", str(a.key)],
               "mismatched": ["--tls-cert", str(a.cert), "--tls-key", str(b.key)],
               "half": ["--tls-cert", str(a.cert)],
               "no proxy": ["--no-proxy", "--tls", "self-signed"]}[case]
    result = CliRunner().invoke(main, ["serve", "-r", str(tmp_path / "no-repository"), "--state-dir",
                                       str(tmp_path / "state"), *options])
    assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
    assert result.output.startswith("Error: ") and says.format(d=tmp_path) in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "state" / "nginx.pid").exists()
