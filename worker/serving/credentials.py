"""Credentials between workers and their clients: the bearer token file,
re-read when it changes; the TLS certificate and key a worker serves, and
the CA bundle it verifies client certificates against (mutual TLS), checked
before the server starts; and `ClientTls`, what a client of workers (the
operator, a gateway, the CLI) trusts and presents.

The token file is what Kubernetes mounts from a Secret. Rotating the Secret
replaces the file (an atomic symlink swap) while the worker runs, so the
server asks `TokenFile.current()` on every RPC, and that looks at the file at
most once per `check_interval_s` (one stat; a read only when the stat
changed): a rotated token is in force within that interval, at a bounded
cost per RPC, without a restart.

An empty or whitespace-only file never turns authentication off: refused at
start, and when a running worker sees its file emptied (or unreadable) it
keeps the last good token and says so in its log, once per change.

Mutual TLS: a worker started with a client CA (`--tls-client-ca`) refuses
the TLS handshake of a client that presents no certificate, or one no CA in
the bundle signed, so such a client's calls fail UNAVAILABLE before any RPC
runs. The bearer token still applies on top.

Nothing here imports grpc at module level, so the command line can check a
token file or a certificate before the heavy imports.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import grpc

log = logging.getLogger(__name__)


def read_token_file(path: Path) -> str:
    """The token in `path` without surrounding whitespace (a Secret made from
    a file keeps its last newline). ValueError, with the reason and not the
    path, when the file cannot be read or holds no token."""
    try:
        token = path.read_text().strip()
    except OSError as error:
        raise ValueError(error.strerror or str(error)) from None
    except UnicodeDecodeError:
        raise ValueError("not UTF-8 text; the token must be text") from None
    if not token:
        raise ValueError(
            "the file is empty (or only whitespace), which would turn authentication off; "
            "put the token in it, or run without a token file"
        )
    return token


class TokenFile:
    """A bearer token read from a file and re-read when the file changes."""

    def __init__(self, path: Path, check_interval_s: float = 1.0) -> None:
        self.path = path
        self.check_interval_s = check_interval_s
        self._lock = threading.Lock()
        self._token = read_token_file(path)
        self._seen = self._signature()
        self._checked = time.monotonic()

    def _signature(self) -> tuple[int, ...] | str:
        """What changes when the file is replaced or rewritten (the inode for
        a Secret's symlink swap, size and mtime for a rewrite in place), or
        the error that stops us from looking."""
        try:
            st = os.stat(self.path)
        except OSError as error:
            return error.strerror or str(error)
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    def current(self) -> str:
        """The token in force; looks at the file when the interval has passed."""
        now = time.monotonic()
        with self._lock:
            if now - self._checked >= self.check_interval_s:
                self._checked = now
                self._refresh()
            return self._token

    def _refresh(self) -> None:
        signature = self._signature()
        if signature == self._seen:
            return
        self._seen = signature
        if isinstance(signature, str):
            log.warning("token file %s: %s; keeping the previous token", self.path, signature)
            return
        try:
            token = read_token_file(self.path)
        except ValueError as error:
            log.warning("token file %s: %s; keeping the previous token", self.path, error)
            return
        if token != self._token:
            self._token = token
            log.info("token file %s changed: the new token is in force", self.path)


def check_tls_pair(cert: Path, key: Path) -> tuple[bytes, bytes]:
    """The certificate chain and key, read and checked to be a usable pair:
    readable PEM, an unencrypted key, the key of the certificate. gRPC would
    otherwise fail at bind with a traceback, or, for a mismatched pair,
    accept connections and fail every handshake. ValueError in one line."""
    pems = []
    for kind, path in (("certificate", cert), ("key", key)):
        try:
            pems.append(path.read_bytes())
        except OSError as error:
            raise ValueError(f"TLS {kind} {path}: {error.strerror or error}") from None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        # An encrypted key would make OpenSSL ask for a passphrase on the
        # terminal; gRPC cannot use one anyway, so an empty one fails it.
        context.load_cert_chain(cert, key, password=lambda: b"")
    except ssl.SSLError as error:
        reason = error.reason or str(error)
        raise ValueError(
            f"TLS certificate {cert} and key {key} are not a usable pair ({reason}): give the "
            "PEM certificate chain and its own unencrypted private key"
        ) from None
    return pems[0], pems[1]


def read_ca_bundle(path: Path) -> bytes:
    """The PEM CA certificates in `path`, checked to hold at least one;
    ValueError in one line otherwise (gRPC would refuse every handshake)."""
    try:
        pem = path.read_bytes()
    except OSError as error:
        raise ValueError(f"TLS CA bundle {path}: {error.strerror or error}") from None
    try:
        ssl.create_default_context(cadata=pem.decode("ascii"))
    except (ssl.SSLError, UnicodeDecodeError, ValueError) as error:
        raise ValueError(
            f"TLS CA bundle {path} holds no usable PEM certificate ({error}): give the CA "
            "certificates that sign the clients' certificates"
        ) from None
    return pem


@dataclass(frozen=True)
class ServerTls:
    """What a TLS worker serves with: its certificate chain and key, and the
    CA bundle client certificates must chain to (None: clients present none)."""

    certificate_chain: bytes
    private_key: bytes = field(repr=False)
    client_ca: bytes | None = None

    @classmethod
    def from_files(cls, cert: Path, key: Path, client_ca: Path | None = None) -> ServerTls:
        """Read and check the files; ValueError in one line."""
        chain, private_key = check_tls_pair(cert, key)
        return cls(chain, private_key, None if client_ca is None else read_ca_bundle(client_ca))

    def server_credentials(self) -> grpc.ServerCredentials:
        import grpc

        return grpc.ssl_server_credentials(
            [(self.private_key, self.certificate_chain)],
            root_certificates=self.client_ca,
            require_client_auth=self.client_ca is not None,
        )


@dataclass(frozen=True)
class ClientTls:
    """What a client of workers trusts and presents over TLS: the roots it
    verifies the worker's certificate against (None: the system's), and the
    certificate chain and key it presents to workers that require client
    certificates (both or neither)."""

    roots: bytes | None = None
    certificate_chain: bytes | None = None
    private_key: bytes | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if (self.certificate_chain is None) != (self.private_key is None):
            raise ValueError("a client certificate needs its key, and a key its certificate")

    @classmethod
    def from_files(
        cls, ca: Path | None = None, cert: Path | None = None, key: Path | None = None
    ) -> ClientTls:
        """Read and check the files (any may be None); ValueError in one line."""
        roots = None if ca is None else read_ca_bundle(ca)
        if cert is None and key is None:
            return cls(roots)
        if cert is None or key is None:
            raise ValueError("a client certificate needs both its certificate and its key file")
        chain, private_key = check_tls_pair(cert, key)
        return cls(roots, chain, private_key)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        import grpc

        return grpc.ssl_channel_credentials(
            root_certificates=self.roots,
            private_key=self.private_key,
            certificate_chain=self.certificate_chain,
        )
