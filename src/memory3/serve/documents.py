"""The knowledge endpoints, `/v1/documents`: documents added, replaced and deleted while the
server runs, all of a request or nothing of it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any

from fastapi import Request
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse

from memory3.scheduler import (
    KnowledgeBase,
)
from memory3.serve.api import APIError, DocumentIn, DocumentReplace, DocumentsBody, _bad_id, _int_param

log = logging.getLogger(__name__)


class DocumentRoutes:
    """The document handlers of the app (`_App` in app.py): they use its `cfg`, `knowledge_base`,
    `parse`, `body` and `on_scheduler`."""

    _edit_locks: dict[str, asyncio.Lock]

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
