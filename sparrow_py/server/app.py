"""The HTTP layer: a Starlette app over a Service (routes, the API key, bodies, server-sent events).

    POST /v1/chat/completions   chat, streamed (server-sent events) or not
    POST /v1/completions        raw prompts (text or token ids)
    GET  /v1/models             the one model served
    GET  /health                liveness and slot counts (no API key needed)
    GET  /slots                 what each slot is doing and served last
(each also without the /v1 prefix, as llama-server has them).

A client that disconnects cancels its request: ClientWatch listens for the ASGI http.disconnect
message while the request is queued, prefilled or streamed, and sets the request's cancel event,
which the worker and the runtime's abort callback read.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
from typing import AsyncIterator, Optional

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sparrow_py.errors import SparrowError

from .errors import ApiError, bad_request, context_exceeded, from_sparrow_error
from .protocol import GenerationRequest, ResponseWriter, parse_chat, parse_completion
from .service import Service

log = logging.getLogger("sparrow.server")

# a body over the limit is still read (and dropped) up to this much more, so that the client,
# which is still sending, gets the 413 answer rather than a reset connection
_DRAIN_BYTES = 16 * 1024 * 1024


class ClientWatch:
    """Notices the client going away (ASGI http.disconnect) while its request is served."""

    def __init__(self, receive):
        self.gone = threading.Event()          # read by the worker thread and the abort callback
        self._gone = asyncio.Event()
        self._task = asyncio.ensure_future(self._listen(receive))

    async def _listen(self, receive) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.mark_gone()
                return

    def mark_gone(self) -> None:
        self.gone.set()
        self._gone.set()

    async def race(self, awaitable):
        """The awaitable's result, or None if the client goes away first (it is then cancelled)."""
        task = asyncio.ensure_future(awaitable)
        gone = asyncio.ensure_future(self._gone.wait())
        try:
            await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if task.done():
            return task.result()
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        return None

    def stop(self) -> None:
        self._task.cancel()


