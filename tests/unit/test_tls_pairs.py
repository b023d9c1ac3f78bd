"""TLS pairs for the public ports: every bad certificate/key is one line naming the fix, the
self-signed pair is made once (key 0600) and kept, and the rendered nginx config serves TLS 1.2/1.3
on both ports (checked by `nginx -t`, no server started)."""

from __future__ import annotations

import datetime
import hashlib
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from backends.errors import ProxyError
from builder.serve.proxy import AccessRules, ProxyLayout, StateDir, check_config, render_config
from builder.serve.tls import check_pair, self_signed, tls_pair


def make_pair(folder: Path, *, days: int = 30, name: str = "a", password: bytes | None = None) -> tuple[Path, Path]:
    """A certificate and key written with cryptography directly (not through the code under test)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=60)).not_valid_after(now + datetime.timedelta(days=days))
            .sign(key, hashes.SHA256()))
    encryption = (serialization.BestAvailableEncryption(password) if password
                  else serialization.NoEncryption())
    folder.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = folder / f"{name}.crt", folder / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption))
    return cert_path, key_path


def test_a_good_pair_gives_its_sha256_fingerprint(tmp_path):
    cert, key = make_pair(tmp_path)
    pair = check_pair(cert, key)
    der = x509.load_pem_x509_certificate(cert.read_bytes()).public_bytes(serialization.Encoding.DER)
    assert pair.fingerprint.count(":") == 31
    assert pair.fingerprint.replace(":", "") == hashlib.sha256(der).hexdigest().upper()


@pytest.mark.parametrize("case, says", [
    ("missing cert", "TLS certificate {d}/nope.crt does not exist: pass an existing file to --tls-cert"),
    ("missing key", "TLS key {d}/nope.key does not exist: pass an existing file to --tls-key"),
    ("cert is a directory", "is a directory: pass the PEM file itself to --tls-cert"),
    ("cert not PEM", "holds no PEM certificate (-----BEGIN CERTIFICATE-----)"),
    ("key not PEM", "holds no PEM private key"),
    ("key is the cert", "holds no PEM private key"),
    ("mismatched", "does not belong to the certificate"),
    ("encrypted key", "is encrypted and nginx would stop to ask for its passphrase"),
    ("expired", "expired on"),
])
def test_bad_pairs_are_one_line_naming_the_fix(tmp_path, case, says):
    cert, key = make_pair(tmp_path / "a")
    _, other_key = make_pair(tmp_path / "b", name="b")
    if case == "missing cert":
        cert = tmp_path / "nope.crt"
    elif case == "missing key":
        key = tmp_path / "nope.key"
    elif case == "cert is a directory":
        cert = tmp_path
    elif case == "cert not PEM":
        cert.write_bytes(x509.load_pem_x509_certificate(cert.read_bytes()).public_bytes(serialization.Encoding.DER))
    elif case == "key not PEM":
        key.write_text("not a key\n")
    elif case == "key is the cert":
        key = cert
    elif case == "mismatched":
        key = other_key
    elif case == "encrypted key":
        cert, key = make_pair(tmp_path / "c", password=b"secret")
    elif case == "expired":
        cert, key = make_pair(tmp_path / "d", days=-1)
    with pytest.raises(ProxyError) as e:
        check_pair(cert, key)
    assert says.format(d=tmp_path) in str(e.value) and "\n" not in str(e.value)
    assert "secret" not in str(e.value)


@pytest.mark.parametrize("mode, cert, key, says", [
    ("self-signed", "x.crt", None, "exclude each other"),
    (None, "x.crt", None, "add --tls-key"),
    (None, None, "x.key", "add --tls-cert"),
    ("acme", None, None, "the only mode is 'self-signed'"),
])
def test_option_combinations_are_checked(tmp_path, mode, cert, key, says):
    with pytest.raises(ProxyError, match=says):
        tls_pair(mode, cert and tmp_path / cert, key and tmp_path / key, tmp_path, ())
    assert tls_pair(None, None, None, tmp_path, ()) is None


def test_self_signed_is_made_once_with_a_private_key_and_kept(tmp_path):
    first = self_signed(tmp_path, ("127.0.0.1", "0.0.0.0"))
    assert first.self_signed and first.cert == tmp_path / "tls" / "self-signed.crt"
    assert stat.S_IMODE(first.key.stat().st_mode) == 0o600
    assert stat.S_IMODE(first.cert.parent.stat().st_mode) == 0o700
    cert = x509.load_pem_x509_certificate(first.cert.read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in names.get_values_for_type(x509.DNSName)
    assert {str(ip) for ip in names.get_values_for_type(x509.IPAddress)} >= {"127.0.0.1", "::1"}
    assert (cert.not_valid_after_utc - datetime.datetime.now(datetime.UTC)).days >= 390
    again = self_signed(tmp_path, ("127.0.0.1",))
    assert again.fingerprint == first.fingerprint                      # restarts keep clients' trust
    first.key.write_text("damaged\n")
    renewed = self_signed(tmp_path, ())
    assert renewed.fingerprint != first.fingerprint and check_pair(renewed.cert, renewed.key)
    assert stat.S_IMODE(renewed.key.stat().st_mode) == 0o600


def test_config_serves_tls_on_both_ports_and_passes_nginx_t(tmp_path):
    pair = self_signed(tmp_path / "state", ())
    state = StateDir(tmp_path / "state")
    layout = ProxyLayout(18443, 18444, "127.0.0.1:1", "127.0.0.1:2", ("127.0.0.1",), gateway="127.0.0.1:3",
                         keys_required=True, tls_cert=str(pair.cert), tls_key=str(pair.key))
    text = render_config(state, layout, AccessRules())
    assert "listen 127.0.0.1:18443 ssl;" in text and "listen 127.0.0.1:18444 ssl http2;" in text
    assert "ssl_protocols TLSv1.2 TLSv1.3;" in text and f"ssl_certificate {pair.cert};" in text
    assert "error_page 497 = @plain_http;" in text
    assert not any(weak in text for weak in ("TLSv1.1", "RC4", "3DES", "CBC", ":DHE-"))
    state.prepare()
    conf = state.path / "nginx.conf"
    conf.write_text(text)
    check_config(state, conf)
    plain = render_config(state, ProxyLayout(18443, 18444, "127.0.0.1:1", "127.0.0.1:2"), AccessRules())
    assert "ssl" not in plain and "listen 0.0.0.0:18444 http2;" in plain
    assert layout.scheme == "https" and ProxyLayout(1, 2, "a:1", "b:2").scheme == "http"


def test_rule_changes_keep_tls(tmp_path):
    """allowed-ips commands re-render from the saved layout: TLS must survive them."""
    pair = self_signed(tmp_path / "state", ())
    state = StateDir(tmp_path / "state")
    state.prepare()
    state.write_layout(ProxyLayout(18443, 18444, "127.0.0.1:1", "127.0.0.1:2", ("127.0.0.1",),
                                   tls_cert=str(pair.cert), tls_key=str(pair.key)))
    layout = state.read_layout()
    assert layout.tls_cert == str(pair.cert) and layout.scheme == "https"
    assert "listen 127.0.0.1:18443 ssl;" in render_config(state, layout, AccessRules(("10.0.0.0/8",)))
