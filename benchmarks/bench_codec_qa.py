"""What the memory codec costs in answers (the goal: at most 1 point of QA accuracy).

For each question set, the knowledge base the evaluation harness uses (`--kb set`: the set's
documents with its gold references among them) is built twice into a memory bank with the same
model, embedder and index: once with the default vector-quantization codec and once with
`--codec none` (bf16). The held-out questions are then answered with explicit memory from each
bank. Retrieval is the same for both (same vectors, exact index), so the difference is the codec's.

    .venv/bin/python benchmarks/bench_codec_qa.py [--limit N] [--threads 1] [--full-sets]

The shipped sets hold a sample of the held-out questions (235 of the three sets), too few to tell
a 1-point drop from noise. `--full-sets` answers every held-out question the three sources give
(`FULL_SETS`: about 1,700), generated into a temporary directory as `python -m memory3.data.sets`
writes the shipped files, each set with its whole knowledge base.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

from harness import Run, experiment, run_experiment, shown

from memory3.data.qa import load_qa
from memory3.data.sets import GenerateConfig, generate
from memory3.eval.paired import paired_drop_ci
from memory3.eval.qa import QAEvalConfig, evaluate_qa, kb_documents, resolve_set, select_items
from memory3.eval.report import table
from memory3.generate import Generator
from memory3.memory.build import BuildConfig, build
from memory3.memory.codec import CodecConfig
from memory3.memory.transform import find_calibration
from memory3.model import resolve_kv_dtype
from memory3.retrieval.index import IndexConfig
from memory3.retrieval.retriever import StoreRetriever
from memory3.shipped import default_model

BASELINE = "none (bf16)"
# Every held-out Factbook fact, the held-out entities of 400 invented ones (the shipped 80 among
# them) and the held-out articles of 3,000 Wikipedia questions: ~1,700 questions.
FULL_SETS = GenerateConfig(
    factbook_questions_per_country=1000, fictional_entities=400, fictional_seed=0, wikipedia_questions=3000
)


SECTIONS = {
    "codec-qa": "Memory codec: effect on question answering",
    "codec-qa-tc": "Memory codec: the transform codec in answers",
    "codec-qa-tc-run-l": "Memory codec: the transform codec in answers, read by run L (trained through it)",
    "codec-qa-tc99": "Memory codec: the largest transform codec within 1/10 of bf16 (tc99) in answers",
    "codec-qa-full": "Memory codec: every held-out question (full sets)",
}


def codecs_from(names: list[str], train_vectors: int | None = None) -> dict[str, CodecConfig]:
    """["default", "Residual2x10,PQ8"] -> the codecs to compare, each against bf16 (always
    measured, last). A FAISS factory string may itself contain commas, so codecs are separate
    arguments. `train_vectors`: vectors sampled per quantizer (None: the build's default)."""
    kw = {} if train_vectors is None else {"train_vectors": train_vectors}
    out = {
        name: dataclasses.replace(CodecConfig.parse(name), **kw) for name in names if name and name != "none"
    }
    return {**out, BASELINE: CodecConfig(kind="none")}


def arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--sets", default="fictional,factbook", help="comma-separated question sets")
    ap.add_argument("--limit", type=int, default=None, help="first N held-out questions per set")
    ap.add_argument(
        "--full-sets",
        action="store_true",
        help="every held-out question of the sets (FULL_SETS, generated), not the shipped sample",
    )
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument(
        "--codecs",
        nargs="+",
        default=["default"],
        help="codecs to compare with bf16, space-separated: 'default', tc<bits> or FAISS factory strings",
    )
    ap.add_argument(
        "--train-vectors", type=int, default=None, help="vectors sampled per quantizer (default: the build's)"
    )
    ap.add_argument(
        "--kv-dtype", default="auto", help="KV cache dtype of generation (auto: as memory3 generate)"
    )
    ap.add_argument(
        "--calibration",
        default=None,
        help="for tc<bits> codecs: a calibration file (default: the one beside the model, as build uses)",
    )
    ap.add_argument(
        "--section",
        default="codec-qa",
        help="BENCHMARKS.md section to write: codec-qa (the default codec's), or codec-qa-tc for the "
        "transform codec's",
    )


@experiment("codec-qa", "codec_qa.json", arguments, faiss_threads=True)
def main(run: Run) -> int:
    args = run.args
    loaded = run.load()
    model, tok, mem_cfg = loaded.model, loaded.tokenizer, loaded.memory_config
    qa_cfg = QAEvalConfig(modes=("memory",), batch_size=args.batch_size)
    codecs = codecs_from(args.codecs, args.train_vectors)
    calibration = find_calibration(loaded.path, args.calibration)  # as `memory3 build --codec tc<bits>`
    rows, detail = [], {}
    ok_all: dict[str, list[bool]] = {}  # per question, every set in turn
    full_dir = tempfile.TemporaryDirectory() if args.full_sets else None
    if full_dir is not None:
        generate(full_dir.name, FULL_SETS)
    for name in args.sets.split(","):
        path = Path(full_dir.name) / f"{name}.jsonl" if full_dir is not None else resolve_set(name)
        items = select_items(load_qa(path), "heldout", args.limit)
        docs = kb_documents(path, items, "set")
        accs: dict[str, float] = {}
        ok = ok_all  # per question, for the paired count below
        with tempfile.TemporaryDirectory() as tmp:
            for codec_name, codec in codecs.items():
                bank = Path(tmp) / codec_name.split()[0].replace(",", "_")
                cfg = BuildConfig(codec=codec, index=IndexConfig(kind="flat"))
                summary = build(docs, bank, model, tok, mem_cfg, cfg, progress=False, calibration=calibration)
                retr = StoreRetriever.open(bank, model, tok)
                t0 = time.perf_counter()
                gen = Generator(model, tok, retr, mem_cfg, kv_dtype=args.kv_dtype)
                report = evaluate_qa(gen, items, qa_cfg)
                s = report.summary()
                acc = s["modes"]["memory"]["contained"]
                accs[codec_name] = acc
                detail[f"{name}/{codec_name}"] = {
                    "summary": s,
                    "bytes_per_memory": summary.bytes / max(summary.references, 1),
                    "eval_s": time.perf_counter() - t0,
                    "answers": [it.texts["memory"] for it in report.items],
                }
                ok.setdefault(codec_name, []).extend(it.contained["memory"] for it in report.items)
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
        # paired: the same questions, so count the answers each codec turned wrong and right
        for row in rows[-len(codecs) :]:
            c, here = row["codec"], slice(-row["questions"], None)
            row["drop (points)"] = 100 * (accs[BASELINE] - accs[c])
            row["lost"] = sum(b and not a for a, b in zip(ok[c][here], ok[BASELINE][here], strict=True))
            row["gained"] = sum(a and not b for a, b in zip(ok[c][here], ok[BASELINE][here], strict=True))
    n = {r["set"]: r["questions"] for r in rows}
    total = sum(n.values())
    overall = {
        c: sum(r["memory accuracy"] * r["questions"] for r in rows if r["codec"] == c) / total for c in codecs
    }
    results = {
        "model": str(args.model),
        "memory_config": mem_cfg.to_dict(),
        "threads": args.threads,
        "train_vectors": args.train_vectors or CodecConfig().train_vectors,
        "kv_dtype": str(resolve_kv_dtype(args.kv_dtype, model.dtype, model.device)).removeprefix("torch."),
        "codec_calibration": None if calibration is None else calibration.meta,
        "codecs": {c: cfg.to_dict() for c, cfg in codecs.items()},
        "full_sets": dataclasses.asdict(FULL_SETS) if args.full_sets else None,
        "rows": rows,
        "overall": overall,
        "drop_points": {c: 100 * (overall[BASELINE] - overall[c]) for c in codecs},
        "drop_ci95": {c: paired_drop_ci(ok_all[c], ok_all[BASELINE]) for c in codecs if c != BASELINE},
        "detail": detail,
    }
    run.save(results)
    body = (
        f"Model `{args.model}`, held-out questions answered with explicit memory from banks of the same "
        f"references built with each codec and in bf16 (same embedder, exact index, so the same hits). "
        + (
            "Goal: at most 1 point lower with the default codec.\n\n"
            if args.section == "codec-qa"
            else "Goal: a codec at most 1/10 of bf16 that loses at most 1 point.\n\n"
        )
        + table(rows)
        + f"\n\nOverall ({total} questions), points lost to each codec against bf16: "
        + ", ".join(
            f"`{c}` **{results['drop_points'][c]:+.1f}** (paired 95% interval "
            f"{results['drop_ci95'][c][0]:+.1f} to {results['drop_ci95'][c][1]:+.1f})"
            for c in codecs
            if c != BASELINE
        )
        + ". The interval is that of the mean per-question difference (codec wrong where bf16 was "
        "right counts +1, the reverse -1), normal approximation: too narrow when few answers change "
        "(see the lost and gained columns)."
    )
    flags = (
        f" --threads {args.threads} --sets {args.sets} --codecs {' '.join(args.codecs)}"
        + (f" --limit {args.limit}" if args.limit else "")
        + (" --full-sets" if args.full_sets else "")
        + (f" --kv-dtype {args.kv_dtype}" if args.kv_dtype != "auto" else "")
        + (f" --train-vectors {args.train_vectors}" if args.train_vectors else "")
        + (f" --calibration {args.calibration}" if args.calibration else "")
    )
    if args.model != default_model():
        flags += f" --model {args.model}"
    if args.section != "codec-qa":
        flags += f" --section {args.section} --json {shown(run.results_path)}"
    title = SECTIONS.get(args.section, f"Memory codec: effect on question answering ({args.section})")
    run.section(args.section, title, flags, body)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_experiment("codec-qa"))
