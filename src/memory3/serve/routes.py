"""The routes of the HTTP API and the app that serves them (`create_app`)."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from memory3.generate import MODES, Generator
from memory3.retrieval.base import Retriever
from memory3.scheduler import (
    Scheduler,
    SchedulerConfig,
)
from memory3.serve.api import (
    APIError,
    ServerConfig,
    _job_error,
    _validation_error,
)
from memory3.serve.app import _App

log = logging.getLogger(__name__)


def create_app(
    generator: Generator,
    stores: Mapping[str, Retriever] | None = None,
    config: ServerConfig | None = None,
    scheduler_config: SchedulerConfig | None = None,
    scheduler: Scheduler | None = None,
) -> FastAPI:
    """The FastAPI app. The scheduler thread starts with the app (lifespan) and stops with it;
    it is `app.state.scheduler` (pass your own, unstarted, to change how batches run).
    `stores` maps names to retrievers; those that also implement `KnowledgeBase` accept
    document operations."""
    config = config or ServerConfig()
    if scheduler is None:
        scheduler = Scheduler(generator, scheduler_config)
    elif scheduler.generator is not generator:
        raise ValueError("the scheduler given drives another Generator than the one given")
    state = _App(generator, stores or {}, config, scheduler)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        scheduler.start()
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, scheduler.close)

    app = FastAPI(title="memory3", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.scheduler = scheduler
    app.state.memory3 = state
    _error_handlers(app)

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = scheduler.alive
        body = {
            "status": "ok" if ok else "unavailable",
            "queued": scheduler.queue_depth(),
            "running": scheduler.running(),
        }
        return JSONResponse(body, status_code=200 if ok else 503)

    api = APIRouter(prefix="/v1", dependencies=[Depends(_authorizer(config))])
    _generation_routes(api, state)
    _knowledge_routes(api, state)
    app.include_router(api)
    return app


def _authorizer(config: ServerConfig) -> Callable[[Request], Any]:
    async def authorize(request: Request) -> None:
        if config.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), config.api_key.encode()
        ):
            raise APIError(
                401,
                "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                "authentication_error",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )

    return authorize


def _error_handlers(app: FastAPI) -> None:
    """Every error answers as OpenAI does ({"error": {...}}), bugs included (500, logged)."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        return _validation_error(e).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = "not_found" if e.status_code == 404 else "method_not_allowed" if e.status_code == 405 else None
        return APIError(
            e.status_code, str(e.detail), code=kind, headers=getattr(e, "headers", None)
        ).response()

    @app.exception_handler(Exception)
    async def _internal(_: Request, e: Exception) -> JSONResponse:
        return _job_error(e).response()


def _generation_routes(api: APIRouter, state: _App) -> None:
    generator, config = state.gen, state.cfg

    @api.get("/models")
    async def models() -> JSONResponse:
        card = {
            "id": config.model_name,
            "object": "model",
            "created": state.created,
            "owned_by": "memory3",
            "max_model_len": generator.model.config.context_limit,
            "memory": {
                "modes": list(MODES),
                "default_mode": state.default_mode,
                "stores": sorted(state.stores),
                "references_per_chunk": generator.mem_cfg.memories_per_chunk,
                "chunk_tokens": generator.mem_cfg.chunk_tokens,
            },
        }
        return JSONResponse({"object": "list", "data": [card]})

    @api.post("/completions")
    async def completions(request: Request) -> Any:
        return await state.completion(request, chat=False)

    @api.post("/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await state.completion(request, chat=True)


def _knowledge_routes(api: APIRouter, state: _App) -> None:
    @api.post("/documents")
    async def add_documents(request: Request) -> JSONResponse:
        return await state.add_documents(request)

    @api.get("/documents")
    async def list_documents(request: Request) -> JSONResponse:
        return await state.list_documents(request)

    @api.get("/documents/{doc_id:path}")  # ids may hold '/' (wikipedia/<title>)
    async def get_document(request: Request, doc_id: str) -> JSONResponse:
        return await state.get_document(request, doc_id)

    @api.put("/documents/{doc_id:path}")
    async def replace_document(request: Request, doc_id: str) -> JSONResponse:
        return await state.replace_document(request, doc_id)

    @api.delete("/documents/{doc_id:path}")
    async def delete_document(request: Request, doc_id: str) -> JSONResponse:
        return await state.delete_document(request, doc_id)

    @api.get("/stores")
    async def list_stores() -> JSONResponse:
        return JSONResponse({"object": "list", "data": [await state.store_info(n) for n in state.stores]})

    @api.get("/stores/{name}")
    async def get_store(name: str) -> JSONResponse:
        if name not in state.stores:
            raise APIError(
                404,
                f"store {name!r} not found; available: {sorted(state.stores)}",
                param="name",
                code="store_not_found",
            )
        return JSONResponse(await state.store_info(name))


class BackgroundServer:
    """Serve an app with uvicorn on a background thread (tests, benchmarks, notebooks).

    >>> with BackgroundServer(create_app(gen, stores)) as server:
    ...     httpx.get(server.url + "/health")
    """

    def __init__(
        self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"
    ) -> None:
        import uvicorn

        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))  # port 0: the OS picks a free one, with no race
        self.host, self.port = host, self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self, timeout: float = 30.0) -> BackgroundServer:
        self.thread.start()
        t0 = time.monotonic()
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() - t0 > timeout:
                raise RuntimeError(f"the server did not start on {self.url}")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        self.sock.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
