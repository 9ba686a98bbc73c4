"""What the memory codec costs in answers (issue "Memory bank": at most 1 point of QA accuracy).

For each question set, the knowledge base the evaluation harness uses (`--kb set`: the set's
documents with its gold references among them) is built twice into a memory bank with the same
model, embedder and index: once with the default vector-quantization codec and once with
`--codec none` (bf16). The held-out questions are then answered with explicit memory from each
bank. Retrieval is the same for both (same vectors, exact index), so the difference is the codec's.

    .venv/bin/python benchmarks/bench_codec_qa.py [--limit N] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from memory3.checkpoint import load_pretrained
from memory3.data.qa import load_qa
from memory3.eval.qa import QAEvalConfig, evaluate_qa, kb_documents, resolve_set, select_items
from memory3.eval.report import machine, table, update_section
from memory3.generate import Generator
from memory3.memory.build import BuildConfig, build
from memory3.memory.codec import CodecConfig
from memory3.retrieval.index import IndexConfig
from memory3.retrieval.retriever import StoreRetriever
from memory3.shipped import default_model

CODECS = {"default": CodecConfig(), "none (bf16)": CodecConfig(kind="none")}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=default_model())
    ap.add_argument("--sets", default="fictional,factbook", help="comma-separated question sets")
    ap.add_argument("--limit", type=int, default=None, help="first N held-out questions per set")
    ap.add_argument("--threads", type=int, default=1, help="torch and FAISS threads (0 = default)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--out", default="BENCHMARKS.md")
    ap.add_argument("--json", default="benchmarks/results/codec_qa.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        import faiss

        faiss.omp_set_num_threads(args.threads)
    loaded = load_pretrained(args.model)
    model, tok, mem_cfg = loaded.model.eval(), loaded.tokenizer, loaded.memory_config
    qa_cfg = QAEvalConfig(modes=("memory",), batch_size=args.batch_size)
    rows, detail = [], {}
    for name in args.sets.split(","):
        path = resolve_set(name)
        items = select_items(load_qa(path), "heldout", args.limit)
        docs = kb_documents(path, items, "set")
        accs: dict[str, float] = {}
        with tempfile.TemporaryDirectory() as tmp:
            for codec_name, codec in CODECS.items():
                bank = Path(tmp) / codec_name.split()[0]
                cfg = BuildConfig(codec=codec, index=IndexConfig(kind="flat"))
                summary = build(docs, bank, model, tok, mem_cfg, cfg, progress=False)
                retr = StoreRetriever.open(bank, model, tok)
                t0 = time.perf_counter()
                report = evaluate_qa(Generator(model, tok, retr, mem_cfg), items, qa_cfg)
                s = report.summary()
                acc = s["modes"]["memory"]["contained"]
                accs[codec_name] = acc
                detail[f"{name}/{codec_name}"] = {
                    "summary": s,
                    "bytes_per_memory": summary.bytes / max(summary.references, 1),
                    "eval_s": time.perf_counter() - t0,
                    "answers": [it.texts["memory"] for it in report.items],
                    "_ok": [it.contained["memory"] for it in report.items],
                }
                rows.append(
                    {
                        "set": name,
                        "codec": codec_name,
                        "questions": s["n"],
                        "hit rate": s["hit_rate"],
                        "memory accuracy": acc,
                        "bytes/memory": summary.bytes / max(summary.references, 1),
                    }
                )
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
                retr.store.close()
        drop = 100 * (accs["none (bf16)"] - accs["default"])
        # paired: the same questions, so count the answers the codec turned wrong and right
        ok = {c: detail[f"{name}/{c}"].pop("_ok") for c in CODECS}
        rows[-2]["lost"] = sum(b and not a for a, b in zip(ok["default"], ok["none (bf16)"], strict=True))
        rows[-2]["gained"] = sum(a and not b for a, b in zip(ok["default"], ok["none (bf16)"], strict=True))
        rows[-1]["lost"] = rows[-1]["gained"] = 0
        rows[-2]["drop (points)"] = drop  # the default codec's row, against bf16 below it
        rows[-1]["drop (points)"] = 0.0
    n = {r["set"]: r["questions"] for r in rows}
    total = sum(n.values())
    overall = {
        c: sum(r["memory accuracy"] * r["questions"] for r in rows if r["codec"] == c) / total for c in CODECS
    }
    results = {
        "machine": machine(),
        "model": str(args.model),
        "memory_config": mem_cfg.to_dict(),
        "threads": args.threads,
        "rows": rows,
        "overall": overall,
        "drop_points": 100 * (overall["none (bf16)"] - overall["default"]),
        "detail": detail,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps({k: v for k, v in results.items() if k != "detail"}, indent=2))
    body = (
        f"Model `{args.model}`, held-out questions answered with explicit memory from a bank built with "
        f"the default codec and from the same bank in bf16 (same references, same embedder, exact "
        f"index). Goal: at most 1 point lower with the codec.\n\n"
        + table(rows)
        + f"\n\nOverall ({total} questions): default codec {overall['default']:.1%}, bf16 "
        f"{overall['none (bf16)']:.1%}: **{results['drop_points']:+.1f} points** lost to the codec."
    )
    flags = f" --threads {args.threads}" + (f" --limit {args.limit}" if args.limit else "")
    compact = {k: v for k, v in results.items() if k != "detail"}
    update_section(
        args.out, "codec-qa", "Memory codec: effect on question answering",
        "python benchmarks/bench_codec_qa.py" + flags, body, compact,
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
