"""Paired comparisons of two answer sets on the same questions, with a 95% interval.

Two accuracies measured on the same questions differ by the mean of the per-question differences
d_i = a_i - b_i (each -1, 0 or 1), so the uncertainty of the difference comes from the questions
on which the two disagree, not from all of them: the interval is the mean of d plus or minus z
standard errors (normal approximation). Questions both answer alike add nothing to the mean but
narrow the interval, as they should. With few disagreements the approximation is too narrow
(none gives 0 to 0): read it with the counts `a_only` and `b_only`.

Used for memory against RAG within one run, for one reader against another (`compare_runs`, two
`memory3 eval qa --out` files) and for codecs against bf16 (`benchmarks/research/codec_qa_intervals.py`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

Z95 = 1.96


def paired_diff_ci(a: Sequence[bool], b: Sequence[bool], z: float = Z95) -> tuple[float, float]:
    """The 95% interval, in points, of accuracy(a) - accuracy(b) on the same questions."""
    if len(a) != len(b):
        raise ValueError(f"paired answers must be on the same questions: {len(a)} against {len(b)}")
    d = np.array(a, dtype=float) - np.array(b, dtype=float)
    half = z * d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else float("inf")
    return float(100 * (d.mean() - half)), float(100 * (d.mean() + half))


def paired_drop_ci(ok: Sequence[bool], base: Sequence[bool], z: float = Z95) -> list[float]:
    """The 95% interval, in points, of the accuracy `ok` loses against `base` (base - ok)."""
    lo, hi = paired_diff_ci(base, ok, z)
    return [lo, hi]


@dataclass(frozen=True)
class Paired:
    """a against b on the same n questions: how many each got right, how many only one got
    right, and a - b in points with its 95% interval."""

    a: str
    b: str
    n: int
    a_right: int
    b_right: int
    a_only: int
    b_only: int
    diff_points: float
    ci95: tuple[float, float]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def paired(a_ok: Sequence[bool], b_ok: Sequence[bool], a: str, b: str) -> Paired:
    n = len(a_ok)
    lo, hi = paired_diff_ci(a_ok, b_ok) if n else (float("nan"), float("nan"))
    return Paired(
        a,
        b,
        n,
        sum(a_ok),
        sum(b_ok),
        sum(x and not y for x, y in zip(a_ok, b_ok, strict=True)),
        sum(y and not x for x, y in zip(a_ok, b_ok, strict=True)),
        100 * (sum(a_ok) - sum(b_ok)) / n if n else float("nan"),
        (lo, hi),
    )


def compare_runs(
    results: dict[str, Any], other: dict[str, Any], mode: str = "memory", score: str = "contained"
) -> dict[str, Paired]:
    """Per set present in both, `mode` of `results` against `mode` of `other` (two `eval qa --out`
    files, e.g. two readers) on the questions both answered, matched by set and question id."""
    out: dict[str, Paired] = {}
    for name, s in results["sets"].items():
        o = other["sets"].get(name)
        if o is None:
            continue
        theirs = {it["id"]: it for it in o["items"] if mode in it[score]}
        pairs = [(it[score][mode], theirs[it["id"]][score][mode]) for it in s["items"] if it["id"] in theirs]
        if mode not in s["config"]["modes"] or not pairs:
            continue
        out[name] = paired([p[0] for p in pairs], [p[1] for p in pairs], "this", "other")
    if not out:
        raise ValueError(
            f"the two results share no set answered in mode {mode!r} with the same question ids: "
            "compare runs of the same --set and --split"
        )
    return out
