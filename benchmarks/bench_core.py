"""Core speed: decode against transformers, decode with memory against without, and writing memories.

1. Decode tokens/s of memory3 vs transformers' `generate` on the same weights, batch 1 and 8,
   fp32 and bf16. Decode rate = B·(N-1) / (t(N new tokens) - t(1 new token)) for both, so
   prefill is excluded the same way.
2. Decode with 5 memories per sequence vs without memory, same run (memory mode re-retrieves
   after 64 tokens; that retrieval is included).
3. Memory writing throughput (references/s), 128-token references.

Runs are interleaved (A, B, A, B, …), the first round dropped; speeds are medians, ratios the
median of the per-round ratios with their spread.

    .venv/bin/python benchmarks/bench_core.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from functools import partial

import torch
from harness import Run, experiment, interleaved, run_experiment

from memory3.config import GenerationConfig, MemoryConfig
from memory3.eval.report import table
from memory3.families import to_hf
from memory3.generate import Generator
from memory3.memory.write import MemoryWriter
from memory3.retrieval.inmemory import InMemoryRetriever
from memory3.shipped import BUNDLED

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle on a stormy night."


def wiki_texts(n: int) -> list[str]:
    from memory3.data.wikipedia import iter_articles

    out = []
    for a in iter_articles():
        out.append(a.text)
        if len(out) == n:
            break
    return out


def decode_rate(batch: int, n: int, t_n: list[float], t_1: list[float]) -> float:
    return batch * (n - 1) / (statistics.median(t_n) - statistics.median(t_1))


def paired_ratio(a: list[float], b: list[float]) -> dict[str, float]:
    """Median and spread of a[i]/b[i] over rounds that ran side by side: drifts in machine load
    cancel within a round, which a ratio of medians does not guarantee on a shared machine."""
    r = sorted(x / y for x, y in zip(a, b, strict=True))
    return {"ratio": statistics.median(r), "ratio min": r[0], "ratio max": r[-1]}


def arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--quick", action="store_true", help="fewer rounds and tokens")
    ap.add_argument("--part", choices=("all", "transformers", "memory"), default="all")
    ap.add_argument(
        "--dtype", choices=("float32", "bfloat16"), default="float32", help="dtype of the memory part"
    )
    ap.add_argument("--rounds", type=int, default=0, help="measured rounds (0: 5, or 2 with --quick)")


def results_file(args: argparse.Namespace) -> str:
    """One file for both parts, or one per part when a part runs alone."""
    return "core.json" if args.part == "all" else f"core-{args.part}.json"


@experiment("core", results_file, arguments, model=None, threads=0)
def main(run: Run) -> int:
    args = run.args
    rounds, n_new = (2, 32) if args.quick else (5, 64)
    rounds = args.rounds or rounds
    torch.manual_seed(0)
    results: dict = {"new_tokens": n_new, "rounds": rounds}

    rows: list[dict] = []
    if args.part in ("all", "transformers"):
        for dtype in (torch.float32, torch.bfloat16):
            loaded = run.load(BUNDLED, dtype)
            model, tok = loaded.model, loaded.tokenizer
            hf = to_hf(model)
            gen = Generator(model, tok, chat=True)
            chat_ids = tok.apply_chat_template(
                [{"role": "user", "content": PROMPT}], add_generation_prompt=True
            )
            if not isinstance(chat_ids, list):
                chat_ids = chat_ids["input_ids"]
            for batch in (1, 8):
                ids = torch.tensor([chat_ids] * batch)

                def ours(n: int, b: int = batch, g: Generator = gen) -> callable:
                    cfg = GenerationConfig(max_new_tokens=n, ignore_eos=True)
                    return lambda: g.generate([PROMPT] * b, mode="none", config=cfg)

                def theirs(n: int, x: torch.Tensor = ids, m=hf) -> callable:
                    return lambda: m.generate(
                        x,
                        attention_mask=torch.ones_like(x),
                        max_new_tokens=n,
                        min_new_tokens=n,
                        do_sample=False,
                    )

                with torch.inference_mode():
                    t = interleaved(
                        {"ours_n": ours(n_new), "hf_n": theirs(n_new), "ours_1": ours(1), "hf_1": theirs(1)},
                        rounds,
                    ).runs
                r_ours = decode_rate(batch, n_new, t["ours_n"], t["ours_1"])
                r_hf = decode_rate(batch, n_new, t["hf_n"], t["hf_1"])
                # per round: our time over theirs (prefill subtracted), inverted into a speed ratio
                ours_dec = [a - b for a, b in zip(t["ours_n"], t["ours_1"], strict=True)]
                hf_dec = [a - b for a, b in zip(t["hf_n"], t["hf_1"], strict=True)]
                row = {
                    "dtype": str(dtype).removeprefix("torch."),
                    "batch": batch,
                    "memory3 tok/s": r_ours,
                    "transformers tok/s": r_hf,
                    **paired_ratio(hf_dec, ours_dec),
                }
                print(json.dumps(row), file=sys.stderr)
                rows.append(row)
            del hf
        results["decode_vs_transformers"] = rows

    mem_rows: list[dict] = []
    if args.part in ("all", "memory"):
        # memory vs no memory, and writing throughput
        mem_dtype = getattr(torch, args.dtype)
        loaded = run.load(BUNDLED, mem_dtype)
        model, tok = loaded.model, loaded.tokenizer
        mc = MemoryConfig()
        gen = Generator(model, tok, memory_config=mc, chat=True)
        writer = MemoryWriter(model, gen.prefix_ids, mc)
        texts = wiki_texts(64)
        refs = [tok(t, add_special_tokens=False).input_ids[:128] for t in texts]
        refs = [r for r in refs if len(r) == 128][:48]
        with torch.inference_mode():
            writer.write(refs[:8], batch_size=8)  # warm up
            write = {"write": lambda: writer.write(refs, batch_size=16)}
            t_write = interleaved(write, rounds, drop_first=False).runs["write"]
        results["write"] = {
            "references": len(refs),
            "tokens_per_reference": 128,
            "references_per_s": len(refs) / statistics.median(t_write),
        }
        print(json.dumps(results["write"]), file=sys.stderr)

        from memory3.retrieval.embed import get_embedder

        retr = InMemoryRetriever(texts, writer, tok, get_embedder("minilm"))
        gen.set_retriever(retr)
        for batch in (1, 8):
            n = 128 if not args.quick else 72  # crosses the 64-token boundary: one re-retrieval
            cfg = GenerationConfig(max_new_tokens=n, ignore_eos=True)
            prompts = [PROMPT] * batch

            def rate(
                mode: str, prompts: list[str] = prompts, n: int = n, cfg: GenerationConfig = cfg
            ) -> float:
                """Decode tokens/s of one generation, prefill excluded."""
                gen.generate(prompts, mode=mode, config=cfg)
                return len(prompts) * (n - 1) / gen.timing.decode_s

            modes = {mode: partial(rate, mode) for mode in ("memory", "none")}
            timings = interleaved(modes, rounds, own_clock=True).runs
            row = {
                "batch": batch,
                "memory tok/s": statistics.median(timings["memory"]),
                "no memory tok/s": statistics.median(timings["none"]),
                **paired_ratio(timings["memory"], timings["none"]),
                "memories per sequence": 5,
            }
            print(json.dumps(row), file=sys.stderr)
            mem_rows.append(row)
        results["decode_memory_vs_none"] = mem_rows

    flags = (
        (" --quick" if args.quick else "")
        + (f" --threads {args.threads}" if args.threads else "")
        + (f" --rounds {args.rounds}" if args.rounds else "")
    )
    run.save(results)
    if rows:
        body = (
            "Decode speed of memory3 vs transformers `generate` (same weights, greedy, "
            f"{n_new} new tokens, prefill excluded the same way for both, {rounds} rounds after a "
            "warm-up, ratio = median of the per-round ratios; goal ≥ 1.0). memory3 uses its default "
            "KV cache (`kv_dtype='auto'`: bfloat16 for a float32 model on a CPU with native bfloat16); "
            "transformers keeps the model's dtype:\n\n" + table(rows)
        )
        run.section(
            "core", "Core: decode speed vs transformers (SmolLM2-135M)", " --part transformers" + flags, body
        )
    if mem_rows:
        body = (
            f"Decode with 5 memories per sequence vs no memory ({args.dtype}, default KV cache, {rounds} rounds after a "
            "warm-up, the re-retrieval after 64 tokens included; ratio = median over rounds of the "
            "side-by-side ratio; goal ≥ 0.95, the paper reached 0.65):\n\n"
            + table(mem_rows)
            + f"\n\nMemory writing ({args.dtype}, 128-token references, batch 16): "
            f"**{results['write']['references_per_s']:.1f} references/s**.\n"
        )
        run.section(
            "core-memory",
            "Core: decode with memory vs without, and writing (SmolLM2-135M)",
            " --part memory" + flags + f" --dtype {args.dtype}",
            body,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(run_experiment("core"))
