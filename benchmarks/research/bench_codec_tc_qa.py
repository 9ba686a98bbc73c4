"""What the transform-coding experiment of `bench_codec_bound.py` costs in answers.

The codecs `memory3 build` offers are measured in answers by `bench_codec_qa.py`, which builds a
bank per codec. The transform coder (`tc<bits>`) is research code, not a codec of the store, so
here each question set's knowledge base is built once in bf16 and the retriever's memories pass
through the coder on their way to the model: the same hits, the same model, only the memories'
keys and values changed as a store with that codec would return them. As `memory3 build` trains
a bank's codec on that bank's memories, coders are fitted on each knowledge base's memories; the
key metric comes from the queries of train-split questions, and held-out questions are asked.

A row is `tc<bits>` for keys and values alike, `KEYS+VALUES` for one of each, and a part may be
a FAISS factory string (trained on the same memories), e.g. `tc96+Residual2x10,PQ8`, with `@head`
for one quantizer per memory layer and kv head instead of per layer (`SQ8@head`).

    .venv/bin/python benchmarks/research/bench_codec_tc_qa.py --rows tc160 tc96 --sets fictional,factbook
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from bench_codec_bound import TransformPartCoder, parse_tc, real_queries

from memory3.checkpoint import load_pretrained
from memory3.data.qa import load_qa
from memory3.eval.qa import QAEvalConfig, evaluate_qa, kb_documents, resolve_set, select_items
from memory3.eval.report import machine, table, update_section
from memory3.generate import Generator
from memory3.memory.build import BuildConfig, build
from memory3.memory.codec import CodecConfig, train_codec
from memory3.memory.write import Memories
from memory3.retrieval.index import IndexConfig
from memory3.retrieval.retriever import StoreRetriever
from memory3.shipped import default_model

PartCoder = Callable[[Memories], torch.Tensor]


def head_slice(mem: Memories, head: int | None) -> Memories:
    """The memories of one kv head (all of them for None), kept as a kv-head axis of size 1."""
    if head is None:
        return mem
    h = slice(head, head + 1)
    return Memories(mem.k[:, :, h], mem.v[:, :, h], mem.positions[:, :, h], mem.fingerprint)


class CodedRetriever:
    """A retriever whose memories come back through a key coder and a value coder."""

    def __init__(self, inner: StoreRetriever, keys: PartCoder, values: PartCoder) -> None:
        self.inner, self.keys, self.values = inner, keys, values

    @property
    def memory_fingerprint(self) -> str:
        return self.inner.memory_fingerprint

    def search(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner.search(*args, **kwargs)

    def memories(self, ref_ids: Sequence[int]) -> Memories:
        mem = self.inner.memories(ref_ids)
        exact = mem.to(dtype=torch.float32)
        k, v = self.keys(exact).to(mem.k.dtype), self.values(exact).to(mem.v.dtype)
        return Memories(k, v, mem.positions, mem.fingerprint)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=default_model())
    ap.add_argument("--rows", nargs="+", default=["tc160", "tc96"])
    ap.add_argument("--sets", default="fictional,factbook", help="comma-separated question sets")
    ap.add_argument("--limit", type=int, default=None, help="first N held-out questions per set")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--out", default="BENCHMARKS.md")
    ap.add_argument("--json", default="benchmarks/results/codec_tc_qa.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_pretrained(args.model)
    model, tok, mc = loaded.model.eval(), loaded.tokenizer, loaded.memory_config
    q_pre: list[torch.Tensor] = []
    coders: dict[tuple[str, str], tuple[PartCoder, float]] = {}

    def coder(spec: str, part: str, train: Memories) -> tuple[PartCoder, float]:
        """The key or value coder of `spec`, fitted on `train` (the current knowledge base)."""
        if not q_pre:  # real queries sit behind the memories
            q_pre.extend(
                real_queries(model, tok, model.config.rope_theta, int(train.positions.max()) + 1, 1)[0]
            )
        if (spec, part) not in coders:
            t0 = time.perf_counter()
            if spec.startswith("tc"):
                try:
                    bits = parse_tc(spec)
                except ValueError as e:
                    ap.error(str(e))
                tc = TransformPartCoder(model, train, q_pre, bits, part)
                coders[spec, part] = (tc, tc.code_bytes)
            else:
                factory, _, per = spec.partition("@")
                if per not in ("", "head"):
                    ap.error(f"{spec!r}: a FAISS part is FACTORY or FACTORY@head (one quantizer per kv head)")
                heads = range(train.k.shape[2]) if per else [None]
                cfg = CodecConfig(kind="faiss", factory=factory, train_vectors=20000)
                codecs = [train_codec(head_slice(train, h), cfg) for h in heads]

                def through(mem: Memories, codecs: Any = codecs, part: str = part) -> torch.Tensor:
                    parts = []
                    for h, codec in zip(heads, codecs, strict=True):
                        one = head_slice(mem, h)
                        parts.append(getattr(codec.decode(codec.encode(one), mem.fingerprint), part))
                    return torch.cat(parts, dim=2)

                coders[spec, part] = (through, float(codecs[0].code_bytes))
            print(
                f"fitted {spec} for {part} in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True
            )
        return coders[spec, part]

    D = model.config.head_dim
    qa_cfg = QAEvalConfig(modes=("memory",), batch_size=args.batch_size)
    rows: list[dict[str, Any]] = []
    detail: dict[str, Any] = {}
    for name in args.sets.split(","):
        path = resolve_set(name)
        items = select_items(load_qa(path), "heldout", args.limit)
        docs = kb_documents(path, items, "set")
        with tempfile.TemporaryDirectory() as tmp:
            bank = Path(tmp) / "bf16"
            build(
                docs,
                bank,
                model,
                tok,
                mc,
                BuildConfig(codec=CodecConfig(kind="none"), index=IndexConfig(kind="flat")),
                progress=False,
            )
            store = StoreRetriever.open(bank, model, tok)
            kb_mem = store.store.get(store.store.live_ids())
            coders.clear()  # fitted per knowledge base
            ok: dict[str, list[bool]] = {}
            for row in ["bf16", *args.rows]:
                if row == "bf16":
                    retr: Any = store
                    bits = 2 * 16 * D
                else:
                    k_spec, _, v_spec = row.partition("+")
                    (kc, kb), (vc, vb) = coder(k_spec, "k", kb_mem), coder(v_spec or k_spec, "v", kb_mem)
                    retr, bits = CodedRetriever(store, kc, vc), 8 * (kb + vb)
                t0 = time.perf_counter()
                report = evaluate_qa(Generator(model, tok, retr, mc), items, qa_cfg)
                s = report.summary()
                ok[row] = [it.contained["memory"] for it in report.items]
                detail[f"{name}/{row}"] = {"answers": [it.texts["memory"] for it in report.items]}
                rows.append(
                    {
                        "set": name,
                        "codec": row,
                        "questions": s["n"],
                        "bits per number": round(bits / (2 * D), 3),
                        # codes + a uint8 position per slot, against bf16 keys and values + int16
                        "of bf16": 1.0 if row == "bf16" else round((bits / 8 + 1) / (4 * D + 2), 4),
                        "memory accuracy": s["modes"]["memory"]["contained"],
                        "s": round(time.perf_counter() - t0, 1),
                    }
                )
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
            store.store.close()
        base = ok["bf16"]
        for r in rows[-len(ok) :]:
            mine = ok[r["codec"]]
            r["drop (points)"] = round(100 * (sum(base) - sum(mine)) / len(base), 2)
            r["lost"] = sum(b and not a for a, b in zip(mine, base, strict=True))
            r["gained"] = sum(a and not b for a, b in zip(mine, base, strict=True))
    total = {c: sum(r["questions"] for r in rows if r["codec"] == c) for c in ["bf16", *args.rows]}
    overall = {
        c: 100 * sum(r["memory accuracy"] * r["questions"] for r in rows if r["codec"] == c) / total[c]
        for c in total
    }
    results = {
        "machine": machine(),
        "model": str(args.model),
        "memory_config": mc.to_dict(),
        "rows": rows,
        "overall_accuracy": overall,
        "drop_points": {c: overall["bf16"] - overall[c] for c in overall},
        "detail": detail,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps({k: v for k, v in results.items() if k != "detail"}, indent=1))
    drops = ", ".join(f"`{c}` {d:+.1f}" for c, d in results["drop_points"].items() if c != "bf16")
    body = (
        f"Model `{args.model}`, held-out questions answered with explicit memory from a bf16 bank of "
        "each set's knowledge base, the retrieved memories passed through each coder (same hits). "
        "Coders fitted on the memories of each knowledge base, as a build trains its codec. "
        f"Overall points lost against bf16: {drops}.\n\n" + table(rows)
    )
    update_section(
        args.out, "codec-tc-qa", "Memory codec: transform coding in answers",
        f"python benchmarks/research/bench_codec_tc_qa.py --threads {args.threads} --sets {args.sets} --rows {' '.join(args.rows)}",
        body, {k: v for k, v in results.items() if k != "detail"},
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
