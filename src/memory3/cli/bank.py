"""`memory3 build` and `memory3 store …`: make and maintain memory banks."""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from memory3.cli.common import (
    add_memory_args,
    add_model_args,
    load_model,
)
from memory3.errors import InputError


def _print(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


def _codec_config(args: argparse.Namespace) -> Any:
    from memory3.memory.codec import CodecConfig

    return CodecConfig.parse(args.codec)


def cmd_build(args: argparse.Namespace) -> int:
    from memory3.memory.build import BuildConfig, build, build_distributed
    from memory3.memory.ingest import IngestStats
    from memory3.retrieval.index import IndexConfig

    codec = _codec_config(args)
    if args.calibration and codec.kind != "transform":  # before the model loads
        raise InputError(
            f"--calibration is for transform codecs (--codec tc<bits>), not --codec {args.codec}"
        )
    _check_out(Path(args.out))
    stats = IngestStats()
    docs = _documents(args.source, stats, "build")  # bad or empty input: said before the model loads
    loaded = load_model(args)
    named = Path(args.model).expanduser()
    config = BuildConfig(
        model=str(named.resolve()) if named.exists() else args.model,  # found again from any directory
        codec=codec,
        index=IndexConfig(kind=args.index),
        embedder=args.embedder,
        batch_size=args.batch_size,
        cold=args.cold,
        overlap_embedding=args.overlap_embedding,
    )
    mem_cfg = loaded.memory_config.override(args.kept_tokens, args.selection)
    calibration = None
    if config.codec.kind == "transform":
        from memory3.memory.transform import find_calibration

        calibration = find_calibration(loaded.path, args.calibration)
    if args.limit:
        docs = itertools.islice(docs, args.limit)  # stops reading there (the counts say so too)
    if "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        summary = build_distributed(
            list(docs), args.out, loaded.model, loaded.tokenizer, mem_cfg, config, calibration=calibration,
            progress=not args.no_progress,
        )  # fmt: skip
        if summary is not None:
            _print(summary.to_dict())
        return 0
    summary = build(
        docs, args.out, loaded.model, loaded.tokenizer, mem_cfg, config, stats=stats, calibration=calibration,
        progress=not args.no_progress,
    )  # fmt: skip
    _print(summary.to_dict())
    return 0


def _check_out(out: Path) -> None:
    """`build --out` must be a new path, an empty directory, or a bank to resume."""
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file; give a directory for the memory bank (a new path)")
    if out.is_dir() and any(out.iterdir()) and not (out / "manifest.json").is_file():
        raise InputError(
            f"--out {out} is a directory that holds other files, not a memory bank; give a new path "
            "(or an empty directory, or a bank whose build you want to resume)"
        )


def _documents(source: str, stats: Any, verb: str) -> Iterator[Any]:
    """The documents of `source`, refusing a source that has none (before any model loads)."""
    from memory3.memory.ingest import read_documents

    docs = read_documents(source, stats)
    first = next(docs, None)
    if first is None:
        raise InputError(
            f"{source}: no documents to {verb} ({_skipped(stats)}); give text, Markdown or JSONL with a 'text' field"
        )
    return itertools.chain([first], docs)


def _skipped(stats: Any) -> str:
    counts = {k: v for k, v in stats.as_dict().items() if v}
    return ", ".join(f"{k} {v}" for k, v in counts.items()) or "the input is empty"


def _open(args: argparse.Namespace, writable: bool) -> Any:
    from memory3.retrieval.retriever import StoreRetriever

    loaded = load_model(args)
    return StoreRetriever.open(args.store, loaded.model, loaded.tokenizer, writable=writable)


def cmd_info(args: argparse.Namespace) -> int:
    from memory3.memory.store import MemoryStore

    with MemoryStore.open(args.store) as store:
        _print(store.info())
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from memory3.retrieval.retriever import verify_bank

    report = verify_bank(args.store)
    _print({"ok": report.ok, "checked": report.checked, "errors": report.errors, "counts": report.counts})
    return 0 if report.ok else 1


def cmd_compact(args: argparse.Namespace) -> int:
    from memory3.memory.store import MemoryStore

    with MemoryStore.open(args.store, readonly=False) as store:
        _print(store.compact())
    return 0


def cmd_reindex(args: argparse.Namespace) -> int:
    from memory3.memory.build import reindex
    from memory3.retrieval.index import IndexConfig

    index = None if args.index is None else IndexConfig(kind=args.index)
    _print(reindex(args.store, args.embedder, index, progress=not args.no_progress))
    return 0


