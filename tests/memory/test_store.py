"""MemoryStore: round trips, deletion and compaction, refusal of foreign memories, checksums,
crash recovery after SIGKILL, a reader beside a writer, merging, clear errors.

Random memories with bf16-representable values and the "none" codec make every round trip exact;
no model is needed.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from memory3.config import MemoryConfig, ModelConfig
from memory3.errors import FingerprintMismatchError, StoreCorruptError, StoreError
from memory3.memory.codec import CodecConfig, MemoryCodec, MemoryShape, train_codec
from memory3.memory.merge import merge_stores
from memory3.memory.store import MemoryStore, RefMeta
from memory3.memory.write import Memories, MemoryFormatError

SHAPE = MemoryShape(layers=2, kv_heads=2, slots=4, head_dim=16)


def mem_for(seeds: list[int], shape: MemoryShape = SHAPE, fingerprint: str = "test") -> Memories:
    """One memory per seed, the same in every process: bf16-representable K/V, sorted positions;
    seeds divisible by 5 give a short reference (empty slots at the end)."""
    ks, vs, ps = [], [], []
    Lm, K, S, D = shape.dims
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        k = (torch.randn(Lm, K, S, D, generator=g) * 2).bfloat16().float()
        v = torch.randn(Lm, K, S, D, generator=g).bfloat16().float()
        pos = torch.stack([torch.randperm(100, generator=g)[:S].sort().values + 3 for _ in range(Lm * K)])
        pos = pos.view(Lm, K, S).to(torch.int32)
        if seed % 5 == 0:
            pos[..., S // 2 :] = -1
            k[pos < 0], v[pos < 0] = 0.0, 0.0
        ks.append(k)
        vs.append(v)
        ps.append(pos)
    return Memories(torch.stack(ks), torch.stack(vs), torch.stack(ps), fingerprint)


def refs_for(doc: str, n: int, seed0: int = 0) -> list[RefMeta]:
    return [
        RefMeta(doc, c, f"{doc} text {c}", title=doc.upper(), tokens=tuple(range(seed0 + c, seed0 + c + 5)))
        for c in range(n)
    ]


def none_codec() -> MemoryCodec:
    return MemoryCodec(CodecConfig(kind="none"), SHAPE)


def new_store(path: Path, rps: int = 4, codec: MemoryCodec | None = None) -> MemoryStore:
    return MemoryStore.create(path, codec or none_codec(), "test", records_per_shard=rps)


def assert_same(a: Memories, b: Memories) -> None:
    assert torch.equal(a.k, b.k) and torch.equal(a.v, b.v) and torch.equal(a.positions, b.positions)
    assert a.fingerprint == b.fingerprint


def test_round_trip_exact(tmp_path: Path) -> None:
    path = tmp_path / "bank"
    with new_store(path, rps=3) as store:
        ids_a = store.add(refs_for("a", 4), mem_for([1, 2, 3, 5]))
        ids_b = store.add(refs_for("b", 3), mem_for([6, 7, 8]))
        assert ids_a == [1, 2, 3, 4] and ids_b == [5, 6, 7]
        assert len(store) == 7
    assert sorted(p.name for p in (path / "shards").iterdir()) == ["00000.bin", "00001.bin", "00002.bin"]
    assert (path / "shards" / "00000.bin").stat().st_size == 3 * store.record_size
    with MemoryStore.open(path, expect_fingerprint="test") as store:
        assert_same(store.get([7, 1, 4, 4]), mem_for([8, 1, 5, 5]))  # any order, repeats, shards
        assert store.get([2], dtype=torch.bfloat16).k.dtype == torch.bfloat16
        assert store.texts([5, 1]) == ["b text 0", "a text 0"]
        ref = store.refs([6])[0]
        assert (ref.doc_id, ref.chunk, ref.title, ref.tokens, ref.n_tokens) == (
            "b",
            1,
            "B",
            (1, 2, 3, 4, 5),
            5,
        )
        assert ref.built and not ref.deleted and ref.ref_id == 6
        assert store.live_ids().tolist() == list(range(1, 8))
        assert store.doc_ids() == ["a", "b"] and store.doc_refs("b").tolist() == [5, 6, 7]
        info = store.info()
        assert info["live"] == 7 and info["shards"] == 3 and info["memory_fingerprint"] == "test"
        assert np.array_equal(store.get_records([3]), store.codec.encode(mem_for([3])))
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["counts"]["live"] == 7 and manifest["codec_fingerprint"] == store.codec.fingerprint


def test_round_trip_with_faiss_codec(tmp_path: Path) -> None:
    codec = train_codec(
        mem_for(list(range(300))), CodecConfig(factory="PQ4x4", train_vectors=3000), threads=1
    )
    mem = mem_for([11, 12, 13])
    with new_store(tmp_path / "bank", codec=codec) as store:
        ids = store.add(refs_for("a", 3), mem)
    with MemoryStore.open(tmp_path / "bank") as store:
        assert store.record_size == 4 + codec.record_bytes
        assert_same(store.get(ids), codec.decode(codec.encode(mem), "test"))


def test_pending_then_fill(tmp_path: Path) -> None:
    with new_store(tmp_path / "bank") as store:
        ids = store.add_pending(refs_for("a", 3) + refs_for("b", 2))
        assert store.pending_ids().tolist() == ids and len(store) == 0
        with pytest.raises(KeyError, match="not built yet"):
            store.get(ids[:1])
        store.fill([ids[4], ids[0]], mem_for([4, 0]))
        assert store.live_ids().tolist() == [ids[0], ids[4]]
        assert_same(store.get([ids[0], ids[4]]), mem_for([0, 4]))
        assert store.unbuilt([ids[4], ids[3], ids[0], ids[1]]) == [ids[1], ids[3]]
        with pytest.raises(StoreError, match="not pending"):
            store.fill([ids[0]], mem_for([0]))
        with pytest.raises(MemoryFormatError, match="2 memories given for 1"):
            store.fill([ids[1]], mem_for([1, 2]))
        assert store.counts() == {"live": 2, "pending": 3, "deleted": 0, "records": 2}


def test_pending_ids_by_length(tmp_path: Path) -> None:
    """A build writes shortest first (batches pad little); ties keep id order."""
    lengths = [5, 2, 9, 2, 7]
    refs = [RefMeta("d", c, f"t{c}", tokens=tuple(range(n))) for c, n in enumerate(lengths)]
    with new_store(tmp_path / "bank") as store:
        ids = store.add_pending(refs)
        assert store.pending_ids(by_length=True).tolist() == [ids[1], ids[3], ids[0], ids[4], ids[2]]
        store.fill([ids[1]], mem_for([1]))
        assert store.pending_ids(by_length=True).tolist() == [ids[3], ids[0], ids[4], ids[2]]


def test_delete_and_compact(tmp_path: Path) -> None:
    path = tmp_path / "bank"
    with new_store(path, rps=2) as store:
        a = store.add(refs_for("a", 3), mem_for([1, 2, 3]))
        b = store.add(refs_for("b", 3), mem_for([4, 5, 6]))
        c = store.add(refs_for("c", 1), mem_for([7]))
        assert store.delete_doc("b") == b and store.delete_doc("b") == []
        assert store.live_ids().tolist() == a + c
        assert store.is_live([a[0], b[0], 999]).tolist() == [True, False, False]
        with pytest.raises(KeyError, match="deleted"):
            store.get([b[1]])
        before = store.info()["shard_bytes"]
        report = store.compact()
        assert report["bytes_before"] == before == 7 * store.record_size
        assert report["bytes_after"] == 4 * store.record_size
        assert store.live_ids().tolist() == a + c  # ids are kept
        assert_same(store.get(a + c), mem_for([1, 2, 3, 7]))
        with pytest.raises(KeyError, match="unknown"):
            store.refs([b[0]])
        # Appending after compaction never reuses an id, and the doc can come back.
        again = store.add(refs_for("b", 1), mem_for([9]))
        assert again[0] > max(b)
        assert store.verify().ok
    with MemoryStore.open(path) as store:
        assert_same(store.get(a + c + again), mem_for([1, 2, 3, 7, 9]))
        assert len(store) == 5


def test_a_reader_open_across_compactions_reads_the_new_records(tmp_path: Path) -> None:
    """Compaction never gives a shard number a second life, even when it leaves no record at all,
    and a reader holding a descriptor of a file that was deleted or replaced reopens it: an open
    reader never returns a deleted reference's bytes for a new one (their checksums would pass)."""
    path = tmp_path / "bank"
    with new_store(path, rps=2) as writer, MemoryStore.open(path) as reader:
        a = writer.add(refs_for("a", 2), mem_for([1, 2]))
        assert_same(reader.get(a), mem_for([1, 2]))  # the reader now holds shard 0 open
        writer.delete_doc("a")
        writer.compact()  # nothing left: shard 0 deleted
        writer.add_pending(refs_for("p", 1))
        writer.delete_doc("p")
        writer.compact()  # only a pending reference to drop: no shard at all before or after
        b = writer.add(refs_for("b", 2), mem_for([3, 4]))
        assert not (path / "shards" / "00000.bin").exists()
        assert_same(reader.get(b), mem_for([3, 4]))
        # a shard replaced under the reader (a restore): read from the file now in the directory
        shard = next((path / "shards").glob("*.bin"))
        swapped = shard.with_suffix(".new")
        swapped.write_bytes(shard.read_bytes()[::-1])
        swapped.replace(shard)
        with pytest.raises(StoreCorruptError, match="checksum"):
            reader.get(b)
        assert not reader.verify().ok


