"""Open the retriever a command asks for: a memory bank on disk (`--store`) or a small text/JSONL
knowledge base written to memory on the fly (`--kb`)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from memory3.config import MemoryConfig, Selection
from memory3.retrieval.base import Retriever

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


def open_retriever(
    loaded: Any,
    store: str | Path | None = None,
    kb: str | Path | None = None,
    embedder: str = "minilm",
    kept_tokens: int | None = None,
    selection: Selection | None = None,
    dtype: torch.dtype | None = None,
    writable: bool = False,
    adopt_layers: bool = True,
) -> tuple[Retriever | None, MemoryConfig]:
    """(retriever or None, the memory config to generate with).

    `kept_tokens` / `selection` (None: the model's own) set how a `kb`'s memories are written. A
    memory bank's memories were written when it was built, so with `store` they must match it.
    The same holds for the layers that read memory: with `adopt_layers` the model is set to read
    in the bank's layers where they differ from its own (a bank built with `--memory-layers`);
    without it (the layers were asked for) a difference is an error.
    `dtype`: what a bank's memories are cached in (`StoreRetriever.open`). `writable`: open a
    bank for writing (it takes the bank's writer lock), so that its documents can be changed."""
    if store is not None and kb is not None:
        raise ValueError("give either --store (a memory bank) or --kb (a small text file), not both")
    if store is not None:
        from memory3.memory.manifest import read_memory_config
        from memory3.retrieval.retriever import StoreRetriever

        have = read_memory_config(store)
        want = have.override(kept_tokens, selection)
        if want != have:
            raise ValueError(
                f"memory bank {store} keeps {have.kept_tokens} tokens per head (selection "
                f"{have.selection!r}), not the {want.kept_tokens} ({want.selection!r}) asked for: its "
                f"memories were written when it was built. Drop --kept-tokens/--selection to read it as "
                f"it is, or build another bank with `memory3 build SOURCE --out DIR --kept-tokens "
                f"{want.kept_tokens} --selection {want.selection}`"
            )
        retriever = StoreRetriever.open(
            store, loaded.model, loaded.tokenizer, dtype=dtype, writable=writable, adopt_layers=adopt_layers
        )
        return retriever, retriever.memory_config
    if kb is None:
        return None, loaded.memory_config.override(kept_tokens, selection)
    from memory3.memory.ingest import IngestStats, chunk_documents, read_documents
    from memory3.memory.write import MemoryWriter
    from memory3.retrieval.embed import get_embedder
    from memory3.retrieval.inmemory import InMemoryRetriever

    cfg = loaded.memory_config.override(kept_tokens, selection)
    stats = IngestStats()
    refs = list(
        chunk_documents(read_documents(kb, stats), loaded.tokenizer, cfg.reference_tokens, stats=stats)
    )
    if not refs:
        raise ValueError(f"{kb}: no text to remember ({stats.as_dict()})")
    writer = MemoryWriter.for_model(loaded.model, loaded.tokenizer, cfg)
    log.info("writing %d memories from %s", len(refs), kb)
    return InMemoryRetriever(refs, writer, loaded.tokenizer, get_embedder(embedder)), cfg
