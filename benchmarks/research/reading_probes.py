"""Reading probes: what limits a reader on questions it was never trained on (issue 25, part 2).

With one model unchanged, this changes only how it reads at inference: which layers read memory
and how many tokens each memory keeps per head, and answers the natural set's dev split in
memory mode, broken down by answer type. Memories are rewritten for every setting (the writer
captures the layers that read). RAG does not read memory, so it is measured once per model
(`--rag`) or taken from a saved `memory3 eval qa` result of the same model (`--rag-from`).
Settings are chosen on the dev split only; the test split is for reporting.

    .venv/bin/python benchmarks/research/reading_probes.py --settings 0-19:32 0-29:32 0-19:64 \
        --rag-from benchmarks/results/natural-qa-dev.json --out benchmarks/results/reading-probes-j.json

    .venv/bin/python benchmarks/research/reading_probes.py --table benchmarks/results/reading-probes-*.json

A setting is LAYERS:KEPT, LAYERS a range `a-b` (inclusive) or comma-separated ranges
(`0-19,25-29`), KEPT a number of tokens per head or `all` (every token of the reference).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import torch

from memory3.checkpoint import load_pretrained
from memory3.eval.paired import paired
from memory3.eval.qa import QAEvalConfig, build_retriever, evaluate_qa, kb_documents, load_set
from memory3.eval.report import machine
from memory3.generate import Generator
from memory3.memory.write import reset_fingerprint
from memory3.retrieval.embed import get_embedder
from memory3.shipped import default_model

# an answer degenerated into one piece of 1 to 8 characters repeated (as natural_qa_report.py counts)
REPEATED = re.compile(r"(.{1,8}?)\1{5,}", re.S)


def parse_layers(spec: str) -> tuple[int, ...]:
    """'0-19' -> (0, …, 19); '0-19,25-29' -> both ranges."""
    out: list[int] = []
    for part in spec.split(","):
        a, _, b = part.partition("-")
        out.extend(range(int(a), int(b or a) + 1))
    return tuple(sorted(set(out)))


def parse_setting(s: str) -> tuple[str, tuple[int, ...], int | None, str | None]:
    layers, _, kept = s.partition(":")
    if not kept:
        raise argparse.ArgumentTypeError(f"a setting is LAYERS:KEPT, e.g. 0-19:32, got {s!r}")
    if kept == "all":
        return s, parse_layers(layers), None, "all"
    return s, parse_layers(layers), int(kept), None


def by_type(summary: dict[str, Any], mode: str) -> dict[str, dict[str, Any]]:
    return {r["answer_type"]: {"n": r["n"], mode: r["contained"][mode]} for r in summary["by_answer_type"]}


def rag_of(path: str, set_key: str) -> tuple[dict[str, bool], dict[str, float], float]:
    """Per-question RAG correctness, RAG accuracy by answer type and overall, from a saved result."""
    res = json.loads(Path(path).read_text())["sets"][set_key]
    ok = {it["id"]: bool(it["contained"]["rag"]) for it in res["items"]}
    rows = res["summary"].get("by_answer_type", [])  # results older than the breakdown have none
    types = {r["answer_type"]: r["contained"]["rag"] for r in rows}
    return ok, types, res["summary"]["modes"]["rag"]["contained"]


TYPES = ("number", "person", "place", "name", "word", "phrase")


def table(paths: list[str]) -> str:
    """A markdown table of every row of saved probe results: memory accuracy overall and by answer
    type, each with memory/RAG (RAG of the same model), and the paired difference from the first
    row on the same questions."""
    head = (
        "| model | layers | kept | memory | memory/RAG | "
        + " | ".join(TYPES)
        + " | vs first row: only this / only first, points (95%) | repeating |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    base: dict[str, Any] | None = None
    for path in paths:
        res = json.loads(Path(path).read_text())
        if base is not None and set(base) != set(res["rows"][0]["answers"]):
            base = None  # another set: compare with its own first row
        for r in res["rows"]:
            base = base or r["answers"]
            ids = sorted(base)
            p = paired([r["answers"][i][1] for i in ids], [base[i][1] for i in ids], "row", "first")
            vs = f"{p.a_only} / {p.b_only}, {p.diff_points:+.1f} ({p.ci95[0]:+.1f} to {p.ci95[1]:+.1f})"
            t = r["by_answer_type"]
            cells = [
                f"{100 * t[k]['memory']:.0f}% ({t[k]['memory_over_rag']:.2f})"
                if k in t and t[k]["memory_over_rag"] is not None
                else "–"
                for k in TYPES
            ]
            lines.append(
                f"| {Path(res['model']).parent.name or res['model']} | {r['layers']} | {r['kept_tokens']} "
                f"| {100 * r['memory']:.1f}% ({r['memory_right']}/{res['questions']}) "
                f"| {r['memory_over_rag']:.2f} | " + " | ".join(cells) + f" | {vs} | {r['repeating']} |"
            )
    return "\n".join(lines)


def main() -> int:
    if sys.argv[1:2] == ["--table"]:
        print(table(sys.argv[2:]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=default_model())
    ap.add_argument("--set", default="natural", help="natural, or another harness set (factbook, …)")
    ap.add_argument("--split", default="dev", help="dev or test for natural; heldout for the others")
    ap.add_argument("--settings", nargs="+", type=parse_setting, default=[parse_setting("0-19:32")])
    ap.add_argument("--rag", action="store_true", help="measure RAG with this model (once)")
    ap.add_argument("--rag-from", help="a `memory3 eval qa --out` JSON of this model on the same split")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--k", type=int, default=5, help="references per retrieval, memory and RAG alike")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_pretrained(args.model)
    model, tok = loaded.model.eval(), loaded.tokenizer
    path, items = load_set(args.set, args.split, args.limit)
    docs = kb_documents(path, items, "set")
    embedder = get_embedder()
    set_key = path.stem
    rag_ok: dict[str, bool] = {}
    rag_types: dict[str, float] = {}
    rag_all: float | None = None
    if args.rag_from:
        rag_ok, rag_types, rag_all = rag_of(args.rag_from, set_key)
    out: dict[str, Any] = {
        "model": str(args.model),
        "set": args.set,
        "split": args.split,
        "questions": len(items),
        "machine": machine(),
        "threads": args.threads,
        "trained_layers": list(loaded.model.memory_layers),
        "trained_memory": loaded.memory_config.to_dict(),
        "rag_from": args.rag_from,
        "k": args.k,
        "command": "python " + " ".join(sys.argv),
        "rows": [],
    }
    for label, layers, kept, selection in args.settings:
        model.set_memory_layers(layers)
        reset_fingerprint(model)
        mem_cfg = loaded.memory_config.override(kept, selection)
        t0 = time.perf_counter()
        retriever = build_retriever(model, tok, docs, mem_cfg, embedder)
        write_s = time.perf_counter() - t0
        modes = ("memory", "rag") if args.rag and rag_all is None else ("memory",)
        report = evaluate_qa(
            Generator(model, tok, retriever, mem_cfg), items, QAEvalConfig(modes=modes, k=args.k)
        )
        s = report.summary()
        if "rag" in modes:
            rag_ok = {it.id: bool(it.contained["rag"]) for it in report.items}
            rag_types = {r["answer_type"]: r["contained"]["rag"] for r in s["by_answer_type"]}
            rag_all = s["modes"]["rag"]["contained"]
            out["rag_answers"] = {it.id: [it.texts["rag"], bool(it.contained["rag"])] for it in report.items}
        mem = s["modes"]["memory"]["contained"]
        types = {}
        for t, r in by_type(s, "memory").items():
            rag_t = rag_types.get(t)
            types[t] = {**r, "rag": rag_t, "memory_over_rag": r["memory"] / rag_t if rag_t else None}
        row = {
            "setting": label,
            "layers": f"{layers[0]}-{layers[-1]}"
            if layers == tuple(range(layers[0], layers[-1] + 1))
            else list(layers),
            "n_layers": len(layers),
            "kept_tokens": "all" if selection == "all" else kept,
            "memory": mem,
            "memory_right": sum(bool(it.contained["memory"]) for it in report.items),
            "rag": rag_all,
            "memory_over_rag": mem / rag_all if rag_all else None,
            "hit_rate": s["hit_rate"],
            "repeating": sum(bool(REPEATED.search(it.texts["memory"])) for it in report.items),
            "by_answer_type": types,
            "write_s": round(write_s, 1),
            "memory_wall_s": round(s["modes"]["memory"]["wall_s"], 1),
            "answers": {it.id: [it.texts["memory"], bool(it.contained["memory"])] for it in report.items},
        }
        out["rows"].append(row)
        brief = {k: v for k, v in row.items() if k not in ("answers", "by_answer_type")}
        brief["types"] = {t: round(v["memory"], 3) for t, v in types.items()}
        print(json.dumps(brief), file=sys.stderr, flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")
    if rag_ok:
        out["rag_right"] = sum(rag_ok.values())
        Path(args.out).write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