def test_open_shard_files_are_bounded_and_short_reads_are_completed(tmp_path: Path, monkeypatch) -> None:
    """A reader keeps at most `max_open` shard files open between reads (a batch over more shards
    opens them all while it reads); a read that returns fewer bytes than asked (network file
    systems) is continued."""
    path = tmp_path / "bank"
    with new_store(path, rps=1) as store:
        ids = store.add(refs_for("a", 6), mem_for(range(1, 7)))  # one record per shard
    real = os.preadv
    monkeypatch.setattr(os, "preadv", lambda fd, bufs, off: real(fd, [bufs[0][:100]], off))
    with MemoryStore.open(path) as store:
        store._shards.max_open = 2
        for i, seed in zip(ids, range(1, 7), strict=True):
            assert_same(store.get([i]), mem_for([seed]))
            assert len(store._shards._fds) <= 2
        assert_same(store.get(ids[::-1]), mem_for(range(6, 0, -1)))  # one batch over 6 shards
        assert list(store._shards._fds) == [1, 0]  # the two read last


def test_replace_doc(tmp_path: Path) -> None:
    with new_store(tmp_path / "bank") as store:
        old = store.add(refs_for("a", 2), mem_for([1, 2]))
        new = store.replace_doc("a", refs_for("a", 3, seed0=10), mem_for([3, 4, 5]))
        assert store.live_ids().tolist() == new and not set(old) & set(new)
        assert store.texts(new) == ["a text 0", "a text 1", "a text 2"]
        with pytest.raises(StoreError, match="already in"):
            store.add(refs_for("a", 1), mem_for([6]))


