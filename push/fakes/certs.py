"""A throwaway certificate authority and APNs credentials, made with `cryptography` at start.

The fake APNs serves TLS with a server certificate from this CA, clients trust the CA
through `client_context()`, and certificate-auth apps connect with client certificates
the CA issued, their bundle id in the subject UID as in Apple's push certificates. Token
auth apps sign with an `ApnsSigningKey`, an ES256 key in the `.p8` (PKCS#8 PEM) form
Apple hands out. Nothing here is meant to outlive the process that made it.
"""

from __future__ import annotations

import datetime
import ipaddress
import secrets
import ssl
import string
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# Short, but long enough for a simulator or an embedded `softrelay serve` left running.
DEFAULT_VALIDITY = datetime.timedelta(days=7)
_CLOCK_SKEW = datetime.timedelta(minutes=5)  # backdated so a peer slightly behind accepts it
_ID_ALPHABET = string.ascii_uppercase + string.digits


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True, slots=True)
class ThrowawayCa:
    """An EC P-256 CA whose key lives only in this object, writing into `directory`."""

    directory: Path  # owned by the caller (e.g. pytest's tmp_path); files are written here
    cert: x509.Certificate
    _key: ec.EllipticCurvePrivateKey = field(repr=False)
    validity: datetime.timedelta = DEFAULT_VALIDITY

    @classmethod
    def create(
        cls,
        directory: Path,
        *,
        name: str = "softrelay throwaway CA",
        validity: datetime.timedelta = DEFAULT_VALIDITY,
    ) -> ThrowawayCa:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _CLOCK_SKEW)
            .not_valid_after(now + validity)
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
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        directory.mkdir(parents=True, exist_ok=True)
        return cls(directory, cert, key, validity)

    @property
    def cert_pem(self) -> bytes:
        return _pem_cert(self.cert)

    def _issue(
        self,
        subject: x509.Name,
        usage: x509.ObjectIdentifier,
        san: x509.SubjectAlternativeName | None = None,
    ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _CLOCK_SKEW)
            .not_valid_after(now + self.validity)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                False,
            )
        )
        if san is not None:
            builder = builder.add_extension(san, critical=False)
        return builder.sign(self._key, hashes.SHA256()), key

    def _write(self, name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> Path:
        """One PEM file holding the certificate and its key, as `load_cert_chain` takes it."""
        path = self.directory / name
        path.touch(mode=0o600)
        path.write_bytes(_pem_cert(cert) + _pem_key(key))
        return path

    def issue_server(self, name: str = "server.pem") -> Path:
        """A server certificate for 127.0.0.1, ::1 and localhost."""
        san = x509.SubjectAlternativeName(
            [
                x509.DNSName("localhost"),
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                x509.IPAddress(ipaddress.ip_address("::1")),
            ]
        )
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
        cert, key = self._issue(subject, ExtendedKeyUsageOID.SERVER_AUTH, san)
        return self._write(name, cert, key)

    def issue_push_certificate(self, topic: str, team_id: str = "TEAMID0001") -> Path:
        """A client certificate like Apple's push certificates: the bundle id in the UID."""
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.USER_ID, topic),
                x509.NameAttribute(NameOID.COMMON_NAME, f"Apple Push Services: {topic}"),
                x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, team_id),
                x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
            ]
        )
        cert, key = self._issue(subject, ExtendedKeyUsageOID.CLIENT_AUTH)
        return self._write(f"push-{topic}-{secrets.token_hex(4)}.pem", cert, key)

    def issue_client(
        self,
        common_name: str,
        *,
        dns: tuple[str, ...] = (),
        uris: tuple[str, ...] = (),
        name: str | None = None,
    ) -> Path:
        """A TLS client certificate (a PBX's, for mutual TLS), its names in the
        subjectAltName DNS and URI entries; with none, the subject's CN is its only name."""
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        entries: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        entries += [x509.UniformResourceIdentifier(u) for u in uris]
        san = x509.SubjectAlternativeName(entries) if entries else None
        cert, key = self._issue(subject, ExtendedKeyUsageOID.CLIENT_AUTH, san)
        return self._write(name or f"client-{secrets.token_hex(4)}.pem", cert, key)

    def write_cert(self, name: str = "ca.pem") -> Path:
        """The CA certificate alone, as a file a server trusts for client certificates."""
        path = self.directory / name
        path.write_bytes(self.cert_pem)
        return path

    def server_context(self) -> ssl.SSLContext:
        """TLS for the fake APNs: asks for a client certificate but does not require one
        (token-auth clients send none), and verifies any it gets against this CA."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.issue_server())
        context.load_verify_locations(cadata=self.cert_pem.decode("ascii"))
        context.verify_mode = ssl.CERT_OPTIONAL
        # Offered for clients that ask; aioapns does not use ALPN and is served all the same.
        context.set_alpn_protocols(["h2"])
        return context

    def client_context(self) -> ssl.SSLContext:
        """A client context that trusts this CA only (hostname checking stays on)."""
        return ssl.create_default_context(cadata=self.cert_pem.decode("ascii"))


@dataclass(frozen=True, slots=True)
class ApnsSigningKey:
    """An APNs token-auth key: the `.p8` PEM, its 10-character key id and team id."""

    team_id: str
    key_id: str
    key_pem: str = field(repr=False)

    @classmethod
    def generate(cls, team_id: str | None = None, key_id: str | None = None) -> ApnsSigningKey:
        key = ec.generate_private_key(ec.SECP256R1())
        return cls(
            team_id or _apple_id(),
            key_id or _apple_id(),
            _pem_key(key).decode("ascii"),
        )

    def public_key(self) -> ec.EllipticCurvePublicKey:
        key = serialization.load_pem_private_key(self.key_pem.encode("ascii"), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return key.public_key()


def _apple_id() -> str:
    """A random 10-character identifier shaped like Apple's team and key ids."""
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(10))