def cmd_add(args: argparse.Namespace) -> int:
    from memory3.memory.ingest import IngestStats
    from memory3.memory.manifest import read_manifest

    read_manifest(args.store)  # a wrong path is said before the model loads
    stats = IngestStats()
    docs = list(_documents(args.source, stats, "add"))
    retr = _open(args, writable=True)
    added = retr.add_documents(docs, replace=True)
    _print(
        {
            "documents": len(added),
            "references": sum(len(a["reference_ids"]) for a in added),
            "ingest": stats.as_dict(),
        }
    )
    retr.store.close()
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    retr = _open(args, writable=True)
    with retr.begin_documents() as batch:
        batch.delete(args.doc_ids)
    retr.store.close()
    unknown = [d for d in dict.fromkeys(args.doc_ids) if d not in batch.deleted]
    _print({"deleted_documents": len(batch.deleted), "not_found": unknown})
    if unknown:
        print(
            f"error: {len(unknown)} of the documents are not in {args.store}: {unknown[:10]}; "
            "`memory3 store info` counts what it holds",
            file=sys.stderr,
        )
    return 1 if unknown else 0


def register(sub: Any) -> None:

    p = sub.add_parser("build", help="build a memory bank from files, a directory, JSONL or 'wikipedia'")
    p.add_argument("source", help="a text/Markdown/JSONL file, a directory of them, or 'wikipedia' (bundled)")
    p.add_argument("--out", required=True, help="the memory bank directory (resumes if it exists)")
    add_model_args(p)
    p.add_argument(
        "--codec",
        default="default",
        help="'default' (8-bit scalar quantizer per layer, 1/2 of bf16), 'none' (bf16), 'tc<bits>' "
        "(transform coding at <bits> per vector, e.g. tc96 = 1/10 of bf16, bits where the model's "
        "calibration says answers need them; tc96m8 caps a coefficient at 8 bits, 12 by default), or a FAISS factory string, e.g. 'Residual2x10,PQ8' "
        "(1/11 of bf16); smaller codecs cost answers: see BENCHMARKS.md",
    )
    p.add_argument(
        "--calibration",
        default=None,
        help="for --codec tc<bits>: a calibration file from `memory3 train calibrate` (default: "
        "codec_calibration.safetensors beside the model, if there is one)",
    )
    p.add_argument("--index", default="auto", choices=("auto", "flat", "hnsw", "ivf"))
    p.add_argument(
        "--embedder",
        default="minilm",
        help="'minilm' (bundled), 'bge-m3', or a sentence-transformers name/path",
    )
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    add_memory_args(p, "how the bank's memories are written, once (part of its fingerprint)")
    p.add_argument("--cold", action="store_true", help="cold start: write memories when first retrieved")
    p.add_argument("--limit", type=int, default=0, help="only the first N documents")
    p.add_argument(
        "--overlap-embedding",
        default="auto",
        choices=("auto", "on", "off"),
        help="embed references in a second thread while memories are written "
        "(auto: when the writer leaves a core free or runs on an accelerator)",
    )

    p.set_defaults(func=cmd_build)
    _register_store(sub)


def _register_store(sub: Any) -> None:
    store = sub.add_parser("store", help="inspect and change a memory bank").add_subparsers(
        dest="store_command", required=True
    )
    bank_help = "the memory bank directory (made by `memory3 build`)"
    for name, func, helptext in (
        ("info", cmd_info, "counts, sizes, fingerprints"),
        (
            "verify",
            cmd_verify,
            "check the manifest, the metadata, every record's checksum and the index; exit 1 if anything is wrong",
        ),
        ("compact", cmd_compact, "reclaim the space of deleted references"),
    ):
        q = store.add_parser(name, help=helptext, description=helptext)
        q.add_argument("store", help=bank_help)
        q.set_defaults(func=func)
    q = store.add_parser(
        "reindex",
        help="embed every reference again and replace the retrieval index (a missing or damaged index, "
        "another embedder or index kind)",
    )
    q.add_argument("store", help=bank_help)
    q.add_argument("--embedder", default=None, help="default: the one the bank was built with")
    q.add_argument(
        "--index", default=None, choices=("auto", "flat", "hnsw", "ivf"), help="default: the bank's"
    )
    q.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    q.set_defaults(func=cmd_reindex)
    q = store.add_parser(
        "add",
        help="add or replace documents, all of them or none (same id = replaced as a unit)",
    )
    q.add_argument("store", help=bank_help)
    q.add_argument("source", help="a text/Markdown/JSONL file or a directory of them")
    add_model_args(q)
    q.set_defaults(func=cmd_add)
    q = store.add_parser("delete", help="delete documents by id, together")
    q.add_argument("store", help=bank_help)
    q.add_argument("doc_ids", nargs="+", help="document ids (`id` of the JSONL line, or the file's path)")
    add_model_args(q)
    q.set_defaults(func=cmd_delete)
