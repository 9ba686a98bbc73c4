"""An OpenAI-compatible HTTP server for a Memory³ model, with knowledge endpoints.

Endpoints (all but `/health` need `Authorization: Bearer <key>` when the server has a key):

    POST /v1/completions, /v1/chat/completions   OpenAI bodies, streaming (SSE) or not
    GET  /v1/models, /health
    POST /v1/documents                            add documents ({"documents": [{text, id?, title?, metadata?}]})
    GET  /v1/documents, /v1/documents/{id}        list, inspect
    PUT  /v1/documents/{id}                       replace (or create) one document
    DELETE /v1/documents/{id}
    GET  /v1/stores, /v1/stores/{name}

Memory per request: an extra body field `"memory": {"mode": "memory" | "none" | "rag", "k": 5,
"store": "name", "min_score": 0.45}` (all optional; `min_score` drops hits less similar to the
query than that, so a question the store knows nothing about reads nothing unrelated). Each choice carries `references`: the retrieved references
(`id`, `doc_id`, `title`, `score`, `chunks` = which 64-token chunks read them), so an answer can
be traced to its sources. Document endpoints take `?store=name`. Stores are looked up by name in
the dict the server was started with; nothing from a request is ever joined to a path.

No model logic lives here: requests are validated, turned into `GenerationRequest`s and handed
to the `Scheduler`, which owns the model on its own thread and batches requests that arrive
together.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import hmac
import json
import logging
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from memory3.config import GenerationConfig
from memory3.errors import Memory3Error
from memory3.generate import MODES, GenerationOutput, Generator, Mode, StreamEvent
from memory3.memory.write import MemoryFormatError, memory_fingerprint
from memory3.retrieval.base import Retriever
from memory3.scheduler import (
    Cancelled,
    GenerationRequest,
    Job,
    JobItem,
    JobTimeout,
    KnowledgeBase,
    QueueFull,
    Scheduler,
    SchedulerClosed,
    SchedulerConfig,
)

log = logging.getLogger(__name__)

RAG_TOKENS_PER_REFERENCE = 8  # "Reference: " and separators around each reference's text


@dataclass(frozen=True)
class ServerConfig:
    model_name: str = "memory3"  # the id clients send as `model`
    api_key: str | None = None  # bearer token required on every endpoint but /health
    default_store: str | None = None  # None: the first store given
    default_mode: Mode | None = None  # None: "memory" when a store is loaded, else "none"
    default_temperature: float = 0.0  # greedy unless a request asks otherwise (OpenAI's default is 1)
    max_body_bytes: int = 1 << 20
    max_prompt_tokens: int = 1024
    max_tokens: int = 512  # largest max_tokens a request may ask for
    default_max_tokens: int = 128
    max_k: int = 16  # references per retrieval
    max_documents: int = 64  # documents per POST
    max_document_chars: int = 200_000
    documents_per_step: int = 4  # documents written between two batches, so decoding is not held up long
    max_list: int = 1000

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_prompt_tokens", "max_tokens", "default_max_tokens", "max_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        for name in ("max_documents", "max_document_chars", "documents_per_step", "max_list"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.default_max_tokens > self.max_tokens:
            raise ValueError(
                f"default_max_tokens ({self.default_max_tokens}) must be ≤ max_tokens ({self.max_tokens})"
            )
        if self.default_mode is not None and self.default_mode not in MODES:
            raise ValueError(f"default_mode must be one of {MODES}, got {self.default_mode!r}")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must not be empty: give a secret or None for no authentication")


# -- errors ---------------------------------------------------------------------------------------
class APIError(Exception):
    """An error answered as OpenAI does: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _job_error(e: BaseException) -> APIError:
    if isinstance(e, APIError):
        return e
    if isinstance(e, QueueFull):
        return APIError(
            429, f"server busy: {e}", "rate_limit_error", code="queue_full", headers={"Retry-After": "1"}
        )
    if isinstance(e, SchedulerClosed):
        return APIError(503, str(e), "server_error", code="unavailable", headers={"Retry-After": "5"})
    if isinstance(e, TimeoutError):  # JobTimeout, or asyncio's wait_for
        return APIError(
            504,
            f"request timed out: {e or 'no answer in time'}; retry later or ask for fewer tokens",
            "server_error",
            code="timeout",
        )
    if isinstance(e, MemoryFormatError):
        return APIError(500, str(e), "server_error", code="memory_format")
    if isinstance(e, Memory3Error) and not isinstance(e, ValueError):  # a bank that failed a read
        log.error("request failed: %s", e)
        return APIError(e.http_status, str(e), "server_error", code="store_error")
    if isinstance(e, ValueError):
        return APIError(400, str(e))
    log.error("request failed", exc_info=e)
    return APIError(500, f"internal error: {type(e).__name__}: {e}", "server_error")


