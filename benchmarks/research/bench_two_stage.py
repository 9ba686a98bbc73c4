"""The paper's two-stage claim at micro scale (§3.6, Fig. 11): a tiny model trained from scratch on
the bundled Wikipedia text (a) with memory from the first step, and (b) warmup without memory
then continual training with memory, the same number of steps and sequences in all. Reports the
held-out loss of each with and without memory.

    python benchmarks/research/bench_two_stage.py            # ~17 min on a busy 2-core machine (1 thread)
    python benchmarks/research/bench_two_stage.py --steps 40 --articles 300   # a quick look

Training sequences come from train-split articles; the held-out loss from held-out articles,
whose references (other parts of the same articles, never the sequence's own text: leak filter
0.9) are in the knowledge base only at evaluation. Results go to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

from memory3.config import MemoryConfig
from memory3.train.config import LoopConfig, OptimConfig


class CompactVocab:
    """The SmolLM2 tokenizer restricted to its `size` most frequent tokens in the training text
    (the rest map to one UNK id). A 49k-token output layer would cost a tiny model ten times its
    body on this CPU; the comparison between the arms does not need it."""

    def __init__(self, tokenizer, stream: np.ndarray, size: int, keep: list[int]) -> None:
        self.tok = tokenizer
        counts = np.bincount(stream, minlength=len(tokenizer))
        order = [int(i) for i in np.argsort(-counts, kind="stable") if int(i) not in keep]
        chosen = list(keep) + order[: size - len(keep) - 1]
        self.unk = len(chosen)
        self.table = np.full(len(tokenizer), self.unk, dtype=np.int32)
        self.table[np.asarray(chosen)] = np.arange(len(chosen), dtype=np.int32)
        self.size = size

    def map(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids)
        return np.where(ids < 0, ids, self.table[np.maximum(ids, 0)]).astype(np.int32)

    def __call__(self, text: str, add_special_tokens: bool = False):
        enc = self.tok(text, add_special_tokens=add_special_tokens)
        enc["input_ids"] = self.map(np.asarray(enc.input_ids)).tolist()
        return enc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=240, help="total optimizer steps of each arm")
    ap.add_argument("--articles", type=int, default=1500, help="train-split Wikipedia articles used")
    ap.add_argument("--heldout-articles", type=int, default=200)
    ap.add_argument("--eval-sequences", type=int, default=96)
    ap.add_argument(
        "--embedder", default="hashing", help="retrieval embedder for the pairing (minilm is ~20x slower)"
    )
    ap.add_argument("--vocab", type=int, default=4096, help="compact vocabulary size (0 = the full 49k)")
    ap.add_argument("--out", default="runs/bench-two-stage")
    ap.add_argument("--report", default="BENCHMARKS.md")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(1)  # faster than 2 on a shared 2-core machine

    from memory3.checkpoint import load_bundled_tokenizer, load_checkpoint
    from memory3.data.wikipedia import load_articles
    from memory3.retrieval.embed import get_embedder
    from memory3.train.continual import (
        ContinualConfig,
        PairedDataset,
        PairingConfig,
        evaluate,
        prepare_continual,
        run_continual,
    )
    from memory3.train.warmup import WarmupConfig, run_warmup

    t_all = time.perf_counter()
    out = Path(args.out)
    tok = load_bundled_tokenizer()
    embedder = get_embedder(args.embedder)
    pcfg = PairingConfig(seq_len=128, chunk_tokens=64, reference_tokens=128, embedder=args.embedder)
    train_texts = [a.text for a in load_articles("train")[: args.articles]]
    held_texts = [a.text for a in load_articles("heldout")[: args.heldout_articles]]

    def paired(name: str, texts: list[str], kb: list[str]) -> PairedDataset:
        path = out / f"data-{name}-{args.articles}-{args.heldout_articles}-{args.embedder}"
        if (path / "pairing.json").exists():
            return PairedDataset.load(path)
        data = prepare_continual(texts, kb, tok, pcfg, embedder=embedder)
        data.save(path)
        return data

    t0 = time.perf_counter()
    train = paired("train", train_texts, train_texts)  # training never sees held-out text
    held = paired("heldout", held_texts, train_texts + held_texts)
    pair_s = time.perf_counter() - t0
    vocab = tok
    if args.vocab:
        prefix = tok("Reference:", add_special_tokens=False).input_ids
        vocab = CompactVocab(tok, train.tokens, args.vocab, [0, 1, 2, *prefix])
        for data in (train, held):
            data.tokens, data.refs = vocab.map(data.tokens), vocab.map(data.refs)

    model_kw = {
        "vocab_size": args.vocab or len(tok),
        "n_layer": 4,
        "hidden_size": 128,
        "n_head": 4,
        "n_kv_head": 2,
        "head_dim": 32,
        "intermediate_size": 384,
        "tie_embeddings": True,
    }
    memory = MemoryConfig(reference_tokens=128, kept_tokens=8, chunk_tokens=64, memories_per_chunk=5)
    optim = OptimConfig(lr=3e-3, warmup_steps=max(1, args.steps // 20), decay_fraction=0.2)
    batch = 8
    half = args.steps // 2

    def loop(steps: int) -> LoopConfig:
        return LoopConfig(steps=steps, log_every=10, checkpoint_every=100, threads=1, bf16=False)

    results = []
    # (a) memory from the first step
    cfg_a = ContinualConfig(
        model="preset:tiny",
        model_overrides=model_kw,
        optim=optim,
        loop=loop(args.steps),
        memory=memory,
        dataset=str(out / "unused"),
        batch_size=batch,
    )
    t0 = time.perf_counter()
    run_a = run_continual(cfg_a, out / "a-memory-from-scratch", data=train, tokenizer=vocab)
    secs_a = time.perf_counter() - t0
    # (b) warmup, then continual from the warmup model, the same steps in all
    cfg_w = WarmupConfig(
        model="preset:tiny",
        model_overrides=model_kw,
        optim=optim,
        loop=loop(half),
        seq_len=pcfg.seq_len,
        batch_size=batch,
    )
    t0 = time.perf_counter()
    run_w = run_warmup(cfg_w, out / "b1-warmup", stream=train.tokens)
    cfg_b = dataclasses.replace(
        cfg_a,
        model=str(run_w / "model"),
        model_overrides={},
        loop=loop(args.steps - half),
        optim=dataclasses.replace(optim, warmup_steps=max(1, optim.warmup_steps // 2)),
    )
    run_b = run_continual(cfg_b, out / "b2-continual", data=train, tokenizer=vocab)
    secs_b = time.perf_counter() - t0

    for name, run, secs in (
        ("(a) memory from scratch", run_a, secs_a),
        ("(b) warmup → continual", run_b, secs_b),
        ("(b) after warmup only", run_w, None),
    ):
        loaded = load_checkpoint(run / "model")
        with_mem = evaluate(loaded.model, vocab, held, memory, True, args.eval_sequences)
        without = evaluate(loaded.model, vocab, held, memory, False, args.eval_sequences)
        results.append(
            {
                "arm": name,
                "heldout_loss_memory": round(with_mem, 4),
                "heldout_loss_no_memory": round(without, 4),
                "memory_gain": round(without - with_mem, 4),
                "train_seconds": round(secs, 1) if secs else "",
            }
        )
        print(json.dumps(results[-1]), flush=True)

    from memory3.eval.report import machine, table, update_section

    figures = {
        "results": results,
        "steps": args.steps,
        "batch": batch,
        "seq_len": pcfg.seq_len,
        "train_sequences": len(train),
        "heldout_sequences": min(args.eval_sequences, len(held)),
        "paired_chunks": f"{int((train.pairs >= 0).sum())}/{train.pairs.size}",
        "embedder": args.embedder,
        "model": model_kw,
        "pairing_seconds": round(pair_s, 1),
        "total_seconds": round(time.perf_counter() - t_all, 1),
        "machine": machine(),
    }
    body = (
        f"Tiny Llama ({model_kw['n_layer']} layers, hidden {model_kw['hidden_size']}, SmolLM2 tokenizer cut to its "
        f"{model_kw['vocab_size']} most frequent tokens) trained from "
        f"scratch on {len(train_texts)} train-split Wikipedia summaries, {args.steps} steps of {batch}×{pcfg.seq_len} "
        f"tokens per arm; memory: 1 reference per 64-token chunk ({args.embedder} retrieval, leak filter 0.9), each chunk "
        f"reading 5, 8 tokens kept per head, first half of the layers. Held-out loss on {figures['heldout_sequences']} "
        "sequences of held-out articles (lower is better).\n\n" + table(results)
    )
    update_section(
        args.report,
        "two-stage",
        "Two-stage training at micro scale (§3.6)",
        "python benchmarks/research/bench_two_stage.py",
        body,
        figures,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
