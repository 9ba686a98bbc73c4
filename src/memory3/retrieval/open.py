"""Open the retriever a command asks for: a memory bank on disk (`--store`) or a small text/JSONL
knowledge base written to memory on the fly (`--kb`)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from memory3.config import MemoryConfig
from memory3.retrieval.base import Retriever

log = logging.getLogger(__name__)


def open_retriever(
    loaded: Any, store: str | Path | None = None, kb: str | Path | None = None, embedder: str = "minilm"
) -> tuple[Retriever | None, MemoryConfig]:
    """(retriever or None, the memory config to generate with)."""
    if store is not None and kb is not None:
        raise ValueError("give either --store (a memory bank) or --kb (a small text file), not both")
    if store is not None:
        from memory3.retrieval.retriever import StoreRetriever

        retriever = StoreRetriever.open(store, loaded.model, loaded.tokenizer)
        return retriever, retriever.memory_config
    if kb is None:
        return None, loaded.memory_config
    from memory3.memory.ingest import IngestStats, chunk_documents, read_documents
    from memory3.memory.write import MemoryWriter, reference_prefix_ids
    from memory3.retrieval.embed import get_embedder
    from memory3.retrieval.inmemory import InMemoryRetriever

    cfg = loaded.memory_config
    stats = IngestStats()
    refs = list(
        chunk_documents(read_documents(kb, stats), loaded.tokenizer, cfg.reference_tokens, stats=stats)
    )
    if not refs:
        raise ValueError(f"{kb}: no text to remember ({stats.as_dict()})")
    prefix = reference_prefix_ids(loaded.tokenizer, loaded.model.config.bos_token_id, cfg)
    writer = MemoryWriter(loaded.model, prefix, cfg)
    log.info("writing %d memories from %s", len(refs), kb)
    return InMemoryRetriever(refs, writer, loaded.tokenizer, get_embedder(embedder)), cfg
