"""Certificate bundles for haproxy: checked and normalized, or made self-signed."""

from __future__ import annotations

import datetime
import re
from typing import Iterable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from zfast.routing.haproxy.errors import HAProxyError


def normalize_pem(pem: str, what: str = "certificate") -> str:
    """Check a PEM bundle (certificate chain + private key, key matching the first
    certificate) and return it as its PEM blocks only, without blank lines (the CLI ends a
    payload at an empty line)."""
    if not isinstance(pem, str):
        raise HAProxyError(f"{what}: PEM must be a string")
    found = [(m.group(1), m.group(0).replace("\r\n", "\n")) for m in
             re.finditer(r"-----BEGIN ([A-Z0-9 ]+)-----\r?\n.*?-----END \1-----", pem, re.S)]
    certs = [text for kind, text in found if kind == "CERTIFICATE"]
    keys = [text for kind, text in found if kind.endswith("PRIVATE KEY")]
    if not certs:
        raise HAProxyError(f"{what}: no CERTIFICATE block in the PEM bundle")
    if len(keys) != 1:
        raise HAProxyError(f"{what}: want exactly one PRIVATE KEY block in the PEM bundle, found {len(keys)}")
    try:
        leaf = x509.load_pem_x509_certificate(certs[0].encode())
        for c in certs[1:]:
            x509.load_pem_x509_certificate(c.encode())
        key = serialization.load_pem_private_key(keys[0].encode(), password=None)
    except (ValueError, TypeError) as e:
        raise HAProxyError(f"{what}: unreadable PEM: {e}") from None
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*spki) != leaf.public_key().public_bytes(*spki):
        raise HAProxyError(f"{what}: the private key does not belong to the first certificate")
    lines = [ln.rstrip() for ln in "\n".join(certs + keys).splitlines()]
    return "\n".join(ln for ln in lines if ln) + "\n"


def make_self_signed(common_name: str, names: Iterable[str] = (), days: int = 3650) -> str:
    """A self-signed certificate + key (EC P-256) as one PEM bundle."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=days)))
    names = list(names)
    if names:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
    cert = builder.sign(key, hashes.SHA256())
    return (cert.public_bytes(serialization.Encoding.PEM).decode()
            + key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode())
