"""TLS for the Redis shards: a run's small CA and server certificate, and the client side.

Place in the data flow: `canopy tls DIR` (or `canopy up` with `cluster.tls`) writes the
files below once into DIR/tls, the `tls/` folder beside the Redis password files
(canopy/redisconn.py `tls_dir`); cluster/redis_server.py points every shard at them
(`tls-port` only, plaintext port 0); canopy/redisconn.py and cache/rawget.py connect with
`client_context`, which trusts `ca.crt` alone and checks the shard's host name against the
certificate.

Files in DIR/tls:

| file | who needs it | secret |
|---|---|---|
| ca.crt | every process that connects to Redis | no |
| redis.crt | every Redis shard | no |
| redis.key | every Redis shard, nothing else | yes (mode 600) |

The CA's private key is used to sign `redis.crt` and then dropped, never written: nobody can
issue another certificate this CA vouches for. A shard on a host name the certificate does
not list needs a new DIR (and `ca.crt` handed out again). Clients prove who they are with
their Redis user's password (canopy/acl.py), inside the encrypted connection, so there is no
client certificate (Redis runs with `tls-auth-clients no`).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
from collections.abc import Iterable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from canopy.errors import UserError

CA_CERT = "ca.crt"
SERVER_CERT = "redis.crt"
SERVER_KEY = "redis.key"
DEFAULT_NAMES = ("localhost", "127.0.0.1")
DEFAULT_DAYS = 825  # the longest server-certificate lifetime common TLS clients still accept


def generate(directory: str | Path, names: Iterable[str] = (), days: int = DEFAULT_DAYS) -> Path:
    """Write a fresh CA certificate and a Redis server certificate and key into `directory`.

    `names`: host names and IP addresses the shards are reached by (each becomes a subject
    alternative name), beside `DEFAULT_NAMES`. Returns the directory. Overwrites older files.

    Example:
        generate("secrets/tls", ["redis-0", "redis-1", "10.0.0.5"])
        # cluster.tls = true, cluster.password_file = "secrets/redis.password"
    """
    sans = list(dict.fromkeys([*DEFAULT_NAMES, *(n.strip() for n in names if n.strip())]))
    alt_names: list[x509.GeneralName] = []
    for name in sans:
        try:
            alt_names.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alt_names.append(x509.DNSName(name))
    now = datetime.datetime.now(datetime.UTC)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)  # some clock skew

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "canopy redis CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "canopy redis")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    pem = serialization.Encoding.PEM
    _write(d / CA_CERT, ca_cert.public_bytes(pem), 0o644)
    _write(d / SERVER_CERT, cert.public_bytes(pem), 0o644)
    key_pem = key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    _write(d / SERVER_KEY, key_pem, 0o600)
    return d


def command(secrets: Path, names: list[str]) -> int:
    """`canopy tls DIR [--name HOST ...]`: the files in DIR/tls, DIR being the password files' folder."""
    d = generate(secrets / "tls", names)
    print(
        f"TLS files in {d}: set cluster.tls = true with cluster.password_file in {secrets}; "
        f"{CA_CERT} on every host, {SERVER_CERT} and {SERVER_KEY} (secret) on the Redis hosts only"
    )
    return 0


def ca_file(directory: str | Path) -> Path:
    """`ca.crt` in `directory`; a UserError saying how to make it when it is missing."""
    return _existing(Path(directory) / CA_CERT)


def server_files(directory: str | Path) -> tuple[Path, Path, Path]:
    """(ca.crt, redis.crt, redis.key) in `directory`, each checked to exist."""
    d = Path(directory)
    return _existing(d / CA_CERT), _existing(d / SERVER_CERT), _existing(d / SERVER_KEY)


def client_context(ca: str | Path) -> ssl.SSLContext:
    """A client context that trusts only `ca` and checks the server's host name (TLS 1.2+)."""
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def _existing(path: Path) -> Path:
    if not path.is_file():
        raise UserError(
            f"TLS file {str(path)!r} is missing: make it with `canopy tls DIR --name HOST ...`, "
            "DIR being the folder of cluster.password_file"
        )
    return path


def _key_usage(cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _write(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, mode)
    tmp.replace(path)
