"""canopy/tls.py: the CA and server certificate a TLS Redis is run with."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509

from canopy import tls
from canopy.errors import UserError


def test_the_server_certificate_names_every_host_and_is_signed_by_the_ca(tmp_path: Path) -> None:
    d = tls.generate(tmp_path / "tls", ["redis-0", "10.0.0.5", " ", "redis-0"])
    ca = x509.load_pem_x509_certificate((d / tls.CA_CERT).read_bytes())
    cert = x509.load_pem_x509_certificate((d / tls.SERVER_CERT).read_bytes())
    cert.verify_directly_issued_by(ca)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost", "redis-0"]
    assert sans.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("10.0.0.5"),
    ]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_only_the_server_key_is_private_and_the_ca_key_is_never_written(tmp_path: Path) -> None:
    d = tls.generate(tmp_path)
    assert sorted(p.name for p in d.iterdir()) == sorted([tls.CA_CERT, tls.SERVER_CERT, tls.SERVER_KEY])
    assert stat.S_IMODE((d / tls.SERVER_KEY).stat().st_mode) == 0o600
    assert b"PRIVATE KEY" not in (d / tls.CA_CERT).read_bytes() + (d / tls.SERVER_CERT).read_bytes()


def test_a_missing_file_says_how_to_make_it(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="canopy tls DIR"):
        tls.server_files(tmp_path)
    with pytest.raises(UserError, match=r"cluster\.password_file"):
        tls.ca_file(tmp_path)
