"""Memory-bank benchmark: build throughput, codec size and error, retrieval latency to 1M references.

1. Build throughput (references/s) on Wikipedia references against the bound set by the matmuls
   of the memory layers alone: the same batches, the same padded shapes, only the linear layers a
   writer must run (every projection of the memory layers but the last, whose q/k/v suffice).
   Reported for the writer alone, for writing + encoding + storing, and for the whole build
   (reading, chunking, embedding and indexing included), once with the embedder after the writer
   on the same thread and once with the embedder in a second thread beside it (the build's
   default when a core is free, as with --threads 1 here); the codec is trained once beforehand,
   as a large build amortises it, and its training time is reported on its own.
2. The default codec: bytes per memory against bf16, reconstruction error of keys and values,
   and the error of a memory layer's attention output when decoded memories replace exact ones.
3. Retrieval + load + decode of 5 memories, p50/p99, at 10k and 1M references: FAISS search of a
   query vector (exact at 10k, IVF at 1M as `auto` chooses; synthetic clustered vectors), then the
   5 records read from the shard files, checksummed, decoded to tensors and laid out for the model.
   "cold": pages of the shard files dropped from the OS cache and the LRU cache empty before every
   query (each read goes to the disk); "warm": served from the LRU cache. The store holds 10k real
   records; at 1M the index ids map onto them (records are fixed-size, read at id × size, so the
   read cost does not depend on the count). Embedding the query text is reported apart.

The bundled base model writes the paper's memories (15 layers × 8 tokens); `--model
smollm2-135m-instruct-memory3` measures the shipped reader's (20 layers × 32 tokens).

    .venv/bin/python benchmarks/bench_bank.py [--quick] [--threads 1] [--parts build,latency] [--model NAME]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from harness import Run, experiment, interleaved, run_experiment

from memory3.eval.fidelity import codec_report
from memory3.eval.report import machine, table
from memory3.memory import layout
from memory3.memory.build import BuildConfig, build
from memory3.memory.codec import CodecConfig, train_codec
from memory3.memory.ingest import Document, chunk_documents
from memory3.memory.store import MemoryStore, RefMeta
from memory3.memory.transform import find_calibration
from memory3.memory.write import Memories, MemoryWriter, reference_prefix_ids
from memory3.retrieval.embed import get_embedder
from memory3.retrieval.index import IndexConfig, VectorIndex
from memory3.retrieval.retriever import StoreRetriever
from memory3.shipped import BUNDLED as BASE_MODEL


def wiki_docs(n: int) -> list[Document]:
    from memory3.data.wikipedia import iter_articles

    docs = []
    for a in iter_articles():
        docs.append(Document(a.doc_id, a.text, a.title))
        if len(docs) == n:
            break
    return docs


def matmul_bound_seconds(model, batches: list[tuple[int, int]], repeats: int) -> float:
    """Seconds for the linear layers a writer runs, on (batch, length) shapes: every projection of
    memory layers 0..L-2 and q/k/v of the last one. Random activations; the median of `repeats`."""
    layers = model.model.layers
    last = max(model.memory_layers)
    C = model.config.hidden_size
    times = []
    with torch.inference_mode():
        for _ in range(repeats):
            t0 = time.perf_counter()
            for B, T in batches:
                x = torch.randn(B, T, C, dtype=model.dtype)
                for i in range(last + 1):
                    a, m = layers[i].self_attn, layers[i].mlp
                    q = F.linear(x, a.q_proj.weight)
                    F.linear(x, a.k_proj.weight), F.linear(x, a.v_proj.weight)
                    if i == last:
                        break
                    F.linear(q, a.o_proj.weight)
                    h = F.linear(x, m.gate_proj.weight) * F.linear(x, m.up_proj.weight)
                    F.linear(h, m.down_proj.weight)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def shapes(refs: list[list[int]], batch: int, prefix: int) -> list[tuple[int, int]]:
    """(batch, padded length) of the writer's batches: it sorts by length, then cuts."""
    lens = sorted(len(r) for r in refs)
    return [(len(lens[s : s + batch]), prefix + lens[s : s + batch][-1]) for s in range(0, len(lens), batch)]


