"""Where a relevance floor (`--min-score`) can sit: retrieval scores of gold and unrelated passages.

For each question set of the harness, the cosine similarity between each question and its gold
passage; for the general questions (Wikipedia fill-in-the-blank), the score of the best hit in a
knowledge base that holds nothing about them (the Factbook passages). A floor keeps the gold
passages it is below and drops the unrelated best hits it is above. Embedding only: a minute.

    .venv/bin/python benchmarks/research/retrieval_scores.py [--embedder minilm] [--floor 0.45]
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from memory3.data.qa import load_qa, shipped_path
from memory3.eval.qa import resolve_set
from memory3.eval.report import machine, publish, table
from memory3.memory.ingest import read_documents
from memory3.retrieval.embed import get_embedder

PERCENTILES = (1, 5, 10, 50, 90, 95, 99)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--embedder", default="minilm")
    ap.add_argument("--sets", default="factbook,fictional,wikipedia")
    ap.add_argument("--general", default="wikipedia", help="questions the unrelated KB knows nothing about")
    ap.add_argument(
        "--kb", default=str(shipped_path("factbook_kb.jsonl")), help="the unrelated knowledge base"
    )
    ap.add_argument("--floor", type=float, default=0.45, help="the floor to report the shares for")
    ap.add_argument("--out", default="BENCHMARKS.md")
    ap.add_argument("--json", default="benchmarks/results/retrieval_scores.json")
    args = ap.parse_args()
    emb = get_embedder(args.embedder)
    rows = []

    def row(what: str, scores: np.ndarray, keep_above: bool) -> None:
        pct = np.percentile(scores, PERCENTILES)
        above = float((scores >= args.floor).mean())
        rows.append(
            {
                "scores": what,
                "n": len(scores),
                **{f"p{p}": round(float(v), 3) for p, v in zip(PERCENTILES, pct, strict=True)},
                f"share ≥ {args.floor}": above,
                "what the floor does": f"keeps {above:.1%}" if keep_above else f"drops {1 - above:.1%}",
            }
        )

    for name in args.sets.split(","):
        items = load_qa(resolve_set(name))
        q = emb.embed([it.question for it in items])
        g = emb.embed([it.reference for it in items])
        row(f"{name} questions · gold passage", (q * g).sum(1), keep_above=True)
    items = load_qa(resolve_set(args.general))
    asked = {it.doc_id for it in items}
    kb = [d.text for d in read_documents(args.kb) if d.doc_id not in asked]
    best = (emb.embed([it.question for it in items]) @ emb.embed(kb).T).max(1)
    row(f"{args.general} questions · best hit in {len(kb)} unrelated passages", best, keep_above=False)
    print(table(rows))
    body = (
        f"Cosine similarity with `{args.embedder}` (`{emb.name}`) between each question of the harness's "
        "sets (both splits) and its whole gold passage, and between each general question and its "
        f"best hit in `{args.kb.rsplit('/', 1)[-1]}`, which holds nothing about it. The floor "
        f"{args.floor} is the one `benchmarks/bench_general.py` measures in answers.\n\n" + table(rows)
    )
    publish(
        {"machine": machine(), "embedder": emb.name, "floor": args.floor, "rows": rows},
        args.json,
        args.out,
        "retrieval-scores",
        "Retrieval scores of gold and unrelated passages",
        "python benchmarks/research/retrieval_scores.py"
        + (f" --floor {args.floor}" if args.floor != 0.45 else ""),
        body,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
