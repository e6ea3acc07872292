"""The ASGI app: OpenAI's HTTP API in front of an fd_celery cluster.

``create_app(celery_app)`` gives a Starlette app for any ASGI server. Every request goes through
the same path as ``Client.submit`` (router, TTL, admission, output streams) by way of the
:class:`~fd_celery.client.aio.AsyncClient`, so any number of server processes can run side by
side: they share nothing but Redis.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (streamed as server-sent events
or not), ``GET /v1/models``, ``GET /health`` (200 only when a request could be served now; no
key needed), ``GET /metrics`` (Prometheus).

A streamed request answers its status only once its first output (or its error) is known, so an
expired, refused or invalid request gets its HTTP status, not a 200 followed by an error event;
a failure after that ends the stream with an error event and ``[DONE]``. A client that goes away
before the end has its request cancelled (``RequestHandle.cancel``): queued, it never starts;
running, its node stops within a step and frees its KV.
Request content never reaches the logs.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from celery import Celery
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from fd_celery.client.aio import AsyncClient, AsyncRequestHandle
from fd_celery.errors import FDCeleryError
from fd_celery.protocol import OutputChunk, parse_request
from fd_celery.server.chat import render_chat
from fd_celery.server.cluster import ClusterView
from fd_celery.server.metrics import ServerMetrics
from fd_celery.server.responses import Chunks, api_error, chat_body, completion_body
from fd_celery.server.schema import ApiError, ParsedRequest, parse_chat, parse_completion
from fd_celery.server.settings import ServerSettings

__all__ = ["create_app"]

log = logging.getLogger(__name__)
T = TypeVar("T")
OPEN_PATHS = frozenset({"/health"})  # reachable without an API key


class ClientGone(Exception):
    """The HTTP client disconnected before its answer was ready."""


def error_response(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


class _Server:
    """One process's state: its client, its view of the cluster, its metrics."""

    def __init__(self, celery_app: Celery, settings: ServerSettings) -> None:
        self.celery_app = celery_app
        self.settings = settings
        self.metrics = ServerMetrics()
        self._client: AsyncClient | None = None
        self.cluster: ClusterView | None = None
        self._background: set[asyncio.Task[None]] = set()

    @property
    def client(self) -> AsyncClient:
        if self._client is None:  # in the event loop (an ASGI server that runs no lifespan)
            self._client = AsyncClient(self.celery_app)
            self.cluster = ClusterView(self._client.config)
        return self._client

    def view(self) -> ClusterView:
        _ = self.client
        assert self.cluster is not None
        return self.cluster

    @asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        _ = self.client
        try:
            yield
        finally:
            if self._background:
                await asyncio.wait(self._background, timeout=5)
            if self._client is not None:
                await self._client.aclose()

    # ----------------------------------------------------------------------- generation

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, chat=True)

    async def _generate(self, request: Request, chat: bool) -> Response:
        endpoint = "chat" if chat else "completions"
        received = time.monotonic()
        self.metrics.opened(endpoint)
        status, handed_off = 200, False
        handle: AsyncRequestHandle | None = None
        try:
            body = await self._json(request)
            parsed = parse_chat(body, self.settings.chat_max_tokens) if chat else parse_completion(body)
            handle = await self._submit(parsed)
            headers = {"X-Request-Id": handle.request_id}
            if parsed.stream:
                chunks = handle.stream()
                first = await self._or_disconnect(request, _first(chunks))
                stream = self._sse(handle, chunks, first, parsed, chat, received)
                handed_off = True  # the stream closes its own books
                return StreamingResponse(stream, media_type="text/event-stream", headers=headers)
            result = await self._or_disconnect(request, handle.result())
            self.metrics.first_byte(endpoint, time.monotonic() - received)
            make = chat_body if chat else completion_body
            return JSONResponse(make(handle.request_id, parsed.model, result), headers=headers)
        except ApiError as err:
            status = err.status
            return error_response(err)
        except FDCeleryError as exc:
            mapped = api_error(exc)
            status = mapped.status
            return error_response(mapped)
        except ClientGone:
            status = 499  # (nginx's "client closed request": nobody reads this answer)
            if handle is not None:
                self._cancel_later(handle)
            return Response(status_code=status)
        finally:
            if not handed_off:
                self.metrics.closed(endpoint, status)

    async def _submit(self, parsed: ParsedRequest) -> AsyncRequestHandle:
        prompt, token_ids = parsed.prompt, parsed.token_ids
        if parsed.messages is not None:
            if os.path.isdir(os.path.expanduser(parsed.model)):  # loads a tokenizer: off the loop
                prompt, token_ids = await asyncio.to_thread(render_chat, parsed.model, parsed.messages)
            else:
                prompt, token_ids = render_chat(parsed.model, parsed.messages)
        # The router's own checks first: a bad value is a 400 even when no node is live
        fields = {"prompt": prompt, "token_ids": token_ids, **parsed.submit}
        parse_request({k: v for k, v in fields.items() if v is not None})
        placement = await self.view().place(parsed.model)
        return await self.client.submit(prompt, token_ids=token_ids, node=placement.node, **parsed.submit)

    async def _sse(
        self,
        handle: AsyncRequestHandle,
        chunks: AsyncIterator[OutputChunk],
        first: OutputChunk | None,
        parsed: ParsedRequest,
        chat: bool,
        received: float,
    ) -> AsyncIterator[bytes]:
        endpoint = "chat" if chat else "completions"
        out = Chunks(handle.request_id, parsed.model, chat)
        status, ended = 200, False
        try:
            start = out.start()
            if start is not None:
                yield start
            if first is not None and first.text:
                yield out.text(first.text)
            self.metrics.first_byte(endpoint, time.monotonic() - received)
            async for chunk in chunks:
                if chunk.text:
                    yield out.text(chunk.text)
            result = await handle.result()
            ended = True
            yield out.finish(result, parsed.include_usage)
        except FDCeleryError as exc:
            err = api_error(exc)
            status, ended = err.status, True
            yield Chunks.error(err)
        finally:
            if not ended:  # the client went away mid-stream (the generator was cancelled or closed)
                status = 499
                self._cancel_later(handle)
            self.metrics.closed(endpoint, status)

    def _cancel_later(self, handle: AsyncRequestHandle) -> None:
        """Cancel the request off the abandoned response's path (its task may not await any more)."""
        self.metrics.cancelled += 1
        task = asyncio.get_running_loop().create_task(self._cancel(handle))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _cancel(self, handle: AsyncRequestHandle) -> None:
        try:
            await handle.cancel()
        except Exception as exc:  # noqa: BLE001 - nobody is left to tell; the TTL still bounds it
            log.warning("could not cancel request %s: %s", handle.request_id, type(exc).__name__)

    async def _json(self, request: Request) -> Any:
        limit = self.settings.max_body_bytes
        data = bytearray()
        async for piece in request.stream():
            data += piece
            if len(data) > limit:
                raise ApiError(413, f"request body exceeds {limit} bytes", code="body_too_large")
        try:
            return json.loads(data)
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "the request body is not valid JSON", code="invalid_json") from None

    @staticmethod
    async def _or_disconnect(request: Request, work: Awaitable[T]) -> T:
        """``work``'s value, or ``ClientGone`` as soon as the client disconnects."""
        task = asyncio.ensure_future(work)
        watcher = asyncio.ensure_future(_disconnected(request.receive))
        try:
            await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
        if not task.done():
            task.cancel()
            raise ClientGone()
        return task.result()

    # ----------------------------------------------------------------------- the rest

    async def models(self, request: Request) -> Response:
        try:
            models = await self.view().models()
        except FDCeleryError as exc:
            return error_response(api_error(exc))
        data = [
            {"id": name, "object": "model", "created": 0, "owned_by": "fd_celery", "nodes": len(nodes)}
            for name, nodes in sorted(models.items())
        ]
        return JSONResponse({"object": "list", "data": data})

    async def health(self, request: Request) -> Response:
        try:
            ready, why = await self.view().ready()
        except FDCeleryError as exc:
            ready, why = False, exc.message
        return JSONResponse(
            {"status": "ok" if ready else "unavailable", "detail": why}, status_code=200 if ready else 503
        )

    async def metrics_page(self, request: Request) -> Response:
        return PlainTextResponse(self.metrics.exposition(), media_type="text/plain; version=0.0.4")


