"""Load test of the HTTP server on loopback: throughput and latency under concurrent requests.

The bundled SmolLM2-135M-Instruct (float32 by default) serves an InMemoryRetriever over the first
reference of ~50 Wikipedia summaries. Closed-loop clients (1, 4, 8, 16 at a time, each sending its next
request when the last one is answered) send a fixed number of chat completions
(greedy, `max_tokens` new tokens), in memory mode and in RAG mode. Reported per level:
requests/s, completion tokens/s, p50/p99 latency and errors (must be 0). Batching works when
throughput at concurrency 8 is ≥ 3× that at concurrency 1 (checked in memory mode: RAG puts
5 × 128 reference tokens in every prompt, and that prefill does not get cheaper in a batch).

For scale, the same model is also timed without the server: `Generator.generate` on 1 and on 8
of the same prompts. The server's c8/c1 ratio can only approach that ceiling.

    .venv/bin/python benchmarks/bench_serve.py [--quick] [--threads 1]

--quick sends max(concurrency, 2) requests per level and measures RAG at concurrency 1 and 8 only.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import torch
from harness import Run, experiment, run_experiment

from memory3.config import GenerationConfig, MemoryConfig
from memory3.eval.report import table
from memory3.generate import Generator
from memory3.memory.ingest import Document, chunk_documents
from memory3.memory.write import MemoryWriter
from memory3.retrieval.embed import get_embedder
from memory3.retrieval.inmemory import InMemoryRetriever
from memory3.scheduler import SchedulerConfig
from memory3.serve import BackgroundServer, ServerConfig, create_app
from memory3.shipped import BUNDLED

QUESTIONS = (
    "What is {t} known for?",
    "Tell me one fact about {t}.",
    "Where does the story of {t} take place?",
    "Why does {t} matter?",
)


def references(n: int, tokenizer, max_tokens: int) -> list:
    from memory3.data.wikipedia import iter_articles

    refs, seen = [], set()
    docs = (Document(a.doc_id, a.text, a.title) for a in iter_articles())
    for r in chunk_documents(docs, tokenizer, max_tokens):
        if r.doc_id not in seen:  # the first reference of each article
            seen.add(r.doc_id)
            refs.append(r)
            if len(refs) == n:
                break
    return refs


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q / 100 * (len(xs) - 1)))]


def load(url: str, bodies: list[dict], concurrency: int) -> dict:
    """Closed loop: `concurrency` clients share the list of bodies, each sending the next one
    as soon as its last is answered."""
    lock, it = threading.Lock(), iter(bodies)
    latencies: list[float] = []
    tokens, errors = [0], [0]
    clients = [httpx.Client(base_url=url, timeout=1800) for _ in range(concurrency)]
    start = threading.Barrier(concurrency + 1)  # every client is ready before the clock starts

    def client(c: httpx.Client) -> None:
        start.wait()
        with c:
            while True:
                with lock:
                    body = next(it, None)
                if body is None:
                    return
                t0 = time.perf_counter()
                try:
                    r = c.post("/v1/chat/completions", json=body)
                    ok = r.status_code == 200
                except httpx.HTTPError:
                    ok = False
                dt = time.perf_counter() - t0
                with lock:
                    if ok:
                        latencies.append(dt)
                        tokens[0] += r.json()["usage"]["completion_tokens"]
                    else:
                        errors[0] += 1

    with ThreadPoolExecutor(concurrency) as pool:
        futures = [pool.submit(client, c) for c in clients]
        start.wait()
        t0 = time.perf_counter()
        for f in futures:
            f.result()
    wall = time.perf_counter() - t0
    return {
        "concurrency": concurrency,
        "requests": len(bodies),
        "errors": errors[0],
        "requests/s": len(latencies) / wall,
        "tokens/s": tokens[0] / wall,
        "p50 s": percentile(latencies, 50) if latencies else float("nan"),
        "p99 s": percentile(latencies, 99) if latencies else float("nan"),
    }


def generator_alone(gen: Generator, prompts: list[str], max_tokens: int) -> dict:
    """Tokens/s of the model without the server (memory mode): batch 1, then batch 8."""
    cfg = GenerationConfig(max_new_tokens=max_tokens)
    out = {}
    for b in (1, 8):
        t0 = time.perf_counter()
        done = gen.generate(prompts[:b], mode="memory", config=cfg, chat=True)
        out[f"batch {b} tokens/s"] = sum(len(o.token_ids) for o in done) / (time.perf_counter() - t0)
    out["speedup b8/b1 tokens/s"] = out["batch 8 tokens/s"] / out["batch 1 tokens/s"]
    return out


def arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--quick", action="store_true", help="fewer requests; RAG at concurrency 1 and 8 only")
    ap.add_argument("--levels", default="1,4,8,16")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-batch-size", type=int, default=8)
    ap.add_argument("--texts", type=int, default=50)
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")


@experiment("serve", "serve.json", arguments, model=None, threads=0)
def main(run: Run) -> int:
    args = run.args
    levels = [int(x) for x in args.levels.split(",")]

    loaded = run.load(BUNDLED, getattr(torch, args.dtype))
    model, tok = loaded.model, loaded.tokenizer
    mc = MemoryConfig()
    gen = Generator(model, tok, memory_config=mc)
    refs = references(args.texts, tok, mc.reference_tokens)
    t0 = time.perf_counter()
    retriever = InMemoryRetriever(refs, MemoryWriter(model, gen.prefix_ids, mc), tok, get_embedder("minilm"))
    print(f"wrote {len(refs)} memories in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    titles = [r.title for r in refs]
    questions = [QUESTIONS[i % len(QUESTIONS)].format(t=titles[i % len(titles)]) for i in range(64)]

    gen.set_retriever(retriever)
    gen.generate(questions[:1], mode="memory", config=GenerationConfig(max_new_tokens=2))  # warm up
    alone = generator_alone(gen, questions, args.max_tokens)
    print(json.dumps({"generator alone": alone}), file=sys.stderr)

    sched = SchedulerConfig(max_batch_size=args.max_batch_size, max_queue=256, request_timeout_s=3600)
    config = ServerConfig(
        model_name="smollm2", max_tokens=args.max_tokens, default_max_tokens=args.max_tokens
    )
    app = create_app(gen, {"wiki": retriever}, config, sched)
    results: dict = {
        "model": f"SmolLM2-135M-Instruct {args.dtype}",
        "references": len(refs),
        "max_tokens": args.max_tokens,
        "max_batch_size": args.max_batch_size,
        "references_per_chunk": mc.memories_per_chunk,
        "generator_alone_memory": alone,
        "levels": {},
    }
    with BackgroundServer(app) as server:
        for mode in ("memory", "rag"):

            def body(i: int, mode: str = mode) -> dict:
                return {
                    "model": "smollm2",
                    "messages": [{"role": "user", "content": questions[i % len(questions)]}],
                    "max_tokens": args.max_tokens,
                    "memory": {"mode": mode},
                }

            load(server.url, [body(i) for i in range(2)], 2)  # warm up
            rows = []
            for c in levels:
                if args.quick and mode == "rag" and c not in (1, 8):
                    continue
                n = max(c, 2) if args.quick else max(3 * c, 12)
                row = {"mode": mode, **load(server.url, [body(i) for i in range(n)], c)}
                print(json.dumps(row), file=sys.stderr)
                rows.append(row)
            results["levels"][mode] = rows
        stats = vars(app.state.scheduler.stats)
        results["scheduler"] = {k: round(v, 2) if isinstance(v, float) else v for k, v in stats.items()}

    checks = {}
    for mode, rows in results["levels"].items():
        by = {r["concurrency"]: r for r in rows}
        if 1 in by and 8 in by:
            checks[mode] = {
                "speedup c8/c1 requests/s": by[8]["requests/s"] / by[1]["requests/s"],
                "speedup c8/c1 tokens/s": by[8]["tokens/s"] / by[1]["tokens/s"],
            }
    results["checks"] = checks
    errors = sum(r["errors"] for rows in results["levels"].values() for r in rows)
    results["errors"] = errors
    run.save(results)

    cols = ["mode", "concurrency", "requests", "errors", "requests/s", "tokens/s", "p50 s", "p99 s"]
    all_rows = [r for rows in results["levels"].values() for r in rows]
    speed = [
        f"- {mode}: concurrency 8 vs 1 = **{c['speedup c8/c1 tokens/s']:.2f}×** tokens/s, "
        f"{c['speedup c8/c1 requests/s']:.2f}× requests/s" + (" (goal ≥ 3×)" if mode == "memory" else "")
        for mode, c in checks.items()
    ]
    speed.append(
        f"- the model alone (`Generator.generate`, memory mode, batch 8 vs batch 1, same prompts): "
        f"{alone['speedup b8/b1 tokens/s']:.2f}× tokens/s, for comparison (measured before the load test, not beside it)"
    )
    body_md = (
        f"SmolLM2-135M-Instruct ({args.dtype}, {torch.get_num_threads()} torch threads) behind `memory3 serve`'s "
        f"app on loopback; {len(refs)} Wikipedia references in RAM (MiniLM retrieval), "
        f"{mc.memories_per_chunk} per chunk; greedy chat completions of {args.max_tokens} new tokens; "
        f"closed-loop clients; scheduler batches of up to {args.max_batch_size}. "
        f"Errors must be 0 (here: {errors}).\n\n"
        + table(all_rows, cols)
        + "\n\nBatching:\n\n"
        + "\n".join(speed)
        + "\n"
    )
    flags = (
        (" --quick" if args.quick else "")
        + (f" --threads {args.threads}" if args.threads else "")
        + f" --dtype {args.dtype}"
    )
    run.section("serve", "Server: throughput and latency under load (SmolLM2-135M)", flags, body_md)
    # The batching goal is checked on memory mode (RAG is prefill-bound, see the docstring).
    ok = errors == 0 and checks.get("memory", {}).get("speedup c8/c1 tokens/s", 0) >= 3
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(run_experiment("serve"))
