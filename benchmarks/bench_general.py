"""General questions with unrelated memories, and what a relevance floor on retrieval changes.

Explicit memory must not break what the model already knew. Here the model answers general
questions (the harness's Wikipedia fill-in-the-blank sentences, which SmolLM2 partly answers from
its weights) while retrieving from a knowledge base that holds nothing about them (by default the
Factbook passages of the harness, no Wikipedia text): every memory it reads is unrelated. Without a
relevance floor the retriever still returns its top 5, and the model reads them (memory) or gets
their text in its prompt (RAG). With a floor (`--min-score`, cosine similarity of query and
reference) hits below it are dropped, so most questions read nothing.

Then the same floors on the harness's held-out sets with their own knowledge base (gold reference
among the distractors, as `memory3 eval qa`), to show what a floor costs when the knowledge base
does hold the answer.

"keeps": of the questions answered right without memory, the share each mode still answers right.

`--codec tc96` (or any `memory3 build --codec`) holds the memories as a bank with that codec
would, fitted on the build's sample of references with the model's calibration: does a codec
that spends no bits where the calibration's answers do not look change what unrelated memories
do? Its results go to their own file and section.

    .venv/bin/python benchmarks/bench_general.py [--floors none 0.45] [--threads 2] [--model NAME] [--codec C]
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

from harness import Run, experiment, run_experiment

from memory3.data.qa import load_qa, shipped_path
from memory3.eval.qa import (
    QAEvalConfig,
    build_retriever,
    evaluate_qa,
    kb_documents,
    resolve_set,
    select_items,
)
from memory3.eval.render import count
from memory3.eval.report import table
from memory3.generate import Generator
from memory3.memory.codec import CodecConfig
from memory3.memory.ingest import read_documents
from memory3.memory.transform import find_calibration
from memory3.retrieval.embed import get_embedder
from memory3.shipped import default_model


def floor_arg(value: str) -> float | None:
    if value == "none":
        return None
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--floors takes cosine similarities or 'none', got {value!r}"
        ) from None


def tag_of(codec: str | None) -> str:
    """'' for exact memories, '-CODEC' for a codec: its results file and section have their own."""
    return "" if codec is None else "-" + codec.replace(",", "_")


def _rows(
    report: Any, items: list[Any], what: str, floor: float | None, modes: tuple[str, ...]
) -> list[dict]:
    """One row per mode and split (all questions, held-out only) from one evaluation."""
    out = []
    one = {it.split for it in items}
    for split in ("all", "heldout") if len(one) > 1 else tuple(one):
        idx = [i for i, it in enumerate(items) if split == "all" or it.split == split]
        if not idx:
            continue
        res = [report.items[i] for i in idx]
        known = [r for r in res if r.contained.get("none")]
        for mode in modes:
            right = sum(r.contained[mode] for r in res)
            out.append(
                {
                    "questions": what,
                    "split": split,
                    "min score": "none" if floor is None else floor,
                    "mode": mode,
                    "n": len(res),
                    "accuracy": right / len(res),
                    "keeps": (
                        f"{sum(r.contained[mode] for r in known)}/{len(known)}"
                        if known and mode != "none"
                        else ""
                    ),
                    "read a memory": sum(bool(r.hits) for r in res) / len(res) if mode != "none" else "",
                }
            )
    return out


def arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--kb", default=str(shipped_path("factbook_kb.jsonl")), help="the unrelated knowledge base"
    )
    ap.add_argument("--questions", default="wikipedia", help="general questions (a harness set or JSONL)")
    ap.add_argument(
        "--sets", default="factbook,fictional,wikipedia", help="sets for the floor's cost ('' = skip)"
    )
    ap.add_argument("--floors", nargs="+", type=floor_arg, default=[None, 0.45])
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--limit", type=int, default=None, help="first N questions of each set (a quick look)")
    ap.add_argument("--codec", default=None, help="hold memories through this codec (default: exact)")
    ap.add_argument("--calibration", default=None, help="for tc<bits>: default, the one beside the model")


@experiment("general", lambda args: f"general{tag_of(args.codec)}.json", arguments, threads=2)
def main(run: Run) -> int:
    args = run.args
    tag = tag_of(args.codec)
    loaded = run.load()
    model, tok, mem_cfg = loaded.model, loaded.tokenizer, loaded.memory_config
    embedder = get_embedder()
    codec = None if args.codec is None else CodecConfig.parse(args.codec)
    calibration = (
        find_calibration(loaded.path, args.calibration)
        if codec is not None and codec.kind == "transform"
        else None
    )

    def retriever_of(docs: list[Any]) -> Any:
        return build_retriever(model, tok, docs, mem_cfg, embedder, codec=codec, calibration=calibration)

    rows: list[dict[str, Any]] = []
    answers: dict[str, list[str]] = {}

    def answer(items: list[Any], retriever: Any, what: str) -> None:
        for j, floor in enumerate(args.floors):
            modes = ("none", "memory", "rag") if j == 0 else ("memory", "rag")
            report = evaluate_qa(
                Generator(model, tok, retriever, mem_cfg),
                items,
                QAEvalConfig(modes=modes, batch_size=args.batch_size, min_score=floor),
            )
            if j == 0:
                none = [it.contained["none"] for it in report.items]
                answers[f"{what}/none"] = [it.texts["none"] for it in report.items]
            else:  # none does not retrieve: the first evaluation's answers stand for every floor
                for it, c in zip(report.items, none, strict=True):
                    it.contained["none"] = c
            for m in ("memory", "rag"):
                answers[f"{what}/{m}/{floor}"] = [it.texts[m] for it in report.items]
            new = _rows(report, items, what, floor, modes)
            rows.extend(new)
            for r in new:
                print(json.dumps(r), file=sys.stderr, flush=True)

    # 1. general questions, unrelated knowledge base (no gold reference added)
    path = resolve_set(args.questions)
    items = select_items(load_qa(path), "all", args.limit)
    docs = list(read_documents(args.kb))  # a file or directory of text, Markdown or JSONL
    asked = {it.doc_id for it in items}
    docs = [d for d in docs if d.doc_id not in asked]
    answer(items, retriever_of(docs), f"{path.stem}, unrelated KB")
    # 2. the harness's held-out sets with their own knowledge base
    for name in filter(None, args.sets.split(",")):
        p = resolve_set(name)
        held = select_items(load_qa(p), "heldout", args.limit)
        answer(
            held,
            retriever_of(kb_documents(p, held, "set")),
            f"{name}, own KB",
        )

    results = {
        "model": str(args.model),
        "memory_config": mem_cfg.to_dict(),
        "kb": args.kb,
        "codec": args.codec,
        "codec_calibration": None if calibration is None else calibration.meta,
        "rows": rows,
        "answers": answers,
    }
    run.save(results)
    body = (
        f"Model `{args.model}`, {count(mem_cfg.memories_per_chunk, 'reference', 'references')} per retrieval, "
        "greedy, answer contained. "
        + (
            ""
            if codec is None
            else f"Memories held through codec `{args.codec}` (fitted as a build fits it). "
        )
        + "First rows: the "
        f"{args.questions} questions (both splits; held-out apart) retrieving from `{Path(args.kb).name}`, "
        "which holds nothing about them, so every memory read is unrelated. Then the harness's held-out "
        "sets with their own knowledge base (gold reference retrieved among distractors). *min score*: "
        "hits whose cosine similarity to the question is below it are dropped (`--min-score`); "
        "*keeps*: of the questions answered right without memory, how many each mode still answers; "
        "*read a memory*: share of questions with at least one hit left.\n\n" + table(rows)
    )
    floors = " ".join("none" if f is None else str(f) for f in args.floors)
    flags = (
        f" --threads {args.threads} --floors {floors}"
        + (f" --model {args.model}" if str(args.model) != default_model() else "")
        + (f" --limit {args.limit}" if args.limit else "")
        + (f" --kb {args.kb}" if args.kb != str(shipped_path("factbook_kb.jsonl")) else "")
        + (f" --sets {shlex.quote(args.sets)}" if args.sets != "factbook,fictional,wikipedia" else "")
        + (f" --codec {args.codec}" if codec is not None else "")
        + (f" --calibration {args.calibration}" if args.calibration else "")
    )
    run.section(
        "general" + tag,
        "General questions with unrelated memories, and a relevance floor"
        + ("" if codec is None else f" (memories through codec {args.codec})"),
        flags,
        body,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(run_experiment("general"))
