"""Dataset and scoring of the memory3_qa task (lm-evaluation-harness loads this file by path)."""

from __future__ import annotations

from typing import Any


def load_questions(set: str = "natural", split: str = "test", limit: int | None = None, **_: Any) -> Any:
    """The questions of a memory3 question set as a DatasetDict with one split, "test"."""
    import datasets

    from memory3.eval.qa import load_set

    _, items = load_set(set, split, limit)
    rows = [
        {"id": it.id, "question": it.question, "answers": list(it.answers), "doc_id": it.doc_id}
        for it in items
    ]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    from memory3.data.qa import answer_contained, exact_match

    text = results[0]
    return {
        "contained": float(answer_contained(text, doc["answers"])),
        "exact": float(exact_match(text, doc["answers"])),
    }