def test_fingerprint_mismatch_refused(tmp_path: Path) -> None:
    new_store(tmp_path / "bank").close()
    with pytest.raises(FingerprintMismatchError) as e:
        MemoryStore.open(tmp_path / "bank", expect_fingerprint="0123abcd")
    msg = str(e.value)
    assert "test" in msg and "0123abcd" in msg and "rebuild" in msg
    with (
        MemoryStore.open(tmp_path / "bank", readonly=False) as store,
        pytest.raises(FingerprintMismatchError, match="fingerprint other"),
    ):
        store.add(refs_for("a", 1), mem_for([1], fingerprint="other"))


def test_corruption_detected(tmp_path: Path) -> None:
    path = tmp_path / "bank"
    with new_store(path, rps=4) as store:
        ids = store.add(refs_for("a", 6), mem_for(range(1, 7)))
    shard = path / "shards" / "00001.bin"  # records 4, 5 of the store: slots 0, 1 of shard 1
    data = bytearray(shard.read_bytes())
    data[store.record_size + 100] ^= 0x01  # one bit of the second record of shard 1
    shard.write_bytes(bytes(data))
    with MemoryStore.open(path) as store:
        report = store.verify()
        assert not report.ok and report.checked == 6
        assert report.errors == [f"shard 00001.bin record 1 (ref {ids[5]}): checksum mismatch"]
        with pytest.raises(StoreCorruptError, match=r"shard 00001.bin, record 1"):
            store.get(ids)
        assert_same(store.get(ids[:5]), mem_for(range(1, 6)))
    (path / "shards" / "00000.bin").unlink()
    with MemoryStore.open(path) as store:
        assert any("00000.bin missing" in e for e in store.verify().errors)


