"""QA accuracy broken down by answer type and by family, with memory/RAG on every row.

A question's answer type is what it asks for (`memory3.data.natural.ANSWER_TYPES`: number,
person, place, name, word, phrase). Hand-written sets label it (`answer_type`); the generated
sets' types follow from the fact each question asks (a Factbook capital is a place, a fictional
person's occupation a word); an unlabelled custom question gets a guess from its answer's shape.
Its family is where its passage and question come from: a hand-written set's `family`, the
generator and entity kind of the generated sets ("fictional/town", "factbook", "wikipedia/cloze").
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from memory3.data.qa import QAItem
from memory3.eval.paired import paired

# the generated sets' facts (the last part of a question id) and the type of their answers
_FACT_TYPES: dict[str, str] = {
    "factbook/anthem": "name",
    "factbook/area": "number",
    "factbook/capital": "place",
    "factbook/coastline": "number",
    "factbook/currency": "word",
    "factbook/gdp_per_capita": "number",
    "factbook/highest_point": "place",
    "factbook/highest_point_height": "number",
    "factbook/independence": "number",
    "factbook/independence_from": "place",
    "factbook/internet_code": "name",
    "factbook/life_expectancy": "number",
    "factbook/median_age": "number",
    "factbook/national_holiday": "number",
    "factbook/official_language": "name",
    "factbook/official_name": "name",
    "factbook/population": "number",
    "fictional/city": "place",
    "fictional/employees": "number",
    "fictional/founded": "number",
    "fictional/founder": "person",
    "fictional/product": "phrase",
    "fictional/birth_year": "number",
    "fictional/death_year": "number",
    "fictional/birthplace": "place",
    "fictional/moved_to": "place",
    "fictional/occupation": "word",
    "fictional/population": "number",
    "fictional/known_for": "phrase",
    "fictional/province": "place",
    "fictional/water": "place",
}
_DIGIT = re.compile(r"\d")


def guess_type(answer: str) -> str:
    """An unlabelled answer's type from its shape: digits make a number, a capital a name."""
    if _DIGIT.search(answer):
        return "number"
    if answer[:1].isupper():
        return "name"
    return "phrase" if len(answer.split()) > 1 else "word"


def answer_type_of(item: QAItem) -> str:
    labelled = item.meta.get("answer_type")
    if isinstance(labelled, str) and labelled:
        return labelled
    if item.source in ("factbook", "fictional"):
        t = _FACT_TYPES.get(f"{item.source}/{item.id.rsplit('/', 1)[-1]}")
        if t:
            return t
    if item.source == "wikipedia" and "kind" in item.meta:
        return "number" if item.meta["kind"] in ("year", "number") else "name"
    return guess_type(item.answers[0])


def family_of(item: QAItem) -> str:
    labelled = item.meta.get("family")
    if isinstance(labelled, str) and labelled:
        return labelled
    if item.source == "fictional":  # fictional/<kind>/<n>/<fact>
        return "/".join(item.id.split("/")[:2])
    if item.source == "wikipedia":
        return "wikipedia/cloze"
    return item.source


def group_rows(items: Sequence[dict[str, Any]], key: str, modes: Sequence[str]) -> list[dict[str, Any]]:
    """One row per value of `key` (most questions first): n, answer-contained accuracy per mode,
    and memory/RAG (the share of RAG's accuracy memory keeps) where both were run."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for it in items:
        groups.setdefault(it.get(key) or "?", []).append(it)
    rows = []
    for value, its in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        acc = {m: sum(it["contained"][m] for it in its) / len(its) for m in modes}
        ratio = acc["memory"] / acc["rag"] if "memory" in acc and acc.get("rag") else None
        rows.append({key: value, "n": len(its), "contained": acc, "memory_over_rag": ratio})
    return rows


def breakdown(items: Sequence[dict[str, Any]], modes: Sequence[str]) -> dict[str, Any]:
    """`by_answer_type` and `by_family` rows, and memory against RAG paired on the same
    questions with a 95% interval, from a report's items (`ItemResult` as dicts, as saved)."""
    out: dict[str, Any] = {
        "by_answer_type": group_rows(items, "answer_type", modes),
        "by_family": group_rows(items, "family", modes),
    }
    if "memory" in modes and "rag" in modes and items:
        p = paired(
            [it["contained"]["memory"] for it in items],
            [it["contained"]["rag"] for it in items],
            "memory",
            "rag",
        )
        out["memory_vs_rag"] = p.to_dict()
    return out


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def breakdown_md(summary: dict[str, Any]) -> str:
    """Markdown of a set's breakdown: a table by answer type, one by family, and memory against
    RAG paired (empty for results written before reports had a breakdown)."""
    from memory3.eval.report import table

    if "by_answer_type" not in summary:
        return ""
    modes = list(summary["modes"])
    parts = []
    for key, label in (("answer_type", "answer type"), ("family", "family")):
        rows = [
            {
                label: r[key],
                "n": r["n"],
                **{m: _pct(r["contained"][m]) for m in modes},
                "memory/RAG": "–" if r["memory_over_rag"] is None else f"{r['memory_over_rag']:.2f}",
            }
            for r in summary[f"by_{key}"]
        ]
        parts.append(table(rows))
    p = summary.get("memory_vs_rag")
    if p:
        lo, hi = p["ci95"]
        parts.append(
            f"Memory − RAG on the same {p['n']} questions: {p['diff_points']:+.1f} points (paired 95% "
            f"interval {lo:+.1f} to {hi:+.1f}); right with memory only: {p['a_only']}, with RAG only: "
            f"{p['b_only']}."
        )
    return "\n\n".join(parts)
