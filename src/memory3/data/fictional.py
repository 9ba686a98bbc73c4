"""Fictional entities: invented people, towns and companies with invented attributes, as
knowledge-base passages and questions in the shape of the Factbook's.

SmolLM2 already knows many capitals, so real facts cannot show that memory beats no memory.
`build_fictional` invents entities no model can know: only reading the reference answers the
question. Entities split into train / held-out with `split_of(name)`, as every source does.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from memory3.data.items import Fact, QAItem, Split, split_of
from memory3.memory.ingest import Document

SOURCE = "fictional"

# Names are built from syllables so they are not real; attributes are drawn from fixed lists
# (occupations, products) or are numbers, so the answer cannot be guessed from the question.

_ONSETS = (
    "b",
    "br",
    "c",
    "d",
    "dr",
    "f",
    "g",
    "gl",
    "k",
    "l",
    "m",
    "n",
    "p",
    "r",
    "s",
    "st",
    "t",
    "tr",
    "v",
    "z",
)
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "i", "o", "ei", "ou")
_CODAS = ("", "", "n", "r", "l", "s", "m", "nd", "v")
_TOWN_ENDS = ("ov", "esk", "ara", "ing", "holm", "ford", "enza", "ach", "ton", "ica")
_SURNAME_ENDS = ("ini", "son", "ek", "ova", "ard", "ez", "lio", "berg", "ault", "enko")
_COMPANY_ENDS = ("ex", "ica", "on", "ar", "ium", "ix")
_OCCUPATIONS = (
    "glassblower", "clockmaker", "cartographer", "beekeeper", "bookbinder", "lighthouse keeper",
    "stonemason", "violin maker", "ferry captain", "botanist", "printer", "tailor", "blacksmith",
    "astronomer", "potter", "surveyor", "perfumer", "chess teacher", "locksmith", "weaver",
)  # fmt: skip
_PRODUCTS = (
    "copper kettles", "wool blankets", "pear brandy", "glass beads", "paper lanterns", "salted cod",
    "clay pipes", "cherry jam", "linen shirts", "iron nails", "goat cheese", "wooden toys",
)  # fmt: skip
_INDUSTRIES = (
    "shipping",
    "textile",
    "brewing",
    "software",
    "mining",
    "publishing",
    "furniture",
    "pharmaceutical",
)
_DEVICES = ("lamp", "pump", "loom", "engine", "scale", "compass", "kettle", "valve", "drill", "press")
_WATERS = ("river", "lake")


@dataclass(frozen=True)
class FictionalEntity:
    """An invented entity of a kind ("person", "town", "company"); its first fact's sentence is its
    whole passage, the other facts are stated in it."""

    id: str
    kind: str
    name: str
    split: Split
    facts: tuple[Fact, ...]


class NameMaker:
    """Fresh invented names from a seeded generator; never the same name twice."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.used: set[str] = set()

    def _syllables(self, n: int) -> str:
        r = self.rng
        return "".join(r.choice(_ONSETS) + r.choice(_VOWELS) for _ in range(n)) + r.choice(_CODAS)

    def _fresh(self, make: Callable[[], str]) -> str:
        while True:
            name = make()
            if name not in self.used and all(4 <= len(w) <= 12 for w in name.split()):
                self.used.add(name)
                return name

    def word(self, ends: Sequence[str]) -> str:
        return self._fresh(
            lambda: (self._syllables(self.rng.randint(1, 2)) + self.rng.choice(ends)).capitalize()
        )

    def person(self) -> str:
        return self._fresh(
            lambda: (
                f"{self._syllables(self.rng.randint(2, 3)).capitalize()} "
                f"{(self._syllables(1) + self.rng.choice(_SURNAME_ENDS)).capitalize()}"
            )
        )


def _a(noun: str) -> str:
    return f"an {noun}" if noun[0] in "aeiou" else f"a {noun}"