def _validation_error(e: ValidationError | RequestValidationError) -> APIError:
    errors = e.errors()
    # a misspelt field is the likelier cause of a "missing" one: name it first
    err = next((x for x in errors if x.get("type") == "extra_forbidden"), errors[0])
    # pydantic names the member of a union it tried ("str", "list[str]"): not a field
    tags = {"str", "int", "float", "bool", "dict", "list", "none"}
    loc = [
        str(x)
        for x in err.get("loc", ())
        if x not in ("body", "query", "path") and x not in tags and "[" not in str(x)
    ]
    param = ".".join(loc) or None
    if err.get("type") == "extra_forbidden":
        return APIError(
            400, f"unknown field {param!r}: this server does not accept it", param=param, code="unknown_field"
        )
    if err.get("type") == "missing":
        return APIError(400, f"missing required field {param!r}", param=param, code="missing_field")
    got = err.get("input")
    shown = (
        json.dumps(got)[:80] if isinstance(got, str | int | float | bool | type(None)) else type(got).__name__
    )
    return APIError(
        400, f"invalid {param or 'body'}: {err.get('msg')} (got {shown})", param=param, code="invalid_value"
    )


# -- request bodies -------------------------------------------------------------------------------
class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class MemoryOptions(_Body):
    mode: Literal["memory", "none", "rag"] | None = None
    k: int | None = Field(None, ge=1)
    store: str | None = Field(None, min_length=1, max_length=200)
    min_score: float | None = Field(None, ge=-1.0, le=1.0)  # None: the server's --min-score


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)  # an extension, as in vLLM
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    memory: MemoryOptions | None = None


class CompletionBody(_Sampling):
    prompt: str | list[str]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None
    logprobs: int | None = None


class TextPart(_Body):
    type: Literal["text"]
    text: str


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None


