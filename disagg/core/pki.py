"""The deployment's private CA and its servers' certificates (NATS, and the
front door's for clients when data asks), made and kept on the controller
(never on a host: only the CA certificate, a server's certificate and its
key are pushed). One directory per deployment,
named by its head, under the state directory ($DISAGG_STATE_DIR, default
~/.local/state/disagg), mode 0700, every file 0600.

A deploy re-uses what is there; it issues a new server certificate when
the head's names change or the old one expires within RENEW_BEFORE, and a
new CA only when there is none (or `disagg tls rotate`)."""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from disagg.agent.net import is_ip

CA_DAYS = 3650
SERVER_DAYS = 365
RENEW_BEFORE = datetime.timedelta(days=30)
CA_KEY, CA_CERT = "ca.key", "ca.crt"
# the servers it issues for, by file name and as their certificates name them
SERVERS = {"nats": "NATS", "frontdoor": "front door"}


@dataclass(frozen=True)
class Bundle:
    """PEM texts: what the hosts get."""

    ca_cert: str
    server_cert: str
    server_key: str


def state_dir() -> Path:
    return Path(os.environ.get("DISAGG_STATE_DIR") or Path.home() / ".local" / "state" / "disagg")


def directory(deployment: str) -> Path:
    return state_dir() / "pki" / re.sub(r"[^A-Za-z0-9_.-]", "_", deployment)


def ensure(deployment: str, names: list[str], server: str = "nats") -> Bundle:
    """The CA and server's certificate valid for names (addresses or DNS
    names), made if missing, stale or issued for other names."""
    d = _private_dir(directory(deployment))
    if not (d / CA_KEY).exists() or not (d / CA_CERT).exists():
        _new_ca(d, deployment)
    ca_key = serialization.load_pem_private_key((d / CA_KEY).read_bytes(), None)
    ca = x509.load_pem_x509_certificate((d / CA_CERT).read_bytes())
    if not _server_current(d, ca, server, names):
        _new_server(d, ca, ca_key, server, names)
    return Bundle(*((d / f).read_text() for f in (CA_CERT, f"{server}.crt", f"{server}.key")))


def rotate(deployment: str) -> Path:
    """A new CA (and so new server certificates at the next deploy)."""
    d = _private_dir(directory(deployment))
    for server in SERVERS:
        for suffix in (".crt", ".key"):
            (d / f"{server}{suffix}").unlink(missing_ok=True)
    _new_ca(d, deployment)
    return d


def ca_file(deployment: str) -> Path | None:
    path = directory(deployment) / CA_CERT
    return path if path.exists() else None


def describe(deployment: str) -> dict:
    """What is there, for `disagg tls show`: fingerprints and dates, no keys."""
    d = directory(deployment)
    out: dict = {"directory": str(d)}
    for label, name in (("ca", CA_CERT), *((server, f"{server}.crt") for server in SERVERS)):
        if (d / name).exists():
            cert = x509.load_pem_x509_certificate((d / name).read_bytes())
            out[label] = {
                "subject": cert.subject.rfc4514_string(),
                "sha256": cert.fingerprint(hashes.SHA256()).hex(":"),
                "not_after": cert.not_valid_after_utc.isoformat(),
                "names": _names(cert),
            }
    return out


def _private_dir(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    d.chmod(0o700)
    return d


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _key_pem(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _new_ca(d: Path, deployment: str) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"disagg CA {deployment}"[:64])])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - datetime.timedelta(minutes=5))
        .not_valid_after(_now() + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write(d / CA_KEY, _key_pem(key))
    _write(d / CA_CERT, cert.public_bytes(serialization.Encoding.PEM))


def _san(names: list[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for n in names:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            out.append(x509.DNSName(n))
    return out


def _names(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return sorted([str(a) for a in san.get_values_for_type(x509.IPAddress)] + san.get_values_for_type(x509.DNSName))


def _server_current(d: Path, ca: x509.Certificate, server: str, names: list[str]) -> bool:
    if not (d / f"{server}.crt").exists() or not (d / f"{server}.key").exists():
        return False
    cert = x509.load_pem_x509_certificate((d / f"{server}.crt").read_bytes())
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, InvalidSignature):  # another CA's (rotated)
        return False
    wanted = sorted(str(ipaddress.ip_address(n)) if is_ip(n) else n for n in names)
    usages = list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    return _names(cert) == wanted and usages == _usages(server) and cert.not_valid_after_utc - _now() > RENEW_BEFORE


def _usages(server: str) -> list:
    """NATS servers also dial each other (cluster routes, mutual TLS): client too."""
    if server == "nats":
        return [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    return [ExtendedKeyUsageOID.SERVER_AUTH]


def _new_server(d: Path, ca: x509.Certificate, ca_key, server: str, names: list[str]) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"disagg {SERVERS[server]} {names[0]}"[:64])]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - datetime.timedelta(minutes=5))
        .not_valid_after(_now() + datetime.timedelta(days=SERVER_DAYS))
        .add_extension(x509.SubjectAlternativeName(_san(names)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(_usages(server)), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _write(d / f"{server}.key", _key_pem(key))
    _write(d / f"{server}.crt", cert.public_bytes(serialization.Encoding.PEM))
