"""The fault matrix: `memory3 build`, `memory3 store add` and an HTTP document batch killed with
SIGKILL at each moment of a write where a kill matters (memory3.faults crash points), then
restarted. Each time: `verify` finds nothing wrong, no document is lost or unfindable, and every
batch of documents is there whole or not at all."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from test_cli_bank import _wait_for

from conftest import free_port, tiny_model
from memory3.checkpoint import load_bundled_tokenizer, load_pretrained, save_checkpoint
from memory3.faults import ENV
from memory3.memory.store import MemoryStore
from memory3.retrieval.retriever import StoreRetriever, verify_bank

pytestmark = pytest.mark.slow

BUILD = ["--dtype", "float32", "--codec", "none", "--embedder", "hashing-64", "--index", "flat",
         "--batch-size", "4", "--overlap-embedding", "off", "--no-progress"]  # fmt: skip


def _docs(n: int, tag: str) -> list[dict]:
    return [
        {
            "id": f"{tag}{i}",
            "title": f"{tag}{i}",
            "text": f"Entry {tag}{i}: the lamp {tag}{i} burns {i * 11 + 5} hours a night.",
        }
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("faults")
    tok = load_bundled_tokenizer()
    save_checkpoint(
        tiny_model(seed=5, vocab_size=len(tok), bos_token_id=1, eos_token_id=2), root / "tiny", tok
    )
    for name, docs in (("base", _docs(12, "b")), ("batch", _docs(5, "n"))):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    done = _memory3(root, "build", "base.jsonl", "--out", "bank", "--model", "tiny", *BUILD)
    assert done.returncode == 0, done.stderr
    return root


def _memory3(cwd: Path, *argv: str, crash: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop(ENV, None)
    if crash:
        env[ENV] = crash
    return subprocess.run(
        [sys.executable, "-m", "memory3", *argv],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _check_bank(bank: Path, model_dir: Path, must_have: set[str], batch: set[str]) -> set[str]:
    """verify is ok; every document in `must_have` is there; the batch is whole or absent; every
    document there is found by a question quoting it. Returns the documents there."""
    report = verify_bank(bank)
    assert report.ok, report.errors
    with MemoryStore.open(bank) as s:
        docs = set(s.doc_ids())
        assert s.counts()["pending"] == 0
    assert must_have <= docs, must_have - docs
    assert batch <= docs or not (batch & docs), f"a batch was cut: {sorted(batch & docs)} of {sorted(batch)}"
    loaded = load_pretrained(str(model_dir))
    r = StoreRetriever.open(bank, loaded.model, loaded.tokenizer)
    try:
        with MemoryStore.open(bank) as s:
            texts = {ref.doc_id: ref.text for ref in s.refs(s.live_ids().tolist())}
        hits = r.search(list(texts.values()), 1)
        assert [h[0].doc_id for h in hits] == list(texts), "a document is in the bank but not found"
    finally:
        r.store.close()
    return docs


BUILD_POINTS = [
    "build.registered",  # references registered, no memory written
    "store.fill_records_written:2",  # a batch's records on disk, not committed
    "build.filled:2",  # two batches committed
    "build.filled:3",  # every memory written, nothing embedded
    "build.embedded",  # embeddings saved, no index
    "index.written",  # the index written aside
    "build.index_saved",  # the index in place, the manifest not told
]


@pytest.mark.parametrize("point", BUILD_POINTS)
def test_build_killed_at_each_point_resumes_to_a_whole_bank(root, tmp_path, point) -> None:
    shutil.copytree(root / "tiny", tmp_path / "tiny")
    shutil.copy(root / "base.jsonl", tmp_path)
    argv = ["build", "base.jsonl", "--out", "bank", "--model", "tiny", *BUILD]
    killed = _memory3(tmp_path, *argv, crash=point)
    assert killed.returncode == -signal.SIGKILL, (point, killed.returncode, killed.stderr[-2000:])
    again = _memory3(tmp_path, *argv)
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads(again.stdout)["resumed"]
    _check_bank(tmp_path / "bank", tmp_path / "tiny", {f"b{i}" for i in range(12)}, set())


ADD_POINTS = [
    "store.batch_records_written:2",  # two documents' records on disk, no row
    "store.batch_before_commit",  # rows inserted in the open transaction
    "batch.committed",  # committed, the index not updated
    "index.written",  # the new index written aside
    "index.moved_aside",  # the old index moved aside, the new one not in place
    "batch.index_saved",  # the index in place, the manifest not told
]


@pytest.mark.parametrize("point", ADD_POINTS)
def test_store_add_killed_at_each_point_is_all_or_nothing(root, tmp_path, point) -> None:
    shutil.copytree(root / "bank", tmp_path / "bank")
    batch = {f"n{i}" for i in range(5)}
    base = {f"b{i}" for i in range(12)}
    killed = _memory3(
        root, "store", "add", str(tmp_path / "bank"), "batch.jsonl", "--model", "tiny", crash=point
    )
    assert killed.returncode == -signal.SIGKILL, (point, killed.returncode, killed.stderr[-2000:])
    loaded = load_pretrained(str(root / "tiny"))
    # a reader right after the crash sees the batch whole or not at all
    reader = StoreRetriever.open(tmp_path / "bank", loaded.model, loaded.tokenizer)
    seen = {h[0].doc_id for h in reader.search([d["text"] for d in _docs(5, "n")], 1)}
    reader.store.close()
    # the restart: the next writer repairs what the crash left
    StoreRetriever.open(tmp_path / "bank", loaded.model, loaded.tokenizer, writable=True).store.close()
    there = _check_bank(tmp_path / "bank", root / "tiny", base, batch)
    assert (seen == batch) == (batch <= there)
    assert (batch <= there) == (
        point in ("batch.committed", "index.written", "index.moved_aside", "batch.index_saved")
    )
    again = _memory3(root, "store", "add", str(tmp_path / "bank"), "batch.jsonl", "--model", "tiny")
    assert again.returncode == 0, again.stderr[-2000:]
    _check_bank(tmp_path / "bank", root / "tiny", base | batch, batch)


HTTP_POINTS = [
    "store.batch_records_written:6",  # in the second step of the batch
    "store.batch_before_commit",
    "batch.committed",
    "index.written",
    "index.moved_aside",
]


def _serve(root: Path, bank: Path, crash: str | None = None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop(ENV, None)
    if crash:
        env[ENV] = crash
    cmd = [sys.executable, "-m", "memory3", "serve", "--model", "tiny", "--dtype", "float32",
           "--store", f"kb={bank}", "--writable", "--port", str(port), "--log-level", "warning"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    _wait_for(url, proc)
    return proc, url


@pytest.mark.parametrize("point", HTTP_POINTS)
def test_http_batch_killed_at_each_point_is_all_or_nothing(root, tmp_path, point) -> None:
    shutil.copytree(root / "bank", tmp_path / "bank")
    docs = _docs(10, "h")
    batch = {d["id"] for d in docs}
    proc, url = _serve(root, tmp_path / "bank", crash=point)
    try:
        with pytest.raises(httpx.TransportError):  # the server dies under the request
            httpx.post(url + "/v1/documents", json={"documents": docs}, timeout=120)
        assert proc.wait(60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    proc, url = _serve(root, tmp_path / "bank")  # the restart
    try:
        present = {
            d["id"] for d in docs if httpx.get(f"{url}/v1/documents/{d['id']}", timeout=60).status_code == 200
        }
        assert present in (set(), batch), f"a batch was cut: {sorted(present)}"
        if not present:  # nothing was acknowledged: the client sends it again
            r = httpx.post(url + "/v1/documents", json={"documents": docs}, timeout=120)
            assert r.status_code == 201, r.text
        r = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": docs[3]["text"], "max_tokens": 1, "memory": {"k": 1}}, timeout=60)  # fmt: skip
        assert r.json()["choices"][0]["references"][0]["doc_id"] == "h3"
    finally:
        proc.terminate()
        proc.wait(60)
    _check_bank(tmp_path / "bank", root / "tiny", {f"b{i}" for i in range(12)} | batch, batch)
