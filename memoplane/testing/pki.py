"""Throwaway keys and certificates for a loopback control plane (never for anything else)."""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# The names the apiserver answers to: loopback plus the in-cluster service names.
_DNS_NAMES = ["localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
              "kubernetes.default.svc.cluster.local"]
_IPS = ["127.0.0.1", "::1", "10.0.0.1"]


def _key() -> ec.EllipticCurvePrivateKey:
    # P-256: fast to generate (RSA-2048 costs ~100 ms each), accepted by Go and Python TLS.
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)


def _cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Certificate | None,
          issuer_key: ec.EllipticCurvePrivateKey, *, ca: bool, client_of: str | None = None,
          dns: list[str] = _DNS_NAMES, ips: list[str] = _IPS) -> x509.Certificate:
    """A CA, a serving certificate for `dns` and `ips`, or (with `client_of`: the organization,
    Kubernetes' group, "" for none) a client certificate for user `subject`."""
    now = dt.datetime.now(dt.UTC)
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, subject)]
    if client_of:
        attributes.insert(0, x509.NameAttribute(NameOID.ORGANIZATION_NAME, client_of))
    name = x509.Name(attributes)
    builder = (x509.CertificateBuilder()
               .subject_name(name)
               .issuer_name(issuer.subject if issuer else name)
               .public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5))
               .not_valid_after(now + dt.timedelta(days=7))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                          content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False,
                          encipher_only=False, decipher_only=False), critical=True)
    elif client_of is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]),
                                        critical=False)
    else:
        sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns]
        sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
        builder = (builder
                   .add_extension(x509.SubjectAlternativeName(sans), critical=False)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                                  critical=False))
    return builder.sign(issuer_key, hashes.SHA256())


def write_pki(directory: Path) -> dict[str, Path]:
    """A CA, an apiserver serving cert signed by it, and a service-account signing key."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, serving_key, sa_key = _key(), _key(), _key()
    ca = _cert("memoplane-local-ca", ca_key, None, ca_key, ca=True)
    serving = _cert("kube-apiserver", serving_key, ca, ca_key, ca=False)
    paths = {name: directory / name for name in
             ("ca.crt", "ca.key", "apiserver.crt", "apiserver.key", "sa.key", "sa.pub")}
    paths["ca.crt"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    _write_key(ca_key, paths["ca.key"])
    paths["apiserver.crt"].write_bytes(serving.public_bytes(serialization.Encoding.PEM))
    _write_key(serving_key, paths["apiserver.key"])
    _write_key(sa_key, paths["sa.key"])
    paths["sa.pub"].write_bytes(sa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return paths


def _load_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    ca = x509.load_pem_x509_certificate((directory / "ca.crt").read_bytes())
    key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise TypeError(f"{directory / 'ca.key'} is not the EC key write_pki makes")
    return ca, key


def issue(directory: Path, name: str, subject: str, *, group: str | None = None,
          serving_ips: list[str] | None = None) -> tuple[Path, Path]:
    """A certificate signed by the CA in `directory` (from write_pki), as <name>.crt/.key:
    a client certificate for user `subject` in `group` (Kubernetes reads the organization as the
    group), or with `serving_ips` a serving certificate for those addresses and `subject`."""
    ca, ca_key = _load_ca(directory)
    key = _key()
    if serving_ips is None:
        cert = _cert(subject, key, ca, ca_key, ca=False, client_of=group or "")
    else:
        cert = _cert(subject, key, ca, ca_key, ca=False, dns=[subject], ips=serving_ips)
    crt_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    crt_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key, key_path)
    return crt_path, key_path
