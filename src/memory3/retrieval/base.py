"""What generation needs from retrieval: query texts -> hits -> memories (docs/design.md, "Retrieving memories").

Concrete retrievers: `memory3.retrieval.retriever.StoreRetriever` (a memory bank on disk) and
`InMemoryRetriever` below (a handful of texts written on the fly, for demos and tests).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from memory3.memory.write import Memories


@dataclass(frozen=True)
class Hit:
    """One retrieved reference."""

    ref_id: int
    score: float
    text: str
    title: str = ""
    doc_id: str = ""


def check_min_score(min_score: float | None) -> float | None:
    """A relevance floor is a cosine similarity (the embedders' rows are normalised): in [-1, 1]."""
    if min_score is not None and not -1.0 <= min_score <= 1.0:
        raise ValueError(
            f"min_score is a cosine similarity in [-1, 1], got {min_score}; e.g. 0.45 drops references "
            "a query is barely related to, None keeps the top k whatever their score"
        )
    return min_score


def above_floor(hit_lists: list[list[Hit]], min_score: float | None) -> list[list[Hit]]:
    """The hits of each list scoring at least `min_score` (all of them when it is None)."""
    if min_score is None:
        return hit_lists
    return [[h for h in hits if h.score >= min_score] for hits in hit_lists]


@runtime_checkable
class Embedder(Protocol):
    """Dense text embedder; rows are L2-normalised so inner product is cosine similarity."""

    name: str
    dim: int

    def embed(self, texts: Sequence[str]) -> np.ndarray:  # (n, dim) float32
        ...


@runtime_checkable
class Retriever(Protocol):
    @property
    def memory_fingerprint(self) -> str:
        """Fingerprint of the model + memory config that wrote the memories."""
        ...

    def search(
        self,
        queries: Sequence[str],
        k: int,
        leak_texts: Sequence[str] | None = None,
        leak_threshold: float | None = None,
    ) -> list[list[Hit]]:
        """Top-k hits per query, best first. With `leak_texts` (one per query), references whose
        overlap (§4.4, Eq. 6) with that text exceeds `leak_threshold` are skipped and the next hit
        takes the slot."""
        ...

    def memories(self, ref_ids: Sequence[int]) -> Memories:
        """Decoded memories, in the order of `ref_ids`. They may share storage with the
        retriever's cache: read or copy them, never modify them in place."""
        ...
