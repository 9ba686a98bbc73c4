"""The attention of one decoding step over a bfloat16 KV cache, path by path.

The fused kernel (`memory3.kernels`, what decoding uses on an AVX-512 CPU), the two-matmul
PyTorch path it replaces (`model.matmul_attention`, the fallback), and float32 SDPA over a float32
cache.

SmolLM2-135M's head layout (9 query heads over 3 kv heads of 64). Slots as in a decoding step of
`memory3 bench speed`: 240 memory slots in front of a 256-token context, of which `--context`
tokens are written; the rest of the cache is masked, as in KVCache. Two settings:
- hot: the same layer's keys and values every call (they stay in the caches);
- cold: 20 layers' worth, one after the other, as a decoding step reads them, so that every call
  reads from DRAM (the setting of the model).
Reported per call: milliseconds, nanoseconds per visible slot (key and value), the GB/s of
visible keys and values that makes, and the largest difference from float32 attention. For
scale, in the cold setting: the time the visible bytes take at the rate of a plain read (a sum
over the whole contiguous cache tensors).

    python benchmarks/bench_decode_attention.py          # BENCHMARKS.md "Speed: the fused decode attention"
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
import torch.nn.functional as F
from harness import Run, experiment, interleaved, run_experiment

from memory3 import kernels
from memory3.eval.report import table
from memory3.model import matmul_attention

H, K, D = 9, 3, 64  # SmolLM2-135M
MEMORY_SLOTS, MAX_LEN, LAYERS = 240, 256, 20


def per_call(fn: Callable[[int], object], layers: int, rounds: int) -> float:
    """Median seconds per call over `rounds` sweeps of `layers` calls, after one sweep."""

    def sweep() -> None:
        for i in range(layers):
            fn(i)

    times = interleaved({"sweep": sweep}, rounds).runs["sweep"]
    return sorted(times)[rounds // 2] / layers


def case(batch: int, memory: bool, context: int, setting: str, rounds: int) -> list[dict]:
    g = torch.Generator().manual_seed(batch)
    n_layers = LAYERS if setting == "cold" else 1
    S = MEMORY_SLOTS + MAX_LEN if memory else MAX_LEN
    ks = [torch.randn(batch, K, S, D, generator=g).bfloat16() for _ in range(n_layers)]
    vs = [torch.randn(batch, K, S, D, generator=g).bfloat16() for _ in range(n_layers)]
    q = torch.randn(batch, H, 1, D, generator=g)
    visible = torch.zeros(batch, S, dtype=torch.bool)
    first = MEMORY_SLOTS if memory else 0
    visible[:, :first] = True
    visible[:, first : first + context] = True
    mask = visible[:, None, None, :]
    seen = int(visible[0].sum())
    want = F.scaled_dot_product_attention(q, ks[0].float(), vs[0].float(), attn_mask=mask, enable_gqa=True)
    ks32 = [k.float() for k in ks]
    vs32 = [v.float() for v in vs]
    paths: dict[str, Callable[[int], torch.Tensor | None]] = {
        "fused kernel (bf16 cache)": lambda i: kernels.fused_decode(q, ks[i], vs[i], visible),
        "matmul path (bf16 cache)": lambda i: matmul_attention(q, ks[i], vs[i], mask),
        "SDPA (float32 cache)": lambda i: F.scaled_dot_product_attention(
            q, ks32[i], vs32[i], attn_mask=mask, enable_gqa=True
        ),
    }
    rows = []
    for name, fn in paths.items():
        out = fn(0)
        if out is None:
            continue  # no kernel on this CPU
        dt = per_call(fn, n_layers, rounds)
        elem = 4 if "float32" in name else 2
        rows.append(
            {
                "batch": batch,
                "memory": "yes" if memory else "no",
                "visible slots": seen,
                "setting": setting,
                "path": name,
                "ms per call": dt * 1e3,
                "ns per slot": dt / (batch * K * seen) * 1e9,
                "GB/s of visible k+v": 2 * batch * K * seen * D * elem / dt / 1e9,
                "max error vs float32": float((out - want).abs().max()),
            }
        )
    if setting == "cold":  # for scale: the visible bytes read at the rate of a plain contiguous read
        dt_all = per_call(lambda i: (ks[i].sum(), vs[i].sum()), n_layers, rounds)
        rate = 2 * ks[0].numel() * 2 / dt_all
        dt = 2 * batch * K * seen * D * 2 / rate
        rows.append(
            {
                "batch": batch,
                "memory": "yes" if memory else "no",
                "visible slots": seen,
                "setting": setting,
                "path": "read only (a sum over the cache, bf16)",
                "ms per call": dt * 1e3,
                "ns per slot": dt / (batch * K * seen) * 1e9,
                "GB/s of visible k+v": rate / 1e9,
                "max error vs float32": float("nan"),
            }
        )
    return rows


def arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--batch-sizes", default="1,8,32")
    ap.add_argument("--context", type=int, default=192, help="context tokens written (of 256)")
    ap.add_argument("--rounds", type=int, default=7)


@experiment("decode-attention", "decode_attention.json", arguments, model=None)
def main(run: Run) -> int:
    args = run.args
    if not kernels.available():
        raise SystemExit(
            "the fused kernel is not available here (no AVX-512, no compiler, or MEMORY3_KERNELS=0)"
        )
    rows = []
    for B in [int(b) for b in args.batch_sizes.split(",")]:
        for memory in (False, True):
            for setting in ("hot", "cold"):
                rows += case(B, memory, args.context, setting, args.rounds)
    speedups = []
    for r in rows:
        if r["path"].startswith("fused"):
            base = next(
                x for x in rows
                if x["path"].startswith("matmul") and all(x[c] == r[c] for c in ("batch", "memory", "setting"))
            )  # fmt: skip
            speedups.append(
                {c: r[c] for c in ("batch", "memory", "setting")}
                | {"fused over matmul path": base["ms per call"] / r["ms per call"]}
            )
    run.save({"threads": args.threads, "context": args.context, "rows": rows, "speedups": speedups})
    print(table(speedups))
    body = (
        f"One decoding step's attention in one layer, SmolLM2-135M heads ({H} query heads over {K} kv heads "
        f"of {D}), {args.threads} thread(s). Slots: {MEMORY_SLOTS} memory slots (with memory) in front of a "
        f"{MAX_LEN}-slot context of which {args.context} are written; unwritten slots are masked. Hot: one "
        f"layer's keys and values, reused; cold: {LAYERS} layers' worth in turn, as a step reads them. "
        "Median of "
        f"{args.rounds} sweeps.\n\n" + table(speedups) + "\n\n" + table(rows)
    )
    run.section("decode-attention", "Speed: the fused decode attention", "", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_experiment("decode-attention"))