def synthetic_vectors(n: int, dim: int, seed: int, clusters: int = 1024) -> np.ndarray:
    """Unit vectors around `clusters` random centres: like text embeddings, not uniform noise."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    out = np.empty((n, dim), dtype=np.float32)
    for s in range(0, n, 100_000):
        m = min(100_000, n - s)
        out[s : s + m] = centres[rng.integers(0, clusters, m)] + 0.6 * rng.standard_normal((m, dim))
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    return out


def drop_page_cache(paths: list[Path]) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs) * 1000, q))


def names(model: str, codec: str) -> tuple[str, str, str]:
    """(results file, section, title): another model or codec than the base model's default gets
    its own."""
    own = model != BASE_MODEL
    slug = Path(model).name
    tag = "" if codec == "default" else "-" + codec.replace(",", "_")
    name, title = "bank", "Memory bank: build, codec, retrieval latency (SmolLM2-135M)"
    if own:
        name, title = f"bank-{slug}", f"Memory bank: build, codec, retrieval latency ({slug})"
    if tag:
        name, title = name + tag, title[:-1] + f", codec {codec})"
    return f"{name}.json", name, title


def arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--quick", action="store_true", help="fewer references and queries")
    ap.add_argument(
        "--codec",
        default="default",
        help="the bank's codec, as `memory3 build --codec` takes it (tc<bits> uses the model's calibration)",
    )
    ap.add_argument(
        "--parts",
        default="build,latency",
        help="what to measure: build, latency, codec (the codec report always runs; 'codec' alone "
        "runs only it); the parts left out are carried over from --json",
    )


def results_file(args: argparse.Namespace) -> str:
    return names(args.model, args.codec)[0]


@experiment("bank", results_file, arguments, model=BASE_MODEL, faiss_threads=True)
def main(run: Run) -> int:
    args = run.args
    path = run.results_path
    parts = set(args.parts.split(",")) - {"codec"}  # the codec report always runs
    if not parts <= {"build", "latency"}:
        raise SystemExit(f"--parts {args.parts}: choose from build, latency, codec")
    previous = json.loads(path.read_text()) if path.exists() else {}
    carried = sorted({"build", "latency"} - parts)
    if any(p not in previous for p in carried):
        raise SystemExit(f"--parts {args.parts}: {path} has no {carried} to carry over; run them too")
    other = {p: previous.get("measured", {}).get(p, {}).get("model", BASE_MODEL) for p in carried}
    if any(m != args.model for m in other.values()):
        raise SystemExit(
            f"--model {args.model}: the parts to carry over from {path} were measured with {other}; "
            "measure every part with this model (--parts build,latency)"
        )
    n_docs, n_queries, big = (48, 100, 200_000) if args.quick else (128, 400, 1_000_000)
    rounds = 1 if args.quick else 3
    results: dict = {"threads": args.threads}
    loaded = run.load()
    model, tok = loaded.model, loaded.tokenizer
    mc = loaded.memory_config  # what the model writes: the paper's defaults for the base model
    results["model"] = args.model
    results["memory"] = {"layers": len(model.memory_layers), "kept_tokens": mc.kept_tokens}
    prefix = reference_prefix_ids(tok, model.config.bos_token_id, mc)
    writer = MemoryWriter(model, prefix, mc)
    bc = BuildConfig(codec=CodecConfig.parse(args.codec))
    calibration = find_calibration(loaded.path) if bc.codec.kind == "transform" else None
    results["codec_calibration"] = None if calibration is None else calibration.meta

    # ---- 1. build throughput against the matmul bound
    docs = wiki_docs(n_docs)
    refs = [list(r.token_ids) for r in chunk_documents(docs, tok, mc.reference_tokens)]
    print(f"{len(refs)} references from {len(docs)} articles", file=sys.stderr)
    with torch.inference_mode():
        writer.write(refs[:16], bc.batch_size)  # warm up
        mem = writer.write(refs, bc.batch_size)
    t0 = time.perf_counter()
    codec = train_codec([mem], bc.codec, rope_theta=model.config.rope_theta, calibration=calibration)
    t_codec = time.perf_counter() - t0
    n = len(refs)
    # Rounds of (bound, writer, build without index, whole build) side by side, so that a change
    # in machine load hits all four alike; speeds are medians, shares the median per-round ratio.
    if "build" not in parts:
        rounds = 0  # carried over below
    serial, beside = (dataclasses.replace(bc, overlap_embedding=o) for o in ("off", "on"))

    def written() -> float:
        with torch.inference_mode():
            t0 = time.perf_counter()
            writer.write(refs, bc.batch_size)
            return time.perf_counter() - t0

    def built(cfg: BuildConfig, index: bool = True) -> float:
        with tempfile.TemporaryDirectory() as tmp:
            return build(
                docs, Path(tmp) / "bank", model, tok, mc, cfg, progress=False, codec=codec, index=index
            ).seconds

    t = interleaved(
        {
            "bound": lambda: matmul_bound_seconds(model, shapes(refs, bc.batch_size, len(prefix)), repeats=1),
            "writer": written,
            "fill": lambda: built(bc, index=False),
            "build": lambda: built(serial),
            "beside": lambda: built(beside),
        },
        rounds,
        drop_first=False,
        own_clock=True,
    ).runs
    what = {
        "bound": "matmul bound (memory layers' linear layers only)",
        "writer": f"writer (forward to the last memory layer + top-{mc.kept_tokens})",
        "fill": "write + encode + store (build without index)",
        "build": "whole build (+ read, chunk, embed, index), embedder after the writer",
        "beside": "whole build, embedder in a second thread beside the writer (default)",
    }
    build_rows = [
        {
            "what": what[key],
            "references/s": n / statistics.median(ts),
            "of bound": statistics.median(b / x for b, x in zip(t["bound"], ts, strict=True)),
        }
        for key, ts in t.items()
        if ts
    ]
    results["build"] = (
        {"references": n, "rounds": rounds, "codec_train_s": t_codec, "rows": build_rows}
        if "build" in parts
        else previous["build"]
    )
    print(json.dumps(results["build"]), file=sys.stderr)

    # ---- 2. codec bytes and fidelity (memories of real references)
    rep = codec_report(mem, codec)
    results["codec"] = {k: v for k, v in rep.items() if k != "attn_rel_error_per_layer"}
    results["codec"]["attn_rel_error_per_layer"] = rep["attn_rel_error_per_layer"]
    print(json.dumps(results["codec"]), file=sys.stderr)

    # ---- 3. retrieval + load + decode latency
    if "latency" in parts:
        latency(args, results, model, writer, mc, mem, codec, n_queries, big)
    else:
        for key in ("latency", "query_embedding_ms_p50", "store_fill_s"):
            results[key] = previous.get(key)
        results["latency_queries"] = previous.get("latency_queries", n_queries)  # same flags, same count
    results["carried_over"] = carried
    # each part keeps the machine, date and codec it was measured with
    here = {**machine(), "codec": results["codec"]["codec"], "model": args.model}
    unknown = {"date": "?", "codec": "? (from a run that did not record it)"}
    results["measured"] = {
        p: previous.get("measured", {}).get(p, unknown) if p in carried else here
        for p in ("build", "codec", "latency")
    }
    run.save(results)

    b, c = results["build"], results["codec"]
    body = (
        f"Model `{args.model}`: memories of {results['memory']['layers']} layers × "
        f"{results['memory']['kept_tokens']} kept tokens per head.\n\n"
        f"Build throughput, {b['references']} Wikipedia references (128-token chunks, fp32, "
        f"{args.threads} thread(s), {b['rounds']} interleaved rounds); the bound is the time of the memory "
        f"layers' matmuls alone on the same batches (goal: build ≥ 70% of it). Codec training on these "
        f"memories took {b['codec_train_s']:.1f} s.\n\n"
        + table(b["rows"])
        + f"\n\n{'Default codec' if args.codec == 'default' else 'Codec'} `{c['codec']}`: **{c['bytes_per_memory']:,} B per memory** vs "
        f"{c['bf16_bytes_per_memory']:,} B in bf16 ({c['compression']:.1f}× smaller); relative error "
        f"keys {c['k_rel_error']:.3f}, values {c['v_rel_error']:.3f}; memory-layer attention output "
        f"{c['attn_rel_error']:.3f} (reading another chunk's memories instead: "
        f"{c['attn_rel_error_other_memories']:.3f}).\n\n"
        "Retrieval + load + decode of 5 memories (query vector → ids → records from disk or cache → "
        "checksummed, decoded, laid out for the model). Cold: the OS page cache dropped and the LRU "
        "cache emptied before every query; the store asks the kernel for all 5 records at once "
        "(fadvise WILLNEED), then reads them with pread. Warm: served from the LRU cache. Synthetic "
        "clustered vectors; "
        f"{results['latency_queries']} queries. Embedding the query text with all-MiniLM-L6-v2 adds "
        f"{results['query_embedding_ms_p50']:.1f} ms (p50). Goal: p50 < 5 ms at 1M with the "
        "approximate index.\n\n" + table(results["latency"])
    )
    for part in carried:
        m = results["measured"][part]
        body += (
            f"\n\n({part} carried over from an earlier run of this benchmark: {m.get('date', '?')}, "
            f"codec {m['codec']}.)"
        )
    flags = (" --quick" if args.quick else "") + f" --threads {args.threads} --parts {args.parts}"
    flags += f" --model {args.model}" if args.model != BASE_MODEL else ""
    flags += f" --codec {args.codec}" if args.codec != "default" else ""
    _, name, title = names(args.model, args.codec)
    run.section(name, title, flags, body)
    return 0


def latency(args, results, model, writer, mc, mem, codec, n_queries: int, big: int) -> None:
    """Part 3: retrieval + load + decode of 5 memories at 10k and `big` references."""
    n_store = 10_000
    dim = 384
    embedder = get_embedder("minilm")
    q_text = "What is the capital city of the country that borders the northern sea?"
    embedder.embed([q_text])
    t_embed = []
    for _ in range(20):
        t0 = time.perf_counter()
        embedder.embed([q_text])
        t_embed.append(time.perf_counter() - t0)
    results["query_embedding_ms_p50"] = pct(t_embed, 50)
    lat_rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bank"
        store = MemoryStore.create(path, codec, writer.fingerprint, model.config, mc)
        reps = -(-n_store // len(mem))
        t0 = time.perf_counter()
        for r in range(reps):  # 10k records: the real memories, repeated
            m = min(len(mem), n_store - r * len(mem))
            metas = [RefMeta(f"doc{r}-{i}", 0, f"reference {r}-{i}") for i in range(m)]
            store.add(metas, Memories(mem.k[:m], mem.v[:m], mem.positions[:m], mem.fingerprint))
        results["store_fill_s"] = time.perf_counter() - t0
        live = store.live_ids()
        shards = sorted((path / "shards").glob("*.bin"))
        rng = np.random.default_rng(0)
        for size in (n_store, big):
            vecs = synthetic_vectors(size, dim, seed=size)
            ids = np.arange(size, dtype=np.int64)
            t0 = time.perf_counter()
            index = VectorIndex.build(vecs, ids, IndexConfig())
            t_index = time.perf_counter() - t0
            picks = rng.integers(0, size, n_queries)
            queries = vecs[picks] + 0.3 * rng.standard_normal((n_queries, dim)).astype(np.float32) / dim**0.5
            queries /= np.linalg.norm(queries, axis=1, keepdims=True)
            exact = np.concatenate(
                [
                    np.argpartition(-(queries[s : s + 50] @ vecs.T), 5, axis=1)[:, :5]
                    for s in range(0, n_queries, 50)
                ]
            )
            retr = StoreRetriever(store, index, embedder, cache_size=4096)

            def query(
                qi: int, cold: bool, retr=retr, index=index, queries=queries
            ) -> tuple[float, np.ndarray]:
                """Seconds for search + load + decode + layout of one query's 5 memories, and its hits."""
                if cold:
                    retr.cache = type(retr.cache)(4096)
                    drop_page_cache(shards)
                t0 = time.perf_counter()
                _, hit = index.search(queries[qi : qi + 1], 5)
                layout.gather(retr.memories(live[hit[0] % n_store].tolist()), torch.arange(5)[None])
                return time.perf_counter() - t0, hit[0]

            for mode in ("cold", "warm"):
                runs = [query(qi, mode == "cold") for qi in range(n_queries)]
                found = [h for _, h in runs]
                if mode == "warm":  # the same queries again, now all cached
                    runs = [query(qi, False) for qi in range(n_queries)]
                times = [t for t, _ in runs]
                row = {
                    "references": size,
                    "index": index.kind,
                    "cache": mode,
                    "p50 ms": pct(times, 50),
                    "p99 ms": pct(times, 99),
                    "index build s": t_index,
                }
                row["recall@5"] = float(
                    np.mean([len(set(f) & set(e)) / 5 for f, e in zip(found, exact, strict=True)])
                )
                lat_rows.append(row)
                print(json.dumps(row), file=sys.stderr)
            del index, vecs
        store.close()
    results["latency"] = lat_rows
    results["latency_queries"] = n_queries


if __name__ == "__main__":
    raise SystemExit(run_experiment("bank"))
