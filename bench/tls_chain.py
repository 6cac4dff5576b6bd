"""A certificate chain as public CAs issue one: a root, an intermediate it signs, and a
server leaf the intermediate signs, for `localhost` and 127.0.0.1. The server presents
leaf + intermediate (as `load_cert_chain` takes a chain file); clients trust the root
only, so every handshake verifies the whole chain. Keys: RSA 2048 (most public leaves)
or EC P-256 (Let's Encrypt's ECDSA leaves)."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

KEY_KINDS = ("p256", "rsa2048")
Key = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


@dataclass(frozen=True, slots=True)
class Chain:
    chain: Path  # leaf, then intermediate (PEM)
    key: Path  # the leaf's key (PEM, unencrypted)
    root: Path  # what clients trust (PEM)
    key_kind: str


def _key(kind: str) -> Key:
    if kind == "rsa2048":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return ec.generate_private_key(ec.SECP256R1())


def _cert(
    subject: str, key: Key, issuer: x509.Name | None, signer: Key, *, ca: bool, depth: int = 0
) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer or name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=90))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=depth if ca else None), True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()), False
        )
    )
    if ca:
        usage = x509.KeyUsage(True, False, False, False, False, True, True, False, False)
        builder = builder.add_extension(usage, True)
    else:
        alt = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        builder = builder.add_extension(x509.SubjectAlternativeName(alt), False)
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False
        )
    return builder.sign(signer, hashes.SHA256())


def make_chain(directory: Path, key_kind: str = "p256") -> Chain:
    if key_kind not in KEY_KINDS:
        raise ValueError(f"key kinds are {', '.join(KEY_KINDS)}")
    directory.mkdir(parents=True, exist_ok=True)
    root_key, mid_key, leaf_key = _key(key_kind), _key(key_kind), _key(key_kind)
    root = _cert("bench root", root_key, None, root_key, ca=True, depth=1)
    mid = _cert("bench intermediate", mid_key, root.subject, root_key, ca=True)
    leaf = _cert("localhost", leaf_key, mid.subject, mid_key, ca=False)
    pem = serialization.Encoding.PEM
    chain = directory / "chain.pem"
    chain.write_bytes(leaf.public_bytes(pem) + mid.public_bytes(pem))
    key = directory / "key.pem"
    key.touch(mode=0o600)
    key.write_bytes(
        leaf_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    trusted = directory / "root.pem"
    trusted.write_bytes(root.public_bytes(pem))
    return Chain(chain, key, trusted, key_kind)
