"""`memory3 demo`: explicit memory vs no memory vs RAG, same model, same references.

Knowledge: a handful of bundled Wikipedia summaries (held-out split) and invented facts that no
model's weights can hold. Each question is answered three ways and scored; speeds are measured
in the same run.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import torch

from memory3.cli.common import (
    load_model,
)
from memory3.config import GenerationConfig
from memory3.data.qa import QAItem, answer_contained, load_qa, shipped_path
from memory3.generate import MODES, Generator
from memory3.memory.ingest import Document, chunk_documents
from memory3.memory.write import MemoryWriter
from memory3.retrieval.embed import get_embedder
from memory3.retrieval.inmemory import InMemoryRetriever


def _say(msg: str = "") -> None:
    print(msg, flush=True)


def _questions(n_wiki: int, n_fictional: int) -> tuple[list[QAItem], list[Document]]:
    items = [q for q in load_qa(shipped_path("wikipedia.jsonl")) if q.split == "heldout"][:n_wiki]
    items += [q for q in load_qa(shipped_path("fictional.jsonl")) if q.split == "heldout"][:n_fictional]
    docs: dict[str, Document] = {}
    for q in items:
        assert q.reference is not None
        docs.setdefault(q.doc_id, Document(q.doc_id, q.reference, q.entity))
    return items, list(docs.values())


def run_demo(args: argparse.Namespace) -> int:

    t0 = time.perf_counter()
    loaded = load_model(args)
    model, tok = loaded.model, loaded.tokenizer
    _say(
        f"model: {args.model} ({model.config.n_layer} layers, memory layers "
        f"{model.config.memory_layers[0]}..{model.config.memory_layers[-1]}), {args.dtype} on {args.device}, "
        f"loaded in {time.perf_counter() - t0:.1f}s"
    )

    cfg = loaded.memory_config
    items, docs = _questions(args.articles, max(3, args.articles // 2))
    refs = list(chunk_documents(docs, tok, cfg.reference_tokens))
    writer = MemoryWriter.for_model(model, tok, cfg)
    t0 = time.perf_counter()
    with torch.inference_mode():
        bank = InMemoryRetriever(refs, writer, tok, get_embedder("minilm"))
    dt = time.perf_counter() - t0
    per_mem = (
        2
        * model.config.n_memory_layers
        * model.config.n_kv_head
        * cfg.kept_tokens
        * model.config.head_dim
        * 2
    )
    _say(
        f"memory bank: {len(refs)} references from {len(docs)} documents (Wikipedia summaries, CC BY-SA 4.0, "
        f"and invented facts), written in {dt:.1f}s including embedding; {per_mem / 1024:.0f} KiB per memory in bf16"
    )
    _say()

    gen = Generator(model, tok, bank, cfg)
    gcfg = GenerationConfig(max_new_tokens=40)
    results = _answer_three_ways(gen, items, gcfg)
    _report(items, results, gcfg, str(args.model))
    sys.stdout.flush()
    return 0


def _answer_three_ways(gen: Generator, items: list[QAItem], gcfg: GenerationConfig) -> dict[str, Any]:
    """Each mode's answers to the same questions, accuracy and speeds."""
    questions = [q.question for q in items]
    results: dict[
        str, Any
    ] = {}  # one untimed call first: loading the decode kernel (compiled on a machine's first run) and
    # first allocations would otherwise be charged to whichever mode runs first
    gen.generate(questions, mode="memory", config=GenerationConfig(max_new_tokens=2))
    for mode in MODES:
        t0 = time.perf_counter()
        outs = gen.generate(questions, mode=mode, config=gcfg)  # type: ignore[arg-type]
        wall = time.perf_counter() - t0
        tm = gen.timing
        results[mode] = {
            "outs": outs,
            "acc": sum(answer_contained(o.text, q.answers) for o, q in zip(outs, items, strict=True))
            / len(items),
            "wall": wall,
            "ttft": tm.first_token_s,
            # per step of the whole batch: rows that finished early still ride along, so tokens per
            # second would favour the mode whose answers run longest
            "step_ms": 1000 * tm.decode_s / tm.decode_steps if tm.decode_steps else float("nan"),
            "throughput": tm.generated_tokens / wall,
            "prompt_tokens": sum(o.prompt_tokens for o in outs) / len(outs),
        }

    return results


def _report(items: list[QAItem], results: dict[str, Any], gcfg: GenerationConfig, model: str) -> None:
    for i, q in enumerate(items):
        _say(f"Q{i + 1}. {q.question}")
        _say(f"    expected: {q.answers[0]}")
        for mode in MODES:
            o = results[mode]["outs"][i]
            ok = "✓" if answer_contained(o.text, q.answers) else "✗"
            text = " ".join(o.text.split())
            _say(f"    {mode:>6} {ok} {text[:150]}")
        hits = results["memory"]["outs"][i].references[0]
        gold = any(h.doc_id == q.doc_id for h in hits)
        _say(
            f"    retrieved: {', '.join(h.title or h.doc_id for h in hits)}{'' if gold else '  (gold reference missed)'}"
        )
    _say()
    _say(
        f"{'mode':>8} {'accuracy':>9} {'prompt tok':>11} {'TTFT s':>8} {'ms/decode step':>15} {'tok/s overall':>14}"
    )
    for mode in MODES:
        r = results[mode]
        _say(
            f"{mode:>8} {r['acc']:>9.0%} {r['prompt_tokens']:>11.0f} {r['ttft']:>8.2f} {r['step_ms']:>15.1f} {r['throughput']:>14.1f}"
        )
    _say()
    _say(
        f"batch of {len(items)} questions per mode, greedy, ≤{gcfg.max_new_tokens} new tokens; "
        "accuracy = expected answer contained in the reply; a decode step runs the whole batch; "
        "timed after one warm-up call."
    )
    if not model.endswith("memory3"):
        _say(
            "note: this base model was never trained to read explicit memory (the paper trains it, §3.5); "
            "its memory answers show what an untrained reader does. RAG and no-memory are the baselines."
        )
