"""The HTTP API's vocabulary: the server's config, its errors (OpenAI's shape), and the request
bodies it accepts."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from memory3.errors import Memory3Error
from memory3.generate import MODES, Mode
from memory3.memory.write import MemoryFormatError
from memory3.scheduler import (
    QueueFull,
    SchedulerClosed,
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
    documents_per_step: int = 4  # documents written per scheduler operation, so decoding is not held up long
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