class ChatBody(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None


def _bad_id(value: str) -> str | None:
    """Why a document id cannot be used, or None. Ids are never file paths (the store keeps them
    in SQLite); they may hold '/' (`memory3 build` names documents `wikipedia/<title>` or by their
    relative path), but no '.' or '..' segment, which clients and proxies drop from URLs."""
    if not 1 <= len(value) <= 256:
        return "must be 1 to 256 characters"
    if any(part in (".", "..", "") for part in value.split("/")) or "\\" in value:
        return "must not have an empty, '.' or '..' segment between '/' nor contain '\\'"
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        return "must not contain control characters"
    return None


class DocumentIn(_Body):
    id: str | None = None
    text: str = Field(min_length=1)
    title: str = Field("", max_length=1000)
    metadata: dict[str, Any] | None = None


class DocumentsBody(_Body):
    documents: list[DocumentIn] = Field(min_length=1)


class DocumentReplace(_Body):
    text: str = Field(min_length=1)
    title: str = Field("", max_length=1000)
    metadata: dict[str, Any] | None = None


# -- plumbing between the event loop and the scheduler thread -------------------------------------
class _Pipe:
    """A job sink that hands items to an asyncio queue from the scheduler thread."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[JobItem] = asyncio.Queue()

    def __call__(self, item: JobItem) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed (server stopped): nobody waits for the item
            log.debug("dropped a result for a closed event loop")


async def _next_item(pipe: _Pipe, job: Job, request: Request | None) -> JobItem:
    """The job's next item; raises APIError on timeout. With `request`, also notices a client
    that left (polled: a non-streaming handler gets no disconnect event otherwise)."""
    grace = 1.0  # the scheduler itself fails a late job; this catches a scheduler stuck in a long batch
    while True:
        left = job.deadline + grace - time.monotonic()
        if left <= 0:
            job.cancel()
            raise _job_error(JobTimeout("no answer in time"))
        try:
            return await asyncio.wait_for(pipe.queue.get(), timeout=min(left, 0.25) if request else left)
        except asyncio.TimeoutError:
            if request is not None and await request.is_disconnected():
                job.cancel()
                raise APIError(499, "client closed the request", code="client_closed") from None


# -- the app --------------------------------------------------------------------------------------
class _App:
    """The state and handlers behind one FastAPI app."""

    def __init__(
        self,
        generator: Generator,
        stores: Mapping[str, Retriever],
        config: ServerConfig,
        scheduler: Scheduler,
    ) -> None:
        self.cfg = config
        self.gen = generator
        self.stores = dict(stores)
        self.scheduler = scheduler
        self.created = int(time.time())
        self._edit_locks: dict[str, asyncio.Lock] = {}
        # The scheduler thread uses the generator's tokenizer; the event loop gets its own copy
        # (a fast tokenizer must not be used from two threads at once).
        self.tok = copy.deepcopy(generator.tokenizer)
        self._adds_bos = bool(self.tok("a").input_ids[:1] == [self.tok.bos_token_id])
        if config.default_store is not None and config.default_store not in self.stores:
            raise ValueError(
                f"default_store {config.default_store!r} is not among the stores {sorted(self.stores)}"
            )
        self.default_store = config.default_store or next(iter(self.stores), None)
        self.default_mode: Mode = config.default_mode or ("memory" if self.stores else "none")
        ours = memory_fingerprint(generator.model, generator.mem_cfg)
        for name, store in self.stores.items():
            if store.memory_fingerprint != ours:
                raise MemoryFormatError(
                    f"store {name!r} holds memories written by another model or memory config "
                    f"({store.memory_fingerprint}, this model reads {ours}); rebuild it with this model"
                )

    # -- helpers ----------------------------------------------------------------------------
    async def body(self, request: Request) -> dict[str, Any]:
        limit = self.cfg.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise APIError(
                413,
                f"request body of {declared} bytes exceeds the limit of {limit} bytes",
                code="body_too_large",
            )
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise APIError(413, f"request body exceeds the limit of {limit} bytes", code="body_too_large")
            chunks.append(chunk)
        try:
            data = json.loads(b"".join(chunks))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise APIError(400, f"the body is not valid JSON: {e}", code="invalid_json") from None
        if not isinstance(data, dict):
            raise APIError(
                400, f"the body must be a JSON object, got {type(data).__name__}", code="invalid_json"
            )
        return data

    def parse(self, model: type[BaseModel], data: dict[str, Any]) -> Any:
        try:
            return model.model_validate(data)
        except ValidationError as e:
            raise _validation_error(e) from None

    def store(self, name: str | None) -> tuple[str, Retriever]:
        name = name or self.default_store
        if name is None:
            raise APIError(
                400,
                "no store is loaded: start the server with --store, or use memory mode 'none'",
                param="store",
            )
        store = self.stores.get(name)  # a dict lookup: a name never becomes a path
        if store is None:
            raise APIError(
                404,
                f"store {name!r} not found; available: {sorted(self.stores)}",
                param="store",
                code="store_not_found",
            )
        return name, store

    def knowledge_base(self, name: str | None) -> tuple[str, KnowledgeBase]:
        name, store = self.store(name)
        if not isinstance(store, KnowledgeBase):
            raise APIError(
                400,
                f"store {name!r} is read-only: it has no document operations",
                param="store",
                code="read_only",
            )
        return name, store

    async def on_scheduler(self, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            fut = self.scheduler.call(fn, *args)
            return await asyncio.wait_for(
                asyncio.wrap_future(fut), timeout=self.scheduler.config.request_timeout_s
            )
        except (QueueFull, SchedulerClosed, asyncio.TimeoutError) as e:
            raise _job_error(e) from None
        except (ValueError, KeyError) as e:
            raise APIError(400, f"the store refused the operation: {e}", code="store_error") from None
        except Memory3Error as e:
            raise APIError(
                e.http_status, f"the store failed: {e}", "server_error" if e.http_status >= 500 else
                "invalid_request_error", code="store_error",
            ) from None  # fmt: skip

    # -- generation -------------------------------------------------------------------------
    def _sampling(
        self, b: _Sampling, max_tokens: int | None, prompt_tokens: int, prompt_param: str
    ) -> tuple[GenerationRequest, dict]:
        cfg = self.cfg
        if b.model != cfg.model_name:
            raise APIError(
                404,
                f"model {b.model!r} not found; this server serves {cfg.model_name!r}",
                param="model",
                code="model_not_found",
            )
        if b.n not in (None, 1):
            raise APIError(
                400,
                f"n={b.n}: this server returns one choice per request; send {b.n} requests instead (they are batched)",
                param="n",
            )
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(b, name) not in (None, 0):
                raise APIError(
                    400,
                    f"{name} is not supported; leave it out or set it to 0",
                    param=name,
                    code="unsupported",
                )
        if b.logit_bias:
            raise APIError(400, "logit_bias is not supported", param="logit_bias", code="unsupported")
        if b.stream_options is not None and not b.stream:
            raise APIError(400, "stream_options is only allowed with stream=true", param="stream_options")
        stop = [b.stop] if isinstance(b.stop, str) else list(b.stop or [])
        if len(stop) > 4 or any(not s for s in stop):
            raise APIError(400, "stop takes up to 4 non-empty strings", param="stop")
        # memory mode and store
        mo = b.memory or MemoryOptions()
        mode: Mode = mo.mode or self.default_mode
        k, min_score = None, None
        retriever, store_name = None, ""
        if mode != "none":
            min_score = self.gen.min_score if mo.min_score is None else mo.min_score
            k = mo.k if mo.k is not None else self.gen.mem_cfg.memories_per_chunk
            if k > cfg.max_k:
                raise APIError(400, f"memory.k={k} exceeds the limit of {cfg.max_k}", param="memory.k")
            store_name, retriever = self.store(mo.store)
        elif mo.k is not None or mo.store is not None or mo.min_score is not None:
            raise APIError(
                400,
                "memory.k, memory.store and memory.min_score need mode 'memory' or 'rag'",
                param="memory.mode",
            )
        # lengths
        if prompt_tokens > cfg.max_prompt_tokens:
            raise APIError(
                400,
                f"the prompt has {prompt_tokens} tokens, more than the limit of {cfg.max_prompt_tokens}; shorten it",
                param=prompt_param,
                code="context_length_exceeded",
            )
        R = self.gen.mem_cfg.reference_tokens
        offset = {
            "memory": len(self.gen.prefix_ids) + R,
            "rag": (k or 0) * (R + RAG_TOKENS_PER_REFERENCE),
            "none": 0,
        }[mode]
        context = prompt_tokens + offset
        limit = self.gen.model.config.max_seq_len
        if context >= limit:
            raise APIError(
                400,
                f"the prompt ({prompt_tokens} tokens, +{offset} for {mode} mode) does not fit the context of {limit} tokens",
                param=prompt_param,
                code="context_length_exceeded",
            )
        if max_tokens is not None and max_tokens > cfg.max_tokens:
            raise APIError(
                400, f"max_tokens={max_tokens} exceeds the limit of {cfg.max_tokens}", param="max_tokens"
            )
        if max_tokens is not None and context + max_tokens > limit:
            raise APIError(
                400,
                f"prompt ({context} positions with {mode} mode) + max_tokens ({max_tokens}) exceed the context of {limit} tokens; lower max_tokens",
                param="max_tokens",
                code="context_length_exceeded",
            )
        gen_cfg = GenerationConfig(
            max_new_tokens=max_tokens or min(cfg.default_max_tokens, limit - context),
            temperature=cfg.default_temperature if b.temperature is None else b.temperature,
            top_p=1.0 if b.top_p is None else b.top_p,
            top_k=b.top_k or 0,
            stop=tuple(stop),
            seed=b.seed,
        )
        req = GenerationRequest(
            prompt="",
            mode=mode,
            config=gen_cfg,
            k=k,
            min_score=min_score,
            retriever=retriever,
            store=store_name,
            stream=b.stream,
            context_tokens=context,
        )
        return req, {"mode": mode, "k": k, "store": store_name or None, "min_score": min_score}

    def _count(self, text: str, special: bool) -> int:
        return len(self.tok(text, add_special_tokens=special).input_ids)

    def chat_prompt(self, messages: list[Message]) -> tuple[str, bool, str | None, int]:
        """(prompt, apply the template in the Generator?, retrieval query, prompt tokens)."""
        turns = []
        for i, m in enumerate(messages):
            text = m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)
            turns.append({"role": "system" if m.role == "developer" else m.role, "content": text})
            if not text.strip() and m.role == "user":
                raise APIError(400, f"messages[{i}] has empty content", param=f"messages.{i}.content")
        if len(turns) == 1 and turns[0]["role"] == "user":
            # the Generator's own chat path: retrieval queries come from the user's text alone
            rendered = self.tok.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
            return turns[0]["content"], True, None, self._count(rendered, False)
        rendered = self.tok.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
        if self._adds_bos and self.tok.bos_token and rendered.startswith(self.tok.bos_token):
            rendered = rendered[len(self.tok.bos_token) :]  # the tokenizer adds it again
        users = [t["content"] for t in turns if t["role"] == "user"]
        query = (users[-1] if users else turns[-1]["content"]).strip() or rendered
        return rendered, False, query, self._count(rendered, True)

    async def completion(self, request: Request, chat: bool) -> Any:
        data = await self.body(request)
        if chat:
            b: Any = self.parse(ChatBody, data)
            if b.logprobs or b.top_logprobs:
                raise APIError(400, "logprobs are not supported", param="logprobs", code="unsupported")
            prompt, use_template, query, n_tokens = self.chat_prompt(b.messages)
            max_tokens, param = b.max_completion_tokens or b.max_tokens, "messages"
        else:
            b = self.parse(CompletionBody, data)
            for name, ok in (
                ("echo", not b.echo),
                ("suffix", b.suffix is None),
                ("best_of", b.best_of in (None, 1)),
                ("logprobs", b.logprobs is None),
            ):
                if not ok:
                    raise APIError(400, f"{name} is not supported", param=name, code="unsupported")
            if isinstance(b.prompt, list) and len(b.prompt) != 1:
                raise APIError(
                    400,
                    f"one prompt per request, got {len(b.prompt)}; send them as separate requests (they are batched)",
                    param="prompt",
                )
            prompt = b.prompt[0] if isinstance(b.prompt, list) else b.prompt
            if not prompt.strip():
                raise APIError(400, "the prompt is empty", param="prompt")
            use_template, query, n_tokens = False, None, self._count(prompt, True)
            max_tokens, param = b.max_tokens, "prompt"
        req, memory = self._sampling(b, max_tokens, n_tokens, param)
        req = dataclasses.replace(req, prompt=prompt, chat=use_template, query=query)
        pipe = _Pipe()
        try:
            job = self.scheduler.submit(req, pipe)
        except (QueueFull, SchedulerClosed) as e:
            raise _job_error(e) from None
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        obj = ("chat.completion" if chat else "text_completion") + (".chunk" if chat and req.stream else "")
        meta = {"id": rid, "object": obj, "created": int(time.time()), "model": self.cfg.model_name}
        if req.stream:
            usage = bool(b.stream_options and b.stream_options.include_usage)
            return StreamingResponse(
                self._stream(job, pipe, meta, memory, chat, usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        try:
            while True:
                item = await _next_item(pipe, job, request)
                if isinstance(item, GenerationOutput):
                    break
                if isinstance(item, BaseException):
                    raise _job_error(item)
        finally:
            job.cancel()  # a no-op once answered; frees the slot if we leave early
        choice: dict[str, Any] = {"index": 0}
        if chat:
            choice["message"] = {"role": "assistant", "content": item.text}
        else:
            choice["text"] = item.text
        choice |= {"logprobs": None, "finish_reason": item.finish_reason, "references": _references(item)}
        return JSONResponse({**meta, "choices": [choice], "usage": _usage(item), "memory": memory})

    async def _stream(
        self, job: Job, pipe: _Pipe, meta: dict, memory: dict, chat: bool, usage: bool
    ) -> AsyncIterator[str]:
        extra = {"usage": None} if usage else {}

        def chunk(delta: dict | str, finish: str | None = None, refs: list | None = None, **top: Any) -> str:
            c: dict[str, Any] = {"index": 0}
            if chat:
                c["delta"] = {"content": delta} if isinstance(delta, str) else delta
            else:
                c["text"] = delta if isinstance(delta, str) else ""
            c |= {"logprobs": None, "finish_reason": finish}
            if refs is not None:
                c["references"] = refs
            return _sse({**meta, "choices": [c], **extra, **top})

        try:
            if chat:
                yield chunk({"role": "assistant", "content": ""})
            while True:
                try:
                    item = await _next_item(pipe, job, None)
                except APIError as e:
                    yield _sse(e.body())
                    break
                if isinstance(item, StreamEvent):
                    if item.delta:
                        yield chunk(item.delta)
                elif isinstance(item, GenerationOutput):
                    yield chunk({}, item.finish_reason, _references(item), memory=memory)
                    if usage:
                        yield _sse({**meta, "choices": [], "usage": _usage(item)})
                    break
                else:
                    if not isinstance(item, Cancelled):
                        yield _sse(_job_error(item).body())
                    break
            yield "data: [DONE]\n\n"
        finally:
            job.cancel()  # the client left (this generator was cancelled) or we are done

    # -- knowledge --------------------------------------------------------------------------
    async def add_documents(self, request: Request) -> JSONResponse:
        name, kb = self.knowledge_base(request.query_params.get("store"))
        b: DocumentsBody = self.parse(DocumentsBody, await self.body(request))
        if len(b.documents) > self.cfg.max_documents:
            raise APIError(
                400,
                f"{len(b.documents)} documents in one request; the limit is {self.cfg.max_documents}",
                param="documents",
            )
        docs = [self._document(d, f"documents.{i}") for i, d in enumerate(b.documents)]
        ids = [d["id"] for d in docs if "id" in d]
        if len(set(ids)) != len(ids):
            raise APIError(400, "document ids repeat within the request", param="documents")
        async with self.editing(name):
            added, _ = await self.write_documents(kb, docs, new_ids=ids)
        data = [{"object": "document", **r} for r in jsonable_encoder(added)]
        return JSONResponse({"object": "list", "store": name, "data": data}, status_code=201)

    def editing(self, name: str) -> asyncio.Lock:
        """The lock that keeps one document operation at a time on store `name`: a batch spans
        several scheduler steps, and a store has one batch open at a time."""
        return self._edit_locks.setdefault(name, asyncio.Lock())

    async def write_documents(
        self, kb: KnowledgeBase, docs: list[dict], new_ids: Sequence[str] = ()
    ) -> tuple[list[dict], list[str]]:
        """Add (or replace) `docs`, all of them or none; `new_ids` must not exist yet (409).
        Returns the added documents and the ids of those that replaced a version.

        A knowledge base with batches (`begin_documents`) writes `documents_per_step` documents
        per scheduler operation, so that decoding goes on in between, and commits them together:
        the first operation also checks `new_ids` and begins the batch, the last one also
        commits, so a request of up to `documents_per_step` documents is one operation (each
        operation waits for the batch being decoded). Others take them in one operation."""

        def check() -> None:
            existing = [i for i in new_ids if kb.get_document(i) is not None]
            if existing:
                raise APIError(
                    409,
                    f"documents already exist: {existing}; replace them with PUT /v1/documents/{{id}}",
                    param="documents",
                    code="conflict",
                )

        begin = getattr(kb, "begin_documents", None)
        if begin is None:

            def add_all() -> tuple[list[dict], list[str]]:
                check()
                ids = [d["id"] for d in docs if "id" in d]
                old = [d for d in map(kb.get_document, ids) if d is not None]
                if old:  # one operation: no batch sees the document missing
                    kb.delete_documents([d["id"] for d in old])
                try:
                    return kb.add_documents(docs), [d["id"] for d in old]
                except BaseException:  # put the old versions back, then report
                    kb.add_documents(
                        [{k: d[k] for k in ("id", "text", "title", "metadata") if k in d} for d in old]
                    )
                    raise

            return await self.on_scheduler(add_all)
        step = self.cfg.documents_per_step
        steps = [docs[i : i + step] for i in range(0, len(docs), step)]
        holder: list[Any] = []

        def add(part: list[dict], first: bool, last: bool) -> list[dict] | None:
            if first:
                check()
                holder.append(begin())
            batch = holder[0]
            try:
                batch.add(part)
                return batch.commit() if last else None
            except BaseException:
                batch.abort()
                raise

        try:
            for n, part in enumerate(steps):
                out = await self.on_scheduler(add, part, n == 0, n == len(steps) - 1)
        except BaseException:
            if holder:  # a later step failed or was cancelled: nothing of the batch stays
                await asyncio.shield(self.on_scheduler_quietly(holder[0].abort))
            raise
        return out, list(holder[0].replaced)

    async def on_scheduler_quietly(self, fn: Callable[..., Any]) -> None:
        """Run `fn` on the scheduler if it still runs (clean-up after a failed request)."""
        try:
            await self.on_scheduler(fn)
        except APIError:
            log.warning("could not run %s on the scheduler; it runs when the store closes", fn)

    def _document(self, d: DocumentIn | DocumentReplace, param: str, doc_id: str | None = None) -> dict:
        doc_id = doc_id if doc_id is not None else getattr(d, "id", None)
        if doc_id is not None and (why := _bad_id(doc_id)):
            raise APIError(400, f"document id {doc_id[:80]!r} {why}", param=f"{param}.id")
        if len(d.text) > self.cfg.max_document_chars:
            raise APIError(
                400,
                f"document text of {len(d.text)} characters exceeds the limit of {self.cfg.max_document_chars}",
                param=f"{param}.text",
            )
        if not d.text.strip():
            raise APIError(400, "document text is empty", param=f"{param}.text")
        doc: dict[str, Any] = {"text": d.text, "title": d.title}
        if doc_id is not None:
            doc["id"] = doc_id
        if d.metadata is not None:
            doc["metadata"] = d.metadata
        return doc

    def _path_id(self, doc_id: str) -> str:
        if why := _bad_id(doc_id):
            raise APIError(400, f"document id {doc_id[:80]!r} {why}", param="id")
        return doc_id

    async def replace_document(self, request: Request, doc_id: str) -> JSONResponse:
        name, kb = self.knowledge_base(request.query_params.get("store"))
        doc = self._document(
            self.parse(DocumentReplace, await self.body(request)), "body", self._path_id(doc_id)
        )

        async with self.editing(name):
            added, replaced = await self.write_documents(kb, [doc])
        n = len(replaced)
        return JSONResponse(
            {"object": "document", **jsonable_encoder(added[0]), "store": name, "replaced": n > 0}
        )

    async def delete_document(self, request: Request, doc_id: str) -> JSONResponse:
        name, kb = self.knowledge_base(request.query_params.get("store"))
        async with self.editing(name):
            n = await self.on_scheduler(kb.delete_documents, [self._path_id(doc_id)])
        if n == 0:
            raise APIError(404, f"document {doc_id!r} not found", param="id", code="document_not_found")
        return JSONResponse({"id": doc_id, "object": "document.deleted", "deleted": True})

    async def get_document(self, request: Request, doc_id: str) -> JSONResponse:
        _, kb = self.knowledge_base(request.query_params.get("store"))
        doc = await self.on_scheduler(kb.get_document, self._path_id(doc_id))
        if doc is None:
            raise APIError(404, f"document {doc_id!r} not found", param="id", code="document_not_found")
        return JSONResponse({"object": "document", **jsonable_encoder(doc)})

    async def list_documents(self, request: Request) -> JSONResponse:
        name, kb = self.knowledge_base(request.query_params.get("store"))
        limit = _int_param(request, "limit", 100, 1, self.cfg.max_list)
        offset = _int_param(request, "offset", 0, 0, None)
        docs = await self.on_scheduler(kb.list_documents, limit, offset)
        data = [{"object": "document", **d} for d in jsonable_encoder(docs)]
        return JSONResponse({"object": "list", "store": name, "data": data, "limit": limit, "offset": offset})

    async def store_info(self, name: str) -> dict[str, Any]:
        store = self.stores[name]
        out: dict[str, Any] = {"id": name, "object": "store", "default": name == self.default_store}
        if isinstance(store, KnowledgeBase):
            out |= jsonable_encoder(await self.on_scheduler(store.info)) | {"writable": True}
        else:
            out["writable"] = False
            if hasattr(store, "__len__"):
                out["references"] = len(store)  # type: ignore[arg-type]
        out["memory_fingerprint"] = store.memory_fingerprint
        return out


def _int_param(request: Request, name: str, default: int, lo: int, hi: int | None) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise APIError(400, f"{name} must be an integer, got {raw[:40]!r}", param=name) from None
    if value < lo or (hi is not None and value > hi):
        raise APIError(
            400, f"{name} must be in {lo}..{hi if hi is not None else '∞'}, got {value}", param=name
        )
    return value


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _usage(out: GenerationOutput) -> dict[str, int]:
    n = len(out.token_ids)
    return {"prompt_tokens": out.prompt_tokens, "completion_tokens": n, "total_tokens": out.prompt_tokens + n}


def _references(out: GenerationOutput) -> list[dict[str, Any]]:
    """Each retrieved reference once, in order of first use, with the chunks that read it
    (memory mode: prompt chunks, then decoded chunks; RAG: chunk 0, the prompt)."""
    seen: dict[int, dict[str, Any]] = {}
    for chunk, hits in enumerate(out.references):
        for h in hits:
            r = seen.get(h.ref_id)
            if r is None:
                seen[h.ref_id] = {
                    "id": h.ref_id,
                    "doc_id": h.doc_id,
                    "title": h.title,
                    "score": round(h.score, 4),
                    "chunks": [chunk],
                }
            else:
                r["score"] = max(r["score"], round(h.score, 4))
                if r["chunks"][-1] != chunk:
                    r["chunks"].append(chunk)
    return list(seen.values())


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

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = scheduler.alive
        body = {
            "status": "ok" if ok else "unavailable",
            "queued": scheduler.queue_depth(),
            "running": scheduler.running(),
        }
        return JSONResponse(body, status_code=200 if ok else 503)

    api = APIRouter(prefix="/v1", dependencies=[Depends(authorize)])

    @api.get("/models")
    async def models() -> JSONResponse:
        card = {
            "id": config.model_name,
            "object": "model",
            "created": state.created,
            "owned_by": "memory3",
            "max_model_len": generator.model.config.max_seq_len,
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

    @api.post("/documents")
    async def add_documents(request: Request) -> JSONResponse:
        return await state.add_documents(request)

    @api.get("/documents")
    async def list_documents(request: Request) -> JSONResponse:
        return await state.list_documents(request)

    @api.get("/documents/{doc_id:path}")
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

    app.include_router(api)
    return app


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
