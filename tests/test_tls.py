"""TLS and mutual TLS with certificates generated here: a TLS client works, a plaintext one is refused, and with
a client CA a client without a certificate is refused; tokens still apply on top."""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from selector_service.backends import LocalBackend
from selector_service.server import RunningServer, ServerConfig, start_server
from trainer_client.client import SelectionClient


def _cert(
    name: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    ca: bool,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer[0].subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    return builder.sign(issuer[1] if issuer else key, hashes.SHA256())


def _write(path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey | None = None) -> None:
    path.with_suffix(".crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is not None:
        path.with_suffix(".key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files."""
    root = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("test CA", ca_key, None, ca=True)
    _write(root / "ca", ca)
    for name in ("server", "client"):
        key = ec.generate_private_key(ec.SECP256R1())
        _write(root / name, _cert(name, key, (ca, ca_key), ca=False), key)
    return root


def _serve(pki: Path, **extra: str) -> RunningServer:
    config = ServerConfig(
        port=0, backend="local", tls_cert=str(pki / "server.crt"), tls_key=str(pki / "server.key"), **extra
    )  # type: ignore[arg-type]
    return start_server(config, backend=LocalBackend(1))


@pytest.fixture
def labels() -> Iterator[np.ndarray]:
    yield np.arange(200) % 4


def test_tls_channel_works_and_plaintext_is_refused(pki: Path, labels: np.ndarray) -> None:
    running = _serve(pki, auth_token="t0ken")
    try:
        with SelectionClient(running.target, token="t0ken", timeout_s=10, tls_ca=str(pki / "ca.crt")) as client:
            assert client.create_session(labels).num_classes == 4
        with SelectionClient(running.target, token="t0ken", timeout_s=5) as plain, pytest.raises(grpc.RpcError) as err:
            plain.create_session(labels)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        with (
            SelectionClient(running.target, token="wrong", timeout_s=10, tls_ca=str(pki / "ca.crt")) as bad,
            pytest.raises(grpc.RpcError) as err,
        ):
            bad.create_session(labels)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED  # TLS does not replace the token
    finally:
        running.stop(grace=0)


def test_mutual_tls_refuses_clients_without_a_certificate(pki: Path, labels: np.ndarray) -> None:
    running = _serve(pki, tls_client_ca=str(pki / "ca.crt"))
    try:
        with SelectionClient(
            running.target,
            timeout_s=10,
            tls_ca=str(pki / "ca.crt"),
            tls_cert=str(pki / "client.crt"),
            tls_key=str(pki / "client.key"),
        ) as client:
            assert client.create_session(labels).num_classes == 4
        with (
            SelectionClient(running.target, timeout_s=5, tls_ca=str(pki / "ca.crt")) as anonymous,
            pytest.raises(grpc.RpcError) as err,
        ):
            anonymous.create_session(labels)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        running.stop(grace=0)


def test_tls_configuration_errors_name_the_problem(pki: Path) -> None:
    with pytest.raises(ValueError, match="needs both --tls-cert and --tls-key"):
        start_server(ServerConfig(port=0, backend="local", tls_cert=str(pki / "server.crt")), backend=LocalBackend(1))
    with pytest.raises(ValueError, match=r"cannot read --tls-key /nonexistent\.key"):
        start_server(
            ServerConfig(port=0, backend="local", tls_cert=str(pki / "server.crt"), tls_key="/nonexistent.key"),
            backend=LocalBackend(1),
        )


def test_a_client_reads_its_token_and_tls_files_from_the_environment(
    pki: Path, labels: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``SelectionClient(endpoint)`` with no credentials takes CREST_AUTH_TOKEN and CREST_TLS_CA/CERT/KEY, as the
    compose stack and the integrations' ``endpoint=`` strings need; "" turns one off."""
    running = _serve(pki, auth_token="t0ken", tls_client_ca=str(pki / "ca.crt"))
    monkeypatch.setenv("CREST_AUTH_TOKEN", "t0ken")
    monkeypatch.setenv("CREST_TLS_CA", str(pki / "ca.crt"))
    monkeypatch.setenv("CREST_TLS_CERT", str(pki / "client.crt"))
    monkeypatch.setenv("CREST_TLS_KEY", str(pki / "client.key"))
    try:
        with SelectionClient(running.target, timeout_s=10) as client:
            assert client.create_session(labels).num_classes == 4
        with SelectionClient(running.target, token="", timeout_s=10) as anonymous, pytest.raises(grpc.RpcError) as err:
            anonymous.create_session(labels)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        monkeypatch.setenv("CREST_TLS_KEY", "")
        with pytest.raises(ValueError, match=r"needs both tls_cert and tls_key .*tls_key=None"):
            SelectionClient(running.target)
    finally:
        running.stop(grace=0)
