"""Certificates and kubeconfig for the test control plane (tests/kube/cluster.py).

One run gets its own CA; from it a serving certificate for kube-apiserver (127.0.0.1, localhost and
the in-cluster names), an admin client certificate in group `system:masters`, and an EC key pair
that signs and verifies service-account tokens. All keys are P-256: quick to generate, and
kube-apiserver accepts ES256 for service-account tokens.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _certificate(subject: x509.Name, key, issuer: x509.Name, signer, *, ca: bool, extensions=()) -> bytes:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    for ext in extensions:
        builder = builder.add_extension(ext, critical=False)
    return builder.sign(signer, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def write_pki(folder: Path) -> None:
    """CA, apiserver serving cert, admin client cert (system:masters) and service-account key."""
    folder.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "nanorun-test-ca")])
    ca = _certificate(ca_name, ca_key, ca_name, ca_key, ca=True)

    serving_key = ec.generate_private_key(ec.SECP256R1())
    # The first service IP is what in-cluster clients dial as kubernetes.default.
    names = [x509.DNSName(n) for n in ("localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc")]
    ips = [x509.IPAddress(ipaddress.ip_address(a)) for a in ("127.0.0.1", "10.0.0.1")]
    serving = _certificate(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]), serving_key, ca_name, ca_key,
        ca=False, extensions=[x509.SubjectAlternativeName(names + ips)],
    )
    admin_key = ec.generate_private_key(ec.SECP256R1())
    admin = _certificate(
        x509.Name([
            x509.NameAttribute(NameOID.COMMON_NAME, "nanorun-admin"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "system:masters"),
        ]),
        admin_key, ca_name, ca_key, ca=False,
    )
    sa_key = ec.generate_private_key(ec.SECP256R1())
    files = {
        "ca.crt": ca, "ca.key": _pem_key(ca_key),
        "apiserver.crt": serving, "apiserver.key": _pem_key(serving_key),
        "admin.crt": admin, "admin.key": _pem_key(admin_key),
        "sa.key": _pem_key(sa_key),
        "sa.pub": sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
    }
    for name, data in files.items():
        path = folder / name
        path.write_bytes(data)
        path.chmod(0o600)


def kubeconfig(server: str, pki: Path) -> str:
    """An admin kubeconfig with the CA and client certificate embedded (one self-contained file)."""
    def b64(name: str) -> str:
        return base64.b64encode((pki / name).read_bytes()).decode()

    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "nanorun-test", "cluster": {"server": server, "certificate-authority-data": b64("ca.crt")}}],
        "users": [{"name": "admin", "user": {"client-certificate-data": b64("admin.crt"), "client-key-data": b64("admin.key")}}],
        "contexts": [{"name": "nanorun-test", "context": {"cluster": "nanorun-test", "user": "admin", "namespace": "default"}}],
        "current-context": "nanorun-test",
    }
    return yaml.safe_dump(config, sort_keys=False)
