"""The app: validation, completions (streaming or not) through the scheduler, and the routes."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from fastapi import Request
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError

from memory3.config import GenerationConfig
from memory3.decoding import StreamEvent
from memory3.errors import Memory3Error
from memory3.generate import GenerationOutput, Generator, Mode
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
)
from memory3.serve.api import (
    RAG_TOKENS_PER_REFERENCE,
    APIError,
    ChatBody,
    CompletionBody,
    MemoryOptions,
    Message,
    ServerConfig,
    _job_error,
    _Sampling,
    _validation_error,
)
from memory3.serve.documents import DocumentRoutes

log = logging.getLogger(__name__)


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
class _App(DocumentRoutes):
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
        """A validated request -> (what the scheduler runs, the `memory` object answered back)."""
        stop = self._check_sampling(b)
        mode, k, min_score, store_name, retriever = self._memory_options(b.memory or MemoryOptions())
        context, limit = self._check_lengths(mode, k, prompt_tokens, prompt_param, max_tokens)
        cfg = self.cfg
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

    def _check_sampling(self, b: _Sampling) -> list[str]:
        """Refuse what this server does not do (with what to do instead); returns the stop strings."""
        if b.model != self.cfg.model_name:
            raise APIError(
                404,
                f"model {b.model!r} not found; this server serves {self.cfg.model_name!r}",
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
        return stop

    def _memory_options(self, mo: MemoryOptions) -> tuple[Mode, int | None, float | None, str, Any]:
        """(mode, k, min_score, store name, retriever) of a request's `memory` object."""
        mode: Mode = mo.mode or self.default_mode
        if mode == "none":
            if mo.k is not None or mo.store is not None or mo.min_score is not None:
                raise APIError(
                    400,
                    "memory.k, memory.store and memory.min_score need mode 'memory' or 'rag'",
                    param="memory.mode",
                )
            return mode, None, None, "", None
        min_score = self.gen.min_score if mo.min_score is None else mo.min_score
        k = mo.k if mo.k is not None else self.gen.mem_cfg.memories_per_chunk
        if k > self.cfg.max_k:
            raise APIError(400, f"memory.k={k} exceeds the limit of {self.cfg.max_k}", param="memory.k")
        store_name, retriever = self.store(mo.store)
        return mode, k, min_score, store_name, retriever

    def _check_lengths(
        self, mode: Mode, k: int | None, prompt_tokens: int, prompt_param: str, max_tokens: int | None
    ) -> tuple[int, int]:
        """(positions the prompt takes in `mode`, the model's context); refuses what does not fit."""
        cfg = self.cfg
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
        limit = self.gen.model.config.context_limit
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
        return context, limit

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
