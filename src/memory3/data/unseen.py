"""The unseen-families set: invented entities of kinds, passage styles and question phrasings that
no training step reads, to measure how well a reader generalises beyond its training data.

The shipped reader was trained on invented people, towns and companies written from one template
each (`memory3.data.fictional`), Factbook passages and Wikipedia fill-in-the-blank. Holding out
entities of those families measures memorised templates as much as reading. This set holds out
whole families instead:

- **kinds** no generator of training data makes: ships, novels, mountains, siblings, species,
  town histories, festivals;
- **passage styles**: narrative prose, a list of fields ("range: …; height: …"), a dated
  timeline, two people in one passage, and passages that state several facts of the same type
  (two years, two towns, two occupations), so the reader must pick the one asked for;
- **question phrasings**: three or four per fact, written as people ask ("Name the author of …",
  "… — how long was she?"), none of them a training template.

Answers cover every type of `memory3.data.natural.ANSWER_TYPES`. Entities split into **dev**
(a third, for choosing settings) and **test** (the reported figure) by a hash of their name; both
read one knowledge base of every passage, so each gold passage competes with others of its kind.

The set is shipped as frozen files (`assets/qa/unseen_dev.jsonl`, `unseen_test.jsonl`,
`unseen_kb.jsonl`), written by `python -m memory3.data.unseen --out src/memory3/assets/qa`; a test
checks that the generator still writes the same files. No module of `memory3.train` imports this
one (checked by the import-graph test).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from memory3.data.fictional import NameMaker
from memory3.data.qa import QAFormatError, QAItem, load_kb, load_qa, save_kb, shipped_path
from memory3.memory.ingest import Document

NAME = "unseen"
SOURCE = "unseen"
UnseenSplit = Literal["dev", "test"]
FILES: dict[str, str] = {"dev": "unseen_dev.jsonl", "test": "unseen_test.jsonl"}
KB_FILE = "unseen_kb.jsonl"
ENTITIES_PER_KIND = 24
QUESTIONS_PER_ENTITY = 3
SEED = 0
DEV_FRACTION = 1 / 3

# Name endings unlike the training generators' (`memory3.data.fictional`), so names look new too.
_PLACE_ENDS = ("wick", "stad", "mere", "ovo", "ella", "burg", "ais", "dorf", "ika", "port")
_SURNAME_ENDS = ("ard", "icz", "quist", "elli", "ova", "ley", "escu", "sen", "aro", "uk")
_LINE_ENDS = ("ia", "on", "ur", "ane", "ico")


@dataclass(frozen=True)
class Fact:
    """One fact of an entity: its key, answer type, accepted answers and the ways to ask for it."""

    key: str
    answer_type: str
    answers: tuple[str, ...]
    questions: tuple[str, ...]


@dataclass(frozen=True)
class Entity:
    kind: str
    name: str
    passage: str
    facts: tuple[Fact, ...]


Maker = Callable[[NameMaker], Entity]


def _place(n: NameMaker) -> str:
    return n.word(_PLACE_ENDS)


def _person(n: NameMaker) -> str:
    first = n.word(("a", "o", "e", "in", "el"))
    return f"{first} {n.word(_SURNAME_ENDS)}"


def _ship(n: NameMaker) -> Entity:
    r = n.rng
    ship, port, coast, line = n.word(("a", "ia", "ine")), _place(n), _place(n), n.word(_LINE_ENDS)
    kind = r.choice(
        ("cargo steamer", "three-masted schooner", "paddle steamer", "river barge", "whaling brig")
    )
    launched = r.randint(1820, 1920)
    lost = launched + r.randint(6, 40)
    length, crew = r.randint(28, 140), r.randint(9, 180)
    passage = (
        f"The {ship} was a {kind} launched in {launched} at the port of {port}. Built for the "
        f"{line} Line, she was {length} metres long and sailed with a crew of {crew}. She was lost "
        f"off the coast of {coast} in {lost}, and her bell now hangs in the harbour office of {port}."
    )
    return Entity("ship", ship, passage, (
        Fact("launched", "number", (str(launched),), (
            f"When was the {ship} launched?", f"What year did the {ship} first take to the water?",
            f"The {ship} was launched in which year?")),
        Fact("lost", "number", (str(lost),), (
            f"In what year was the {ship} lost?", f"When did the {ship} sink?",
            f"How long did the {ship} last — in which year was she lost?")),
        Fact("port", "place", (port,), (
            f"Where was the {ship} launched?", f"Which port did the {ship} come from?",
            f"Name the port where the {ship} was launched.")),
        Fact("coast", "place", (coast,), (
            f"Off which coast was the {ship} lost?", f"Where did the {ship} go down?",
            f"The {ship} sank near the coast of what place?")),
        Fact("line", "name", (line, f"{line} Line"), (
            f"Which shipping line was the {ship} built for?", f"Who owned the {ship}?",
            f"The {ship} sailed for which line?")),
        Fact("crew", "number", (str(crew),), (
            f"How many sailors made up the crew of the {ship}?", f"What was the crew size of the {ship}?",
            f"How big a crew did the {ship} carry?")),
        Fact("type", "phrase", (kind,), (
            f"What kind of vessel was the {ship}?", f"What type of ship was the {ship}?",
            f"Was the {ship} a steamer, a schooner or something else? What exactly?")),
    ))  # fmt: skip


_THEMES = ("a lighthouse keeper", "a rope maker", "a village doctor", "a piano tuner", "a tram driver",
           "a stamp collector", "a night watchman", "a ferry pilot", "a seed merchant", "a map engraver")  # fmt: skip
_GENRES = ("comic", "historical", "detective", "gothic", "pastoral", "satirical")


def _novel(n: NameMaker) -> Entity:
    r = n.rng
    title = f"The {r.choice(('Winter', 'Silent', 'Copper', 'Last', 'Hidden', 'Salt'))} {n.word(('ow', 'een', 'ary', 'eth'))}"
    author, publisher, town = _person(n), f"{n.word(('ham', 'ford', 'ley'))} Press", _place(n)
    year = r.randint(1880, 1990)
    hero = r.choice(_THEMES)
    genre = r.choice(_GENRES)
    languages = r.randint(3, 31)
    passage = (
        f"{title} is a {genre} novel by {author}, first published in {year} by {publisher}. Set in "
        f"the harbour town of {town}, it follows {hero} through one long winter. The book has been "
        f"translated into {languages} languages."
    )
    job = hero.split(" ", 1)[1]
    return Entity("novel", title, passage, (
        Fact("author", "person", (author,), (
            f"Who wrote {title}?", f"Name the author of {title}.", f"{title} is a novel by whom?")),
        Fact("title", "name", (title,), (
            f"What is the title of the {genre} novel {author} wrote?",
            f"Which book by {author} is set in {town}?", f"What is {author}'s novel called?")),
        Fact("year", "number", (str(year),), (
            f"When did {title} first come out?", f"What year was {title} published?",
            f"{title} was first published in which year?")),
        Fact("publisher", "name", (publisher,), (
            f"Which publisher first printed {title}?", f"Who published {title}?",
            f"{title} first appeared from which press?")),
        Fact("town", "place", (town,), (
            f"Where is {title} set?", f"In which town does {title} take place?",
            f"What is the setting of {title}?")),
        Fact("hero", "word", (job,), (
            f"What is the main character of {title} by trade?", f"What job does the hero of {title} do?",
            f"{title} follows someone in what occupation?")),
        Fact("genre", "word", (genre,), (
            f"What kind of novel is {title}?", f"{title} belongs to which genre of novel?",
            f"Is {title} a detective novel, a comic one, or what?")),
        Fact("languages", "number", (str(languages),), (
            f"Into how many languages has {title} been translated?",
            f"In how many languages can you read {title}?")),
    ))  # fmt: skip


_FEATURES = ("a glacier lake", "red granite cliffs", "a ruined chapel", "hot springs", "a natural arch",
             "a pilgrims' path", "an old silver mine")  # fmt: skip


def _mountain(n: NameMaker) -> Entity:
    r = n.rng
    mountain = f"Mount {n.word(('ar', 'ek', 'orn', 'ul'))}"
    chain, climber, town = n.word(("ides", "ans", "ines")), _person(n), _place(n)
    height = f"{r.randint(1200, 6900):,}"
    ascent = r.randint(1780, 1960)
    feature = r.choice(_FEATURES)
    passage = (
        f"{mountain}. Range: the {chain} Mountains. Height: {height} m. First ascent: {ascent}, "
        f"by {climber}. Nearest town: {town}, in the valley to the south. Known for: {feature} "
        "below the summit."
    )
    return Entity("mountain", mountain, passage, (
        Fact("range", "place", (chain, f"{chain} Mountains"), (
            f"Which mountain range is {mountain} part of?", f"{mountain} belongs to what range?",
            f"In what range does {mountain} stand?")),
        Fact("height", "number", (height, height.replace(",", "")), (
            f"How high is {mountain}?", f"What is the height of {mountain} in metres?",
            f"{mountain} rises to how many metres?")),
        Fact("ascent", "number", (str(ascent),), (
            f"When was {mountain} first climbed?", f"In what year did someone first reach the top of {mountain}?")),
        Fact("climber", "person", (climber,), (
            f"Who first climbed {mountain}?", f"Who made the first ascent of {mountain}?",
            f"Name the first person to reach the summit of {mountain}.")),
        Fact("town", "place", (town,), (
            f"What is the nearest town to {mountain}?", f"Which town lies closest to {mountain}?")),
        Fact("feature", "phrase", (feature,), (
            f"What is {mountain} known for?", f"What can you find below the summit of {mountain}?")),
    ))  # fmt: skip


_JOBS = ("weaver", "surveyor", "glazier", "saddler", "midwife", "organist", "cooper", "chandler",
         "engraver", "schoolteacher", "apothecary", "bookseller")  # fmt: skip


def _siblings(n: NameMaker) -> Entity:
    r = n.rng
    surname = n.word(_SURNAME_ENDS)
    a, b = n.word(("a", "ina", "ette")), n.word(("o", "an", "ert"))
    town, town2 = _place(n), _place(n)
    born_a = r.randint(1750, 1900)
    born_b = born_a + r.randint(2, 9)
    job_a, job_b = r.sample(_JOBS, 2)
    full_a, full_b = f"{a} {surname}", f"{b} {surname}"
    passage = (
        f"{full_a} and her brother {full_b} were both born in {town}. {a}, the elder, was born in "
        f"{born_a} and became a {job_a}. {b}, born in {born_b}, trained as a {job_b} and later "
        f"moved to {town2}, where he spent the rest of his life."
    )
    return Entity("siblings", f"the {surname} siblings", passage, (
        Fact("born_a", "number", (str(born_a),), (
            f"What year was {full_a} born?", f"When was {full_a} born?")),
        Fact("born_b", "number", (str(born_b),), (
            f"What year was {full_b} born?", f"When was {full_b} born?")),
        Fact("job_a", "word", (job_a,), (
            f"What did {full_a} do for a living?", f"What was {full_a}'s trade?",
            f"{full_a} became what?")),
        Fact("job_b", "word", (job_b,), (
            f"What did {full_b} train as?", f"What was {full_b}'s occupation?",
            f"{full_b} worked as what?")),
        Fact("elder", "person", (full_a, a), (
            f"Which of the {surname} siblings was the elder?", f"Who was older, {full_b} or his sister?")),
        Fact("moved", "place", (town2,), (
            f"Where did {full_b} move later in life?", f"In which town did {full_b} spend his last years?")),
        Fact("town", "place", (town,), (
            f"Where were {full_a} and {full_b} born?", f"What is the home town of the {surname} siblings?")),
    ))  # fmt: skip


_HABITATS = ("reed beds", "pine forests", "salt marshes", "mountain meadows", "river gorges", "sand dunes")
_COLOURS = ("olive", "rust-red", "slate-grey", "yellow", "black", "white", "blue")
_BODY = ("wings", "crest", "tail", "throat")
_FOODS = ("beetles", "seeds", "snails", "berries", "moths", "ants", "worms")
_CLASSES = ("songbird", "lizard", "frog", "bat", "beetle")


def _species(n: NameMaker) -> Entity:
    r = n.rng
    genus = n.word(("ia", "odon", "ella", "ops"))
    epithet = n.word(("ensis", "ata", "ii")).lower()
    animal = r.choice(_CLASSES)
    common = f"{_place(n)} {animal}"
    habitat, region = r.choice(_HABITATS), _place(n)
    size = r.randint(3, 40)
    colour, body, food = r.choice(_COLOURS), r.choice(_BODY), r.choice(_FOODS)
    passage = (
        f"The {common} ({genus} {epithet}) is a small {animal} of the {habitat} of {region}. Adults "
        f"measure about {size} centimetres and are easily told apart by their {colour} {body}. It "
        f"feeds mainly on {food} and is most active at dusk."
    )
    return Entity("species", common, passage, (
        Fact("genus", "name", (genus, f"{genus} {epithet}"), (
            f"What is the scientific name of the {common}?", f"To which genus does the {common} belong?")),
        Fact("habitat", "phrase", (habitat,), (
            f"Where does the {common} live?", f"What habitat does the {common} prefer?")),
        Fact("region", "place", (region,), (
            f"In which region is the {common} found?", f"Where in the world would you see a {common}?")),
        Fact("size", "number", (str(size),), (
            f"How big is an adult {common}, in centimetres?", f"How long are adult {common}s?")),
        Fact("colour", "word", (colour,), (
            f"What colour are the {body} of the {common}?", f"How can you recognise a {common} — what colour is its {body}?")),
        Fact("food", "word", (food,), (
            f"What does the {common} eat?", f"What is the main food of the {common}?")),
    ))  # fmt: skip


def _history(n: NameMaker) -> Entity:
    r = n.rng
    town, river, builder = _place(n), n.word(("a", "ene", "is")), _person(n)
    years = sorted(r.sample(range(1150, 1900), 4))
    passage = (
        f"A history of {town}: granted a market charter in {years[0]}; the stone bridge over the "
        f"{river} finished in {years[1]} by {builder}; the old town hall destroyed by fire in "
        f"{years[2]}; reached by the railway in {years[3]}."
    )
    return Entity("history", town, passage, (
        Fact("charter", "number", (str(years[0]),), (
            f"When did {town} get its market charter?", f"In what year was {town} granted a charter?")),
        Fact("bridge", "number", (str(years[1]),), (
            f"When was the stone bridge in {town} completed?", f"What year was {town}'s stone bridge finished?")),
        Fact("fire", "number", (str(years[2]),), (
            f"When did fire destroy the town hall of {town}?", f"In which year did {town} lose its old town hall?")),
        Fact("railway", "number", (str(years[3]),), (
            f"When did the railway come to {town}?", f"What year did trains first reach {town}?")),
        Fact("river", "place", (river,), (
            f"Which river flows through {town}?", f"The stone bridge of {town} crosses what river?")),
        Fact("builder", "person", (builder,), (
            f"Who built the stone bridge in {town}?", f"Who finished the bridge over the river at {town}?")),
    ))  # fmt: skip


_MONTHS = ("January", "March", "April", "May", "June", "July", "August", "September", "October", "November")
_DISHES = ("roasted chestnuts", "smoked eel", "honey cakes", "onion soup", "plum dumplings", "fried trout")
_EVENTS = ("lantern parade", "boat race", "cheese market", "horse fair", "bell-ringing contest")


def _festival(n: NameMaker) -> Entity:
    r = n.rng
    town, founder = _place(n), _person(n)
    event = r.choice(_EVENTS)
    name = f"the {town} {event}"
    month, dish = r.choice(_MONTHS), r.choice(_DISHES)
    since = r.randint(1400, 1950)
    visitors = f"{r.randint(2, 90) * 1000:,}"
    passage = (
        f"Every {month}, about {visitors} visitors come to {town} for its {event}. The custom goes back "
        f"to {since}, when the mayor {founder} started it to celebrate a good harvest. Stalls along the "
        f"square sell {dish}, which everyone eats on the first evening."
    )
    return Entity("festival", name, passage, (
        Fact("month", "word", (month,), (
            f"In which month is {name} held?", f"When in the year does {name} take place?")),
        Fact("since", "number", (str(since),), (
            f"How old is {name} — since when has it been held?", f"In which year did {name} begin?")),
        Fact("founder", "person", (founder,), (
            f"Who started {name}?", f"Which mayor founded {name}?")),
        Fact("dish", "phrase", (dish,), (
            f"What do people eat at {name}?", f"What food is sold on the square during {name}?")),
        Fact("visitors", "number", (visitors, visitors.replace(",", "")), (
            f"How many people visit {name}?", f"About how many visitors does {name} draw?")),
    ))  # fmt: skip


KINDS: dict[str, Maker] = {
    "ship": _ship,
    "novel": _novel,
    "mountain": _mountain,
    "siblings": _siblings,
    "species": _species,
    "history": _history,
    "festival": _festival,
}


def _split_of(name: str) -> UnseenSplit:
    """dev for a third of the entities, by a hash of the name; test for the rest."""
    u = int.from_bytes(hashlib.sha256(f"memory3-unseen:{name}".encode()).digest()[:8], "big") / 2**64
    return "dev" if u < DEV_FRACTION else "test"


def build_unseen(
    per_kind: int = ENTITIES_PER_KIND, questions_per_entity: int = QUESTIONS_PER_ENTITY, seed: int = SEED
) -> tuple[list[Document], dict[str, list[dict[str, str | list[str]]]]]:
    """Every passage (the knowledge base), and the plain-format question lines of each split."""
    names = NameMaker(random.Random(f"memory3-unseen:{seed}"))
    docs: list[Document] = []
    lines: dict[str, list[dict[str, str | list[str]]]] = {s: [] for s in FILES}
    for kind, make in KINDS.items():
        for i in range(per_kind):
            e = make(names)
            doc_id = f"{SOURCE}/{kind}/{i:03d}"
            docs.append(Document(doc_id, e.passage, e.name))
            asked = names.rng.sample(e.facts, min(questions_per_entity, len(e.facts)))
            for f in asked:
                lines[_split_of(e.name)].append({
                    "id": f"{doc_id}/{f.key}",
                    "question": names.rng.choice(f.questions),
                    "answers": list(f.answers),
                    "doc_id": doc_id,
                    "title": e.name,
                    "answer_type": f.answer_type,
                    "family": f"{SOURCE}/{kind}",
                })  # fmt: skip
    return docs, lines


def write_unseen(out: str | Path) -> dict[str, int]:
    """Write the knowledge base and both splits under `out`; returns the question count per split."""
    out = Path(out)
    docs, lines = build_unseen()
    save_kb(docs, out / KB_FILE)
    for split, name in FILES.items():
        with open(out / name, "w", encoding="utf-8") as f:
            for line in lines[split]:
                f.write(json.dumps(line, ensure_ascii=False, separators=(",", ":")) + "\n")
    return {split: len(v) for split, v in lines.items()}


def knowledge_base() -> list[Document]:
    """Every passage of the set, both splits: each gold passage among the others of its kind."""
    return load_kb(shipped_path(KB_FILE))


def load_unseen(split: UnseenSplit) -> list[QAItem]:
    """The questions of one split, each with its passage as the reference (every answer checked to
    be in it)."""
    if split not in FILES:
        raise ValueError(f"the unseen set has splits {list(FILES)}, got {split!r}")
    items = load_qa(shipped_path(FILES[split]), kb=shipped_path(KB_FILE))
    for it in items:
        if not any(a in it.reference for a in it.answers):
            raise QAFormatError(f"item {it.id!r}: no answer is a span of its passage {it.doc_id!r}")
    return items


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m memory3.data.unseen", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--out", required=True, help="directory for the JSONL files")
    print(json.dumps(write_unseen(parser.parse_args(argv).out)))


if __name__ == "__main__":
    main()
