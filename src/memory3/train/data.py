"""Training data: text corpora packed into token sequences, the bundled Wikipedia, and
question–answer groups for SFT, with the held-out split enforced in code.

The held-out entities (`memory3.data.qa.split_of(name) == "heldout"`) are what evaluation asks
about; `assert_train_only` refuses any training item that belongs to them, and every loader here
calls it, so no training step can see one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from memory3.data.qa import Document, QAItem, load_qa, shipped_path, split_of
from memory3.errors import InputError

log = logging.getLogger(__name__)


class HeldOutLeak(InputError):
    """A training item belongs to a held-out entity."""


def assert_train_only(items: Iterable[QAItem]) -> None:
    """Raise if any item is held out, by its own label or by its entity's hash split."""
    for it in items:
        if it.split != "train" or split_of(it.entity) != "train":
            raise HeldOutLeak(
                f"training item {it.id!r} is about held-out entity {it.entity!r}: held-out entities "
                "are for evaluation only; filter with split == 'train'"
            )


def heldout_entities() -> set[str]:
    """Entities asked about by the shipped evaluation sets' held-out split (casefolded)."""
    out = set()
    for name in ("fictional.jsonl", "factbook.jsonl"):
        out |= {
            it.entity.casefold() for it in load_qa(shipped_path(name), resolve=False) if it.split == "heldout"
        }
    return out


# --- text corpora -----------------------------------------------------------------------------


