"""Reading a knowledge base and cutting it into references with the real SmolLM2 tokenizer."""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memory3.memory.ingest import (
    WIKIPEDIA,
    Document,
    IngestStats,
    Reference,
    chunk_document,
    chunk_documents,
    read_documents,
    read_wikipedia,
)


def write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        path.write_text(data, encoding="utf-8")
    else:
        path.write_bytes(data)
    return path


def check_chunks(doc: Document, refs: list[Reference], tok, n: int) -> None:
    """The properties every user of references relies on."""
    assert [r.ref_id for r in refs] == [f"{doc.doc_id}#{i}" for i in range(len(refs))]
    for r in refs:
        assert 1 <= len(r.token_ids) <= n
        assert r.doc_id == doc.doc_id and r.title == doc.title
        assert r.text == tok.decode(list(r.token_ids), clean_up_tokenization_spaces=False)
        assert tok.bos_token_id not in r.token_ids and tok.eos_token_id not in r.token_ids
    assert "".join(doc.text.split()) == "".join("".join(r.text for r in refs).split())


# ---- reading --------------------------------------------------------------------------------------


def test_reads_text_markdown_jsonl_and_directories(tmp_path: Path) -> None:
    kb = tmp_path / "kb"
    write(kb / "a.txt", "Plain text.\r\nSecond line.\n")
    write(kb / "notes" / "b.md", "---\ntitle: 'From front matter'\n---\n# Heading\n\nBody text.")
    write(kb / "notes" / "c.markdown", "# The Title\n\nMore.")
    write(
        kb / "data.jsonl",
        '{"id": "x1", "text": "First.", "title": "T1", "lang": "en"}\n'
        "\n"  # blank lines are not documents
        '{"text": "No id here.", "id": 7}\n'
        '{"text": "Line three."}\n',
    )
    write(kb / "image.png", b"\x89PNG\r\n\x1a\n\x00\x00")  # other extensions are not read
    write(kb / ".hidden" / "secret.txt", "hidden")
    stats = IngestStats()
    docs = list(read_documents(kb, stats))
    by_id = {d.doc_id: d for d in docs}
    assert list(by_id) == ["a.txt", "x1", "7", "data.jsonl:4", "notes/b.md", "notes/c.markdown"]
    assert by_id["a.txt"].text == "Plain text.\nSecond line." and by_id["a.txt"].title == "a"
    assert by_id["notes/b.md"].title == "From front matter"
    assert by_id["notes/b.md"].text == "# Heading\n\nBody text."
    assert by_id["notes/c.markdown"].title == "The Title"
    assert by_id["x1"].title == "T1" and by_id["x1"].meta == {"source": "data.jsonl", "lang": "en"}
    assert stats.documents == 6 and stats.skipped == 0 and stats.files_unsupported == 1
    # Stable ids: a second read of the same tree gives the same documents.
    assert list(read_documents(kb)) == docs
    # A single file: its name is the id root.
    assert [d.doc_id for d in read_documents(kb / "data.jsonl")] == ["x1", "7", "data.jsonl:4"]


def test_bad_input_is_skipped_counted_and_logged(tmp_path: Path, caplog) -> None:
    kb = tmp_path / "kb"
    write(kb / "01_empty.txt", "")
    write(kb / "02_blank.md", "  \n\t\n")
    write(kb / "03_binary.txt", b"abc\x00\x01\x02def")
    write(kb / "04_latin1.txt", "café au lait".encode("latin-1"))
    write(kb / "05_huge.txt", "word " * 100)
    write(
        kb / "06_lines.jsonl",
        b'{"text": "good one"}\n'
        b"{not json}\n"
        b"[1, 2, 3]\n"
        b'{"title": "no text"}\n'
        b'{"text": 42}\n'
        b'{"text": "   "}\n'
        b'{"text": "caf\xe9"}\n' + b'{"text": "' + b"x" * 300 + b'"}\n'
        b'{"text": "good two", "id": "dup"}\n'
        b'{"text": "same id again", "id": "dup"}\n'
        b'{"text": "good three"}',  # no final newline
    )
    write(kb / "07_ok.txt", "Still read after all that.")
    stats = IngestStats()
    with caplog.at_level(logging.WARNING, logger="memory3.memory.ingest"):
        docs = list(read_documents(kb, stats, max_bytes=200))
    assert [d.text for d in docs] == ["good one", "good two", "good three", "Still read after all that."]
    assert (stats.empty, stats.binary, stats.bad_encoding, stats.too_large) == (3, 1, 2, 2)
    assert (stats.malformed, stats.duplicate_id, stats.skipped, stats.documents) == (4, 1, 13, 4)
    assert "04_latin1.txt" in caplog.text and "not UTF-8" in caplog.text
    assert "06_lines.jsonl:2" in caplog.text and "invalid JSON" in caplog.text
    assert stats.as_dict()["skipped"] == 13


