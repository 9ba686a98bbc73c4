"""A retriever over a few references held in RAM: memories written on construction, exact search.

For demos, tests and small private knowledge bases; a memory bank on disk is
`memory3.retrieval.retriever.StoreRetriever`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from memory3.memory.ingest import Reference
from memory3.memory.write import Memories, MemoryWriter
from memory3.retrieval.base import Embedder, Hit
from memory3.retrieval.leak import leak_check

if TYPE_CHECKING:
    from memory3.memory.codec import MemoryCodec


class InMemoryRetriever:
    """references: chunked `Reference`s (see `memory.ingest.chunk_documents`) or plain strings
    (each cut to the first `reference_tokens` tokens)."""

    def __init__(
        self,
        references: Sequence[Reference] | Sequence[str],
        writer: MemoryWriter,
        tokenizer: Any,
        embedder: Embedder,
        batch_size: int = 16,
    ) -> None:
        if not references:
            raise ValueError("InMemoryRetriever needs at least one reference")
        n = writer.config.reference_tokens
        refs: list[Reference] = []
        for i, r in enumerate(references):
            if isinstance(r, str):
                ids = tokenizer(r, add_special_tokens=False).input_ids[:n]
                if not ids:
                    raise ValueError(f"reference {i} is empty: give non-empty texts")
                r = Reference(str(i), str(i), 0, tuple(ids), tokenizer.decode(ids))
            refs.append(r)
        self.references = refs
        self.texts = [r.text for r in refs]
        self.embedder = embedder
        self._vectors = embedder.embed(self.texts)
        self._memories: Memories = writer.write([list(r.token_ids) for r in refs], batch_size=batch_size).to(
            "cpu"
        )
        self._fingerprint = writer.fingerprint

    @property
    def memory_fingerprint(self) -> str:
        return self._fingerprint

    def __len__(self) -> int:
        return len(self.references)

    def search(
        self,
        queries: Sequence[str],
        k: int,
        leak_texts: Sequence[str] | None = None,
        leak_threshold: float | None = None,
    ) -> list[list[Hit]]:
        scores = self.embedder.embed(list(queries)) @ self._vectors.T  # (Q, N) cosine
        order = np.argsort(-scores, axis=1, kind="stable")
        out = []
        is_leak = leak_check(leak_texts, leak_threshold)
        for qi, row in enumerate(order):
            hits: list[Hit] = []
            for i in row:
                if len(hits) == k:
                    break
                r = self.references[i]
                if is_leak(qi, r.text):
                    continue  # the next hit takes the slot
                hits.append(Hit(int(i), float(scores[qi, i]), r.text, r.title, r.doc_id))
            out.append(hits)
        return out

    def memories(self, ref_ids: Sequence[int]) -> Memories:
        return self._memories[list(ref_ids)]

    def through_codec(self, codec: MemoryCodec) -> None:
        """Hold every memory as a bank built with `codec` holds it: encoded, then decoded. Evaluates
        a codec on the same references without writing a bank to disk."""
        dtype = self._memories.k.dtype
        self._memories = codec.decode(codec.encode(self._memories), self._fingerprint, dtype)
