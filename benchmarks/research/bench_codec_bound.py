"""How small can a memory get before what a memory layer reads changes? A bound and an experiment.

The issue asks for a codec at ≤ 1/10 of bf16 (≤ 1.6 bits per number) that costs at most one point
of answers. This script measures how far that is from what coding theory allows on this model's
memories, so the question stops being "which FAISS string next" and becomes a number:

1. **The Gaussian bound.** For each memory layer and kv head, the covariance of its key (before and
   after RoPE) and value vectors gives, by reverse water-filling over the eigenvalues, the smallest
   mean squared error any code of R bits per number reaches on a Gaussian source with that
   covariance (a Gaussian is the hardest source for a given covariance, so real vectors can do
   better only by having structure beyond second order, e.g. clusters). Keys are also bounded in
   the metric that matters for them, the error of q·k for this layer's real queries: each RoPE
   plane is weighted by the queries' mean energy in it (a relative rotation in a plane leaves only
   that energy). Key errors are relative to the keys' spread around their mean (the softmax
   ignores the mean: it shifts all of a query's logits alike), value errors to the values' norm.
2. **An experiment: transform coding** (`tc<bits>`): per layer and kv head, the vectors are
   rotated into the eigenbasis of their covariance (keys before RoPE, in the query-weighted metric
   above; values in the metric of the head's output projection), each coefficient gets a
   1-D k-means quantizer, and bits go one at a time to the coefficient whose error drops most.
   This is the classical codec that approaches the bound; it is research code here, not a codec
   `memory3 build` offers.
3. Side by side with FAISS codecs, each row gives bytes per memory against bf16 and the relative
   error of a memory layer's attention output reading 5 memories, with **real queries** (the
   memory layers' queries on train-split Factbook and invented-facts questions, at positions
   behind the memories) and with keys only or values only
   decoded (`eval.fidelity.codec_report`).

Rows are codecs: a FAISS factory string or `tc<bits per vector>` for keys and values alike, or
`KEYS+VALUES` for one of each (e.g. `tc96+Residual2x10,PQ8`).

    .venv/bin/python benchmarks/research/bench_codec_bound.py --rows SQ8 SQ4 Residual2x10,PQ8 tc96 \
        tc96+Residual2x10,PQ8
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from memory3.data.qa import load_qa
from memory3.eval.fidelity import codec_report
from memory3.eval.qa import resolve_set, select_items
from memory3.eval.report import machine, table, update_section
from memory3.memory.codec import CodecConfig, MemoryShape, train_codec
from memory3.memory.write import Memories
from memory3.model import apply_rope, rope_cos_sin
from memory3.shipped import default_model

# benchmarks/ holds bench_codec_fidelity.py, whose memories this bounds
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_codec_fidelity import rotate_keys, write_split_memories

RATES = (1.0, 1.5, 2.0, 4.0)  # bits per number for the bound


def water_filling(eigenvalues: np.ndarray, bits_per_dim: float) -> float:
    """Total squared error of reverse water-filling at `bits_per_dim` (rate-distortion of a
    Gaussian with these variances): components below the water level θ are dropped, the others
    coded down to θ, with Σ max(0, ½·log2(λ/θ)) = bits_per_dim · D."""
    ev = np.clip(np.asarray(eigenvalues, dtype=np.float64), 1e-30, None)
    budget = bits_per_dim * len(ev)
    lo, hi = 1e-30, float(ev.max())
    for _ in range(200):
        theta = (lo * hi) ** 0.5
        if np.maximum(0.0, 0.5 * np.log2(ev / theta)).sum() > budget:
            lo = theta
        else:
            hi = theta
    return float(np.minimum(ev, hi).sum())


def rope_plane_weights(q: np.ndarray) -> np.ndarray:
    """(N, D) pre-RoPE queries -> (D,) metric for key errors: the queries' mean energy in each
    RoPE plane (dims i and i + D/2), halved and given to both dims of the plane."""
    e = (q.astype(np.float64) ** 2).mean(0)
    half = len(e) // 2
    plane = e[:half] + e[half:]
    return np.concatenate([plane, plane]) / 2


def kmeans_1d(x: np.ndarray, k: int, iters: int = 15) -> tuple[np.ndarray, float]:
    """Sorted levels of a k-level Lloyd quantizer of x (quantile start) and its mean squared error."""
    if k == 1:
        return np.array([x.mean()]), float(x.var())
    levels = np.quantile(x, (np.arange(k) + 0.5) / k)
    for _ in range(iters):
        cell = np.searchsorted((levels[1:] + levels[:-1]) / 2, x)
        sums, counts = np.bincount(cell, x, k), np.bincount(cell, minlength=k)
        levels = np.sort(np.where(counts > 0, sums / np.maximum(counts, 1), levels))
    cell = np.searchsorted((levels[1:] + levels[:-1]) / 2, x)
    return levels, float(((x - levels[cell]) ** 2).mean())


class TransformCoder:
    """Transform coding of (N, D) vectors in the metric eᵀGe: x -> coefficients c = (x − μ)·T in the
    eigenbasis of the G-whitened covariance, one Lloyd quantizer per coefficient, `bits` per vector
    allocated greedily (at most `max_bits` per coefficient)."""

    def __init__(
        self, x: np.ndarray, bits: int, metric: np.ndarray | None = None, max_bits: int = 6, fit: int = 8000
    ) -> None:
        x = x.astype(np.float64)
        D = x.shape[1]
        self.mean = x.mean(0)
        G = np.eye(D) if metric is None else metric
        g, U = np.linalg.eigh(G)
        g = np.clip(g, 1e-8 * g.max(), None)
        root, inv_root = U @ np.diag(g**0.5) @ U.T, U @ np.diag(g**-0.5) @ U.T
        _, V = np.linalg.eigh(np.cov(((x - self.mean) @ root).T))
        V = V[:, ::-1]
        self.forward, self.inverse = root @ V, V.T @ inv_root
        c = (x - self.mean) @ self.forward
        c = c[np.random.default_rng(0).permutation(len(c))[:fit]]
        fits = [[kmeans_1d(c[:, j], 2**b) for b in range(max_bits + 1)] for j in range(D)]
        err = np.array([[e for _, e in row] for row in fits])
        self.bits = np.zeros(D, dtype=int)
        for _ in range(bits):
            gain = np.where(
                self.bits < max_bits,
                err[np.arange(D), self.bits] - err[np.arange(D), np.minimum(self.bits + 1, max_bits)],
                -1.0,
            )
            self.bits[int(gain.argmax())] += 1
        self.levels = [fits[j][b][0] for j, b in enumerate(self.bits)]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        c = (x.astype(np.float64) - self.mean) @ self.forward
        out = np.empty_like(c)
        for j, lv in enumerate(self.levels):
            out[:, j] = lv[np.searchsorted((lv[1:] + lv[:-1]) / 2, c[:, j])] if len(lv) > 1 else lv[0]
        return (out @ self.inverse + self.mean).astype(np.float32)


class Simulated:
    """Decoded memories of a (key coder, value coder) pair, with the bytes their codes would take;
    `codec_report` calls `encode` then `decode`, and only the decoded tensors matter to it."""

    def __init__(self, shape: MemoryShape, decoded: Memories, key_bytes: float, value_bytes: float) -> None:
        self.shape, self.decoded = shape, decoded
        n = shape.vectors
        self.record_bytes = round(n * (key_bytes + value_bytes) + n)  # + uint8 positions
        self.raw_bytes = 2 * n * 2 * shape.head_dim + 2 * n

    def encode(self, mem: Memories) -> Memories:
        return self.decoded

    def decode(self, mem: Memories, fingerprint: str) -> Memories:
        return mem


class TransformPartCoder:
    """Transform coding of the keys or the values of whole memories, one `TransformCoder` per
    memory layer and kv head, fitted on `train`: keys before RoPE in the metric of this layer's
    real queries (`rope_plane_weights`), values in the metric of the head's output projection (a
    value error e reaches the layer's output as Σ_i W_i e p_i over the group's query heads).
    Calling it on memories returns the decoded keys (after RoPE) or values, zero in empty slots."""

    def __init__(self, model: Any, train: Memories, q_pre: list[torch.Tensor], bits: int, part: str) -> None:
        self.part, self.bits, self.theta = part, bits, model.config.rope_theta
        K, D = train.k.shape[2], train.k.shape[4]
        g = model.config.n_head // K
        x = rotate_keys(train, self.theta, -1).k if part == "k" else train.v
        valid = train.positions >= 0
        self.coders: list[list[TransformCoder]] = []
        for layer, index in enumerate(model.memory_layers):
            W = model.model.layers[index].self_attn.o_proj.weight.detach().double().numpy()
            row = []
            for head in range(K):
                if part == "k":
                    q = q_pre[layer][:, head * g : (head + 1) * g].reshape(-1, D).numpy()
                    metric = np.diag(rope_plane_weights(q))
                else:
                    Wg = W[:, head * g * D : (head + 1) * g * D].reshape(-1, g, D).sum(1)
                    metric = Wg.T @ Wg
                row.append(
                    TransformCoder(x[:, layer, head][valid[:, layer, head]].float().numpy(), bits, metric)
                )
            self.coders.append(row)

    @property
    def code_bytes(self) -> float:
        return self.bits / 8

    def __call__(self, mem: Memories) -> torch.Tensor:
        src = rotate_keys(mem, self.theta, -1) if self.part == "k" else mem
        out = getattr(src, self.part).float().clone()
        for layer, row in enumerate(self.coders):
            for head, coder in enumerate(row):
                block = out[:, layer, head]
                out[:, layer, head] = torch.from_numpy(
                    coder(block.reshape(-1, block.shape[-1]).numpy())
                ).view_as(block)
        if self.part == "k":
            out = rotate_keys(Memories(out, mem.v, mem.positions, mem.fingerprint), self.theta, 1).k
        return out * (mem.positions >= 0)[..., None]


def parse_tc(spec: str) -> int:
    """`tc96` -> 96 bits per vector."""
    if not spec.startswith("tc") or not spec[2:].isdigit():
        raise ValueError(f"{spec!r}: a transform-coding row is tc<bits per vector>, e.g. tc96")
    return int(spec[2:])


def real_queries(
    model: Any, tok: Any, theta: float, position: int, n: int
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Queries of every memory layer on train-split shipped questions (60 Factbook, 60 invented
    facts; the QA benchmark asks held-out ones): pre-RoPE (Lm × (T, H, D)) for the
    metrics, and n sampled post-RoPE ones per kv head (Lm, K, n·H/K, D) for `codec_report`."""
    questions = [
        it.question
        for name in ("factbook", "fictional")
        for it in select_items(load_qa(resolve_set(name)), "train", 60)
    ]
    K, H, D = model.config.n_kv_head, model.config.n_head, model.config.head_dim
    pre: list[list[torch.Tensor]] = [[] for _ in model.memory_layers]
    post: list[list[torch.Tensor]] = [[] for _ in model.memory_layers]
    with torch.inference_mode():
        for text in questions:
            ids = torch.tensor([tok.encode(text)])
            pos = torch.arange(position, position + ids.shape[1])[None]
            cos, sin = rope_cos_sin(pos, theta, D, torch.float32)
            for i, cap in enumerate(model.capture_memory_layers(ids, pos)):
                pre[i].append(cap.q[0].transpose(0, 1))  # (T, H, D)
                post[i].append(apply_rope(cap.q, cos, sin)[0].transpose(0, 1))
    q_pre = [torch.cat(x).float() for x in pre]
    pick = torch.randperm(len(q_pre[0]), generator=torch.Generator().manual_seed(0))[:n]
    g = H // K
    q_post = torch.stack(
        [
            torch.stack([torch.cat(p)[pick][:, h * g : (h + 1) * g].reshape(-1, D) for h in range(K)])
            for p in post
        ]
    )
    return q_pre, q_post


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=default_model())
    ap.add_argument(
        "--rows", nargs="+", default=["SQ8", "SQ4", "Residual2x10,PQ8", "tc96", "tc96+Residual2x10,PQ8"]
    )
    ap.add_argument("--train-references", type=int, default=640)
    ap.add_argument("--test-references", type=int, default=60)
    ap.add_argument("--train-vectors", type=int, default=20000, help="per FAISS quantizer")
    ap.add_argument("--queries", type=int, default=64, help="real query positions per group")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="BENCHMARKS.md")
    ap.add_argument("--json", default="benchmarks/results/codec_bound.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok, mc, train, test = write_split_memories(
        args.model, args.train_references, args.test_references
    )
    theta = model.config.rope_theta
    _, Lm, K, S, D = train.k.shape
    shape = MemoryShape(Lm, K, S, D)
    g = model.config.n_head // K
    # Real queries sit behind the memories: the furthest memory slot is at the reference's end.
    q_pre, q_post = real_queries(model, tok, theta, int(train.positions.max()) + 1, args.queries)
    pre_train = rotate_keys(train, theta, -1)
    valid = train.positions >= 0

    def vectors(x: torch.Tensor, layer: int, head: int) -> np.ndarray:
        return x[:, layer, head][valid[:, layer, head]].float().numpy()

    def key_metric(layer: int, head: int) -> np.ndarray:
        return np.diag(rope_plane_weights(q_pre[layer][:, head * g : (head + 1) * g].reshape(-1, D).numpy()))

    # 1. The Gaussian bound, per (layer, head), averaged as mean squared error over heads.
    bound: dict[str, dict[str, float]] = {}
    kinds = {
        "keys after RoPE": lambda l, h: (vectors(train.k, l, h), None),
        "keys before RoPE": lambda l, h: (vectors(pre_train.k, l, h), None),
        "keys before RoPE, query-weighted": lambda l, h: (vectors(pre_train.k, l, h), key_metric(l, h)),
        "values": lambda l, h: (vectors(train.v, l, h), None),
    }
    for name, get in kinds.items():
        err = {r: 0.0 for r in RATES}
        energy = 0.0
        for layer in range(Lm):
            for head in range(K):
                x, G = get(layer, head)
                x = x.astype(np.float64)
                if G is not None:
                    x = x * np.sqrt(np.diag(G))  # diagonal metric
                ev = np.linalg.eigvalsh(np.cov(x.T))
                # Relative to what matters: a key's mean shifts every logit of a query alike, which
                # the softmax ignores, so keys count their spread; a value's mean reaches the output.
                energy += float(ev.sum()) if name.startswith("keys") else float((x**2).sum(1).mean())
                for r in RATES:
                    err[r] += water_filling(ev, r)
        bound[name] = {f"{r:g} bits": float(np.sqrt(err[r] / energy)) for r in RATES}
        print(json.dumps({name: bound[name]}), file=sys.stderr, flush=True)

    # 2-3. Codecs: decoded test memories and the attention error with real queries.
    faiss_decoded: dict[str, tuple[Memories, int]] = {}
    tc_decoded: dict[tuple[str, str], tuple[torch.Tensor, float]] = {}

    def decode_part(spec: str, part: str) -> tuple[torch.Tensor, float]:
        if spec.startswith("tc"):
            if (spec, part) not in tc_decoded:
                tc_decoded[spec, part] = transform_code(spec, part)
            return tc_decoded[spec, part]
        if spec not in faiss_decoded:
            cfg = CodecConfig(kind="faiss", factory=spec, train_vectors=args.train_vectors)
            codec = train_codec(train, cfg, threads=args.threads)
            faiss_decoded[spec] = (codec.decode(codec.encode(test), test.fingerprint), codec.code_bytes)
        mem, code = faiss_decoded[spec]
        return getattr(mem, part), float(code)

    def transform_code(spec: str, part: str) -> tuple[torch.Tensor, float]:
        try:
            coder = TransformPartCoder(model, train, q_pre, parse_tc(spec), part)
        except ValueError as e:
            ap.error(str(e))
        return coder(test), coder.code_bytes

    rows: list[dict[str, Any]] = []
    other = 0.0
    for row in args.rows:
        t0 = time.perf_counter()
        k_spec, _, v_spec = row.partition("+")
        v_spec = v_spec or k_spec
        k, k_bytes = decode_part(k_spec, "k")
        v, v_bytes = decode_part(v_spec, "v")
        sim = Simulated(shape, Memories(k, v, test.positions, test.fingerprint), k_bytes, v_bytes)
        rep = codec_report(test, sim, queries=q_post)  # type: ignore[arg-type]
        other = rep["attn_rel_error_other_memories"]
        rows.append(
            {
                "keys": k_spec,
                "values": v_spec,
                "bits per number": round(8 * (k_bytes + v_bytes) / (2 * D), 3),
                "of bf16": round(sim.record_bytes / sim.raw_bytes, 4),
                "key error": rep["k_rel_error"],
                "value error": rep["v_rel_error"],
                "attention error": rep["attn_rel_error"],
                "keys only": rep["attn_rel_error_k_only"],
                "values only": rep["attn_rel_error_v_only"],
                "s": round(time.perf_counter() - t0, 1),
            }
        )
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)

    results = {
        "machine": machine(),
        "model": str(args.model),
        "memory_config": mc.to_dict(),
        "references": {"train": args.train_references, "test": args.test_references},
        "bound_relative_error": bound,
        "attn_rel_error_other_memories": other,
        "rows": rows,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results, indent=1))
    bound_rows = [{"vectors": name, **{k: round(v, 3) for k, v in b.items()}} for name, b in bound.items()]
    body = (
        f"Model `{args.model}` ({Lm} memory layers × {mc.kept_tokens} kept tokens), memories of "
        f"{args.train_references} train-split Wikipedia references to fit, {args.test_references} others "
        "to measure. **Lower bound** on the relative error ‖x̂−x‖/‖x‖ of any code at R bits per "
        "number, for Gaussian vectors with each layer's and head's covariance (reverse water-filling); "
        "the query-weighted row bounds the error of q·k for real queries instead. Keys are relative to "
        "their spread around their mean (the softmax ignores the mean), values to their norm:\n\n"
        + table(bound_rows)
        + "\n\nMeasured codecs, attention error with real queries (each memory layer's queries on "
        "train-split Factbook and invented-facts questions; reading 5 other memories exactly gives "
        f"{other:.2f}). `tc<bits>` is the "
        "transform-coding experiment (per layer and head: eigenbasis, one Lloyd quantizer per "
        "coefficient, greedy bit allocation; keys before RoPE in the query-weighted metric); "
        "`A+B` codes keys with A and values with B:\n\n" + table(rows)
    )
    update_section(
        args.out, "codec-bound", "Memory codec: how small a memory can get",
        "python benchmarks/research/bench_codec_bound.py --threads " + f"{args.threads} --rows {' '.join(args.rows)}",
        body, results,
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
