"""Memory-mode prefill: one block-masked pass over every chunk, or chunk by chunk through the cache?

docs/design.md, "Reading memories" asks for prompt chunks to read their memories in one attention call with a block mask.
That call scores every query against every chunk's memories and masks the others', so its work
grows with chunks × memory keys, and each memory layer concatenates all chunks' memories with the
context. Generation instead runs the prompt chunk by chunk (`generate.prefill_chunks`): the
prefix and chunk 0 in one pass, then each chunk's memories are copied into the KV cache's memory
slots and its tokens read them beside the context so far. Both compute the same function (`tests/test_generate.py` checks generation against
the one-pass forward). This measures both, interleaved, with the model's own memory config and
random memories (speed does not depend on their values):

    .venv/bin/python benchmarks/bench_prefill.py [--threads 1] [--cases 32x128,8x512]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from functools import partial

import torch
from harness import Run, experiment, interleaved, run_experiment

from memory3.config import MemoryConfig
from memory3.eval.report import table
from memory3.generate import prefill_chunks
from memory3.memory import layout
from memory3.memory.write import Memories, reference_prefix_ids
from memory3.model import KVCache, Memory3Model


def prefill_s(
    model: Memory3Model, mc: MemoryConfig, mem: Memories, index: torch.Tensor, L: int, p: int, how: str
) -> float:
    """Seconds to prefill B prompts of L tokens after a p-token prefix; index (B, C, J) into mem."""
    B, _, J = index.shape
    n, R, S = mc.chunk_tokens, mc.reference_tokens, mem.k.shape[3]
    T = p + L
    g = torch.Generator().manual_seed(L)
    ids = torch.randint(0, model.config.vocab_size, (B, T), generator=g)
    pos = torch.cat((torch.arange(p), torch.arange(L) + p + R)).expand(B, T)
    valid = torch.ones(B, T, dtype=torch.bool)
    cache = KVCache(model.config, B, T, J * S)
    t0 = time.perf_counter()
    with torch.inference_mode():
        if how == "one pass":
            chunk = torch.full((B, T), -1, dtype=torch.long)
            chunk[:, p:] = torch.arange(L) // n
            memory = layout.chunked(mem, index, chunk)
            model(ids, pos, token_valid=valid, memory=memory, cache=cache, last_only=True)
        else:
            prefill_chunks(model, mem=mem, ids=ids, pos=pos, valid=valid, index=index,
                           last=torch.full((B,), T - 1), p=p, chunk_tokens=n, cache=cache)  # fmt: skip
    return time.perf_counter() - t0


def arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--cases", default="32x128,8x512", help="BATCHxPROMPT_TOKENS, comma-separated")
    ap.add_argument("--runs", type=int, default=3, help="measured runs of each (after one dropped)")


@experiment("prefill", "prefill.json", arguments)
def main(run: Run) -> int:
    args = run.args
    loaded = run.load()
    model, mc = loaded.model, loaded.memory_config
    cfg = model.config
    p = len(reference_prefix_ids(loaded.tokenizer, cfg.bos_token_id, mc))
    rows = []
    for case in args.cases.split(","):
        B, L = (int(x) for x in case.split("x"))
        C, J = -(-L // mc.chunk_tokens), mc.memories_per_chunk
        shape = (B * C * J, cfg.n_memory_layers, cfg.n_kv_head, mc.kept_tokens, cfg.head_dim)
        g = torch.Generator().manual_seed(0)
        positions = torch.arange(mc.kept_tokens, dtype=torch.int32).expand(shape[:4]).contiguous()
        mem = Memories(torch.randn(shape, generator=g), torch.randn(shape, generator=g), positions, "bench")
        index = torch.arange(B * C * J).view(B, C, J)
        hows = ("one pass", "chunk by chunk")
        fns = {how: partial(prefill_s, model, mc, mem, index, L, p, how) for how in hows}
        t = interleaved(fns, args.runs, own_clock=True)
        med = t.median
        rows.append(
            {
                "batch": B,
                "prompt tokens": L,
                "chunks": C,
                "one pass s": round(med["one pass"], 3),
                "chunk by chunk s": round(med["chunk by chunk"], 3),
                "chunk by chunk / one pass": round(med["chunk by chunk"] / med["one pass"], 3),
                "runs": {how: [round(x, 3) for x in ts] for how, ts in t.runs.items()},
            }
        )
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    run.save({"model": str(args.model), "memory_config": mc.to_dict(), "threads": args.threads, "rows": rows})
    cols = ["batch", "prompt tokens", "chunks", "one pass s", "chunk by chunk s", "chunk by chunk / one pass"]
    body = (
        f"Model `{args.model}` ({len(model.memory_layers)} memory layers, {mc.kept_tokens} kept tokens, "
        f"{mc.memories_per_chunk} memories per 64-token chunk), float32, {args.threads} thread(s), random "
        f"memories; median of {args.runs} interleaved runs after a dropped one. *One pass*: every chunk's "
        "memories in front of the context keys with a block mask (how training and `eval ppl` read "
        "them); *chunk by chunk*: what generation does "
        "(`generate.prefill_chunks`), the prefix and chunk 0 in one pass, then each chunk's memories "
        "copied into the KV cache's memory slots before its tokens run.\n\n" + table(rows, cols)
    )
    run.section(
        "prefill", "Speed: memory-mode prefill, one block-masked pass or chunk by chunk",
        f" --threads {args.threads} --cases {args.cases}", body,
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(run_experiment("prefill"))
