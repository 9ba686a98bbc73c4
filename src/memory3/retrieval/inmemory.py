"""A retriever over a few texts held in RAM: memories written on construction, exact search.

For demos, tests and small private knowledge bases; a memory bank on disk is
`memory3.retrieval.retriever.StoreRetriever`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from memory3.memory.write import Memories, MemoryWriter
from memory3.retrieval.base import Embedder, Hit


class InMemoryRetriever:
    def __init__(
        self,
        texts: Sequence[str],
        writer: MemoryWriter,
        tokenizer: Any,
        embedder: Embedder,
        titles: Sequence[str] | None = None,
        batch_size: int = 16,
    ) -> None:
        if not texts:
            raise ValueError("InMemoryRetriever needs at least one text")
        n = writer.config.reference_tokens
        ids = [tokenizer(t, add_special_tokens=False).input_ids[:n] for t in texts]
        empty = [i for i, r in enumerate(ids) if not r]
        if empty:
            raise ValueError(f"texts {empty} are empty: give non-empty references")
        self.texts = [tokenizer.decode(r) for r in ids]  # exactly what the memories encode
        self.token_ids = ids
        self.titles = list(titles) if titles is not None else [""] * len(texts)
        self.embedder = embedder
        self._vectors = embedder.embed(self.texts)
        self._memories: Memories = writer.write(ids, batch_size=batch_size).to("cpu")
        self._fingerprint = writer.fingerprint

    @property
    def memory_fingerprint(self) -> str:
        return self._fingerprint

    def __len__(self) -> int:
        return len(self.texts)

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
        for qi, row in enumerate(order):
            hits: list[Hit] = []
            for i in row:
                if len(hits) == k:
                    break
                if leak_texts is not None and leak_threshold is not None:
                    from memory3.retrieval.leak import overlap

                    if overlap(leak_texts[qi], self.texts[i]) > leak_threshold:
                        continue
                hits.append(Hit(int(i), float(scores[qi, i]), self.texts[i], self.titles[i], str(i)))
            out.append(hits)
        return out

    def memories(self, ref_ids: Sequence[int]) -> Memories:
        return self._memories[list(ref_ids)]
