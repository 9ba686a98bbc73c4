"""Question answering against tokens kept per head, on the full evaluation harness.

The reader's probe (`memory3 train probe --kept …`) sweeps kept tokens on 40 invented towns; this
runs the same sweep on every held-out question of the harness's sets, with the same model, the same
knowledge base and the same retrieval as `memory3 eval qa`: only the number of tokens each memory
keeps per head changes (memories are rewritten for each setting). RAG is measured once per set (it
reads text, so kept tokens do not touch it) and every memory figure is also given as a fraction of
it, the training issue's measure. Bytes per memory are with the default 8-bit codec.

    .venv/bin/python benchmarks/bench_qa_kept.py [--kept 32 48 64 all] [--sets factbook] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from harness import Run, experiment, run_experiment

from memory3.data.qa import load_qa
from memory3.eval.qa import (
    QAEvalConfig,
    build_retriever,
    evaluate_qa,
    kb_documents,
    resolve_set,
    select_items,
)
from memory3.eval.report import table
from memory3.generate import Generator
from memory3.memory.codec import CodecConfig, MemoryCodec, MemoryShape
from memory3.retrieval.embed import get_embedder


def kept_setting(value: str) -> tuple[int | None, str | None]:
    """'32' -> (32, None); 'all' -> (None, 'all'): every token of the reference."""
    if value == "all":
        return None, "all"
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--kept takes numbers of tokens or 'all', got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"--kept takes positive numbers of tokens, got {n}")
    return n, None


def sq8_bytes(layers: int, kv_heads: int, kept: int, head_dim: int) -> int:
    """Bytes of one memory with the default codec (codes and positions)."""
    codec = MemoryCodec(CodecConfig(), MemoryShape(layers, kv_heads, kept, head_dim))
    return codec.record_bytes


def arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--sets", default="factbook,fictional,wikipedia", help="comma-separated question sets")
    ap.add_argument("--kept", nargs="+", default=["32", "48", "64", "all"], help="tokens per head, or 'all'")
    ap.add_argument("--limit", type=int, default=None, help="first N held-out questions per set")
    ap.add_argument("--batch-size", type=int, default=8)


@experiment("qa-kept", "qa_kept.json", arguments, threads=2)
def main(run: Run) -> int:
    args = run.args
    settings = [(k, kept_setting(k)) for k in args.kept]
    loaded = run.load()
    model, tok = loaded.model, loaded.tokenizer
    embedder = get_embedder()
    cfg = model.config
    rows: list[dict[str, Any]] = []
    answers: dict[str, list[str]] = {}
    for name in args.sets.split(","):
        path = resolve_set(name)
        items = select_items(load_qa(path), "heldout", args.limit)
        docs = kb_documents(path, items, "set")
        rag: float | None = None
        for label, (kept, selection) in settings:
            mem_cfg = loaded.memory_config.override(kept, selection)
            retriever = build_retriever(model, tok, docs, mem_cfg, embedder)
            modes = ("memory",) if rag is not None else ("memory", "rag")
            report = evaluate_qa(
                Generator(model, tok, retriever, mem_cfg),
                items,
                QAEvalConfig(modes=modes, batch_size=args.batch_size),
            )
            s = report.summary()
            if rag is None:
                rag = s["modes"]["rag"]["contained"]
            acc = s["modes"]["memory"]["contained"]
            n_kept = mem_cfg.kept_tokens if selection != "all" else mem_cfg.reference_tokens
            answers[f"{name}/{label}"] = [it.texts["memory"] for it in report.items]
            rows.append(
                {
                    "set": name,
                    "kept tokens": label,
                    "questions": s["n"],
                    "hit rate": s["hit_rate"],
                    "memory": acc,
                    "RAG": rag,
                    "memory / RAG": acc / rag if rag else float("nan"),
                    "memory answers": round(acc * s["n"]),
                    "KiB/memory (8-bit)": sq8_bytes(
                        len(model.memory_layers), cfg.n_kv_head, n_kept, cfg.head_dim
                    )
                    / 1024,
                }
            )
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    run.save(
        {
            "model": str(args.model),
            "memory_config": loaded.memory_config.to_dict(),
            "rows": rows,
            "answers": answers,
        }
    )
    own = loaded.memory_config.kept_tokens
    body = (
        f"Model `{args.model}` (its default: {own} kept tokens per head). Held-out questions "
        "of the evaluation harness, its knowledge base and retrieval (`memory3 eval qa`), memory-mode "
        "accuracy (answer contained) with memories rewritten at each number of kept tokens; RAG once per "
        "set. Goal of the training issue: memory ≥ 90% of RAG.\n\n" + table(rows)
    )
    flags = f" --threads {args.threads} --sets {args.sets} --kept {' '.join(args.kept)}" + (
        f" --limit {args.limit}" if args.limit else ""
    )
    run.section("qa-kept", "Question answering against tokens kept per head", flags, body)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_experiment("qa-kept"))
