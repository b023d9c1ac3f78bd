"""TLS on the public ports: the certificate pair nginx serves, checked before anything starts, and
the self-signed pair `serve --tls self-signed` makes once and keeps in the state directory.

Why check here when nginx checks too: nginx's complaint about a bad pair arrives after Triton has
loaded every model, and reads like "SSL_CTX_use_PrivateKey ... key values mismatch". Checking
first gives one line that names the file and the fix, before anything starts.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from backends.errors import ProxyError

SELF_SIGNED_DIR = "tls"
SELF_SIGNED_CERT = "self-signed.crt"
SELF_SIGNED_KEY = "self-signed.key"
SELF_SIGNED_DAYS = 397              # the longest validity browsers accept for a server certificate
RENEW_BEFORE = datetime.timedelta(days=30)


@dataclass(frozen=True)
class TlsPair:
    """A checked certificate chain (PEM, leaf first) and its private key."""

    cert: Path
    key: Path
    fingerprint: str                # SHA-256 of the leaf certificate, AA:BB:... as browsers show it
    not_after: datetime.datetime
    self_signed: bool = False


def _read(path: Path, what: str, option: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise ProxyError(f"{what} {path} does not exist: pass an existing file to {option}") from None
    except IsADirectoryError:
        raise ProxyError(f"{what} {path} is a directory: pass the PEM file itself to {option}") from None
    except OSError as e:
        raise ProxyError(f"{what} {path} cannot be read ({e.strerror}): fix its permissions "
                         f"or pass another file to {option}") from None


def _fingerprint(cert) -> str:
    from cryptography.hazmat.primitives import hashes

    return cert.fingerprint(hashes.SHA256()).hex(":").upper()


def check_pair(cert: Path, key: Path, *, self_signed: bool = False) -> TlsPair:
    """Refuse a missing, unreadable, non-PEM, encrypted, expired or mismatched certificate/key pair."""
    from cryptography import x509
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    cert, key = Path(cert).resolve(), Path(key).resolve()
    cert_pem, key_pem = _read(cert, "TLS certificate", "--tls-cert"), _read(key, "TLS key", "--tls-key")
    try:
        chain = x509.load_pem_x509_certificates(cert_pem)
    except ValueError:
        raise ProxyError(f"TLS certificate {cert} holds no PEM certificate (-----BEGIN CERTIFICATE-----): "
                         "convert it (openssl x509 -in FILE -out cert.pem) or pass the PEM file") from None
    try:
        private = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise ProxyError(f"TLS key {key} is encrypted and nginx would stop to ask for its passphrase: "
                         "decrypt it (openssl pkey -in KEY -out key.pem) and keep it mode 0600") from None
    except (ValueError, UnsupportedAlgorithm) as e:
        raise ProxyError(f"TLS key {key} holds no PEM private key ({type(e).__name__}): "
                         "pass the key file that belongs to the certificate") from None
    leaf = chain[0]
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if leaf.public_key().public_bytes(*spki) != private.public_key().public_bytes(*spki):
        raise ProxyError(f"TLS key {key} does not belong to the certificate {cert} (their public keys differ): "
                         "pass the matching pair")
    not_after = leaf.not_valid_after_utc
    if not_after <= datetime.datetime.now(datetime.UTC):
        raise ProxyError(f"TLS certificate {cert} expired on {not_after:%Y-%m-%d}: renew it "
                         "(or use --tls self-signed for a test deployment)")
    return TlsPair(cert, key, _fingerprint(leaf), not_after, self_signed)


def _hosts(public_addresses: tuple[str, ...]) -> list:
    """Names the self-signed certificate covers: loopback, this host's name, each concrete listen address."""
    from cryptography import x509

    names: list = [x509.DNSName("localhost"), x509.DNSName(socket.gethostname())]
    ips = {"127.0.0.1", "::1", *(a for a in public_addresses if a not in ("0.0.0.0", "::", ""))}
    for ip in sorted(ips):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(ip)))
        except ValueError:
            names.append(x509.DNSName(ip))
    return names


def _write_private(path: Path, data: bytes) -> None:
    """Mode 0600 from the first byte (never briefly world-readable), then renamed into place."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def self_signed(state_path: Path, public_addresses: tuple[str, ...] = ()) -> TlsPair:
    """The state directory's self-signed pair: kept while valid for 30 more days, else made anew.

    Kept, so clients that pinned it (as their CA file or by fingerprint) keep working across
    restarts. ECDSA P-256: as strong as RSA-3072 and faster to handshake.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder = Path(state_path) / SELF_SIGNED_DIR
    cert_path, key_path = folder / SELF_SIGNED_CERT, folder / SELF_SIGNED_KEY
    if cert_path.exists() and key_path.exists():
        try:
            pair = check_pair(cert_path, key_path, self_signed=True)
            if pair.not_after - datetime.datetime.now(datetime.UTC) > RENEW_BEFORE:
                return pair
        except ProxyError:
            pass  # damaged or expired: make a new one
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"serverless-triton {socket.gethostname()}")])
    now = datetime.datetime.now(datetime.UTC)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=SELF_SIGNED_DAYS))
            .add_extension(x509.SubjectAlternativeName(_hosts(tuple(public_addresses))), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False, key_agreement=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(ski, critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
            .sign(key, hashes.SHA256()))
    _write_private(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    tmp = cert_path.with_name(cert_path.name + ".tmp")
    tmp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    os.replace(tmp, cert_path)
    return check_pair(cert_path, key_path, self_signed=True)


def tls_pair(mode: str | None, cert: Path | None, key: Path | None, state_path: Path,
             public_addresses: tuple[str, ...]) -> TlsPair | None:
    """The pair `serve` options ask for (None: plain HTTP), checked; one line naming the fix otherwise."""
    if mode not in (None, "self-signed"):
        raise ProxyError(f"--tls {mode!r}: the only mode is 'self-signed' (or give --tls-cert and --tls-key)")
    if mode and (cert or key):
        raise ProxyError("--tls self-signed and --tls-cert/--tls-key exclude each other: choose one")
    if bool(cert) != bool(key):
        missing = "--tls-key" if cert else "--tls-cert"
        raise ProxyError(f"TLS needs both a certificate and its key: add {missing}")
    if mode:
        return self_signed(state_path, public_addresses)
    return check_pair(cert, key) if cert else None
