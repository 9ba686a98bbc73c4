"""The paper's two-stage claim at micro scale (§3.6, Fig. 11): a tiny model trained from scratch on
the bundled Wikipedia text (a) with memory from the first step, and (b) warmup without memory
then continual training with memory, at equal training compute, over several seeds. Reports the
held-out loss of each with and without memory, and how flat each arm's loss was at the end.

    python benchmarks/research/bench_two_stage.py            # 3 seeds × 600 steps: hours on 2 CPU cores
    python benchmarks/research/bench_two_stage.py --steps 40 --articles 300 --seeds 0   # a quick look

Equal compute: arm (a) runs `--steps` steps with memory. Arm (b) runs half of them with memory
(continual) and spends the other half's compute on warmup steps, which cost less (no reference
is encoded): a step's cost is counted as tokens × layers they pass through, text through every
layer, references through the memory layers. Both arms see the same number of training texts at
least. Every run resumes where it stopped (rerun the same command), so the benchmark spans sessions.

Training sequences come from train-split articles; the held-out loss from held-out articles,
whose references (other parts of the same articles, never the sequence's own text: leak filter
0.9) are in the knowledge base only at evaluation. Results go to BENCHMARKS.md and
benchmarks/results/two-stage.json.
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


def step_costs(data, batch: int, seq_len: int, n_layer: int, memory_layers: int) -> tuple[float, float]:
    """(warmup, memory) cost of one step in token-layers: the text passes every layer; with memory
    the references its chunks read are encoded through the memory layers as well (the mean over
    the training data of the distinct references of a batch)."""
    text = batch * seq_len * n_layer
    ref_len = float((data.refs >= 0).sum(axis=1).mean())
    n_batches = len(data.pairs) // batch
    refs = [
        len({int(r) for r in data.pairs[i * batch : (i + 1) * batch].ravel() if r >= 0})
        for i in range(n_batches)
    ]
    return float(text), text + float(np.mean(refs)) * ref_len * memory_layers


def flatness(run: Path) -> float:
    """Relative change of the training loss over the last tenth of a run (mean of the last tenth
    against the tenth before it): near 0 when the loss has flattened."""
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    losses = [r["loss"] for r in rows]
    tenth = max(1, len(losses) // 10)
    last, before = np.mean(losses[-tenth:]), np.mean(losses[-2 * tenth : -tenth])
    return float((before - last) / before)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=600, help="optimizer steps of arm (a), all with memory")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="model init and data order")
    ap.add_argument("--articles", type=int, default=8035, help="train-split Wikipedia articles used")
    ap.add_argument("--heldout-articles", type=int, default=200)
    ap.add_argument("--eval-sequences", type=int, default=96)
    ap.add_argument(
        "--embedder", default="hashing", help="retrieval embedder for the pairing (minilm is ~20x slower)"
    )
    ap.add_argument("--vocab", type=int, default=4096, help="compact vocabulary size (0 = the full 49k)")
    ap.add_argument("--out", default=None, help="default: runs/bench-two-stage-<steps>")
    ap.add_argument("--report", default="BENCHMARKS.md")
    ap.add_argument("--json", default=None, help="default: benchmarks/results/two-stage-<steps>.json")
    args = ap.parse_args()
    args.out = args.out or f"runs/bench-two-stage-{args.steps}"
    args.json = args.json or f"benchmarks/results/two-stage-{args.steps}.json"
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
    from memory3.train.loop import load_base
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
    continual = args.steps // 2
    n_mem = len(load_base("preset:tiny", model_kw)[0].memory_layers)
    cost_w, cost_m = step_costs(train, batch, pcfg.seq_len, model_kw["n_layer"], n_mem)
    warmup = round((args.steps - continual) * cost_m / cost_w)  # (b) spends (a)'s compute

    def loop(steps: int, seed: int) -> LoopConfig:
        return LoopConfig(steps=steps, seed=seed, log_every=10, checkpoint_every=50, threads=1, bf16=False)

    def held_out(run: Path) -> tuple[float, float]:
        loaded = load_checkpoint(run / "model")
        return (
            evaluate(loaded.model, vocab, held, memory, True, args.eval_sequences),
            evaluate(loaded.model, vocab, held, memory, False, args.eval_sequences),
        )

    rows = []
    for seed in args.seeds:
        root = out / f"seed-{seed}"
        # (a) memory from the first step
        cfg_a = ContinualConfig(
            model="preset:tiny",
            model_overrides=model_kw,
            optim=optim,
            loop=loop(args.steps, seed),
            memory=memory,
            dataset=str(out / "unused"),
            batch_size=batch,
        )
        run_a = run_continual(cfg_a, root / "a-memory-from-scratch", data=train, tokenizer=vocab)
        # (b) warmup, then continual from the warmup model: (a)'s compute in all
        cfg_w = WarmupConfig(
            model="preset:tiny",
            model_overrides=model_kw,
            optim=dataclasses.replace(optim, warmup_steps=max(1, warmup // 20)),
            loop=loop(warmup, seed),
            seq_len=pcfg.seq_len,
            batch_size=batch,
        )
        run_w = run_warmup(cfg_w, root / "b1-warmup", stream=train.tokens)
        cfg_b = dataclasses.replace(
            cfg_a,
            model=str(run_w / "model"),
            model_overrides={},
            loop=loop(continual, seed),
            optim=dataclasses.replace(optim, warmup_steps=max(1, optim.warmup_steps // 2)),
        )
        run_b = run_continual(cfg_b, root / "b2-continual", data=train, tokenizer=vocab)
        for arm, run, seconds in (
            ("(a) memory from scratch", run_a, _seconds(run_a)),
            ("(b) warmup → continual", run_b, _seconds(run_w) + _seconds(run_b)),
            ("(b) after warmup only", run_w, _seconds(run_w)),
        ):
            with_mem, without = held_out(run)
            rows.append(
                {
                    "seed": seed,
                    "arm": arm,
                    "heldout_loss_memory": round(with_mem, 4),
                    "heldout_loss_no_memory": round(without, 4),
                    "memory_gain": round(without - with_mem, 4),
                    "last_tenth_change": round(flatness(run), 4),
                    "train_seconds": round(seconds, 1),
                }
            )
            print(json.dumps(rows[-1]), flush=True)

    from memory3.eval.report import machine, table, update_section

    arms = list(dict.fromkeys(r["arm"] for r in rows))
    summary = []
    for arm in arms:
        mine = [r for r in rows if r["arm"] == arm]
        summary.append(
            {
                "arm": arm,
                "seeds": len(mine),
                **{
                    key: _mean_sd([r[key] for r in mine])
                    for key in (
                        "heldout_loss_memory",
                        "heldout_loss_no_memory",
                        "memory_gain",
                        "last_tenth_change",
                    )
                },
                "train_seconds": round(float(np.mean([r["train_seconds"] for r in mine]))),
            }
        )
    a = {r["seed"]: r for r in rows if r["arm"] == arms[0]}
    b = {r["seed"]: r for r in rows if r["arm"] == arms[1]}
    diffs = [round(a[s]["heldout_loss_memory"] - b[s]["heldout_loss_memory"], 4) for s in args.seeds]
    figures = {
        "rows": rows,
        "summary": summary,
        "a_minus_b_loss_with_memory": diffs,
        "steps_a": args.steps,
        "steps_b": {"warmup": warmup, "continual": continual},
        "step_cost_token_layers": {"warmup": cost_w, "memory": round(cost_m)},
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
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    wins = sum(d > 0 for d in diffs)
    body = (
        f"Tiny Llama ({model_kw['n_layer']} layers, hidden {model_kw['hidden_size']}, SmolLM2 tokenizer cut to its "
        f"{model_kw['vocab_size']} most frequent tokens) trained from scratch on {len(train_texts)} train-split "
        f"Wikipedia summaries ({len(train)} sequences of {pcfg.seq_len} tokens, batch {batch}), seeds "
        f"{', '.join(map(str, args.seeds))}. Memory: 1 reference per 64-token chunk ({args.embedder} retrieval, leak "
        f"filter 0.9), each chunk reading 5, 8 tokens kept per head, memory in {n_mem} of {model_kw['n_layer']} layers. "
        f"Equal compute: (a) {args.steps} steps with memory; (b) {warmup} warmup steps then {continual} with memory "
        f"(a memory step costs {cost_m / cost_w:.2f}× a warmup step in token-layers). Held-out loss on "
        f"{figures['heldout_sequences']} sequences of held-out articles (lower is better), mean ± sd over seeds; "
        "`last_tenth_change` is how much the training loss still fell over the last tenth of the run.\n\n"
        + table(summary)
        + f"\n\nLoss with memory, (a) − (b), per seed: {', '.join(f'{d:+.3f}' for d in diffs)} "
        f"((b) lower in {wins} of {len(diffs)}). Per-seed rows: `{args.json}`."
    )
    update_section(
        args.report,
        "two-stage",
        "Two-stage training at micro scale (§3.6)",
        f"python benchmarks/research/bench_two_stage.py --steps {args.steps}",
        body,
        figures,
        results_file=args.json,
    )
    return 0


def _seconds(run: Path) -> float:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return float(rows[-1]["seconds"]) if rows else 0.0


def _mean_sd(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}"


if __name__ == "__main__":
    sys.exit(main())
