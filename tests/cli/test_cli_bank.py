"""The bank commands as a user runs them: every verb with relative and absolute paths, one-line
errors for every damaged file, read-only commands that write nothing, permissions that follow
the umask, and `memory3 serve --writable` started as a real process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from conftest import free_port, tiny_model
from memory3.checkpoint import load_bundled_tokenizer, save_checkpoint
from memory3.cli import main
from memory3.errors import Memory3Error, StoreCorruptError, StoreError, StoreLockedError
from memory3.memory.store import MemoryStore
from memory3.retrieval.retriever import StoreRetriever, verify_bank

BUILD = [
    "--dtype",
    "float32",
    "--codec",
    "none",
    "--embedder",
    "hashing-64",
    "--index",
    "flat",
    "--no-progress",
]


def _docs(n: int, tag: str = "d") -> list[dict]:
    return [
        {
            "id": f"{tag}{i}",
            "title": f"Item {tag}{i}",
            "text": f"Record {tag}{i}: the weight of crate {tag}{i} is {i * 7 + 3} kilograms.",
        }
        for i in range(n)
    ]


def _jsonl(path: Path, docs: list[dict]) -> Path:
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Path:
    """A tiny checkpoint, a corpus and a bank built from it (copied by tests that damage it)."""
    root = tmp_path_factory.mktemp("cli")
    tok = load_bundled_tokenizer()
    save_checkpoint(
        tiny_model(seed=3, vocab_size=len(tok), bos_token_id=1, eos_token_id=2), root / "tiny", tok
    )
    _jsonl(root / "docs.jsonl", _docs(12))
    _jsonl(root / "more.jsonl", _docs(3, "m"))
    old = Path.cwd()
    os.chdir(root)
    try:
        assert main(["build", "docs.jsonl", "--out", "bank", "--model", "tiny", *BUILD]) == 0
    finally:
        os.chdir(old)
    return root


def _bank_copy(setup: Path, tmp_path: Path, name: str = "bank") -> Path:
    dst = tmp_path / name
    shutil.copytree(setup / "bank", dst)
    return dst


@pytest.mark.parametrize("how", ["relative", "absolute"])
@pytest.mark.slow
def test_every_bank_verb_takes_relative_and_absolute_paths(setup, tmp_path, monkeypatch, capsys, how) -> None:
    work = tmp_path / "work dir"  # a space in the path too
    work.mkdir()
    shutil.copy(setup / "docs.jsonl", work / "docs.jsonl")
    shutil.copy(setup / "more.jsonl", work / "more.jsonl")
    monkeypatch.chdir(work if how == "relative" else setup)  # absolute: run from elsewhere
    p = (lambda name: name) if how == "relative" else (lambda name: str(work / name))
    model = ["--model", p("tiny")]
    shutil.copytree(setup / "tiny", work / "tiny")
    assert main(["build", p("docs.jsonl"), "--out", p("bank"), *model, *BUILD]) == 0
    capsys.readouterr()

    def run(*argv: str) -> dict:
        code = main(list(argv))
        out = capsys.readouterr().out
        assert code == 0, f"memory3 {' '.join(argv)} exited {code}"
        return json.loads(out)

    info = run("store", "info", p("bank"))
    assert info["live"] == 12 and info["built_with"] == str(work / "tiny")  # a directory: found from anywhere
    assert run("store", "verify", p("bank"))["ok"]
    row = run(
        "generate", "Record d4: the weight of crate d4", *model, "--store", p("bank"), "--max-new-tokens", "3"
    )
    assert row["references"][0][0]["title"] == "Item d4"
    assert run("store", "add", p("bank"), p("more.jsonl"), *model, "--dtype", "float32")["documents"] == 3
    assert run("store", "delete", p("bank"), "d0", "m1", *model)["deleted_documents"] == 2
    assert run("store", "reindex", p("bank"), "--no-progress")["indexed"] == 13
    assert run("store", "compact", p("bank"))["records"] == 13
    report = run("store", "verify", p("bank"))
    assert report["ok"] and report["counts"]["index_entries"] == 13
    questions = [{"question": "How heavy is crate d4?", "answers": ["31"], "doc_id": "d4"},
                 {"question": "How heavy is crate m2?", "answers": ["17"], "doc_id": "m2"}]  # fmt: skip
    _jsonl(work / "questions.jsonl", questions)
    qa = ["eval", "qa", "--set", p("questions.jsonl"), "--store", p("bank"), *model, "--dtype", "float32"]
    out = work / "qa.json"
    assert (
        main([*qa, "--modes", "memory", "--max-new-tokens", "2", "--no-progress", "--out", p("qa.json")]) == 0
    )
    capsys.readouterr()
    assert out.exists() and json.loads(out.read_text())


@pytest.mark.slow
def test_read_only_commands_write_nothing_into_the_bank(setup, tmp_path, capsys) -> None:
    bank = _bank_copy(setup, tmp_path)
    before = sorted(str(p.relative_to(bank)) for p in bank.rglob("*"))
    mtimes = {p: p.stat().st_mtime_ns for p in bank.rglob("*") if p.is_file()}
    for argv in (
        ["store", "info", str(bank)],
        ["store", "verify", str(bank)],
        [
            "generate",
            "crate d3",
            "--model",
            str(setup / "tiny"),
            "--store",
            str(bank),
            "--max-new-tokens",
            "2",
        ],
    ):
        assert main(argv) == 0
    capsys.readouterr()
    assert sorted(str(p.relative_to(bank)) for p in bank.rglob("*")) == before  # no -wal, no -shm
    assert {p: p.stat().st_mtime_ns for p in bank.rglob("*") if p.is_file()} == mtimes


@pytest.mark.slow
def test_a_bank_is_made_with_the_modes_the_umask_allows(setup, tmp_path, capsys) -> None:
    old = os.umask(0o002)
    try:
        assert (
            main(
                [
                    "build",
                    str(setup / "docs.jsonl"),
                    "--out",
                    str(tmp_path / "b"),
                    "--model",
                    str(setup / "tiny"),
                    *BUILD,
                ]
            )
            == 0
        )
    finally:
        os.umask(old)
    capsys.readouterr()
    bank = tmp_path / "b"
    for d in (bank, bank / "index", bank / "shards", bank / "codec"):
        assert d.stat().st_mode & 0o777 == 0o775, d
    assert (bank / "shards" / "00000.bin").stat().st_mode & 0o777 == 0o664


def _flip(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGES = {
    "manifest cut": (
        lambda b: (b / "manifest.json").write_text((b / "manifest.json").read_text()[:40]),
        "manifest.json",
    ),
    "manifest field missing": (
        lambda b: (b / "manifest.json").write_text(
            json.dumps(
                {
                    k: v
                    for k, v in json.loads((b / "manifest.json").read_text()).items()
                    if k != "record_bytes"
                }
            )
        ),
        "manifest.json",
    ),
    "metadata missing": (lambda b: (b / "meta.sqlite").unlink(), "meta.sqlite"),
    "metadata damaged": (lambda b: (b / "meta.sqlite").write_bytes(b"\x00garbage" * 600), "meta.sqlite"),
    "shard flipped": (lambda b: _flip(b / "shards" / "00000.bin", 3000), "00000.bin"),
    "shard truncated": (lambda b: os.truncate(b / "shards" / "00000.bin", 5000), "00000.bin"),
    "shard missing": (lambda b: (b / "shards" / "00000.bin").unlink(), "00000.bin"),
    "index missing": (lambda b: shutil.rmtree(b / "index"), "index"),
    "index file damaged": (lambda b: (b / "index" / "index.faiss").write_bytes(b"junk" * 10), "index.faiss"),
    "index ids damaged": (lambda b: (b / "index" / "ids.npy").write_bytes(b"junk"), "ids.npy"),
    "index description damaged": (lambda b: (b / "index" / "index.json").write_text("{"), "index.json"),
    "index lacks entries": (lambda b: _drop_from_index(b, 2), "index"),
}


def _drop_from_index(bank: Path, n: int) -> None:
    """An index that is whole but lacks `n` references (what a crash after a commit leaves)."""
    from memory3.retrieval.index import VectorIndex

    index = VectorIndex.load(bank / "index")
    index.remove(index.ids()[:n])
    index.save(bank / "index")


@pytest.mark.parametrize("damage", list(DAMAGES))
@pytest.mark.slow
def test_each_damaged_file_is_named_by_verify_and_refused_in_one_line(
    setup, tmp_path, capsys, caplog, damage
) -> None:
    bank = _bank_copy(setup, tmp_path)
    do, name = DAMAGES[damage]
    do(bank)
    code = main(["store", "verify", str(bank)])
    out, err = capsys.readouterr()
    assert code == 1
    said = out + err
    assert name in said, said
    assert "Traceback" not in said
    if out:
        assert not json.loads(out)["ok"]
    else:
        assert err.startswith("error: ") and err.count("\n") == 1, err

    prompt = "Record d1: the weight of crate d1"  # reads ref 2, the damaged record of "shard flipped"
    code = main(
        ["generate", prompt, "--model", str(setup / "tiny"), "--store", str(bank), "--max-new-tokens", "2"]
    )
    out, err = capsys.readouterr()
    if damage == "index lacks entries":  # what a crash after a commit leaves: repaired on open
        assert code == 0 and "repaired in memory" in caplog.text
        return
    assert code != 0 and "Traceback" not in err
    lines = [ln for ln in err.splitlines() if not ln.startswith("INFO ")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and (name in lines[0] or "index" in lines[0]), (
        err
    )

    # The server opens banks the same way: refused at start-up, in one line (flipped bytes are
    # found when a request reads them: see test_a_request_reading_a_damaged_record_gets_a_json_error).
    if damage != "shard flipped":
        code = main(
            ["serve", "--model", str(setup / "tiny"), "--store", str(bank), "--port", str(free_port())]
        )
        err = capsys.readouterr().err
        assert code != 0 and "Traceback" not in err and err.strip().splitlines()[-1].startswith("error: ")


@pytest.mark.slow
def test_a_request_reading_a_damaged_record_gets_a_json_error(setup, tmp_path) -> None:
    from memory3.checkpoint import load_pretrained
    from memory3.generate import Generator
    from memory3.serve import BackgroundServer, ServerConfig, create_app

    bank = _bank_copy(setup, tmp_path)
    _flip(bank / "shards" / "00000.bin", 3000)  # record 1 = ref 2 = document d1
    loaded = load_pretrained(str(setup / "tiny"))
    retriever = StoreRetriever.open(bank, loaded.model, loaded.tokenizer)
    gen = Generator(loaded.model, loaded.tokenizer, None, retriever.memory_config)
    app = create_app(gen, {"kb": retriever}, ServerConfig(model_name="tiny"))
    with BackgroundServer(app) as server, httpx.Client(base_url=server.url, timeout=60) as http:
        r = http.post(
            "/v1/completions",
            json={"model": "tiny", "prompt": "Record d1: the weight of crate d1", "max_tokens": 2},
        )
        assert r.status_code == 500
        assert "fails its checksum" in r.json()["error"]["message"]
        ok = http.post(
            "/v1/completions",
            json={"model": "tiny", "prompt": "Record d7 crate d7", "max_tokens": 2, "memory": {"k": 1}},
        )
        assert ok.status_code == 200  # other records still serve


def test_errors_form_one_hierarchy() -> None:
    from memory3.checkpoint import CheckpointError
    from memory3.memory.codec import CodecError
    from memory3.retrieval.index import IndexFormatError

    for cls in (
        StoreError,
        StoreCorruptError,
        StoreLockedError,
        CheckpointError,
        CodecError,
        IndexFormatError,
    ):
        assert issubclass(cls, Memory3Error)
    assert issubclass(CodecError, ValueError) and issubclass(StoreError, RuntimeError)
    assert StoreLockedError.http_status == 409 and IndexFormatError.exit_code == 1


@pytest.mark.slow
def test_small_cli_errors_are_said_before_the_model_loads(setup, tmp_path, capsys) -> None:
    (tmp_path / "empty.jsonl").write_text("")
    nowhere = ["--model", str(tmp_path / "no-model")]  # would fail if it were loaded
    assert main(["build", str(tmp_path / "empty.jsonl"), "--out", str(tmp_path / "b"), *nowhere]) == 2
    assert "no documents to build" in capsys.readouterr().err
    bank = _bank_copy(setup, tmp_path)
    assert main(["store", "add", str(bank), str(tmp_path / "empty.jsonl"), *nowhere]) == 2
    assert "no documents to add" in capsys.readouterr().err
    (tmp_path / "afile").write_text("x")
    assert main(["build", str(setup / "docs.jsonl"), "--out", str(tmp_path / "afile"), *nowhere]) == 2
    assert "is a file" in capsys.readouterr().err
    assert main(["store", "delete", str(bank), "d1", "nope", "--model", str(setup / "tiny")]) == 1
    out, err = capsys.readouterr()
    assert json.loads(out) == {"deleted_documents": 1, "not_found": ["nope"]} and "nope" in err


@pytest.mark.slow
def test_a_second_writer_is_told_who_holds_the_bank(setup, tmp_path, capsys) -> None:
    bank = _bank_copy(setup, tmp_path)
    with MemoryStore.open(bank, readonly=False):
        code = main(["store", "add", str(bank), str(setup / "more.jsonl"), "--model", str(setup / "tiny")])
        err = capsys.readouterr().err
        assert code == 1 and f"pid {os.getpid()}" in err and err.count("\n") == 1
        assert main(["store", "info", str(bank)]) == 0  # reading needs no lock
    capsys.readouterr()


def _wait_for(url: str, proc: subprocess.Popen, seconds: float = 300) -> None:
    t0 = time.monotonic()
    while True:
        try:
            if httpx.get(url + "/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            raise AssertionError(f"the server exited {proc.returncode}: {proc.communicate()[1][-3000:]}")
        assert time.monotonic() - t0 < seconds, "the server did not come up"
        time.sleep(0.2)


@pytest.mark.slow
def test_serve_writable_changes_documents_through_the_real_command(setup, tmp_path) -> None:
    """`memory3 serve --store NAME=relative/path --writable`, started as a user starts it."""
    bank = _bank_copy(setup, tmp_path, "banks")
    port = free_port()
    cmd = [sys.executable, "-m", "memory3", "serve", "--model", str(setup / "tiny"), "--dtype", "float32",
           "--store", "kb=banks", "--writable", "--port", str(port), "--log-level", "warning"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_for(url, proc)
        http = httpx.Client(base_url=url, timeout=120)
        r = http.post("/v1/documents", json={"documents": _docs(6, "n")})
        assert r.status_code == 201, r.text
        assert [d["id"] for d in r.json()["data"]] == [f"n{i}" for i in range(6)]
        assert http.get("/v1/documents/n5").json()["text"].startswith("Record n5")
        assert http.put("/v1/documents/n5", json={"text": "Record n5: crate n5 was sold."}).status_code == 200
        assert http.delete("/v1/documents/d2").status_code == 200
        r = http.post(
            "/v1/completions",
            json={
                "model": "tiny",
                "prompt": "Record n3: the weight of crate n3",
                "max_tokens": 2,
                "memory": {"k": 1},
            },
        )
        assert r.status_code == 200 and r.json()["choices"][0]["references"][0]["doc_id"] == "n3"
        # another writer is refused, naming the server
        done = subprocess.run(
            [sys.executable, "-m", "memory3", "store", "add", "banks", str(setup / "more.jsonl"), "--model", str(setup / "tiny")],
            cwd=tmp_path, capture_output=True, text=True,
        )  # fmt: skip
        assert done.returncode == 1 and f"pid {proc.pid}" in done.stderr and "Traceback" not in done.stderr
        assert "faiss" not in done.stderr  # no loader chatter
    finally:
        proc.terminate()
        proc.wait(60)
    report = verify_bank(bank)
    assert report.ok, report.errors
    with MemoryStore.open(bank) as s:
        docs = set(s.doc_ids())
    assert {f"n{i}" for i in range(6)} <= docs and "d2" not in docs

    # without --writable, document changes are refused with what to do
    port = free_port()
    cmd[cmd.index("--port") + 1] = str(port)
    cmd.remove("--writable")
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_for(url, proc)
        r = httpx.post(url + "/v1/documents", json={"documents": _docs(1, "x")}, timeout=60)
        assert r.status_code == 400 and "--writable" in r.json()["error"]["message"]
    finally:
        proc.terminate()
        proc.wait(60)


@pytest.mark.slow
def test_embedding_in_a_batch_is_close_to_alone_and_ranks_the_same(setup) -> None:
    """Batched matmuls differ in the last bits from CPU to CPU (AMX, AVX-512-BF16): the promise
    is the same retrieval, not the same bytes."""
    from memory3.retrieval.embed import get_embedder

    emb = get_embedder("minilm")
    texts = [d["text"] for d in _docs(12)] + ["Paris is the capital of France.", "A cat sat on the mat."]
    together = emb.embed(texts)
    alone = np.concatenate([emb.embed([t]) for t in texts])
    assert np.abs(together - alone).max() < 5e-3
    queries = emb.embed(["how heavy is crate d4", "capital of France"])
    assert (np.argsort(-queries @ together.T, 1)[:, :3] == np.argsort(-queries @ alone.T, 1)[:, :3]).all()