def test_missing_path_names_it(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        read_documents(tmp_path / "no_such_dir")


def test_bundled_wikipedia() -> None:
    docs = list(read_wikipedia(limit=3))
    assert docs[0].doc_id == "wikipedia/20th-century classical music"
    assert all(d.text and d.meta["license"] == "CC BY-SA 4.0" and d.meta["topic"] for d in docs)
    stats = IngestStats()
    assert sum(1 for _ in read_documents(WIKIPEDIA, stats)) == 10_033 == stats.documents
    # "wikipedia" is the short name, unless a path of that name exists
    assert next(iter(read_documents("wikipedia"))).doc_id == docs[0].doc_id


def test_wikipedia_short_name_yields_to_a_real_path(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "wikipedia").mkdir()
    (tmp_path / "wikipedia" / "a.txt").write_text("my own notes")
    monkeypatch.chdir(tmp_path)
    assert [d.text for d in read_documents("wikipedia")] == ["my own notes"]


# ---- chunking -------------------------------------------------------------------------------------


def test_chunks_fit_and_rejoin(tok) -> None:
    docs = list(read_wikipedia(limit=200))
    stats = IngestStats()
    refs = list(chunk_documents(docs, tok, 128, batch_size=16, stats=stats))
    by_doc: dict[str, list[Reference]] = defaultdict(list)
    for r in refs:
        by_doc[r.doc_id].append(r)
    for doc in docs:
        check_chunks(doc, by_doc[doc.doc_id], tok, 128)
        assert "".join(r.text for r in by_doc[doc.doc_id]) == doc.text  # byte-level BPE: exact
    assert stats.references == len(refs) and stats.tokens == sum(len(r.token_ids) for r in refs)
    # Batching does not change the result.
    assert list(chunk_documents(docs[:20], tok, 128, batch_size=3)) == [
        r for r in refs if r.doc_id in {d.doc_id for d in docs[:20]}
    ]


def test_cuts_at_sentence_ends(tok) -> None:
    sentences = [f"Sentence number {i} says something about topic {i * 7}." for i in range(60)]
    doc = Document("d", " ".join(sentences), "T")
    refs = chunk_document(doc, tok, 64)
    check_chunks(doc, refs, tok, 64)
    assert len(refs) > 5
    assert all(r.text.rstrip().endswith(".") for r in refs)
    assert sum(len(r.token_ids) for r in refs) / len(refs) > 48  # packed, not one sentence each


def test_paragraph_breaks_are_cut_points(tok) -> None:
    para = "A line without any full stop but many words in it " * 3
    doc = Document("p", "\n\n".join(para.strip() for _ in range(8)))
    refs = chunk_document(doc, tok, 48)
    check_chunks(doc, refs, tok, 48)
    assert all(r.text.endswith("\n\n") or r is refs[-1] for r in refs)


def test_hard_split_of_an_overlong_sentence(tok) -> None:
    doc = Document("long", " ".join(f"word{i}" for i in range(400)))
    refs = chunk_document(doc, tok, 32)
    check_chunks(doc, refs, tok, 32)
    assert all(r.text.startswith(" ") for r in refs[1:])  # split between words, not inside one
    assert "".join(r.text for r in refs) == doc.text


def test_never_splits_a_character(tok) -> None:
    doc = Document("cjk", "日本語のテキスト🎉🎉" * 60)  # no spaces, multi-byte, multi-token characters
    refs = chunk_document(doc, tok, 16)
    check_chunks(doc, refs, tok, 16)
    assert "".join(r.text for r in refs) == doc.text
    assert not any("\ufffd" in r.text for r in refs)


@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    text=st.text(
        alphabet=st.sampled_from(list("abc xyz.!?\n\t\"')é日🎉")) | st.characters(codec="utf-8"),
        min_size=1,
        max_size=400,
    ).filter(lambda s: s.strip()),
    n=st.integers(4, 64),
)
@pytest.mark.slow
def test_chunking_property(tok, text: str, n: int) -> None:
    doc = Document("h", text)
    stats = IngestStats()
    refs = list(chunk_documents([doc], tok, n, stats=stats))
    roundtrip = tok.decode(tok.encode(text, add_special_tokens=False))
    if "".join(roundtrip.split()) != "".join(text.split()):
        assert stats.lossy == 1  # e.g. unassigned code points: the tokenizer itself loses them
        return
    assert stats.lossy == 0  # at most whitespace-like control characters were dropped
    if roundtrip != text:
        return
    check_chunks(doc, refs, tok, n)
    assert "".join(r.text for r in refs) == text


def test_ingest_a_directory_end_to_end(tmp_path: Path, tok) -> None:
    write(
        tmp_path / "kb" / "a.jsonl",
        "\n".join(json.dumps({"id": f"q{i}", "text": "Fact. " * 100}) for i in range(3)),
    )
    stats = IngestStats()
    refs = list(chunk_documents(read_documents(tmp_path / "kb", stats), tok, 128, stats=stats))
    assert {r.doc_id for r in refs} == {"q0", "q1", "q2"}
    assert stats.documents == 3 and stats.references == len(refs) == 6