class EventStream:
    """A text/event-stream response of JSON events, then [DONE]. The ASGI app itself, so that
    the client watch (not Starlette's own listener) decides what a disconnect does."""

    def __init__(self, events: AsyncIterator[dict], watch: ClientWatch):
        self.events = events
        self.watch = watch

    async def __call__(self, scope, receive, send) -> None:
        try:
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/event-stream; charset=utf-8"),
                                    (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]})
            async for event in self.events:
                data = json.dumps(event, ensure_ascii=False) if isinstance(event, dict) else event
                await send({"type": "http.response.body", "body": f"data: {data}\n\n".encode(), "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # servers of ASGI 2.4 raise on writes after a disconnect
            self.watch.mark_gone()
        finally:
            self.watch.stop()
            await self.events.aclose()


def _error_response(e: ApiError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


class Api:
    def __init__(self, service: Service):
        self.service = service
        self.config = service.config
        self.started = int(time.time())

    # ---- request plumbing ---------------------------------------------------------------------
    def _authorize(self, request: Request) -> None:
        key = self.config.api_key
        if not key:
            return
        header = request.headers.get("authorization", "")
        given = header[7:].strip() if header[:7].lower() == "bearer " else request.headers.get("x-api-key", "")
        if not given:
            raise ApiError(401, "an API key is needed: send 'Authorization: Bearer KEY'", "authentication_error")
        if not hmac.compare_digest(given.encode(), key.encode()):
            raise ApiError(401, "invalid API key", "authentication_error")

    async def _read_json(self, request: Request) -> dict:
        limit = self.config.max_upload_bytes
        declared = request.headers.get("content-length", "")
        too_large = declared.isdigit() and int(declared) > limit
        body, seen = bytearray(), 0
        async for chunk in request.stream():
            seen += len(chunk)
            if not too_large:
                body += chunk
                too_large = len(body) > limit
            if too_large and seen > limit + _DRAIN_BYTES:
                break
        if too_large:
            raise ApiError(413, f"the request body is larger than the server's limit of {limit} bytes "
                                "(--max-upload-mb)", "invalid_request_error")
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise bad_request(f"malformed JSON in the request body: {e}") from None
        if not isinstance(data, dict):
            raise bad_request("the request body must be a JSON object")
        return data

    def _check_model(self, model: Optional[str]) -> None:
        if model is not None and model not in self.service.model_names():
            raise ApiError(404, f"the model {model!r} does not exist: this server serves {self.config.model_id!r}",
                           "not_found_error", "model")

    # ---- endpoints --------------------------------------------------------------------------
    async def health(self, request: Request) -> Response:
        pool = self.service.pool
        cache = self.service.media_cache.stats
        return JSONResponse({"status": "ok", "slots_idle": pool.n_idle, "slots_processing": len(pool.slots) - pool.n_idle,
                             "requests_waiting": pool.n_waiting, "requests_rejected": pool.n_rejected,
                             "media_cache": {"items": cache.items, "bytes": cache.bytes, "hits": cache.hits,
                                             "misses": cache.misses}})

    async def slots(self, request: Request) -> Response:
        self._authorize(request)
        return JSONResponse([slot.describe() for slot in self.service.pool.slots])

    async def models(self, request: Request) -> Response:
        self._authorize(request)
        e = self.service.engine
        meta = {"n_ctx_slot": self.service.slots[0].n_ctx, "n_slots": len(self.service.slots), "n_vocab": e.n_vocab,
                "n_embd": e.n_embd, "vision": self.service.has_vision, "draft": self.service.has_draft}
        return JSONResponse({"object": "list", "data": [{"id": self.config.model_id, "object": "model",
                                                         "created": self.started, "owned_by": "sparrow", "meta": meta}]})

    async def chat(self, request: Request) -> Response:
        self._authorize(request)
        return await self._generate(request, parse_chat(await self._read_json(request), self.config.sampling))

    async def completions(self, request: Request) -> Response:
        self._authorize(request)
        return await self._generate(request, parse_completion(await self._read_json(request), self.config.sampling))

    # ---- generation -------------------------------------------------------------------------
    async def _generate(self, request: Request, req: GenerationRequest) -> Response:
        self._check_model(req.model)
        self.service.check_request(req)
        watch = ClientWatch(request.receive)
        streaming = False
        try:
            try:
                tokens = await asyncio.to_thread(self.service.prompt_tokens, req)
            except SparrowError as e:
                raise from_sparrow_error(e) from None
            n_ctx = min(s.n_ctx for s in self.service.slots)
            if tokens is not None and len(tokens) >= n_ctx:
                raise context_exceeded(len(tokens), n_ctx)
            media_keys = self.service.media_routing(req)
            slot = await watch.race(self.service.pool.acquire(tokens, media_keys))
            if slot is None:
                return Response(status_code=499)  # the client went away while queued: nobody reads this
            events = self.service.run(slot, req, tokens, media_keys, watch.gone, asyncio.get_running_loop())
            kind, value = await events.get()
            if kind == "error":
                raise value
            if kind == "cancelled":
                return Response(status_code=499)
            writer = ResponseWriter(req, self.config.model_id)
            if req.stream:
                streaming = True
                return EventStream(self._stream(writer, req, events), watch)
            pieces = []
            while True:
                kind, value = await events.get()
                if kind == "piece":
                    pieces.append(value)
                elif kind == "end":
                    return JSONResponse(writer.whole("".join(pieces), value))
                elif kind == "error":
                    raise value
                else:
                    return Response(status_code=499)
        finally:
            if not streaming:
                watch.stop()

    async def _stream(self, writer: ResponseWriter, req: GenerationRequest, events: asyncio.Queue):
        if writer.chat:
            yield writer.chunk("", first=True)
        pending = None
        while True:
            kind, value = pending or await events.get()
            pending = None
            if kind == "piece":
                # the runtime can outpace the client: send what has accumulated as one chunk
                text = [value]
                while not events.empty():
                    item = events.get_nowait()
                    if item[0] != "piece":
                        pending = item
                        break
                    text.append(item[1])
                yield writer.chunk("".join(text))
            elif kind == "end":
                yield writer.chunk(None, outcome=value)
                if req.include_usage:
                    yield writer.usage_chunk(value)
                yield "[DONE]"
                return
            elif kind == "error":
                yield value.body()
                yield "[DONE]"
                return
            else:  # cancelled: the client is gone
                return


def create_app(service: Service) -> Starlette:
    api = Api(service)

    def endpoint(handler):
        async def run(request: Request) -> Response:
            try:
                return await handler(request)
            except ApiError as e:
                return _error_response(e)
            except Exception as e:  # noqa: BLE001 - a bug must cost one request, not the server
                log.exception("%s %s failed", request.method, request.url.path)
                return _error_response(ApiError(500, f"internal error: {type(e).__name__}: {e}", "server_error"))
        return run

    async def http_error(request: Request, exc: HTTPException) -> Response:
        kind = {404: "not_found_error", 405: "invalid_request_error"}.get(exc.status_code, "invalid_request_error")
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return _error_response(ApiError(exc.status_code, message, kind))

    routes = []
    for path, handler, method in (("/health", api.health, "GET"), ("/slots", api.slots, "GET"),
                                  ("/models", api.models, "GET"), ("/chat/completions", api.chat, "POST"),
                                  ("/completions", api.completions, "POST")):
        routes.append(Route(path, endpoint(handler), methods=[method]))
        routes.append(Route("/v1" + path, endpoint(handler), methods=[method]))
    return Starlette(routes=routes, exception_handlers={HTTPException: http_error})
