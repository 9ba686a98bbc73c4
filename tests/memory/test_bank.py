"""The memory bank end to end: build → store → index → StoreRetriever → generation; resume after
kill -9, document changes, cold start, cache, fingerprints, torchrun."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import free_port, run_checked, tiny_model
from memory3.checkpoint import save_checkpoint
from memory3.config import GenerationConfig, MemoryConfig
from memory3.errors import FingerprintMismatchError
from memory3.generate import Generator
from memory3.memory.build import BuildConfig, build
from memory3.memory.codec import CodecConfig
from memory3.memory.ingest import Document
from memory3.memory.store import MemoryStore
from memory3.memory.write import MemoryWriter, reference_prefix_ids
from memory3.retrieval.index import IndexConfig
from memory3.retrieval.retriever import MemoryCache, StoreRetriever

MEM = MemoryConfig(reference_tokens=32, kept_tokens=4, chunk_tokens=16, memories_per_chunk=2)
CFG = BuildConfig(
    codec=CodecConfig(kind="none"), index=IndexConfig(kind="flat"), embedder="hashing-64", batch_size=4
)

DOCS = [
    Document(
        "zantoria", "Quellmar is the capital of Zantoria, a port city on the Amber Sea. " * 2, "Zantoria"
    ),
    Document("fjarn", "Mount Fjarn, 4,211 metres high, is the highest point of Zantoria.", "Mount Fjarn"),
    Document(
        "velmora",
        "Velmora Castiglio was a glassblower born in Dresk in 1873. She moved to Quellmar in 1901.",
        "Velmora",
    ),
    Document("dresk", "The Dresk glassworks closed in 1931 after a fire destroyed the furnaces.", "Dresk"),
    Document("zant", "The currency of Zantoria is the zant, divided into 100 pell.", "Zant"),
]


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model(seed=21, vocab_size=len(tok))


@pytest.mark.slow
def test_build_then_retrieve_and_generate(tmp_path, model, tok) -> None:
    summary = build(DOCS, tmp_path / "bank", model, tok, MEM, CFG, progress=False)
    assert summary.references >= len(DOCS) and summary.written == summary.references
    retr = StoreRetriever.open(tmp_path / "bank", model, tok)
    hits = retr.search(["Who was Velmora Castiglio, the glassblower?"], 2)[0]
    assert hits[0].doc_id == "velmora"
    # memories read back equal the writer's (codec none keeps bf16)
    writer = MemoryWriter(model, reference_prefix_ids(tok, model.config.bos_token_id, MEM), MEM)
    ref = retr.store.refs([hits[0].ref_id])[0]
    with torch.no_grad():
        want = writer.write([list(ref.tokens)])
    got = retr.memories([hits[0].ref_id])
    assert torch.equal(got.positions, want.positions)
    torch.testing.assert_close(got.k, want.k.bfloat16().float())
    gen = Generator(model, tok, retr, MEM, chat=False)
    out = gen.generate(["Who was Velmora Castiglio?", "zant"], config=GenerationConfig(max_new_tokens=20))
    assert all(len(o.token_ids) > 0 for o in out)
    assert out[0].references[0][0].doc_id == "velmora"
    # leak filter: a query that contains the reference drops it and the next hit takes the slot
    leaky = retr.search([DOCS[3].text], 2, leak_texts=[DOCS[3].text], leak_threshold=2 / 3)[0]
    assert "dresk" not in [h.doc_id for h in leaky] and len(leaky) == 2


@pytest.mark.slow
def test_bank_opened_in_the_kv_dtype_reads_the_same_memories(tmp_path, model, tok) -> None:
    """A bank opened to cache its memories in bfloat16 (what `--kv-dtype auto` gives on such
    CPUs) returns the float32 reading cast once, and generation reads them alike."""
    build(DOCS, tmp_path / "bank", model, tok, MEM, CFG, progress=False)
    f32 = StoreRetriever.open(tmp_path / "bank", model, tok)
    bf16 = StoreRetriever.open(tmp_path / "bank", model, tok, dtype=torch.bfloat16)
    ids = [int(i) for i in f32.store.live_ids()[::-1][:3]]
    for _ in range(2):  # cold from disk, then from the cache
        a, b = f32.memories(ids), bf16.memories(ids)
        assert a.k.dtype == torch.float32 and b.k.dtype == torch.bfloat16 and b.v.dtype == torch.bfloat16
        assert torch.equal(a.k.bfloat16(), b.k) and torch.equal(a.v.bfloat16(), b.v)
        assert torch.equal(a.positions, b.positions)
    prompts = ["Who was Velmora Castiglio?", "zant"]
    cfg = GenerationConfig(max_new_tokens=12)
    outs = [
        Generator(model, tok, r, MEM, chat=False, kv_dtype="bfloat16").generate(prompts, config=cfg)
        for r in (f32, bf16)
    ]
    assert [o.token_ids for o in outs[0]] == [o.token_ids for o in outs[1]]


def test_embedding_beside_the_writer_gives_the_same_bank(tmp_path, model, tok) -> None:
    for mode in ("on", "off"):
        build(
            DOCS,
            tmp_path / mode,
            model,
            tok,
            MEM,
            dataclasses.replace(CFG, overlap_embedding=mode),
            progress=False,
        )
    assert _snapshot(tmp_path / "on") == _snapshot(tmp_path / "off")
    _same_memories(tmp_path / "on", tmp_path / "off")
    queries = [d.text[:40] for d in DOCS]
    hits = {
        mode: [
            [(h.ref_id, round(h.score, 6)) for h in q]
            for q in StoreRetriever.open(tmp_path / mode, model, tok).search(queries, 3)
        ]
        for mode in ("on", "off")
    }
    assert hits["on"] == hits["off"]


def test_embedder_failing_beside_the_writer_loses_no_memory(tmp_path, model, tok) -> None:
    bad = dataclasses.replace(CFG, overlap_embedding="on", embedder="hashing-x")
    with pytest.raises(ValueError, match="hashing-<dim>"):
        build(DOCS, tmp_path / "bank", model, tok, MEM, bad, progress=False)
    with MemoryStore.open(tmp_path / "bank") as s:
        assert s.counts()["pending"] == 0 and s.counts()["records"] > 0  # every memory was written
    summary = build(
        DOCS,
        tmp_path / "bank",
        model,
        tok,
        MEM,
        dataclasses.replace(CFG, overlap_embedding="on"),
        progress=False,
    )
    assert summary.resumed and summary.written == 0
    build(DOCS, tmp_path / "ref", model, tok, MEM, CFG, progress=False)
    assert _snapshot(tmp_path / "bank") == _snapshot(tmp_path / "ref")
    _same_memories(tmp_path / "bank", tmp_path / "ref")


def test_writer_failing_beside_the_embedder_raises_its_own_error_and_resumes(
    tmp_path, model, tok, monkeypatch
) -> None:
    real_fill, calls = MemoryStore.fill, []

    def fill_then_fail(self, ids, mem):
        if calls:
            raise OSError("No space left on device")
        calls.append(ids)
        return real_fill(self, ids, mem)

    monkeypatch.setattr(MemoryStore, "fill", fill_then_fail)
    beside = dataclasses.replace(CFG, overlap_embedding="on")
    with pytest.raises(OSError, match="No space left"):
        build(DOCS, tmp_path / "bank", model, tok, MEM, beside, progress=False)
    monkeypatch.undo()
    (tmp_path / "bank" / "embeddings.partial").mkdir(exist_ok=True)
    (tmp_path / "bank" / "embeddings.partial" / ".000000000.tmp.npy").write_bytes(b"half")  # as after a kill
    summary = build(DOCS, tmp_path / "bank", model, tok, MEM, beside, progress=False)
    assert summary.resumed and summary.written == summary.references - len(calls[0])
    build(DOCS, tmp_path / "ref", model, tok, MEM, CFG, progress=False)
    assert _snapshot(tmp_path / "bank") == _snapshot(tmp_path / "ref")
    _same_memories(tmp_path / "bank", tmp_path / "ref")


def test_other_model_is_refused_with_both_fingerprints(tmp_path, model, tok) -> None:
    """The refusal names both fingerprints and the model to load instead: the one the build named."""
    named = dataclasses.replace(CFG, model="my-reader")
    build(DOCS[:2], tmp_path / "bank", model, tok, MEM, named, progress=False)
    other = tiny_model(seed=22, vocab_size=len(tok))
    with pytest.raises(FingerprintMismatchError) as e:
        StoreRetriever.open(tmp_path / "bank", other, tok)
    stored = json.loads((tmp_path / "bank" / "manifest.json").read_text())["memory_fingerprint"]
    assert stored in str(e.value) and "--model my-reader" in str(e.value)
    with MemoryStore.open(tmp_path / "bank") as store:
        assert store.info()["built_with"] == "my-reader"


def test_documents_added_replaced_deleted(tmp_path, model, tok) -> None:
    build(DOCS[:3], tmp_path / "bank", model, tok, MEM, CFG, progress=False)
    retr = StoreRetriever.open(tmp_path / "bank", model, tok, writable=True)
    retr.add_documents(
        [Document("ostrel", "The Ostrel river flows through Dresk into the Amber Sea.", "Ostrel")]
    )
    assert retr.search(["Which river flows through Dresk?"], 1)[0][0].doc_id == "ostrel"
    retr.add_documents([Document("ostrel", "The Ostrel is a canal dug in 1850 between two lakes.", "Ostrel")])
    hit = retr.search(["Ostrel canal"], 1)[0][0]
    assert hit.doc_id == "ostrel" and "canal" in hit.text
    assert retr.delete_documents(["ostrel"]) >= 1
    for hits in retr.search(["Ostrel river canal Dresk", "Ostrel"], 3):
        assert "ostrel" not in [h.doc_id for h in hits]
    retr.store.close()
    # a reopened bank agrees (index saved with the store)
    again = StoreRetriever.open(tmp_path / "bank", model, tok)
    assert "ostrel" not in [h.doc_id for h in again.search(["Ostrel"], 3)[0]]


def test_cold_start_writes_on_first_retrieval(tmp_path, model, tok) -> None:
    cold = BuildConfig(**{**CFG.__dict__, "cold": True})
    build(DOCS, tmp_path / "bank", model, tok, MEM, cold, progress=False)
    with MemoryStore.open(tmp_path / "bank") as s:
        assert s.counts()["records"] == 0
    retr = StoreRetriever.open(tmp_path / "bank", model, tok, writable=True)
    hit = retr.search(["Mount Fjarn"], 1)[0][0]
    m1 = retr.memories([hit.ref_id])
    assert retr.store.counts()["records"] == 1
    assert torch.equal(retr.memories([hit.ref_id]).k, m1.k) and retr.cache.hits == 1


def test_lru_cache_evicts_least_recent() -> None:
    c = MemoryCache(2)
    t = (torch.zeros(1), torch.zeros(1), torch.zeros(1))
    c.put(1, t)
    c.put(2, t)
    assert c.get(1) is not None  # 1 is now the most recent
    c.put(3, t)
    assert c.get(2) is None and c.get(1) is not None and c.get(3) is not None
    off = MemoryCache(0)
    off.put(1, t)
    assert off.get(1) is None


_BUILD_SCRIPT = """
import sys, torch
sys.path.insert(0, {tests!r})
from conftest import tiny_model
from memory3.checkpoint import load_bundled_tokenizer
from memory3.memory.build import BuildConfig, build
from memory3.memory.codec import CodecConfig
from memory3.memory.ingest import Document
from memory3.config import MemoryConfig
from memory3.retrieval.index import IndexConfig
tok = load_bundled_tokenizer()
model = tiny_model(seed=21, vocab_size=len(tok))
docs = [Document(f"d{{i}}", f"Document number {{i}} says the value of item {{i}} is {{i * 7}}. " * 3) for i in range(120)]
mem = MemoryConfig(reference_tokens=32, kept_tokens=4, chunk_tokens=16, memories_per_chunk=2)
cfg = BuildConfig(codec=CodecConfig(kind="none"), index=IndexConfig(kind="flat"), embedder="hashing-64", batch_size=2)
build(docs, sys.argv[1], model, tok, mem, cfg, progress=False)
"""


def _snapshot(path: Path) -> dict:
    with MemoryStore.open(path) as s:
        ids = s.live_ids().tolist()
        return {
            "ids": ids,
            "refs": [(r.doc_id, r.chunk, r.text) for r in s.refs(ids)],
            "counts": s.counts(),
        }


def _same_memories(a: Path, b: Path) -> None:
    """The same memories up to kernel rounding (a batch written by a new process may differ in
    the last bits on some CPUs), so the same keys and values to 1e-2 of their scale."""
    with MemoryStore.open(a) as sa, MemoryStore.open(b) as sb:
        ids = sa.live_ids().tolist()
        ma, mb = sa.get(ids), sb.get(ids)
    assert torch.equal(ma.positions, mb.positions)
    for x, y in ((ma.k, mb.k), (ma.v, mb.v)):
        assert (x - y).abs().max() <= 1e-2 * x.abs().max()


@pytest.mark.slow
def test_build_killed_with_sigkill_resumes_to_the_same_store(tmp_path) -> None:
    script = tmp_path / "build.py"
    script.write_text(_BUILD_SCRIPT.format(tests=str(Path(__file__).parents[1])))  # where conftest.py is
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(script), str(tmp_path / "ref")], check=True, env=env)
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "bank")], env=env)
    deadline = time.time() + 120
    while time.time() < deadline:  # kill it in the middle of writing memories
        db = tmp_path / "bank" / "meta.sqlite"
        if db.exists():
            try:
                with MemoryStore.open(tmp_path / "bank") as s:
                    if s.counts()["records"] >= 20:
                        break
            except Exception:
                pass
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with MemoryStore.open(tmp_path / "bank") as s:
        partial = s.counts()
    assert 0 < partial["records"] < _snapshot(tmp_path / "ref")["counts"]["records"]
    subprocess.run([sys.executable, str(script), str(tmp_path / "bank")], check=True, env=env)
    assert _snapshot(tmp_path / "bank") == _snapshot(tmp_path / "ref")
    _same_memories(tmp_path / "bank", tmp_path / "ref")


@pytest.mark.slow
def test_torchrun_build_with_two_processes(tmp_path, model, tok) -> None:
    ckpt = save_checkpoint(model, tmp_path / "ckpt", tok)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(
        "".join(json.dumps({"id": d.doc_id, "text": d.text, "title": d.title}) + "\n" for d in DOCS)
    )
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
        "-m", "memory3", "build", str(corpus), "--out", str(tmp_path / "bank"), "--model", str(ckpt),
        "--dtype", "float32", "--codec", "none", "--embedder", "hashing-64", "--index", "flat",
    ]  # fmt: skip
    run_checked(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    with MemoryStore.open(tmp_path / "bank") as s:
        assert s.verify().ok
        docs = {r.doc_id for r in s.refs(s.live_ids().tolist())}
    assert docs == {d.doc_id for d in DOCS}


@pytest.mark.slow
def test_server_over_a_real_bank_sees_document_changes(tmp_path, model, tok) -> None:
    """The HTTP server with a StoreRetriever: a document added through /v1/documents is read by
    the next answer, and gone after DELETE."""
    import httpx

    from memory3.serve import BackgroundServer, ServerConfig, create_app

    build(DOCS[:3], tmp_path / "bank", model, tok, MEM, CFG, progress=False)
    retr = StoreRetriever.open(tmp_path / "bank", model, tok, writable=True)
    gen = Generator(model, tok, retr, MEM, chat=False)
    app = create_app(gen, {"bank": retr}, ServerConfig(model_name="tiny"))
    with BackgroundServer(app) as s:
        body = {"model": "tiny", "prompt": "Which river flows through Dresk?", "max_tokens": 4}

        def docs_read() -> set[str]:
            r = httpx.post(s.url + "/v1/completions", json=body, timeout=60)
            r.raise_for_status()
            return {ref["doc_id"] for ref in r.json()["choices"][0]["references"]}

        assert "ostrel" not in docs_read()
        doc = {
            "id": "ostrel",
            "title": "Ostrel",
            "text": "The Ostrel river flows through Dresk into the Amber Sea.",
        }
        r = httpx.post(s.url + "/v1/documents", json={"documents": [doc]}, timeout=60)
        assert r.status_code == 201, r.text
        assert "ostrel" in docs_read()
        assert httpx.delete(s.url + "/v1/documents/ostrel", timeout=60).status_code == 200
        assert "ostrel" not in docs_read()
        # a batch is written in steps of 4 documents, one scheduler operation each, the first
        # one checking the ids and the last one committing: 6 documents are 2 operations
        ops = app.state.scheduler.stats.operations
        many = [
            {"id": f"n{i}", "text": f"Note {i}: the Ostrel bridge was rebuilt in {1900 + i}."}
            for i in range(6)
        ]
        assert httpx.post(s.url + "/v1/documents", json={"documents": many}, timeout=60).status_code == 201
        assert app.state.scheduler.stats.operations - ops == 2
        assert (
            httpx.post(s.url + "/v1/documents", json={"documents": many[:1]}, timeout=60).status_code == 409
        )
    retr.store.close()


@pytest.mark.slow
def test_build_cli_writes_memories_with_the_given_kept_tokens_and_selection(tmp_path, model, tok) -> None:
    from memory3.cli import main

    ckpt = save_checkpoint(model, tmp_path / "ckpt", tok)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": d.doc_id, "text": d.text}) + "\n" for d in DOCS[:3]))
    argv = ["build", str(corpus), "--out", str(tmp_path / "bank"), "--model", str(ckpt), "--dtype", "float32"]
    argv += ["--codec", "none", "--embedder", "hashing-64", "--index", "flat", "--kept-tokens", "4"]
    assert main([*argv, "--selection", "value-attention"]) == 0
    with MemoryStore.open(tmp_path / "bank") as s:
        assert s.manifest["memory"]["selection"] == "value-attention"
        assert s.manifest["memory"]["kept_tokens"] == 4
        assert s.verify().ok


def test_memory_layers_parse_and_print_back() -> None:
    from memory3.config import layer_span, parse_memory_layers

    assert parse_memory_layers("all", 30) == tuple(range(30))
    assert parse_memory_layers("half", 30) == tuple(range(15))
    assert parse_memory_layers("first:20", 30) == tuple(range(20))
    assert parse_memory_layers("0-9, 20-29", 30) == (*range(10), *range(20, 30))
    assert layer_span(parse_memory_layers("0-3,5,7-8", 30)) == "0-3,5,7-8"
    for bad in ("last:3", "0-", "x", ""):
        with pytest.raises(ValueError, match="memory_layers must be"):
            parse_memory_layers(bad, 30)
    with pytest.raises(ValueError, match="this model has layers 0-29"):
        parse_memory_layers("0-30", 30)


@pytest.mark.slow
def test_bank_built_in_other_layers_is_read_in_them(tmp_path, model, tok, capsys) -> None:
    """`--memory-layers` at build: the bank's memories are of those layers; a model that reads in
    other layers reads the bank in the bank's (its fingerprint follows), and is refused with the fix
    where other layers were asked for; two banks of different layers are not served together."""
    from memory3.checkpoint import load_pretrained
    from memory3.cli import main
    from memory3.cli.serve import open_stores
    from memory3.retrieval.open import open_retriever

    ckpt = save_checkpoint(model, tmp_path / "ckpt", tok)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": d.doc_id, "text": d.text}) + "\n" for d in DOCS[:3]))
    common = ["--model", str(ckpt), "--dtype", "float32", "--codec", "none", "--embedder", "hashing-64"]
    n_layer = model.config.n_layer
    own = tuple(load_pretrained(ckpt).model.memory_layers)
    assert own != tuple(range(n_layer))
    wide, narrow = str(tmp_path / "wide"), str(tmp_path / "narrow")
    assert main(["build", str(corpus), "--out", wide, *common, "--memory-layers", "all"]) == 0
    assert main(["build", str(corpus), "--out", narrow, *common]) == 0

    with MemoryStore.open(wide) as s:
        assert s.info()["memory_layers"] == f"0-{n_layer - 1}"
    loaded = load_pretrained(ckpt)
    before = loaded.model._memory3_fingerprint
    retriever, _ = open_retriever(loaded, store=wide)
    assert loaded.model.memory_layers == tuple(range(n_layer))
    assert retriever is not None
    hit = retriever.search(["Where is Quellmar?"], 1)[0][0]
    assert retriever.memories([hit.ref_id]).k.shape[1] == n_layer
    loaded.model.set_memory_layers(own)  # back to its own layers: its own fingerprint again
    assert loaded.model._memory3_fingerprint == before
    with pytest.raises(ValueError, match=rf"layers 0-{n_layer - 1}, not the .* asked for.*--memory-layers"):
        open_retriever(loaded, store=wide, adopt_layers=False)
    assert loaded.model.memory_layers == own  # refused: nothing changed
    with pytest.raises(ValueError, match=r"other layers.*serve them separately"):
        open_stores(loaded, [narrow, wide], [], "hashing-64")
    from memory3.retrieval.retriever import StoreRetriever

    with StoreRetriever.open(wide, loaded.model).store:  # every way in reads the bank's layers
        assert loaded.model.memory_layers == tuple(range(n_layer))
    loaded.model.set_memory_layers(own)
    speed = tmp_path / "speed.json"
    bench = ["bench", "speed", "--store", wide, *common[:4], "--batch-sizes", "1", "--modes", "memory"]
    bench += ["--caches", "warm", "--runs", "1", "--prompt-tokens", "8", "--new-tokens", "2"]
    bench += ["--out", str(speed)]
    assert main([*bench, "--no-progress"]) == 0
    assert json.loads(speed.read_text())["memory"]["memory_layers"] == f"0-{n_layer - 1}"
    argv = ["generate", "--store", wide, *common[:4], "--max-new-tokens", "2"]
    assert main([*argv, "Where is Quellmar?"]) == 0
    capsys.readouterr()
    assert main([*argv, "--memory-layers", "0", "Where is Quellmar?"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert "not the 0 asked for" in err[-1] and "--memory-layers" in err[-1]


@pytest.mark.slow
def test_generate_kept_tokens_writes_a_kb_and_must_match_a_bank(tmp_path, model, tok, capsys) -> None:
    """`--kept-tokens` on generate/serve: a --kb's memories are written with it; a --store was
    written when it was built, so asking it for another setting is refused with the fix, not
    read with the wrong shapes."""
    from memory3.checkpoint import load_pretrained
    from memory3.cli import main
    from memory3.cli.serve import open_stores
    from memory3.retrieval.open import open_retriever

    ckpt = save_checkpoint(model, tmp_path / "ckpt", tok)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": d.doc_id, "text": d.text}) + "\n" for d in DOCS[:3]))
    bank = str(tmp_path / "bank")
    model_args = ["--model", str(ckpt), "--dtype", "float32"]
    argv = ["build", str(corpus), "--out", bank, *model_args, "--codec", "none", "--embedder", "hashing-64"]
    assert main([*argv, "--index", "flat", "--kept-tokens", "4"]) == 0

    loaded = load_pretrained(ckpt)
    assert loaded.memory_config.kept_tokens != 2
    retriever, cfg = open_retriever(loaded, kb=corpus, embedder="hashing-64", kept_tokens=2)
    assert cfg.kept_tokens == 2 and cfg.selection == loaded.memory_config.selection
    assert retriever is not None and retriever.memories([0]).k.shape[3] == 2
    _, cfg = open_retriever(loaded, store=bank, kept_tokens=4)  # what it was built with: fine
    assert cfg.kept_tokens == 4
    with pytest.raises(ValueError, match=r"keeps 4 tokens per head.*memory3 build .*--kept-tokens 2"):
        open_retriever(loaded, store=bank, kept_tokens=2)
    with pytest.raises(ValueError, match=r"selection 'attention'.*--selection random"):
        open_stores(loaded, [bank], [], "hashing-64", selection="random")
    _, cfg = open_stores(loaded, [], [], "hashing-64", kept_tokens=2)  # no store: the override
    assert cfg.kept_tokens == 2

    gen = ["generate", "Where is Dresk?", *model_args, "--max-new-tokens", "2", "--no-chat"]
    capsys.readouterr()
    assert main([*gen, "--store", bank, "--kept-tokens", "2"]) == 2
    assert "--kept-tokens 2" in capsys.readouterr().err
    assert main([*gen, "--kb", str(corpus), "--embedder", "hashing-64", "--kept-tokens", "2"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[0])["references"]
    with MemoryStore.open(bank) as s:  # refusing touched nothing
        assert s.verify().ok and s.manifest["memory"]["kept_tokens"] == 4


@pytest.mark.slow
def test_build_with_the_transform_codec_uses_the_models_calibration(
    tmp_path, model, tok, caplog, capsys
) -> None:
    """`--codec tc<bits>` fits a transform codec on the bank's memories, with its bits allocated
    by the calibration saved beside the model, or by mean squared error with a warning that names
    `memory3 train calibrate`; the bank verifies and answers through it."""
    import numpy as np

    from memory3.cli import main
    from memory3.memory.transform import CALIBRATION_FILE, CodecCalibration

    ckpt = save_checkpoint(model, tmp_path / "ckpt", tok)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": d.doc_id, "text": d.text}) + "\n" for d in DOCS))
    argv = ["build", str(corpus), "--model", str(ckpt), "--dtype", "float32", "--codec", "tc32"]
    argv += ["--embedder", "hashing-64", "--index", "flat", "--kept-tokens", "4"]
    with caplog.at_level("WARNING"):
        assert main([*argv, "--out", str(tmp_path / "mse")]) == 0
    assert "memory3 train calibrate" in caplog.text
    Lm, K, D = len(model.memory_layers), model.config.n_kv_head, model.config.head_dim
    fisher = np.zeros((Lm, K, D, D))
    fisher[-1] = np.eye(D)  # only the last memory layer matters to this model's answers
    cal = tmp_path / "cal.safetensors"
    CodecCalibration(fisher, fisher, {"test": True}).save(cal)
    assert main([*argv, "--out", str(tmp_path / "x"), "--calibration", str(tmp_path / "nothing")]) == 2
    assert "no calibration at" in capsys.readouterr().err
    assert main([*argv, "--codec", "default", "--out", str(tmp_path / "x"), "--calibration", str(cal)]) == 2
    assert "for transform codecs" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert main([*argv, "--out", str(tmp_path / "given"), "--calibration", str(cal)]) == 0
    cal.rename(ckpt / CALIBRATION_FILE)  # found beside the model
    assert main([*argv, "--out", str(tmp_path / "fisher")]) == 0
    with MemoryStore.open(tmp_path / "given") as a, MemoryStore.open(tmp_path / "fisher") as b:
        assert a.codec.fingerprint == b.codec.fingerprint
    for name, metric in (("mse", "mse"), ("fisher", "fisher")):
        with MemoryStore.open(tmp_path / name) as s:
            assert s.codec.config.kind == "transform" and s.codec.transform_meta["metric"] == metric
            assert s.verify().ok
            assert s.codec.record_bytes < s.codec.raw_bytes / 7  # 2 bits per number and positions
    from memory3.checkpoint import load_pretrained

    loaded = load_pretrained(ckpt)
    retr = StoreRetriever.open(tmp_path / "fisher", loaded.model, tok)
    got = retr.memories(retr.store.live_ids()[:2].tolist())
    assert got.k[:, :-1].abs().sum() > 0  # layers without bits decode to their mean, not to zeros
    out = Generator(loaded.model, tok, retr, retr.memory_config, chat=False)
    answers = out.generate(["Where is Dresk?"], config=GenerationConfig(max_new_tokens=4))
    assert len(answers[0].token_ids) > 0
    retr.store.close()