def read_texts(path: str | Path, field: str = "text") -> list[str]:
    """Texts of a .txt file (one document), a directory of .txt/.md files, or a JSONL file whose
    lines have a `field` string."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: corpus not found")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".md") and p.is_file())
        if not files:
            raise FileNotFoundError(f"{path}: no .txt or .md files in this directory")
        return [p.read_text(encoding="utf-8", errors="replace") for p in files]
    if path.suffix == ".jsonl":
        out = []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                obj = json.loads(line)
                if not isinstance(obj, dict) or not isinstance(obj.get(field), str):
                    raise ValueError(f"{path}:{lineno}: expected an object with a string {field!r} field")
                out.append(obj[field])
        return out
    return [path.read_text(encoding="utf-8", errors="replace")]


def corpus_texts(source: str, split: str = "train") -> list[str]:
    """ "wikipedia" (the bundled summaries, one split) or a path for `read_texts`. Held-out
    Wikipedia articles are never returned for split="train"."""
    if source == "wikipedia":
        from memory3.data.wikipedia import load_articles

        if split not in ("train", "heldout"):
            raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
        return [a.text for a in load_articles(split) if split_of(a.title) == split]  # type: ignore[arg-type]
    return read_texts(source)


def tokenize_corpus(
    texts: Sequence[str], tokenizer: Any, eos_id: int, cache: Path | None = None
) -> np.ndarray:
    """All texts as one int32 token stream, each document followed by EOS; cached as .npy."""
    if cache is not None and cache.exists():
        return np.load(cache)
    ids: list[int] = []
    for i in range(0, len(texts), 256):
        for row in tokenizer(list(texts[i : i + 256]), add_special_tokens=False).input_ids:
            ids.extend(row)
            ids.append(eos_id)
    arr = np.asarray(ids, dtype=np.int32)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.save(cache, arr)
    return arr


def sequence_at(stream: np.ndarray, seq_len: int, index: int) -> np.ndarray:
    """Sequence number `index` of seq_len + 1 tokens (input and shifted target), in a fixed
    shuffled order of non-overlapping windows; wraps around for more epochs."""
    n = (len(stream) - 1) // seq_len
    if n < 1:
        raise ValueError(f"corpus of {len(stream)} tokens is shorter than one sequence of {seq_len}")
    epoch, i = divmod(index, n)
    perm = np.random.default_rng(epoch).permutation(n)
    s = int(perm[i]) * seq_len
    return stream[s : s + seq_len + 1]


def rng_for(*keys: Any) -> random.Random:
    """A generator that depends only on its keys (seed, step, micro-step, rank): batches are pure
    functions of the step, which makes resume exact."""
    h = hashlib.sha256(":".join(map(str, keys)).encode()).digest()
    return random.Random(int.from_bytes(h[:8], "big"))


# --- question–answer groups for SFT -----------------------------------------------------------


@dataclass(frozen=True)
class Fact:
    question: str
    answer: str


@dataclass(frozen=True)
class Entity:
    """One knowledge-base passage and the questions it answers."""

    name: str
    kind: str  # "person", "town", "company", "country"
    reference: str
    facts: tuple[Fact, ...]


def _entities_from(items: Sequence[QAItem], docs: dict[str, Document], kind_of: Any) -> list[Entity]:
    by_doc: dict[str, list[QAItem]] = {}
    for it in items:
        by_doc.setdefault(it.doc_id, []).append(it)
    out = []
    for doc_id, its in by_doc.items():
        text = docs[doc_id].text if doc_id in docs else its[0].reference
        facts = tuple(Fact(it.question, it.answers[0]) for it in its if it.answers[0] in text)
        if facts:
            out.append(Entity(its[0].entity, kind_of(its[0]), text, facts))
    return out


def fictional_training_entities(n: int, seed: int = 1) -> list[Entity]:
    """Invented entities for training, generated with another seed than the shipped evaluation
    set (seed 0), train split only, and none named like a held-out evaluation entity."""
    from memory3.data.factbook import build_fictional

    if seed == 0:
        raise ValueError("seed 0 generates the shipped evaluation entities; train with another seed")
    docs, items = build_fictional(n, seed=seed)
    banned = heldout_entities()
    items = [it for it in items if it.split == "train" and it.entity.casefold() not in banned]
    assert_train_only(items)
    return _entities_from(items, {d.doc_id: d for d in docs}, lambda it: it.doc_id.split("/")[1])


def factbook_training_entities() -> list[Entity]:
    """Factbook passages of train-split countries with their questions (all facts, not only the
    shipped sample)."""
    from memory3.data.factbook import build_factbook

    docs, items = build_factbook()
    items = [it for it in items if it.split == "train"]
    assert_train_only(items)
    return _entities_from(items, {d.doc_id: d for d in docs}, lambda it: "country")


def wikipedia_training_entities() -> list[Entity]:
    """Fill-in-the-blank questions on train-split Wikipedia articles (one per article that has a
    good blank, as the shipped evaluation set asks them), each with its article's leading passage
    as the reference. The kind is the article's topic, so a group's distractors share it."""
    from memory3.data.wikipedia import build_wikipedia_qa

    items = [it for it in build_wikipedia_qa(split="train") if split_of(it.entity) == "train"]
    assert_train_only(items)
    return [
        Entity(
            it.entity,
            f"wikipedia/{it.meta.get('topic', '')}",
            it.reference or "",
            (Fact(it.question or "", it.answers[0]),),
        )
        for it in items
    ]


@dataclass(frozen=True)
class Group:
    """References read together as the memories of every question in the group; each question's
    own passage (its gold reference) is one of them."""

    references: tuple[str, ...]
    questions: tuple[Fact, ...]
    owners: tuple[int, ...] = ()  # owners[i]: index in `references` of questions[i]'s gold passage


def make_group(pool: Sequence[Entity], rng: random.Random, memories: int, questions: int) -> Group:
    """`memories` entities of one kind (hard distractors, as retrieval gives) and up to
    `questions` of their questions."""
    anchor = pool[rng.randrange(len(pool))]
    same = [e for e in pool if e.kind == anchor.kind and e is not anchor]
    others = rng.sample(same, min(memories - 1, len(same)))
    chosen = [anchor, *others]
    rng.shuffle(chosen)
    facts = [(i, f) for i, e in enumerate(chosen) for f in e.facts]
    rng.shuffle(facts)
    facts = facts[:questions]
    return Group(tuple(e.reference for e in chosen), tuple(f for _, f in facts), tuple(i for i, _ in facts))


# --- self-supervised reading questions ------------------------------------------------------------

# Words too common to be a fact worth a blank (an ordinary-word answer must carry content).
_STOPWORDS = frozenset(
    [
        "a",
        "an",
        "and",
        "are",
        "as",
        "at",
        "be",
        "but",
        "by",
        "for",
        "has",
        "had",
        "her",
        "his",
        "in",
        "is",
        "it",
        "its",
        "of",
        "on",
        "or",
        "not",
        "the",
        "to",
        "was",
        "who",
        "about",
        "above",
        "after",
        "again",
        "against",
        "along",
        "also",
        "among",
        "another",
        "around",
        "because",
        "been",
        "before",
        "being",
        "below",
        "between",
        "both",
        "during",
        "each",
        "either",
        "every",
        "first",
        "from",
        "further",
        "have",
        "having",
        "into",
        "itself",
        "known",
        "large",
        "later",
        "least",
        "less",
        "like",
        "made",
        "main",
        "many",
        "more",
        "most",
        "much",
        "must",
        "near",
        "only",
        "other",
        "over",
        "same",
        "several",
        "should",
        "since",
        "some",
        "such",
        "than",
        "that",
        "their",
        "them",
        "then",
        "there",
        "these",
        "they",
        "this",
        "those",
        "through",
        "under",
        "until",
        "upon",
        "used",
        "very",
        "well",
        "were",
        "what",
        "when",
        "where",
        "whether",
        "which",
        "while",
        "whom",
        "whose",
        "will",
        "with",
        "within",
        "without",
        "would",
    ]
)
_WORD = re.compile(r"(?<=[\s(])([a-z][a-z-]{4,})(?=[\s,;:.)])")
_PHRASE = re.compile(r"(?<=[\s(])([a-z][a-z-]{2,} (?:[a-z-]{2,} )?[a-z][a-z-]{3,})(?=[\s,;:.)])")
_CLOZE_FORMS = (
    "Fill in the blank: {s}",
    "What is missing from this sentence of the text? {s}",
    "Complete with the {what} from the text: {s}",
    "What goes in the blank? {s}",
)
_QUOTE_FORMS = (
    "Quote the sentence of the text that mentions {x}.",
    "What does the text say about {x}? Quote it.",
    "Repeat the sentence about {x}.",
)
_WHAT = {"number": "number", "name": "name", "word": "word", "phrase": "words"}


def _spans_of(sentence: str, title_words: set[str]) -> dict[str, list[str]]:
    """Candidate answers in one sentence, by kind: numbers and years, capitalised names (not the
    sentence's first word), ordinary content words, and phrases of two or three ordinary words.
    Each occurs once in the sentence, so its blank is unambiguous."""
    from memory3.data.wikipedia import _ENTITY, _NUMBER, _YEAR

    found: dict[str, list[str]] = {"number": [], "name": [], "word": [], "phrase": []}
    for kind, pattern in (("number", _YEAR), ("number", _NUMBER), ("name", _ENTITY)):
        found[kind] += [m.group(1) for m in pattern.finditer(sentence)]
    found["word"] = [w for w in _WORD.findall(sentence) if w not in _STOPWORDS]
    found["phrase"] = [
        p for p in _PHRASE.findall(sentence) if not set(p.split()) & _STOPWORDS and len(p.split()) > 1
    ]
    return {
        k: sorted(
            a
            for a in set(v)
            if sentence.count(a) == 1
            and not set(a.lower().split()) & title_words
            and not sentence[sentence.index(a) + len(a) :].startswith(("'", "’"))  # "People's"
        )
        for k, v in found.items()
    }


def _blank_window(sentence: str, start: int, answer: str, before: int = 14, after: int = 8) -> str:
    """The sentence with the answer blanked, cut to a few words on each side (the question must
    fit one 64-token chunk with the chat template); the text around the blank keeps its spacing."""
    head, tail = sentence[:start].split(" "), sentence[start + len(answer) :].split(" ")
    left = ("… " if len(head) > before + 1 else "") + " ".join(head[-(before + 1) :])
    right = " ".join(tail[: after + 1]) + (" …" if len(tail) > after + 1 else "")
    return f"{left}____{right}"


def reading_facts(article: Any, reference: str, rng: random.Random, per_sentence: int = 2) -> list[Fact]:
    """Questions whose answer is a span of `reference` (blanks of every kind: numbers, names,
    ordinary words, phrases) or one of its sentences (quoted), so that answering them means
    copying names, words and numbers out of the reference."""
    from memory3.data.qa import estimate_tokens
    from memory3.data.wikipedia import sentence_spans

    title_words = set(re.findall(r"\w+", article.title.lower()))
    facts: list[Fact] = []
    sentences = [reference[a:b] for a, b in sentence_spans(reference)]
    for s in sentences:
        if "  " in s or "\n" in s or " ," in s or " ." in s:
            continue  # formulas or markup stripped: garbled
        spans = _spans_of(s, title_words)
        kinds = [k for k in spans if spans[k]]
        rng.shuffle(kinds)
        for kind in kinds[:per_sentence]:
            answer = rng.choice(spans[kind])
            form = rng.choice(_CLOZE_FORMS)
            q = form.format(s=_blank_window(s, s.index(answer), answer), what=_WHAT[kind])
            facts.append(Fact(q, answer))
        # quote: a name or word found in this sentence only, asked for the whole sentence
        keys = [a for k in ("name", "word") for a in spans[k] if sum(a in t for t in sentences) == 1]
        if keys and len(s.split()) >= 6 and estimate_tokens(s) <= 40:
            form = rng.choice(_QUOTE_FORMS)
            facts.append(Fact(form.format(x=rng.choice(keys)), s.strip()))
    return facts


def reading_training_entities(max_tokens: int = 128, seed: int = 0) -> list[Entity]:
    """Self-supervised reading questions on train-split Wikipedia articles: each article's leading
    passage (whole sentences within about `max_tokens` tokens) is the reference, and its questions
    ask for spans of every kind, or a whole sentence, out of it (`reading_facts`). The kind is the
    article's topic, so a group's distractors share it. Held-out articles are never read."""
    from memory3.data.wikipedia import leading_passage_end, load_articles

    out = []
    for a in load_articles("train"):
        if split_of(a.title) != "train":
            continue
        reference = a.text[: leading_passage_end(a.text, max_tokens)]
        facts = reading_facts(a, reference, rng_for("reading", seed, a.title))
        if facts:
            out.append(Entity(a.title, f"reading/{a.topic}", reference, tuple(facts)))
    return out
