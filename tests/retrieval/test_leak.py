"""The leak filter (§4.4, Eq. 6): the fast bit-parallel overlap against the textbook DP."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memory3.retrieval.base import Hit
from memory3.retrieval.leak import (
    EVAL_THRESHOLD,
    filter_hits,
    leaks,
    overlap,
    overlap_reference,
    words,
)

small_seqs = st.lists(st.integers(0, 5), max_size=60)


@settings(max_examples=300, deadline=None)
@given(t=small_seqs, r=st.lists(st.integers(0, 5), max_size=24))
def test_overlap_matches_reference(t: list[int], r: list[int]) -> None:
    assert overlap(t, r) == pytest.approx(overlap_reference(t, r), abs=1e-12)


@settings(max_examples=200, deadline=None)
@given(
    t=small_seqs,
    r=st.lists(st.integers(0, 5), min_size=1, max_size=20),
    threshold=st.sampled_from([0.0, 0.25, 0.5, EVAL_THRESHOLD, 0.9, 1.0]),
)
def test_leaks_matches_reference(t: list[int], r: list[int], threshold: float) -> None:
    assert leaks(t, r, threshold) == (overlap_reference(t, r) > threshold)


@pytest.mark.parametrize("m", [63, 65, 100])
@pytest.mark.slow
def test_multiword_bit_vectors(m: int) -> None:
    """r longer than one 64-bit word: the carry between words must be right (t longer than 2|r|,
    so that several windows go through the numpy path)."""
    rng = np.random.default_rng(m)
    for trial in range(2):
        r = rng.integers(0, 4, m).tolist()
        t = rng.integers(0, 4, 2 * m + 12).tolist()
        if trial == 1:  # a near copy of r inside t
            t[10 : 10 + m] = [x if rng.random() > 0.2 else 9 for x in r]
        assert overlap(t, r) == pytest.approx(overlap_reference(t, r), abs=1e-12)


def test_span_limit_is_two_r_wide() -> None:
    r = list(range(1, 11))  # |r| = 10, so matches must fit in 20 tokens of t
    one_gap = [x for tok in r for x in (tok, 0)][:-1]  # spans 19 tokens
    two_gaps = [x for tok in r for x in (tok, 0, 0)][:-2]  # spans 28 tokens
    assert overlap(one_gap, r) == 1.0
    assert overlap(two_gaps, r) == pytest.approx(0.7)  # 7 of r's tokens fit in a 20-token window
    assert overlap_reference(two_gaps, r) == pytest.approx(0.7)


def test_verbatim_copy_and_unrelated() -> None:
    rng = np.random.default_rng(0)
    t = rng.integers(0, 5000, 2048)
    assert overlap(t, t[700:828]) == 1.0
    assert leaks(t, t[700:828], 0.9)
    unrelated = rng.integers(5000, 10000, 128)
    assert overlap(t, unrelated) == 0.0
    assert not leaks(t, unrelated, 0.0)


def test_strings_compare_words() -> None:
    assert words("The Cat, sat!") == ["the", "cat", "sat"]
    assert overlap("Yesterday the cat sat on the mat.", "THE CAT SAT") == 1.0
    assert overlap("a b c", "x y") == 0.0


def test_edge_cases_and_errors() -> None:
    assert overlap([1, 2, 3], []) == 0.0
    assert overlap([], [1, 2]) == 0.0
    assert not leaks([1, 2], [], 0.5)
    with pytest.raises(ValueError, match="one of each"):
        overlap("some text", [1, 2, 3])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        leaks([1], [1], 1.5)


def test_filter_hits_drops_leaks_and_refills() -> None:
    question = "What is the capital city of France and its population?"
    hits = [
        Hit(1, 0.9, "the capital city of France"),  # contained in the question: dropped
        Hit(2, 0.8, "Paris has about two million inhabitants."),
        Hit(3, 0.7, "Lyon is a city in France."),
        Hit(4, 0.6, "Marseille is a port."),
    ]
    kept = filter_hits(hits, question, EVAL_THRESHOLD)
    assert [h.ref_id for h in kept] == [2, 3, 4]
    assert [h.ref_id for h in filter_hits(hits, question, EVAL_THRESHOLD, k=2)] == [2, 3]
    assert [h.ref_id for h in filter_hits(hits, question, 1.0)] == [1, 2, 3, 4]