def _person(names: NameMaker, i: int) -> FictionalEntity:
    r = names.rng
    name, born_in, moved_to = names.person(), names.word(_TOWN_ENDS), names.word(_TOWN_ENDS)
    born = r.randint(1700, 1950)
    died = born + r.randint(35, 95)
    job = r.choice(_OCCUPATIONS)
    sentence = (
        f"{name} was born in {born} in the town of {born_in} and worked as {_a(job)}. "
        f"Later in life {name} moved to {moved_to}, where {name.split()[0]} died in {died}."
    )
    facts = (
        Fact("birth_year", sentence, f"In which year was {name} born?", (str(born),)),
        Fact("birthplace", "", f"In which town was {name} born?", (born_in,)),
        Fact("occupation", "", f"What did {name} work as?", (job,)),
        Fact("moved_to", "", f"To which town did {name} move later in life?", (moved_to,)),
        Fact("death_year", "", f"In which year did {name} die?", (str(died),)),
    )
    return FictionalEntity(f"{SOURCE}/person/{i:04d}", "person", name, split_of(name), facts)


def _town(names: NameMaker, i: int) -> FictionalEntity:
    r = names.rng
    town, water, region = names.word(_TOWN_ENDS), names.word(_TOWN_ENDS), names.word(_TOWN_ENDS)
    kind = r.choice(_WATERS)
    founded = r.randint(900, 1900)
    pop = f"{r.randint(1200, 98000):,}"
    product = r.choice(_PRODUCTS)
    water_name = f"the {water} River" if kind == "river" else f"Lake {water}"
    sentence = (
        f"{town} is a town on {water_name} in the province of {region}. It was founded in {founded}, "
        f"has {pop} inhabitants and is known for its {product}."
    )
    facts = (
        Fact("water", sentence, f"On which {kind} does the town of {town} lie?", (water,)),
        Fact("province", "", f"In which province is the town of {town}?", (region,)),
        Fact("founded", "", f"In which year was the town of {town} founded?", (str(founded),)),
        Fact("population", "", f"How many inhabitants does the town of {town} have?", (pop,)),
        Fact("known_for", "", f"What is the town of {town} known for?", (product,)),
    )
    return FictionalEntity(f"{SOURCE}/town/{i:04d}", "town", town, split_of(town), facts)


def _company(names: NameMaker, i: int) -> FictionalEntity:
    r = names.rng
    company, founder, city = names.word(_COMPANY_ENDS), names.person(), names.word(_TOWN_ENDS)
    industry = r.choice(_INDUSTRIES)
    founded = r.randint(1850, 2015)
    staff = f"{r.randint(40, 60000):,}"
    product = f"{names.word(_COMPANY_ENDS)} {r.choice(_DEVICES)}"
    sentence = (
        f"{company} is {_a(industry)} company founded in {founded} by {founder} in the city of {city}. "
        f"It employs {staff} people and its best-known product is the {product}."
    )
    facts = (
        Fact("founder", sentence, f"Who founded the company {company}?", (founder,)),
        Fact("founded", "", f"In which year was the company {company} founded?", (str(founded),)),
        Fact("city", "", f"In which city was the company {company} founded?", (city,)),
        Fact("employees", "", f"How many people does the company {company} employ?", (staff,)),
        Fact("product", "", f"What is the best-known product of the company {company}?", (product,)),
    )
    return FictionalEntity(f"{SOURCE}/company/{i:04d}", "company", company, split_of(company), facts)


def fictional_entities(n: int, seed: int = 0) -> list[FictionalEntity]:
    """`n` invented entities (half people, a quarter towns, a quarter companies), the same for the
    same `n` and `seed`; the first `m` entities of a larger `n` are the same as for `m`."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    names = NameMaker(random.Random(f"memory3-fictional:{seed}"))
    makers = (_person, _person, _town, _company)
    return [makers[i % 4](names, i) for i in range(n)]


def build_fictional(n: int = 150, seed: int = 0) -> tuple[list[Document], list[QAItem]]:
    """One knowledge-base document and five questions per invented entity."""
    docs, items = [], []
    for e in fictional_entities(n, seed):
        text = " ".join(f.sentence for f in e.facts if f.sentence)
        docs.append(Document(e.id, text, e.name))
        for f in e.facts:
            items.append(
                QAItem(
                    id=f"{e.id}/{f.key}",
                    question=f.question,
                    answers=list(f.answers),
                    entity=e.name,
                    split=e.split,
                    source=SOURCE,
                    doc_id=e.id,
                    reference=text,
                )
            )
    return docs, items
