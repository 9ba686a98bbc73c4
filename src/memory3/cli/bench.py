"""`memory3 bench speed|storage`: throughput and time to first token, and bytes per memory.
`memory3 bench all` (cli/eval.py) runs them with `eval qa` and `eval ppl`."""

from __future__ import annotations

import argparse
from dataclasses import asdict
from typing import Any

from memory3.cli.common import kv_dtype_of
from memory3.cli.measure import (
    add_memory_override_args,
    add_output_args,
    add_retrieval_args,
    check_memory_overrides,
    csv_of,
    emit,
    load_cached,
    memory_config_of,
    run_context,
    store_size,
)
from memory3.config import layer_span

# --- bench speed -------------------------------------------------------------------------------------


def _open_store(path: str, loaded: Any, cache: str, dtype: Any) -> Any:
    """A memory bank on disk, its memories read in `dtype`; "cold" turns its memory cache off
    (every read from disk)."""
    import inspect

    from memory3.retrieval.retriever import StoreRetriever  # type: ignore[import-not-found]

    params = inspect.signature(StoreRetriever.open).parameters
    if "cache_size" not in params:
        raise ValueError("this StoreRetriever.open has no cache_size: cannot run the cold-cache setting")
    kw = {"cache_size": 0} if cache == "cold" else {}
    return StoreRetriever.open(path, loaded.model, dtype=dtype, **kw)


def cmd_bench_speed(args: argparse.Namespace) -> int:
    import torch

    from memory3.data.wikipedia import load_articles
    from memory3.eval.qa import build_retriever
    from memory3.eval.speed import SpeedConfig, bench_speed, make_prompts
    from memory3.generate import Generator
    from memory3.memory.ingest import Document
    from memory3.retrieval.embed import get_embedder

    config = SpeedConfig(
        batch_sizes=args.batch_sizes,
        prompt_tokens=args.prompt_tokens,
        new_tokens=args.new_tokens,
        # the speed comparison's own setting (5 references, as the paper's) unless -k is given
        **({"k": args.references} if args.references is not None else {}),
        runs=args.runs,
        modes=args.modes,
        caches=args.caches,
        warmup=args.warmup,
    )
    check_memory_overrides(args)
    torch.manual_seed(0)
    loaded = load_cached(args)
    model, tok = loaded.model, loaded.tokenizer
    articles = load_articles("heldout")
    kb_articles, prompt_articles = articles[: args.kb_articles], articles[args.kb_articles :]
    prompts = make_prompts(
        tok, [a.text for a in prompt_articles], max(config.batch_sizes), config.prompt_tokens
    )
    if args.store is not None:  # a bank's memories were written with its own config
        from memory3.memory.manifest import read_memory_config

        mem_cfg = read_memory_config(args.store)
    else:
        mem_cfg = memory_config_of(args, loaded)
    warm = None
    if args.store is None and any(m != "none" for m in config.modes):
        docs = [Document(a.doc_id, a.text, a.title) for a in kb_articles]
        warm = build_retriever(model, tok, docs, mem_cfg, get_embedder(args.embedder))

    def factory(cache: str) -> Any:
        if args.store is not None:
            return _open_store(args.store, loaded, cache, kv_dtype_of(args, loaded))
        return warm if cache == "warm" else None

    gen = Generator(model, tok, None, mem_cfg, chat=False, kv_dtype=args.kv_dtype)
    results = bench_speed(gen, prompts, factory, config, progress=not args.no_progress)
    results["kb"] = (
        f"memory bank of {store_size(args.store)} references given as `--store` (warm: its RAM cache "
        "on; cold: cache_size=0, every memory read and decoded from disk)"
        if args.store
        else f"{len(kb_articles)} held-out Wikipedia summaries written to memory in RAM"
    )
    results["memory"] = {
        "layers": len(model.memory_layers),
        "memory_layers": layer_span(model.memory_layers),
        "kept_tokens": mem_cfg.kept_tokens,
        "selection": mem_cfg.selection,
    }
    results.update(run_context(args))
    emit("speed", results, args, {"ratios": results["ratios"], "skipped": results["skipped"]})
    return 0


# --- bench storage -----------------------------------------------------------------------------------


def cmd_bench_storage(args: argparse.Namespace) -> int:
    from memory3.config import MemoryConfig, ModelConfig
    from memory3.data.wikipedia import load_articles
    from memory3.eval.storage import storage_rows, text_sample

    loaded = load_cached(args)
    mem_cfg = loaded.memory_config
    texts = [a.text for a in load_articles("heldout")[: args.texts]]
    sample = text_sample(texts, loaded.tokenizer, mem_cfg.reference_tokens)
    rows: list[dict[str, Any]] = []
    skipped: list[str] = []
    # the loaded model as it reads (a trained adapter's memory config); presets as the paper sets them
    models = [(loaded.model.config, mem_cfg)] + [
        (ModelConfig.from_preset(p), MemoryConfig()) for p in args.presets
    ]
    for mc, cfg in models:
        for c in args.codecs:
            try:
                rows += [
                    {**r, "kept_tokens": cfg.kept_tokens, "memory_layers": mc.n_memory_layers}
                    for r in storage_rows(mc, cfg, [c], sample)
                ]
            except ValueError as e:
                skipped.append(f"{mc.name}/{c}: {e}")
    results = {
        "rows": rows,
        "skipped": skipped,
        "text_sample": {**asdict(sample), "utf8_bytes_per_token": sample.utf8_bytes_per_token},
        "memory_config": mem_cfg.to_dict(),
        **run_context(args),
    }
    emit("storage", results, args, rows)
    return 0


# --- the parsers -------------------------------------------------------------------------------------


def add_speed_parser(be: Any) -> None:
    p = be.add_parser("speed", help="throughput and time to first token: memory vs RAG vs no retrieval")
    add_output_args(p)
    add_retrieval_args(p, k_default="5, as the paper's speed comparison")
    p.add_argument("--batch-sizes", type=csv_of(int), default=(1, 8, 32))
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--runs", type=int, default=3, help="measured runs (one more warm-up run is dropped)")
    p.add_argument("--modes", type=csv_of(str), default=("none", "rag", "memory"))
    p.add_argument(
        "--warmup",
        default="each",
        choices=("each", "first"),
        help="dropped warm-up round at each batch size, or only before the first",
    )
    p.add_argument("--caches", type=csv_of(str), default=("warm", "cold"), help="cold needs --store")
    p.add_argument(
        "--kb-articles", type=int, default=200, help="Wikipedia summaries to retrieve from (no --store)"
    )
    add_memory_override_args(p, "speed")
    p.set_defaults(func=cmd_bench_speed)


def add_storage_parser(be: Any) -> None:
    p = be.add_parser("storage", help="bytes per memory for each codec vs full KV cache vs text")
    add_output_args(p)
    p.add_argument(
        "--codecs",
        type=csv_of(str),
        default=("none", "default", "faiss:OPQ20_80,Residual2x14,PQ8x10"),
        help="none (bf16), default (the memory bank's), faiss:<factory string>, fp16, fp32",
    )
    p.add_argument(
        "--presets", type=csv_of(str), default=("memory3-2b",), help="model presets to add to the table"
    )
    p.add_argument("--texts", type=int, default=200, help="Wikipedia summaries measured for text bytes")
    p.set_defaults(func=cmd_bench_storage)
