"""The least explicit memory can cost in throughput, from what this machine can stream and
compute, set beside a measured `memory3 bench speed` run.

In a decoding step the memory mode does one thing more than the plain model: in each memory layer,
every sequence's attention reads its retrieved memories' keys and values. However good the kernel,
that costs at least their bytes over the memory bandwidth one thread streams at (measured here,
a sum over 512 MB). In the prefill, memory keys add attention FLOPs to every prompt token: at
least their count over the GEMM rate one thread reaches (measured, in the model's dtype).
Retrieval (embedding each query chunk, search, loading memories) is taken as the run measured it,
or left out. So:

    memory/none ≤ wall_none / (wall_none + steps·bytes_memory/bandwidth
                                + prompt_tokens·flops_memory/gemm_rate + retrieval)

The gap between the measured added time and these floors is what better kernels could win; the
floors are what only fewer or smaller memory keys can. Also given for other kept-token counts.
With `--store` (the run's bank), the parts of one retrieval are timed too.
Run it alone: the two rates are timed.

    memory3 bench speed --store BANK --threads 1 --batch-sizes 32 --modes none,memory \
        --caches warm --warmup first --runs 3 --out benchmarks/results/speed-batch32-kv-auto.json
    python benchmarks/research/bound_memory_cost.py --speed benchmarks/results/speed-batch32-kv-auto.json \
        --store BANK
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from memory3.checkpoint import load_pretrained
from memory3.eval.report import machine, table, update_section

ELEMENT_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def row(rows: list[dict[str, Any]], mode: str, batch: int) -> dict[str, Any]:
    for r in rows:
        if r["mode"] == mode and r["batch"] == batch and r.get("cache") in ("-", "warm"):
            return r
    raise SystemExit(
        f"the speed JSON has no {mode!r} row at batch {batch} (warm cache): rerun with --modes none,memory"
    )


def best_of(fn: Any, rounds: int = 5, median: bool = False) -> float:
    """Fastest (or median) of `rounds` timed calls after a warm-up call."""
    fn()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[rounds // 2] if median else min(times)


def stream_bandwidth(dtype: torch.dtype, mbytes: int = 512) -> float:
    """Bytes per second one thread reads (a sum over a tensor far larger than the caches)."""
    x = torch.ones(mbytes * 2**20 // torch.finfo(dtype).bits * 8, dtype=dtype)
    return x.numel() * x.element_size() / best_of(lambda: x.sum())


def gemm_rate(dtype: torch.dtype, m: int = 2048, k: int = 576, n: int = 1536) -> float:
    """FLOPs per second of a prefill-shaped matmul (a batch of tokens through a projection)."""
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    return 2 * m * k * n / best_of(lambda: a @ b)


def memory_costs(cfg: Any, mem_layers: int, memory_keys: int, kv_dtype: str) -> tuple[float, float]:
    """(bytes one decoding step reads for memories, per sequence; attention FLOPs memories add
    per prompt token): each memory layer's kv heads read `memory_keys` keys and values, and each
    query head does q·k and p·v over them."""
    step_bytes = mem_layers * cfg.n_kv_head * memory_keys * cfg.head_dim * 2 * ELEMENT_BYTES[kv_dtype]
    token_flops = mem_layers * cfg.n_head * memory_keys * 4 * cfg.head_dim
    return step_bytes, token_flops


def retrieval_parts(model: str, store: str, batch: int, chunk_tokens: int, kv_dtype: str) -> dict[str, float]:
    """Median seconds of one retrieval's parts for `batch` query chunks of `chunk_tokens` tokens
    (held-out Wikipedia text): embedding the queries, the rest of the search (index, filters),
    and loading the hits' memories from a warm cache in the KV dtype."""
    from memory3.data.wikipedia import load_articles
    from memory3.retrieval.open import open_retriever

    loaded = load_pretrained(model)
    dtype = getattr(torch, kv_dtype)
    retriever, _ = open_retriever(
        loaded, store=store, dtype=dtype
    )  # cached in the KV dtype, as generation does
    tok = loaded.tokenizer
    chunks = [tok.decode(tok.encode(a.text)[:chunk_tokens]) for a in load_articles("heldout")[:batch]]
    if len(chunks) < batch:
        raise SystemExit(
            f"only {len(chunks)} held-out articles for {batch} query chunks: use a smaller --batch"
        )
    hits = retriever.search(chunks, 5)
    ids = sorted({h.ref_id for found in hits for h in found})
    embed = best_of(lambda: retriever.embedder.embed(chunks), median=True)
    search = best_of(lambda: retriever.search(chunks, 5), median=True)
    fetch = best_of(lambda: retriever.memories(ids).to(dtype=dtype), median=True)
    return {
        "embed": embed,
        "index and filters": max(search - embed, 0.0),
        "memories": fetch,
        "memories read": len(ids),
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--speed", default="benchmarks/results/speed-batch32-kv-auto.json")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument(
        "--kept", type=int, nargs="+", default=[8, 16, 32, 48, 64], help="kept tokens per head to bound"
    )
    ap.add_argument("--store", help="the run's bank: also time the parts of one retrieval")
    ap.add_argument("--out", default="BENCHMARKS.md")
    ap.add_argument("--json", default="benchmarks/results/speed-bound.json")
    args = ap.parse_args()
    run = json.loads(Path(args.speed).read_text())
    none, mem = row(run["rows"], "none", args.batch), row(run["rows"], "memory", args.batch)
    cfg = load_pretrained(run["model"]).model.config
    c, m = run["config"], run["memory"]
    prompt, new, k, B = c["prompt_tokens"], c["new_tokens"], c["k"], args.batch
    wall_none, prefill_none = none["wall_s"]["median"], none["prefill_s"]
    wall_mem, prefill_mem, retrieval = mem["wall_s"]["median"], mem["prefill_s"], mem["retrieval_s"]
    added = {
        "decode": (wall_mem - prefill_mem - retrieval) - (wall_none - prefill_none),
        "prefill": prefill_mem - prefill_none,
        "retrieval": retrieval,
    }
    torch.set_num_threads(1)
    bandwidth = stream_bandwidth(getattr(torch, run["kv_dtype"]))
    rate = gemm_rate(getattr(torch, run["dtype"]))
    step_bytes, token_flops = memory_costs(cfg, m["layers"], k * m["kept_tokens"], run["kv_dtype"])
    floors = {"decode": new * B * step_bytes / bandwidth, "prefill": B * prompt * token_flops / rate}
    measured = {
        "memory/none": wall_none / wall_mem,
        "added s": added,
        "floor s": floors,
        "memory attention while decoding, GB/s": new * B * step_bytes / added["decode"] / 1e9,
    }
    if args.store:
        measured["one retrieval s"] = retrieval_parts(run["model"], args.store, B, 64, run["kv_dtype"])
    rows = []
    for kept in sorted(set(args.kept) | {m["kept_tokens"]}):
        sb, tf = memory_costs(cfg, m["layers"], k * kept, run["kv_dtype"])
        floor = new * B * sb / bandwidth + B * prompt * tf / rate
        rows.append(
            {
                "kept tokens": kept,
                "memory keys per layer": k * kept,
                "MB read per decoding step": round(B * sb / 1e6, 1),
                "decode + prefill floor s": round(floor, 2),
                "bound without retrieval": round(wall_none / (wall_none + floor), 3),
                "bound with measured retrieval": round(wall_none / (wall_none + floor + retrieval), 3),
                "the run's setting": "yes" if kept == m["kept_tokens"] else "",
            }
        )
    results = {
        "speed_json": args.speed,
        "model": run["model"],
        "dtype": run["dtype"],
        "kv_dtype": run["kv_dtype"],
        "batch": args.batch,
        "machine": machine(),
        "stream_bandwidth_GBps": bandwidth / 1e9,
        "gemm_GFLOPS": rate / 1e9,
        "measured": measured,
        "rows": rows,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results, indent=1))
    f = floors
    body = (
        f"From `{args.speed}` ({run['model']}, {run['dtype']} weights, {run['kv_dtype']} KV cache, batch "
        f"{B}, {prompt} prompt and {new} new tokens, {k} memories of {m['kept_tokens']} tokens per head "
        f"in {m['layers']} layers). One thread here streams {bandwidth / 1e9:.1f} GB/s of {run['kv_dtype']} "
        f"and multiplies {run['dtype']} matrices at {rate / 1e9:.0f} GFLOP/s.\n\n"
        f"Measured memory/none: **{measured['memory/none']:.3f}**. Memory added {added['decode']:.2f} s of "
        f"decoding (floor {f['decode']:.2f} s: its attention read memories at "
        f"{measured['memory attention while decoding, GB/s']:.1f} GB/s), {added['prefill']:.2f} s of "
        f"prefill (floor {f['prefill']:.2f} s) and {retrieval:.2f} s of retrieval, to {wall_none:.1f} s "
        "without memory. Upper bounds on memory/none with kernels at those floors:\n\n" + table(rows)
    )
    if args.store:
        parts = measured["one retrieval s"]
        body += (
            f"\n\nOne retrieval for {B} query chunks of 64 tokens (median of 5, warm cache, "
            f"{parts['memories read']} memories): embedding the queries {parts['embed']:.3f} s, index and "
            f"filters {parts['index and filters']:.3f} s, memories {parts['memories']:.3f} s."
        )
    update_section(
        args.out, "speed-bound", "Speed: the least explicit memory can cost",
        f"python benchmarks/research/bound_memory_cost.py --speed {args.speed}" + (" --store BANK" if args.store else ""),
        body, results,
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
