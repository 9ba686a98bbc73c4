"""Reading loss: how well a reader predicts the gold answer of a natural question, reading the
answer's passage as memory, as text (RAG), or not at all, by answer type (issue 25, part 2).

Accuracy on 128 dev questions moves in steps of 0.8 points and a short answer is right or wrong;
the mean loss per answer token (teacher-forced, the answer alone followed by EOS, as SFT trains
it) tells a little better how far a reader is from copying the answer. Each question reads 5
references: the chunk of its gold summary that holds the answer and the 4 chunks of the natural
knowledge base nearest the question (the bundled embedder), as retrieval would give them; memory
reads them laid out as SFT and generation do (one chunk, all 5 memories), RAG has them as text.
No generation, no leak filter. Only the dev split is used to choose settings.

    .venv/bin/python benchmarks/research/reading_loss.py --settings 0-19:32 0-29:32 --out benchmarks/results/reading-loss-j-dev.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from memory3.checkpoint import load_pretrained
from memory3.data import natural
from memory3.data.qa import answer_contained
from memory3.eval.breakdown import answer_type_of
from memory3.generate import rag_prompt
from memory3.memory.ingest import chunk_documents
from memory3.memory.write import MemoryWriter, reference_prefix_ids, reset_fingerprint
from memory3.retrieval.embed import get_embedder
from memory3.shipped import default_model
from memory3.train.layout import shared_memory, text_batch
from memory3.train.loop import batch_loss

sys.path.insert(0, str(Path(__file__).parent))
from reading_probes import parse_setting


class _Text:
    def __init__(self, text: str) -> None:
        self.text = text


def five_references(items: list[Any], refs: list[Any], embedder: Any) -> list[list[int]]:
    """For each question, indices into `refs`: its gold chunk (the first of its document whose
    text holds an answer, else its first) and the 4 nearest other chunks, gold first."""
    emb = embedder.embed([r.text for r in refs])
    q = embedder.embed([it.question for it in items])
    out = []
    for i, it in enumerate(items):
        own = [j for j, r in enumerate(refs) if r.doc_id == it.doc_id]
        # an answer cut by a chunk boundary: the document's first chunk stands in
        gold = next((j for j in own if answer_contained(refs[j].text, it.answers)), own[0])
        order = [int(j) for j in np.argsort(-(emb @ q[i])) if j != gold]
        out.append([gold, *order[:4]])
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=default_model())
    ap.add_argument("--split", default="dev", choices=["dev", "test"])
    ap.add_argument("--settings", nargs="+", type=parse_setting, default=[parse_setting("0-19:32")])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_pretrained(args.model)
    model, tok = loaded.model.eval(), loaded.tokenizer
    items = natural.load_natural(args.split)
    refs = list(chunk_documents(natural.knowledge_base(), tok, loaded.memory_config.reference_tokens))
    refs = [r for r in refs if any(r.doc_id == it.doc_id for it in items)] + [
        r for r in refs if not any(r.doc_id == it.doc_id for it in items)
    ]
    chosen = five_references(items, refs, get_embedder())
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0

    def prompt(q: str) -> list[int]:
        text = tok.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False
        )
        return list(tok(text, add_special_tokens=False).input_ids)

    def answer(a: str) -> list[int]:
        return [*tok(a, add_special_tokens=False).input_ids, tok.eos_token_id]

    losses: dict[str, dict[str, float]] = {"none": {}, "rag": {}}
    rows = []
    with torch.inference_mode():
        for it, five in zip(items, chosen, strict=True):
            a = answer(it.answers[0])
            p = prompt(it.question)
            losses["none"][it.id] = batch_loss(model, text_batch([p + a], [len(p)], None, 0, pad))[0].item()
            rag = prompt(rag_prompt(it.question, [_Text(refs[j].text) for j in five]))
            losses["rag"][it.id] = batch_loss(model, text_batch([rag + a], [len(rag)], None, 0, pad))[
                0
            ].item()
        for label, layers, kept, selection in args.settings:
            model.set_memory_layers(layers)
            reset_fingerprint(model)
            mem_cfg = loaded.memory_config.override(kept, selection)
            prefix = reference_prefix_ids(tok, model.config.bos_token_id, mem_cfg)
            writer = MemoryWriter(model, prefix, mem_cfg)
            per: dict[str, float] = {}
            for it, five in zip(items, chosen, strict=True):
                mem = writer.write([list(refs[j].token_ids) for j in five])
                p, a = prompt(it.question), answer(it.answers[0])
                b = text_batch([p + a], [len(p)], prefix, mem_cfg.reference_tokens, pad)
                per[it.id] = batch_loss(model, b, shared_memory(mem, b))[0].item()
            rows.append(
                {"setting": label, "n_layers": len(layers), "kept_tokens": kept or "all", "memory": per}
            )
            print(label, round(float(np.mean(list(per.values()))), 3), file=sys.stderr, flush=True)
    types = {it.id: answer_type_of(it) for it in items}

    def by_type(per: dict[str, float]) -> dict[str, float]:
        acc: dict[str, list[float]] = defaultdict(list)
        for k, v in per.items():
            acc[types[k]].append(v)
            acc["all"].append(v)
        return {t: round(float(np.mean(v)), 3) for t, v in acc.items()}

    out = {
        "model": str(args.model),
        "split": args.split,
        "questions": len(items),
        "command": "python " + " ".join(sys.argv),
        "none": by_type(losses["none"]),
        "rag": by_type(losses["rag"]),
        "rows": [
            {**{k: v for k, v in r.items() if k != "memory"}, "memory": by_type(r["memory"])} for r in rows
        ],
        "per_question": {
            "none": losses["none"],
            "rag": losses["rag"],
            **{r["setting"]: r["memory"] for r in rows},
        },
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")
    print(json.dumps({k: out[k] for k in ("none", "rag")}), file=sys.stderr)
    for r in out["rows"]:
        print(json.dumps(r), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
