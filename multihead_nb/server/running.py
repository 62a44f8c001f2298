"""A server running on a thread: uvicorn serving an ASGI app on a socket bound before it starts (so `port=0`
gives a free port, known at once), stopped on request.

Owns the thread, the socket and the shutdown. Knows nothing of the routes.
"""

from __future__ import annotations

import socket
import threading
import time

from ..errors import ConfigError


class Server:
    """A running server (uvicorn on a daemon thread): `url`, `stop()`."""

    def __init__(self, app, host: str, port: int, log_level: str = "warning"):
        import uvicorn

        family, _, _, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        self._sock = socket.socket(family, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._sock.bind(addr)
        except OSError as e:
            self._sock.close()
            raise ConfigError(f"cannot serve on {host}:{port}: {e.strerror or e}") from None
        self.host, self.port = host, self._sock.getsockname()[1]
        config = uvicorn.Config(app, log_level=log_level, lifespan="off", timeout_graceful_shutdown=1,
                                access_log=False)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]},
                                        name=f"multihead-http-{self.port}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the HTTP server on {host}:{self.port} did not start")
            time.sleep(0.01)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/v1"

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        """Stop serving (open streams are closed, their requests cancelled); returns once the port is free."""
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._sock.close()

    def __repr__(self) -> str:
        return f"Server({self.url}, {'running' if self.running else 'stopped'})"
