"""The deployment's CA and NATS certificate on the controller (disagg/core/pki.py):
kept, re-issued when the head's names change or the certificate nears its
end, a new CA only on rotation; private files."""

import datetime
import stat

from cryptography import x509

from disagg.core import pki


def cert(pem: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem.encode())


def test_kept_reissued_for_new_names_and_rotated():
    first = pki.ensure("head-a", ["10.0.0.1"])
    assert pki.ensure("head-a", ["10.0.0.1"]) == first
    moved = pki.ensure("head-a", ["10.0.0.2"])
    assert moved.ca_cert == first.ca_cert and moved.server_cert != first.server_cert
    cert(moved.server_cert).verify_directly_issued_by(cert(moved.ca_cert))
    assert pki.describe("head-a")["nats"]["names"] == ["10.0.0.2"]
    pki.rotate("head-a")
    rotated = pki.ensure("head-a", ["10.0.0.2"])
    assert rotated.ca_cert != moved.ca_cert and rotated.server_cert != moved.server_cert
    cert(rotated.server_cert).verify_directly_issued_by(cert(rotated.ca_cert))
    # the front door's certificate for clients' names, from the same CA
    door = pki.ensure("head-a", ["llm.example.com", "10.0.0.9"], server="frontdoor")
    assert door.ca_cert == rotated.ca_cert and door.server_cert != rotated.server_cert
    cert(door.server_cert).verify_directly_issued_by(cert(door.ca_cert))
    assert pki.describe("head-a")["frontdoor"]["names"] == ["10.0.0.9", "llm.example.com"]
    assert pki.ensure("head-a", ["10.0.0.2"]) == rotated  # NATS's is its own
    d = pki.directory("head-a")
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in d.iterdir()} == dict.fromkeys(
        (pki.CA_KEY, pki.CA_CERT, "nats.key", "nats.crt", "frontdoor.key", "frontdoor.crt"), 0o600
    )
    pki.rotate("head-a")
    assert {p.name for p in d.iterdir()} == {pki.CA_KEY, pki.CA_CERT}


def test_a_certificate_near_its_end_is_reissued(monkeypatch):
    first = pki.ensure("head-b", ["nats.example"])
    assert pki.describe("head-b")["nats"]["names"] == ["nats.example"]
    # every certificate is "within RENEW_BEFORE of its end" once that exceeds its lifetime
    monkeypatch.setattr(pki, "RENEW_BEFORE", datetime.timedelta(days=pki.SERVER_DAYS + 1))
    renewed = pki.ensure("head-b", ["nats.example"])
    assert renewed.ca_cert == first.ca_cert and renewed.server_cert != first.server_cert
