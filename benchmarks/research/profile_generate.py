"""Where generation with explicit memory spends its time, against no retrieval: wall, prefill,
time to first token, retrieval and decode for both modes side by side, then (with --profile)
the operators that differ, from torch.profiler. Also (with --sdpa) the decode attention alone at
the key counts of both modes, which bounds what memory keys cost per step.

    memory3 build wikipedia --limit 200 --out BANK
    python benchmarks/research/profile_generate.py --store BANK --batch 32 --new-tokens 4 --profile
    python benchmarks/research/profile_generate.py --sdpa --batch 32

Prints text, not JSON: this is a diagnostic, the measured figures are `memory3 bench speed`'s.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F


def sdpa(batch: int, keys: list[int], rounds: int = 200) -> None:
    """fp32, bf16 and fp16 single-query attention at SmolLM2-135M's head layout."""
    H, K, D = 9, 3, 64
    for S in keys:
        for dt in (torch.float32, torch.bfloat16, torch.float16):
            q = torch.randn(batch, H, 1, D, dtype=dt)
            k = torch.randn(batch, K, S + 256, D, dtype=dt)[:, :, :S]  # a cache view, as in decode
            v = torch.randn(batch, K, S + 256, D, dtype=dt)[:, :, :S]
            mask = torch.ones(batch, 1, 1, S, dtype=torch.bool)
            for _ in range(10):
                F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
            t0 = time.perf_counter()
            for _ in range(rounds):
                F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
            ms = (time.perf_counter() - t0) / rounds * 1e3
            print(f"sdpa batch {batch} keys {S:5d} {dt!s:15s} {ms:7.3f} ms")


def generate(args: argparse.Namespace) -> None:
    from memory3.checkpoint import load_pretrained
    from memory3.config import GenerationConfig
    from memory3.data.wikipedia import load_articles
    from memory3.eval.speed import make_prompts
    from memory3.generate import Generator
    from memory3.retrieval.open import open_retriever
    from memory3.shipped import default_model

    loaded = load_pretrained(args.model or default_model())
    retriever, mem_cfg = open_retriever(loaded, store=args.store)
    gen = Generator(loaded.model, loaded.tokenizer, retriever, mem_cfg, kv_dtype=args.kv_dtype)
    print(f"KV cache {gen.kv_dtype}", flush=True)
    texts = [a.text for a in load_articles("heldout")[40:]]
    prompts = make_prompts(loaded.tokenizer, texts, args.batch, args.prompt_tokens)
    cfg = GenerationConfig(max_new_tokens=args.new_tokens, ignore_eos=True)
    for rnd in range(args.rounds + 1):
        for mode in ("none", "memory"):
            t0 = time.perf_counter()
            gen.generate(prompts, mode, cfg, k=5, chat=False)
            wall, tm = time.perf_counter() - t0, gen.timing
            if rnd:  # the first round warms kernels, caches and the embedder
                print(
                    f"{mode:7s} wall {wall:7.2f} s  prefill {tm.prefill_s:6.2f}  ttft {tm.first_token_s:6.2f}"
                    f"  retrieval {tm.retrieval_s:5.2f}  decode {tm.decode_s:7.2f}",
                    flush=True,
                )
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        for mode in ("none", "memory"):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                gen.generate(prompts, mode, cfg, k=5, chat=False)
            print(f"\n{mode}\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="", help="default: the shipped model")
    ap.add_argument("--store", default=None, help="memory bank built with this model (memory3 build)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--kv-dtype", default="auto", help="auto, float32 or bfloat16 (model.resolve_kv_dtype)")
    ap.add_argument("--profile", action="store_true", help="torch.profiler tables for both modes")
    ap.add_argument("--sdpa", action="store_true", help="only the decode attention micro-benchmark")
    ap.add_argument("--keys", default="192,357", help="key counts for --sdpa")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.sdpa:
        sdpa(args.batch, [int(x) for x in args.keys.split(",")])
    else:
        if args.store is None:
            ap.error("--store BANK is needed (memory3 build wikipedia --limit 200 --out BANK)")
        generate(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
