"""Which tokens should a memory keep? (docs/design.md, "Writing a memory": check whether the paper's rule keeps the tokens
that carry the answer, and if not, measure alternatives rather than guess.)

For each selection rule of `MemoryConfig.selection` and each number of kept tokens per head:

- **answer coverage**: held-out questions' gold references are written as memories; the share of
  the answer's tokens kept, averaged over memory layers and kv heads, and the share of (layer,
  head) pairs that keep at least one answer token;
- **accuracy**: the training probe (`memory3.train.probe`: gold reference forced among the 5
  retrieved, greedy answers) in memory mode, on the same held-out questions.

    .venv/bin/python benchmarks/bench_selection.py [--threads 2] [--n 40]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from typing import Any

import torch
from harness import Run, experiment, run_experiment

from memory3.config import MemoryConfig
from memory3.eval.report import table
from memory3.memory.write import MemoryWriter, reference_prefix_ids
from memory3.train.probe import heldout_questions, probe


def answer_positions(tok: Any, text: str, answers: list[str], limit: int) -> list[int]:
    """Token indices (within the reference, before the prefix) overlapping the first answer
    string found in `text`, case-insensitively; [] when no answer appears verbatim."""
    low = text.lower()
    for a in answers:
        start = low.find(a.lower())
        if start < 0:
            continue
        end = start + len(a)
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        return [t for t, (s, e) in enumerate(enc.offset_mapping[:limit]) if s < end and e > start]
    return []


def coverage(model: Any, tok: Any, mem: MemoryConfig, source: str, n: int) -> dict[str, float]:
    items, kb = heldout_questions(n, source)
    text = {d.doc_id: d.text for d in kb}
    refs, spans = [], []
    for it in items:
        ids = tok(text[it.doc_id], add_special_tokens=False).input_ids[: mem.reference_tokens]
        span = answer_positions(tok, text[it.doc_id], it.answers, len(ids))
        if span:
            refs.append(ids)
            spans.append(span)
    prefix = reference_prefix_ids(tok, model.config.bos_token_id, mem)
    with torch.no_grad():
        m = MemoryWriter(model, prefix, mem).write(refs)
    share, any_kept = [], []
    for i, span in enumerate(spans):
        want = torch.tensor([len(prefix) + t for t in span])
        kept = torch.isin(m.positions[i].long(), want).sum(-1).float()  # (Lm, K)
        share.append((kept / len(span)).mean().item())
        any_kept.append((kept > 0).float().mean().item())
    return {
        "references": len(refs),
        "answer tokens kept": sum(share) / len(share),
        "heads keeping any": sum(any_kept) / len(any_kept),
    }


def arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--rules", default="attention,attention-mean,value-attention,key-norm,random")
    ap.add_argument("--kept", default="8,16,32", help="kept tokens per head to measure")
    ap.add_argument("--sources", default="fictional,factbook")
    ap.add_argument("--n", type=int, default=40, help="held-out questions per source")
    ap.add_argument("--no-accuracy", action="store_true", help="answer coverage only (fast)")


@experiment("selection", "selection.json", arguments, threads=2)
def main(run: Run) -> int:
    args = run.args
    loaded = run.load()
    model, tok = loaded.model, loaded.tokenizer
    base = loaded.memory_config
    rows = []
    for source in args.sources.split(","):
        for kept in (int(k) for k in args.kept.split(",")):
            for rule in args.rules.split(","):
                mem = dataclasses.replace(base, kept_tokens=kept, selection=rule)
                t0 = time.perf_counter()
                row: dict[str, Any] = {"source": source, "kept": kept, "rule": rule}
                row.update(coverage(model, tok, mem, source, args.n))
                if not args.no_accuracy:
                    res = probe(model, tok, args.n, ("memory",), mem, source=source)
                    row["memory accuracy"] = res.accuracy["memory"]
                row["seconds"] = time.perf_counter() - t0
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    run.save({"model": str(args.model), "memory_config": base.to_dict(), "n": args.n, "rows": rows})
    cols = ["source", "kept", "rule", "answer tokens kept", "heads keeping any"]
    cols += [] if args.no_accuracy else ["memory accuracy"]
    body = (
        f"Model `{args.model}` (its own memory config: `{base.selection}` selection, {base.kept_tokens} "
        f"kept tokens, {len(model.memory_layers)} memory layers). Up to {args.n} held-out questions per "
        "source; "
        "the gold reference is among the 5 memories. *Answer tokens kept*: share of the answer's "
        "tokens a memory keeps, averaged over layers and kv heads; *heads keeping any*: share of "
        "(layer, head) pairs that keep at least one of them.\n\n" + table(rows, cols)
    )
    flags = f" --threads {args.threads} --n {args.n} --rules {args.rules} --kept {args.kept}"
    flags += f" --sources {args.sources}" + (" --no-accuracy" if args.no_accuracy else "")
    run.section("selection", "Token selection: what memories keep and what it costs in answers", flags, body)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_experiment("selection"))
