"""Certificates and kubeconfig for the test control plane (tests/kube/cluster.py).

One run gets its own CA; from it a serving certificate for kube-apiserver (127.0.0.1, localhost, the
bridge address pods reach it at, the `kubernetes` Service IP and its in-cluster names), a client
certificate per identity (the admin in group `system:masters`; kube-scheduler,
kube-controller-manager, kube-proxy, each node as `system:node:<name>` in `system:nodes`, and
kube-apiserver's kubelet client), a serving certificate for the nodes' kubelet API, and an EC key
pair that signs and verifies service-account tokens. All keys are P-256: quick to generate, and
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


def write_pki(
    folder: Path,
    *,
    nodes: tuple[str, ...] = (),
    node_ip: str = "127.0.0.1",
    service_ip: str = "10.96.0.1",
    api_ip: str = "127.0.0.1",
) -> None:
    """The CA and every certificate and key of the cluster (see the module docstring)."""
    folder.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "nanorun-test-ca")])
    files = {"ca.crt": _certificate(ca_name, ca_key, ca_name, ca_key, ca=True), "ca.key": _pem_key(ca_key)}

    def issue(name: str, common_name: str, org: str | None = None, dns=(), ips=()) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
        if org:
            subject.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
        sans = [x509.DNSName(n) for n in dns] + [x509.IPAddress(ipaddress.ip_address(a)) for a in ips]
        extensions = [x509.SubjectAlternativeName(sans)] if sans else []
        files[f"{name}.crt"] = _certificate(
            x509.Name(subject), key, ca_name, ca_key, ca=False, extensions=extensions
        )
        files[f"{name}.key"] = _pem_key(key)

    # The first service IP is what in-cluster clients dial as kubernetes.default.
    issue(
        "apiserver",
        "kube-apiserver",
        dns=(
            "localhost",
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
            "kubernetes.default.svc.cluster.local",
        ),
        ips=sorted({"127.0.0.1", api_ip, service_ip}),
    )
    issue("admin", "nanorun-admin", "system:masters")
    issue("kube-scheduler", "system:kube-scheduler")
    issue("kube-controller-manager", "system:kube-controller-manager")
    issue("kube-proxy", "system:kube-proxy")
    issue("apiserver-kubelet-client", "kube-apiserver-kubelet-client")
    for node in nodes:
        issue(f"node-{node}", f"system:node:{node}", "system:nodes")
    issue("kubelet", "kubelet", dns=("localhost", *nodes), ips=sorted({"127.0.0.1", node_ip}))
    sa_key = ec.generate_private_key(ec.SECP256R1())
    files["sa.key"] = _pem_key(sa_key)
    files["sa.pub"] = sa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    for name, data in files.items():
        path = folder / name
        path.write_bytes(data)
        path.chmod(0o600)


def kubeconfig(server: str, pki: Path, user: str = "admin") -> str:
    """A kubeconfig for one identity (<user>.crt/.key) with the CA and client certificate embedded
    (one self-contained file)."""

    def b64(name: str) -> str:
        return base64.b64encode((pki / name).read_bytes()).decode()

    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "nanorun-test",
                "cluster": {"server": server, "certificate-authority-data": b64("ca.crt")},
            }
        ],
        "users": [
            {
                "name": user,
                "user": {
                    "client-certificate-data": b64(f"{user}.crt"),
                    "client-key-data": b64(f"{user}.key"),
                },
            }
        ],
        "contexts": [
            {
                "name": "nanorun-test",
                "context": {"cluster": "nanorun-test", "user": user, "namespace": "default"},
            }
        ],
        "current-context": "nanorun-test",
    }
    return yaml.safe_dump(config, sort_keys=False)
