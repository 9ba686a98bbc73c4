"""How much each memory codec changes what a memory layer reads, and whether keys or values cost it.

Memories of train-split Wikipedia references are written with the model; codecs are trained on the
first `--train-references` and measured on the next `--test-references`, which they never saw
(`eval.fidelity.codec_report`: bytes per memory, relative error of keys and values, and of a memory
layer's attention output over 5 memories when decoded memories replace exact ones, with keys only
or values only decoded). `--pre-rope` adds, for each codec, a variant that quantizes keys before
rotary embedding (keys un-rotated with their stored positions, rotated back after decoding), to
see whether the position-dependent rotation is what makes keys hard to quantize.

    .venv/bin/python benchmarks/bench_codec_fidelity.py --codecs SQ8 SQ4 Residual2x10,PQ8 [--pre-rope]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import torch
from harness import Run, experiment, load_model, run_experiment

from memory3.data.wikipedia import load_articles
from memory3.eval.fidelity import codec_report
from memory3.eval.report import table
from memory3.memory.codec import CodecConfig, MemoryCodec, train_codec
from memory3.memory.transform import rotate
from memory3.memory.write import Memories, MemoryWriter, reference_prefix_ids


def rotate_keys(mem: Memories, theta: float, sign: int) -> Memories:
    """Keys rotated by their positions' RoPE angles (sign 1) or back to before RoPE (sign -1)."""
    k = rotate(mem.k, mem.positions, theta, sign)
    return Memories(k.to(mem.k.dtype), mem.v, mem.positions, mem.fingerprint)


class PreRopeCodec:
    """A trained codec applied to keys before RoPE: what `codec_report` calls is forwarded."""

    def __init__(self, codec: MemoryCodec, theta: float) -> None:
        self.codec, self.theta = codec, theta
        self.shape = codec.shape
        self.record_bytes, self.raw_bytes = codec.record_bytes, codec.raw_bytes

    def encode(self, mem: Memories) -> Any:
        return self.codec.encode(rotate_keys(mem, self.theta, -1))

    def decode(self, codes: Any, fingerprint: str) -> Memories:
        return rotate_keys(self.codec.decode(codes, fingerprint), self.theta, 1)

    def __repr__(self) -> str:
        return f"{self.codec!r}, keys before RoPE"


def write_split_memories(
    model_name: str, n_train: int, n_test: int, batch: int = 16
) -> tuple[Any, Any, Any, Memories, Memories]:
    """(model, tokenizer, memory config, memories of the first n_train train-split Wikipedia
    references, memories of the next n_test), written by `model_name` (the harness's loader)."""
    loaded = load_model(model_name)
    model, tok, mc = loaded.model, loaded.tokenizer, loaded.memory_config
    writer = MemoryWriter(model, reference_prefix_ids(tok, model.config.bos_token_id, mc), mc)
    n = n_train + n_test
    articles = load_articles("train")[:n]
    if len(articles) < n:
        raise ValueError(f"only {len(articles)} train-split articles; ask for fewer references")
    refs = [tok.encode(a.text)[: mc.reference_tokens] for a in articles]
    t0 = time.perf_counter()
    with torch.inference_mode():
        train_mem = writer.write(refs[:n_train], batch)
        test_mem = writer.write(refs[n_train:], batch)
    print(f"wrote {n} memories in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return model, tok, mc, train_mem, test_mem


def arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--codecs", nargs="+", default=["SQ8", "SQ4", "Residual2x10,PQ8"], help="FAISS factory strings"
    )
    ap.add_argument("--pre-rope", action="store_true", help="also quantize keys before RoPE")
    ap.add_argument("--train-references", type=int, default=640)
    ap.add_argument("--test-references", type=int, default=60)
    ap.add_argument("--train-vectors", type=int, default=20000, help="per quantizer (one per layer, K and V)")


@experiment("codec-fidelity", "codec_fidelity.json", arguments, threads=2)
def main(run: Run) -> int:
    args = run.args
    if args.test_references < 10:
        run.error("--test-references must be at least 10 (codec_report reads groups of 5 memories)")
    try:
        model, _, mc, train_mem, test_mem = write_split_memories(
            args.model, args.train_references, args.test_references
        )
    except ValueError as e:
        run.error(str(e))
    theta = model.config.rope_theta
    rows: list[dict[str, Any]] = []
    variants = [(f, False) for f in args.codecs] + ([(f, True) for f in args.codecs] if args.pre_rope else [])
    for factory, pre in variants:
        t0 = time.perf_counter()
        sample = rotate_keys(train_mem, theta, -1) if pre else train_mem
        cfg = CodecConfig(kind="faiss", factory=factory, train_vectors=args.train_vectors)
        codec = train_codec(sample, cfg, threads=args.threads or None)
        rep = codec_report(test_mem, PreRopeCodec(codec, theta) if pre else codec)  # type: ignore[arg-type]
        rows.append(
            {
                "codec": factory,
                "keys": "before RoPE" if pre else "after RoPE",
                "bytes/memory": rep["bytes_per_memory"],
                "of bf16": 1 / rep["compression"],
                "key error": rep["k_rel_error"],
                "value error": rep["v_rel_error"],
                "attention error": rep["attn_rel_error"],
                "keys only": rep["attn_rel_error_k_only"],
                "values only": rep["attn_rel_error_v_only"],
                "train + measure s": time.perf_counter() - t0,
            }
        )
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    other = rep["attn_rel_error_other_memories"]
    run.save(
        {
            "model": str(args.model),
            "memory_config": mc.to_dict(),
            "references": {"train": args.train_references, "test": args.test_references},
            "train_vectors": args.train_vectors,
            "attn_rel_error_other_memories": other,
            "rows": rows,
        }
    )
    body = (
        f"Model `{args.model}` ({len(model.memory_layers)} memory layers × {mc.kept_tokens} kept tokens). "
        f"Codecs trained on {args.train_references} train-split Wikipedia references' memories "
        f"(up to {args.train_vectors} vectors per quantizer, one per memory layer for keys and one for "
        f"values) and measured on {args.test_references} others. Errors are relative (‖x̂−x‖/‖x‖); "
        "the attention error is that of a memory layer's output reading 5 memories, with random "
        "queries shaped like each head's keys, and with only keys or only values decoded. For scale, "
        f"reading 5 other memories exactly gives {other:.2f}.\n\n" + table(rows)
    )
    flags = f" --threads {args.threads} --codecs {' '.join(args.codecs)}" + (
        " --pre-rope" if args.pre_rope else ""
    )
    run.section("codec-fidelity", "Memory codec: where the attention error comes from", flags, body)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_experiment("codec-fidelity"))
