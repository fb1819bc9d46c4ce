"""How the operator reaches what a fleet names: its workers (TLS roots and
a bearer token) and its adapter store (URL and password), read from the
fleet's Secrets.

No kopf and no Kubernetes client here: Secrets come through an injected
`ReadSecret`, so the rules (which keys, whitespace, what a missing Secret
means) are tested without a cluster and the handlers stay thin. Values are
read each time they are needed, so a rotated Secret applies without a
restart.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from elasticfleet.operator.control import (
    Connect,
    WorkerConnection,
    WorkerEndpoint,
    plaintext_connect,
)
from elasticfleet.operator.spec import FleetSpec, RedisSettings, SecretKey, SecretUnavailable
from elasticfleet.worker.serving.client import AsyncWorkerClient
from elasticfleet.worker.serving.credentials import ClientTls

# (namespace, Secret name, keys) -> the first of the keys the Secret holds,
# decoded; raises SecretUnavailable when the Secret or every key is missing.
ReadSecret = Callable[[str, str, tuple[str, ...]], Awaitable[bytes]]
TLS_ROOT_KEYS = ("ca.crt", "tls.crt")


async def secret_text(read: ReadSecret, namespace: str, ref: SecretKey) -> str:
    """A Secret key's text without surrounding whitespace: `kubectl create
    secret --from-file` keeps the file's last newline, and the workers strip
    their environment the same way, so both sides agree on a token or
    password."""
    value = await read(namespace, ref.name, (ref.key,))
    try:
        return value.decode().strip()
    except UnicodeDecodeError:  # never repeat any of it
        raise SecretUnavailable(f"Secret {ref.name} key {ref.key} is not UTF-8 text") from None


@dataclass(frozen=True)
class Credentials:
    """What reaching a fleet's workers takes: TLS (the roots their
    certificates are verified against, and the client certificate the
    operator presents for mutual TLS), and the bearer token they require."""

    tls: ClientTls | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)

    def connect(self) -> Connect:
        """The control loop's `connect` for these credentials."""
        if self.tls is None and self.token is None:
            return plaintext_connect
        tls, token = self.tls or False, self.token

        def connect(endpoint: WorkerEndpoint) -> WorkerConnection:
            return AsyncWorkerClient(
                endpoint.address,
                token=token,
                tls=tls,
                server_name=endpoint.server_name or None,
            )

        return connect


async def fleet_credentials(read: ReadSecret, fleet: FleetSpec) -> Credentials:
    """spec.tls's CA (its Secret's ca.crt, else tls.crt), its client
    certificate and key (spec.tls.clientSecretName's tls.crt and tls.key),
    and spec.auth's token."""
    tls = token = None
    if fleet.tls_secret:
        roots = await read(fleet.namespace, fleet.tls_secret, TLS_ROOT_KEYS)
        chain = key = None
        if fleet.tls_client_secret:
            chain = await read(fleet.namespace, fleet.tls_client_secret, ("tls.crt",))
            key = await read(fleet.namespace, fleet.tls_client_secret, ("tls.key",))
        tls = ClientTls(roots, chain, key)
    if fleet.token_secret is not None:
        token = await secret_text(read, fleet.namespace, fleet.token_secret)
    return Credentials(tls, token)


@dataclass(frozen=True)
class StoreAddress:
    """Where a fleet's adapter store is, with what its workers log in with."""

    url: str = field(repr=False)  # it may hold a password
    password: str | None = field(repr=False)
    prefix: str
    url_secret: SecretKey | None  # where the URL came from, to name in errors


async def store_address(read: ReadSecret, namespace: str, redis: RedisSettings) -> StoreAddress:
    """spec.redis with its URL and password read from the Secrets that hold them."""
    password = None
    if redis.password_secret is not None:
        password = await secret_text(read, namespace, redis.password_secret)
    if redis.url_secret is not None:
        url = await secret_text(read, namespace, redis.url_secret)
    else:
        assert redis.url is not None  # the spec has a URL or its Secret
        url = redis.url
    return StoreAddress(url, password, redis.prefix, redis.url_secret)