async def _first(chunks: AsyncIterator[OutputChunk]) -> OutputChunk | None:
    """The first chunk, or ``None`` when the request ended without one."""
    try:
        return await chunks.__anext__()
    except StopAsyncIteration:
        return None


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class _Guard:
    """API keys and the body size limit, before any route runs."""

    def __init__(self, app: ASGIApp, settings: ServerSettings) -> None:
        self.app, self.settings = app, settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        err: ApiError | None = None
        if scope["path"] not in OPEN_PATHS and not self.settings.authorized(headers.get("authorization")):
            err = ApiError(
                401,
                "a valid API key is required: Authorization: Bearer <key>",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
        elif _content_length(headers) > self.settings.max_body_bytes:
            err = ApiError(
                413, f"request body exceeds {self.settings.max_body_bytes} bytes", code="body_too_large"
            )
        if err is not None:
            await error_response(err)(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _content_length(headers: dict[str, str]) -> int:
    try:
        return int(headers.get("content-length", "0"))
    except ValueError:
        return 0


async def _http_error(request: Request, exc: Exception) -> Response:
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    message = exc.detail if isinstance(exc, HTTPException) else "internal error"
    return error_response(ApiError(status, str(message), code="not_found" if status == 404 else None))


async def _internal_error(request: Request, exc: Exception) -> Response:
    log.error("unexpected %s in %s %s", type(exc).__name__, request.method, request.url.path)
    return error_response(ApiError(500, "internal error", type="server_error"))


def create_app(celery_app: Celery, settings: ServerSettings | None = None) -> ASGIApp:
    """The OpenAI-compatible ASGI app for ``celery_app`` (an app that ``fd_celery.install`` set up)."""
    server = _Server(celery_app, settings or ServerSettings())
    endpoint = Callable[[Request], Awaitable[Response]]
    routes: list[tuple[str, endpoint, list[str]]] = [
        ("/v1/completions", server.completions, ["POST"]),
        ("/v1/chat/completions", server.chat_completions, ["POST"]),
        ("/v1/models", server.models, ["GET"]),
        ("/health", server.health, ["GET"]),
        ("/metrics", server.metrics_page, ["GET"]),
    ]
    app = Starlette(
        routes=[Route(path, fn, methods=methods) for path, fn, methods in routes],
        lifespan=server.lifespan,
        exception_handlers={HTTPException: _http_error, Exception: _internal_error},
    )
    app.state.fd_server = server
    return _Guard(app, server.settings)
