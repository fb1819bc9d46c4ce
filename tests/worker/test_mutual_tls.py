"""Mutual TLS between a worker and its clients, over real gRPC on TLS
sockets, with certificates made in the test (tests/certificates.py): a
worker started with a client CA serves a client whose certificate that CA
signed, and refuses, with UNAVAILABLE before any RPC runs, a client that
presents no certificate or one from another CA. The token still applies on
top. Misconfiguration is one line at start."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from certificates import CertificateAuthority
from serving_helpers import make_engine

from elasticfleet.cli import main
from elasticfleet.worker.serving.client import AsyncWorkerClient, WorkerClient, generate_request
from elasticfleet.worker.serving.credentials import ClientTls
from elasticfleet.worker.serving.server import BackgroundServer, ServerOptions, server_tls

# Fixtures: served_model_dir, one_thread.
pytest_plugins = ["serving_fixtures"]


class Pki:
    """The fleet's CA (the worker's certificate and the trusted client's)
    and another CA (an untrusted client's), written under a folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.ca, self.other = CertificateAuthority("fleet-ca"), CertificateAuthority("other-ca")
        self.ca_file = folder / "ca.crt"
        self.ca_file.write_bytes(self.ca.pem)
        self.server = self.ca.write(folder, "worker", ips=("127.0.0.1",))
        self.client = self.ca.write(folder, "operator")
        self.stranger = self.other.write(folder, "stranger")

    def client_tls(self, pair: tuple[Path, Path] | None) -> ClientTls:
        """Trusting the fleet's CA, presenting `pair` (or nothing)."""
        if pair is None:
            return ClientTls.from_files(self.ca_file)
        return ClientTls.from_files(self.ca_file, *pair)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path)


@pytest.fixture
def target(pki: Pki, served_model_dir: Path, one_thread: None) -> Iterator[str]:
    """A worker that requires a client certificate from the fleet's CA and a token."""
    cert, key = pki.server
    options = ServerOptions(tls_cert=cert, tls_key=key, tls_client_ca=pki.ca_file, token="t0k")
    running = BackgroundServer(make_engine(served_model_dir), options)
    yield f"127.0.0.1:{running.port}"
    running.stop()


def code_of(target: str, tls: ClientTls, token: str | None = "t0k") -> grpc.StatusCode | None:
    with WorkerClient(target, tls=tls, token=token) as client:
        try:
            client.get_stats(timeout=10)
        except grpc.RpcError as error:
            return error.code()
    return None


def test_a_client_with_a_certificate_of_the_fleets_ca_is_served(pki: Pki, target: str) -> None:
    tls = pki.client_tls(pki.client)
    with WorkerClient(target, tls=tls, token="t0k") as client:
        result = client.complete(generate_request("hi", max_new_tokens=3, ignore_eos=True))
        assert len(result.token_ids) == 3

    async def streamed() -> int:  # the asyncio client presents it too
        async with AsyncWorkerClient(target, tls=tls, token="t0k") as client:
            return len((await client.get_stats(timeout=10)).keep_mask)

    assert asyncio.run(streamed()) > 0
    # The certificate does not replace the token.
    assert code_of(target, tls, token=None) == grpc.StatusCode.UNAUTHENTICATED


def test_clients_without_a_trusted_certificate_are_refused(pki: Pki, target: str) -> None:
    assert code_of(target, pki.client_tls(None)) == grpc.StatusCode.UNAVAILABLE
    assert code_of(target, pki.client_tls(pki.stranger)) == grpc.StatusCode.UNAVAILABLE
    # Nor does a plaintext client get anywhere.
    with WorkerClient(target, token="t0k") as plain, pytest.raises(grpc.RpcError) as raised:
        plain.get_stats(timeout=10)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    # The trusted one still is served: the refusals were about the certificates.
    assert code_of(target, pki.client_tls(pki.client)) is None


def test_mutual_tls_misconfiguration_is_one_line(pki: Pki, tmp_path: Path) -> None:
    cert, key = pki.server
    assert server_tls(cert, key, pki.ca_file) is not None
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    cases = [
        ((None, None, pki.ca_file), "a client CA (mutual TLS) needs TLS"),
        ((cert, key, tmp_path / "absent.pem"), "No such file or directory"),
        ((cert, key, garbage), "holds no usable PEM certificate"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError) as raised:
            server_tls(*args)
        assert message in str(raised.value) and "\n" not in str(raised.value)
    with pytest.raises(ValueError, match="needs both its certificate and its key"):
        ClientTls.from_files(pki.ca_file, pki.client[0], None)
    with pytest.raises(ValueError, match="a client certificate needs its key"):
        ClientTls(certificate_chain=b"PEM")


def test_the_worker_command_refuses_a_client_ca_without_tls(
    pki: Pki, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["worker", "--tls-client-ca", str(pki.ca_file)]) == 2
    assert "needs TLS" in capsys.readouterr().err


def test_generate_presents_a_client_certificate(
    pki: Pki, target: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ELASTICFLEET_TOKEN", "t0k")
    cert, key = pki.client
    args = ["generate", "--target", target, "--tls-ca", str(pki.ca_file), "--max-new-tokens", "2"]
    assert main([*args, "--tls-client-cert", str(cert), "--tls-client-key", str(key), "hi"]) == 0
    assert "finish" in capsys.readouterr().err
    assert main([*args, "hi"]) == 75  # no certificate: refused, UNAVAILABLE (EX_TEMPFAIL)
    assert "UNAVAILABLE" in capsys.readouterr().err
