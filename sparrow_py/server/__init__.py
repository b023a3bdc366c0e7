"""`sparrow serve`: an OpenAI-compatible HTTP server for video chat, with Sparrow speculation.

    errors.py    OpenAI-style error objects (ApiError)
    protocol.py  request checking and response shapes (usage, llama-server's timings)
    media.py     image and video parts: data URIs, files under --media-path, decoding, the cache
                 of encodings
    slots.py     N contexts on one loaded model, the bounded queue, prefix-affine slot choice
    service.py   one request's generation on a worker thread, cancellation
    app.py       the Starlette app: routes, API key, bodies, server-sent events, disconnects
    launch.py    serve() for the command line, BackgroundServer for tests and embedding
    config.py    ServerConfig and the `sparrow serve` command line

Needs the `server` extra (Starlette, uvicorn); the runtime and the Engine do not.
"""
from .config import ServerConfig


def __getattr__(name):  # the ASGI stack is imported only when a server is made
    if name == "BackgroundServer":
        from .launch import BackgroundServer
        return BackgroundServer
    if name == "create_app":
        from .app import create_app
        return create_app
    if name == "Service":
        from .service import Service
        return Service
    raise AttributeError(name)


__all__ = ["ServerConfig", "BackgroundServer", "Service", "create_app"]
