"""Run a server app on a free loopback port in a background thread (tests, benchmarks, notebooks)."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

from personascope.errors import PersonascopeError

#: Seconds uvicorn keeps an idle keep-alive connection open. httpx and the openai SDK drop a pooled connection after
#: 5 s idle; uvicorn's own default is also 5 s, so a client could reuse a connection at the moment the server closes
#: it and read "connection reset". Longer than any common client's expiry, the client always lets go first.
KEEP_ALIVE_S = 75


class BackgroundServer:
    """uvicorn serving `app` on 127.0.0.1 (a free port unless `port` is given); leaving the context stops it."""

    def __init__(self, app: Any, port: int = 0, start_timeout: float = 30.0) -> None:
        import uvicorn

        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", port))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self._server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on",
                                                    timeout_keep_alive=KEEP_ALIVE_S))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True,
                                        name="personascope-uvicorn")
        self._timeout = start_timeout

    def start(self) -> BackgroundServer:
        self._thread.start()
        deadline = time.monotonic() + self._timeout
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                self.stop()
                raise PersonascopeError("the background server did not start")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout=60)
        self._sock.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
