"""A quick accuracy probe used while training: held-out fictional questions, the gold reference
forced among the 5 retrieved, greedy answers, scored with `answer_contained`, in three modes
(memory / none / rag). The full evaluation harness is `memory3.eval`; this is its small cousin,
cheap enough to run at the end of every training run.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from memory3.config import GenerationConfig, MemoryConfig
from memory3.data.qa import QAItem, answer_contained, load_kb, load_qa, shipped_path
from memory3.generate import Generator
from memory3.memory.ingest import Reference
from memory3.memory.write import MemoryWriter, reference_prefix_ids, reset_fingerprint
from memory3.model import Memory3Model
from memory3.retrieval.base import Embedder, Hit
from memory3.retrieval.inmemory import InMemoryRetriever

log = logging.getLogger(__name__)


class GoldAmongRetriever:
    """Wraps a retriever so that a question's gold reference is always among its k hits (it
    replaces the last hit when retrieval missed it): the probe measures reading, not retrieval."""

    def __init__(self, base: InMemoryRetriever, gold: dict[str, int]) -> None:
        self.base, self.gold = base, gold

    @property
    def memory_fingerprint(self) -> str:
        return self.base.memory_fingerprint

    def search(
        self, queries: Sequence[str], k: int, leak_texts: Any = None, leak_threshold: Any = None
    ) -> list[list[Hit]]:
        out = []
        for q, hits in zip(queries, self.base.search(queries, k, leak_texts, leak_threshold), strict=True):
            g = self.gold.get(q.strip())
            if g is not None and all(h.ref_id != g for h in hits):
                r = self.base.references[g]
                hits = [*hits[: k - 1], Hit(g, 0.0, r.text, r.title, r.doc_id)]
            out.append(hits)
        return out

    def memories(self, ref_ids: Sequence[int]) -> Any:
        return self.base.memories(ref_ids)


@dataclass
class ProbeResult:
    accuracy: dict[str, float]  # mode -> fraction correct
    n: int
    examples: list[dict[str, str]]


def heldout_questions(n: int, source: str = "fictional") -> tuple[list[QAItem], list[Any]]:
    items = [it for it in load_qa(shipped_path(f"{source}.jsonl")) if it.split == "heldout"][:n]
    return items, load_kb(shipped_path(f"{source}_kb.jsonl"))


def probe(
    model: Memory3Model,
    tokenizer: Any,
    n: int = 40,
    modes: Sequence[str] = ("memory", "none", "rag"),
    memory_config: MemoryConfig | None = None,
    embedder: Embedder | None = None,
    source: str = "fictional",
    max_new_tokens: int = 32,
    batch_size: int = 20,
    bf16: bool = False,
) -> ProbeResult:
    """Accuracy on `n` held-out questions of `source` in each mode (same model, same 5 hits)."""
    from memory3.retrieval.embed import get_embedder

    mem_cfg = memory_config or MemoryConfig()
    embedder = embedder or get_embedder("minilm")
    items, kb = heldout_questions(n, source)
    was_training = model.training
    model.eval()
    reset_fingerprint(model)
    prefix = reference_prefix_ids(tokenizer, model.config.bos_token_id, mem_cfg)
    refs = []
    for i, d in enumerate(kb):
        ids = tokenizer(d.text, add_special_tokens=False).input_ids[: mem_cfg.reference_tokens]
        refs.append(Reference(str(i), d.doc_id, 0, tuple(ids), d.text, d.title))
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else torch.autocast("cpu", enabled=False)
    with ctx, torch.no_grad():
        writer = MemoryWriter(model, prefix, mem_cfg)
        base = InMemoryRetriever(refs, writer, tokenizer, embedder)
    row = {d.doc_id: i for i, d in enumerate(kb)}
    retr = GoldAmongRetriever(base, {it.question.strip(): row[it.doc_id] for it in items})
    gen = Generator(model, tokenizer, retr, mem_cfg)
    cfg = GenerationConfig(max_new_tokens=max_new_tokens)
    acc: dict[str, float] = {}
    examples: list[dict[str, str]] = []
    for mode in modes:
        right = 0
        for s in range(0, len(items), batch_size):
            part = items[s : s + batch_size]
            with ctx:
                outs = gen.generate([it.question for it in part], mode=mode, config=cfg)  # type: ignore[arg-type]
            for it, o in zip(part, outs, strict=True):
                ok = answer_contained(o.text, it.answers)
                right += ok
                if len(examples) < 3 * len(modes) and s == 0:
                    examples.append(
                        {"mode": mode, "q": it.question, "gold": it.answers[0], "out": o.text[:120]}
                    )
        acc[mode] = right / max(len(items), 1)
        log.info("probe %s: %.3f (%d questions)", mode, acc[mode], len(items))
    reset_fingerprint(model)
    model.train(was_training)
    return ProbeResult(acc, len(items), examples)