def test_a_shard_truncated_under_an_open_reader_is_an_error_not_a_crash(tmp_path: Path) -> None:
    """Records are read with pread, so a shard cut short while a reader holds it open gives a
    StoreCorruptError that says so (through a memory map it would be a SIGBUS); the records
    before the cut still read, and the reader sees a file that grows again."""
    path = tmp_path / "bank"
    with new_store(path, rps=4) as store:
        ids = store.add(refs_for("a", 6), mem_for(range(1, 7)))
    shard = path / "shards" / "00001.bin"
    with MemoryStore.open(path) as reader:
        assert_same(reader.get(ids), mem_for(range(1, 7)))  # descriptors now open on both shards
        full = shard.read_bytes()
        with open(shard, "r+b") as f:
            f.truncate(reader.record_size + 10)  # record 1 of shard 1 (ref 6) cut short
        with pytest.raises(StoreCorruptError, match=r"00001.bin.*record 1 reaches byte .*truncated"):
            reader.get(ids[4:])
        assert_same(reader.get(ids[:5]), mem_for(range(1, 6)))
        shard.write_bytes(full)  # the same file (inode) grows back
        assert_same(reader.get(ids), mem_for(range(1, 7)))
        assert reader.unbuilt(ids) == []


# --- processes ------------------------------------------------------------------------------


def _fill_pending(path: str) -> None:
    torch.set_num_threads(1)  # no OpenMP pool in a forked child
    with MemoryStore.open(path, readonly=False) as store:
        for i in store.pending_ids().tolist():
            store.fill([i], mem_for([i]))


def _append_docs(path: str, n: int) -> None:
    torch.set_num_threads(1)
    with MemoryStore.open(path, readonly=False) as store:
        for d in range(n):
            store.add(refs_for(f"doc{d:03d}", 2), mem_for([100 + 2 * d, 101 + 2 * d]))


def start_process(target, *args: object) -> mp.process.BaseProcess:
    """A writer in another process; forked, so it starts in milliseconds without re-importing."""
    proc = mp.get_context("fork").Process(target=target, args=args, daemon=True)
    proc.start()
    return proc


def store_state(path: Path) -> tuple[dict[str, bytes], list[tuple]]:
    shards = {p.name: p.read_bytes() for p in sorted((path / "shards").iterdir())}
    with MemoryStore.open(path) as s:
        ids = list(range(1, s.counts()["live"] + s.counts()["pending"] + 1))
        rows = [(r.ref_id, r.doc_id, r.chunk, r.built) for r in s.refs(ids)]
        places = s.meta.conn.execute("SELECT ref_id, shard, slot FROM refs ORDER BY ref_id").fetchall()
    return shards, rows + places


