"""Running the server: in the foreground (`sparrow serve`), or on a background thread of this
process (tests, benchmarks, an app that embeds Sparrow).

    with BackgroundServer(ServerConfig(model="target.gguf", mmproj="mmproj.gguf", port=0)) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
"""
from __future__ import annotations

import socket
import sys
import threading
from typing import Optional

import uvicorn

from .app import create_app
from .config import ServerConfig
from .service import Service


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named: asyncio sets TCP_NODELAY only on sockets whose protocol says TCP, and
    # without it a response written in two parts waits out the client's delayed ACK (40 ms)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def _uvicorn(service: Service, log_level: str) -> uvicorn.Server:
    # one worker process (the model is loaded here), no reload; the access log at debug level only
    config = uvicorn.Config(create_app(service), log_level=log_level, access_log=log_level == "debug",
                            timeout_graceful_shutdown=2)
    return uvicorn.Server(config)


def serve(config: ServerConfig, log_level: str = "info") -> int:
    """Load the model and serve until interrupted."""
    service = Service(config)
    try:
        sock = _listen(config.host, config.port)
        port = sock.getsockname()[1]
        print(f"sparrow serve: {config.model_id} on http://{config.host}:{port} ({config.parallel} slots of "
              f"{service.slots[0].n_ctx} tokens{', draft ' + config.draft if config.draft else ''}"
              f"{', vision' if config.mmproj else ''})", file=sys.stderr, flush=True)
        _uvicorn(service, log_level).run(sockets=[sock])
    finally:
        service.close()
    return 0


class BackgroundServer:
    """The server on a thread of this process, listening on config.host:config.port (port 0: a
    free one; `url` says which)."""

    def __init__(self, config: ServerConfig, log_level: str = "warning", start_timeout_s: float = 60.0):
        self.service = Service(config)
        self._sock = _listen(config.host, config.port)
        host = config.host if ":" not in config.host else f"[{config.host}]"
        self.url = f"http://{host}:{self._sock.getsockname()[1]}"
        self._server = _uvicorn(self.service, log_level)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]},
                                        name="sparrow-server", daemon=True)
        self._thread.start()
        self._start_timeout_s = start_timeout_s
        self._wait_started()

    def _wait_started(self) -> None:
        import time

        deadline = time.monotonic() + self._start_timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.close()
                raise RuntimeError("the server did not start")
            time.sleep(0.01)

    def close(self, timeout_s: Optional[float] = 10.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout_s)
        self.service.close()
        self._sock.close()

    def __enter__(self) -> "BackgroundServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
