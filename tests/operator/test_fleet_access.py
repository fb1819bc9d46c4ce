"""What the operator reads from a fleet's Secrets (fleet_access.py), with a
Secret reader that behaves as the handlers' does: the first key present
with a non-empty value, decoded, or SecretUnavailable."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from elasticfleet.operator import fleet_access
from elasticfleet.operator.control import WorkerEndpoint, plaintext_connect
from elasticfleet.operator.fleet_access import (
    Credentials,
    fleet_credentials,
    store_address,
)
from elasticfleet.operator.spec import FleetSpec, SecretUnavailable
from elasticfleet.worker.serving.credentials import ClientTls

SECRETS = {
    ("ns", "workers-tls"): {"tls.crt": b"PEM"},  # no ca.crt: the certificate is its own root
    ("ns", "operator-tls"): {"tls.crt": b"CLIENT", "tls.key": b"KEY", "ca.crt": b"CA"},
    ("ns", "workers-token"): {"token": b"t0ken\n"},  # as --from-file leaves it
    ("ns", "redis"): {"url": b" redis://redis:6379/0\n", "password": b"pw\n"},
    ("ns", "binary"): {"token": b"\xff\xfe"},
}


async def read(namespace: str, name: str, keys: tuple[str, ...]) -> bytes:
    data = SECRETS.get((namespace, name))
    if data is None:
        raise SecretUnavailable(f"reading Secret {name}: HTTP 404")
    for key in keys:
        if data.get(key):
            return data[key]
    raise SecretUnavailable(f"Secret {name} has no {' or '.join(keys)} yet")


def fleet(**spec: Any) -> FleetSpec:
    raw = {
        "model": {"name": "SmolLM2-135M-Instruct"},
        "worker": {"image": "img"},
        "memoryPolicy": {"budget": {"fraction": 0.5}},
        **spec,
    }
    return FleetSpec.parse("f", "ns", raw)


def test_a_fleet_without_tls_or_token_is_reached_in_plaintext() -> None:
    credentials = asyncio.run(fleet_credentials(read, fleet()))
    assert credentials == Credentials() and credentials.connect() is plaintext_connect


def test_tls_roots_and_the_token_come_from_their_secrets(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spec = fleet(
        tls={"secretName": "workers-tls"},
        auth={"tokenSecretRef": {"name": "workers-token", "key": "token"}},
    )
    credentials = asyncio.run(fleet_credentials(read, spec))
    assert credentials == Credentials(ClientTls(b"PEM"), token="t0ken")  # newline stripped
    assert "t0ken" not in repr(credentials)
    # The client is made with TLS, the roots, the token and the pod's DNS name.
    made: list[dict[str, Any]] = []
    monkeypatch.setattr(fleet_access, "AsyncWorkerClient", lambda *a, **kw: made.append(kw))
    credentials.connect()(WorkerEndpoint("p", "10.0.0.1:50051", server_name="10-0-0-1.f.ns.svc"))
    assert made == [
        {"token": "t0ken", "tls": ClientTls(b"PEM"), "server_name": "10-0-0-1.f.ns.svc"}
    ]


def test_mutual_tls_presents_the_client_secrets_certificate() -> None:
    spec = fleet(tls={"secretName": "workers-tls", "clientSecretName": "operator-tls"})
    credentials = asyncio.run(fleet_credentials(read, spec))
    # The workers' roots as before; the client Secret's certificate and key.
    assert credentials.tls == ClientTls(b"PEM", b"CLIENT", b"KEY")
    assert "KEY" not in repr(credentials.tls)
    missing = fleet(tls={"secretName": "workers-tls", "clientSecretName": "absent"})
    with pytest.raises(SecretUnavailable, match="reading Secret absent"):
        asyncio.run(fleet_credentials(read, missing))


def test_a_missing_secret_says_which() -> None:
    spec = fleet(auth={"tokenSecretRef": {"name": "absent", "key": "token"}})
    with pytest.raises(SecretUnavailable, match="reading Secret absent"):
        asyncio.run(fleet_credentials(read, spec))
    spec = fleet(auth={"tokenSecretRef": {"name": "workers-token", "key": "other"}})
    with pytest.raises(SecretUnavailable, match="Secret workers-token has no other yet"):
        asyncio.run(fleet_credentials(read, spec))
    spec = fleet(auth={"tokenSecretRef": {"name": "binary", "key": "token"}})
    with pytest.raises(SecretUnavailable, match=r"Secret binary key token is not UTF-8 text$"):
        asyncio.run(fleet_credentials(read, spec))


def test_the_store_address_reads_url_and_password_from_secrets() -> None:
    spec = fleet(
        redis={
            "urlSecretRef": {"name": "redis", "key": "url"},
            "passwordSecretRef": {"name": "redis", "key": "password"},
            "prefix": "ef:",
        }
    )
    assert spec.redis is not None
    address = asyncio.run(store_address(read, "ns", spec.redis))
    assert (address.url, address.password, address.prefix) == ("redis://redis:6379/0", "pw", "ef:")
    assert address.url_secret == spec.redis.url_secret
    plain = fleet(redis={"url": "redis://r:6379/0"}).redis
    assert plain is not None
    direct = asyncio.run(store_address(read, "ns", plain))
    assert (direct.url, direct.password, direct.url_secret) == ("redis://r:6379/0", None, None)