def test_killed_build_resumes_to_the_same_store(tmp_path: Path) -> None:
    """SIGKILL a writer while it fills pending references, twice; reopening drops the partial
    append and finishing the build gives byte-identical shards and rows."""
    n = 40
    refs = [r for d in range(n // 4) for r in refs_for(f"d{d}", 4)]
    ref = new_store(tmp_path / "ref", rps=7)
    ref_ids = ref.add_pending(refs)
    for i in ref_ids:
        ref.fill([i], mem_for([i]))
    ref.close()

    path = tmp_path / "killed"
    with new_store(path, rps=7) as s:
        assert s.add_pending(refs) == ref_ids
    rng = np.random.default_rng(0)
    for target in (8, 20):
        proc = start_process(_fill_pending, str(path))
        deadline = time.monotonic() + 60
        with MemoryStore.open(path) as reader:
            while len(reader) < target and proc.is_alive() and time.monotonic() < deadline:
                time.sleep(0.002)
        time.sleep(float(rng.uniform(0, 0.01)))
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        with MemoryStore.open(path) as s:
            done = len(s)
            assert s.verify().ok  # only committed rows are read; their records are whole
            assert_same(s.get(s.live_ids()), mem_for(s.live_ids().tolist()))
        assert 0 < done < n, f"the writer was killed after {done} of {n} references: adjust timing"
    proc = start_process(_fill_pending, str(path))
    proc.join(timeout=120)
    assert proc.exitcode == 0
    assert store_state(path) == store_state(tmp_path / "ref")


def test_reader_never_sees_a_half_written_record(tmp_path: Path) -> None:
    path = tmp_path / "bank"
    new_store(path, rps=5).close()
    n_docs = 60
    proc = start_process(_append_docs, str(path), n_docs)
    seen, reads = 0, 0
    deadline = time.monotonic() + 120
    with MemoryStore.open(path) as reader:
        while time.monotonic() < deadline:
            running = proc.is_alive()
            ids = reader.live_ids().tolist()
            if ids:
                metas = reader.refs(ids)
                seeds = [100 + 2 * int(m.doc_id[3:]) + m.chunk for m in metas]
                assert_same(reader.get(ids), mem_for(seeds))
                reads += 1
            assert len(ids) >= seen and len(ids) % 2 == 0  # a doc's two refs appear together
            seen = len(ids)
            if not running:
                break
    proc.join(timeout=60)
    assert proc.exitcode == 0
    assert seen == 2 * n_docs and reads >= 2


def test_recovery_drops_uncommitted_bytes(tmp_path: Path) -> None:
    """What a killed append leaves (a torn record past the last committed one, a shard file no
    row points to) is invisible to readers and removed when a writer opens the store."""
    path = tmp_path / "bank"
    with new_store(path, rps=3) as s:
        s.add(refs_for("a", 4), mem_for([1, 2, 3, 4]))  # shard 0 full, shard 1 holds one record
        rs = s.record_size
    with open(path / "shards" / "00001.bin", "ab") as f:
        f.write(b"\xff" * (rs + rs // 2))  # one and a half records nobody committed
    (path / "shards" / "00002.bin").write_bytes(b"\x01" * rs)
    with MemoryStore.open(path) as reader:  # readers ignore it
        assert reader.verify().ok and reader.verify().counts["orphan_files"] == 1
        assert_same(reader.get([1, 2, 3, 4]), mem_for([1, 2, 3, 4]))
    with MemoryStore.open(path, readonly=False) as s:
        assert (path / "shards" / "00001.bin").stat().st_size == rs
        assert not (path / "shards" / "00002.bin").exists()
        assert s.add(refs_for("b", 3), mem_for([5, 6, 7])) == [5, 6, 7]
        assert_same(s.get(range(1, 8)), mem_for(range(1, 8)))
    sizes = [(path / "shards" / f"0000{i}.bin").stat().st_size for i in range(3)]
    assert sizes == [3 * rs, 3 * rs, rs]


def test_second_writer_is_refused(tmp_path: Path) -> None:
    with new_store(tmp_path / "bank"):
        with pytest.raises(StoreError, match=r"open for writing by pid \d+ \(.*\) since"):
            MemoryStore.open(tmp_path / "bank", readonly=False)
        MemoryStore.open(tmp_path / "bank").close()  # readers are welcome
    MemoryStore.open(tmp_path / "bank", readonly=False).close()  # the lock went with the writer


# --- merging --------------------------------------------------------------------------------


def test_merge_two_stores(tmp_path: Path) -> None:
    p1, p2, out = tmp_path / "p1", tmp_path / "p2", tmp_path / "merged"
    with new_store(p1, rps=3) as s:
        s.add(refs_for("a", 4), mem_for([1, 2, 3, 4]))
        s.add_pending(refs_for("pending", 1))
    with new_store(p2, rps=3) as s:
        s.add(refs_for("b", 2), mem_for([5, 6]))
        s.add(refs_for("c", 2), mem_for([7, 8]))
        s.delete_doc("b")
    inode = (p2 / "shards" / "00000.bin").stat().st_ino
    result = merge_stores([p1, p2], out, keep_parts=True)
    assert result.id_offsets == [0, 5] and result.records == 8
    with MemoryStore.open(out, readonly=False) as m:
        assert m.live_ids().tolist() == [1, 2, 3, 4, 8, 9]
        assert m.pending_ids().tolist() == [5]
        assert_same(m.get([1, 2, 3, 4, 8, 9]), mem_for([1, 2, 3, 4, 7, 8]))
        assert m.texts([9]) == ["c text 1"] and m.doc_ids() == ["a", "c", "pending"]
        assert (out / "shards" / "00002.bin").stat().st_ino == inode  # linked, not copied
        assert m.verify().ok and m.manifest["index"] is None
        new = m.add(refs_for("d", 1), mem_for([9]))
        assert new == [10]
        shard_of_new = m.meta.conn.execute("SELECT shard FROM refs WHERE ref_id = 10").fetchone()[0]
        assert shard_of_new == 4  # appends go to a shard of its own, not into a part's file
    with MemoryStore.open(p1) as s:  # parts kept intact
        assert_same(s.get([1, 2, 3, 4]), mem_for([1, 2, 3, 4]))
    merge_stores([p1], tmp_path / "again")
    assert not p1.exists() and len(MemoryStore.open(tmp_path / "again")) == 4


def test_merge_refuses_mismatched_parts(tmp_path: Path) -> None:
    with new_store(tmp_path / "p1") as s:
        s.add(refs_for("a", 1), mem_for([1]))
    with new_store(tmp_path / "p2") as s:
        s.add(refs_for("a", 1), mem_for([2]))
    with pytest.raises(StoreError, match="also in an earlier part"):
        merge_stores([tmp_path / "p1", tmp_path / "p2"], tmp_path / "m")
    assert not (tmp_path / "m").exists() and (tmp_path / "p1").exists()
    other = MemoryCodec(CodecConfig(kind="none", positions="int16"), SHAPE)
    MemoryStore.create(tmp_path / "p3", other, "test").close()
    with pytest.raises(StoreError, match="codec_fingerprint"):
        merge_stores([tmp_path / "p1", tmp_path / "p3"], tmp_path / "m")
    with pytest.raises(FileExistsError):
        merge_stores([tmp_path / "p1"], tmp_path / "p2")


# --- errors ---------------------------------------------------------------------------------


def test_bad_inputs(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match="is a file"):
        MemoryStore.open(tmp_path / "file")
    with pytest.raises(FileNotFoundError, match="no memory bank here"):
        MemoryStore.open(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreError, match=r"manifest\.json missing"):
        MemoryStore.open(tmp_path / "empty")
    with pytest.raises(FileExistsError):
        MemoryStore.create(tmp_path / "file", none_codec(), "test")
    with pytest.raises(ValueError, match="not trained"):
        MemoryStore.create(tmp_path / "x", MemoryCodec(CodecConfig(factory="PQ4x4"), SHAPE), "test")
    model = ModelConfig.from_preset("tiny")  # 2 memory layers, 2 kv heads, head dim 16
    with pytest.raises(ValueError, match="does not fit model"):
        MemoryStore.create(
            tmp_path / "x", none_codec(), "test", model_config=ModelConfig.from_preset("tiny-tied")
        )
    with pytest.raises(ValueError, match="keeps 8"):
        MemoryStore.create(tmp_path / "x", none_codec(), "test", model, MemoryConfig())
    store = MemoryStore.create(tmp_path / "ok", none_codec(), "test", model, MemoryConfig(kept_tokens=4))
    with pytest.raises(MemoryFormatError, match="do not fit this codec"):
        store.add(refs_for("a", 1), mem_for([1], MemoryShape(2, 2, 4, 8)))
    with pytest.raises(MemoryFormatError, match="2 memories given for 1"):
        store.add(refs_for("a", 1), mem_for([1, 2]))
    with pytest.raises(ValueError, match="chunk must be"):
        RefMeta("a", -1, "t")
    with pytest.raises(ValueError, match="doc_id"):
        RefMeta("", 0, "t")
    store.close()
    with pytest.raises(StoreError, match="closed"):
        store.live_ids()
    with MemoryStore.open(tmp_path / "ok") as reader, pytest.raises(StoreError, match="read-only"):
        reader.add(refs_for("a", 1), mem_for([1]))
    manifest = json.loads((tmp_path / "ok" / "manifest.json").read_text())
    (tmp_path / "ok" / "manifest.json").write_text(json.dumps({**manifest, "version": 99}))
    with pytest.raises(StoreError, match="version 99"):
        MemoryStore.open(tmp_path / "ok")
