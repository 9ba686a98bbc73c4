"""The leak filter (§4.4, Eq. 6): how much of a reference a text already contains.

    overlap(t, r) = max over windows w of t with |w| ≤ 2|r| of LCS(w, r) / |r|

Our reading of the paper's "LCS(t, r)/|r| where the matched span in t is at most 2|r| wide": the
longest common subsequence of r and t whose matched positions in t lie within 2|r| consecutive
tokens (first to last match inclusive). That equals the LCS of r with the best window of t of width
2|r| (a longer window can only help, so windows narrower than 2|r| never need checking, except when
t itself is shorter). overlap is 1.0 when r appears in t verbatim, and stays high when r appears in t
with a few tokens changed or inserted, which is what a leak looks like; unrelated text scores low
because its common tokens are spread too far apart.

Sequences are token ids, or words when given strings (lower-cased `\\w+` runs, so punctuation and
case do not matter).

The fast path runs the bit-parallel LCS of Hyyrö (2004) for many window starts at once in numpy
(r as a bit vector of ⌈|r|/64⌉ uint64 words, one row per window start), and skips window starts
whose bag-of-tokens intersection with r, an upper bound on the LCS, cannot beat the best found so
far (or cannot exceed the threshold, in `leaks`). `overlap_reference` is the textbook dynamic
program, kept to check it.

docs/design.md, "Retrieving memories": references with overlap > 0.9 with a training sequence are not paired with it; at
evaluation, references with overlap > 2/3 with the question are dropped.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np

from memory3.retrieval.base import Hit

TRAIN_THRESHOLD = 0.9  # §4.4: a training sequence is not paired with a reference it contains
EVAL_THRESHOLD = 2 / 3  # §4.4: at evaluation, drop references that overlap the question this much

_WORD = re.compile(r"\w+")
# Window starts run through the bit-parallel LCS together, best bound first: the single best one on
# a Python int (a verbatim copy is found there), then batches in numpy.
_FIRST_BATCH = 64
_BATCH = 512

H = TypeVar("H", bound=Hit)
Seq = Sequence[int] | np.ndarray | str  # token ids, or a text compared word by word


def words(text: str) -> list[str]:
    """The units `overlap` compares when given strings: lower-cased `\\w+` runs."""
    return _WORD.findall(text.lower())


def _as_ids(t: Seq, r: Seq) -> tuple[np.ndarray, np.ndarray]:
    """Both sequences as int64 arrays over one vocabulary."""
    if isinstance(t, str) != isinstance(r, str):
        raise ValueError(
            "overlap compares two texts or two token id sequences, got one of each "
            f"({type(t).__name__} and {type(r).__name__}); tokenize the text first"
        )
    if isinstance(t, str):
        vocab: dict[str, int] = {}
        tw = [vocab.setdefault(w, len(vocab)) for w in words(t)]
        rw = [vocab.setdefault(w, len(vocab)) for w in words(r)]  # type: ignore[arg-type]
        return np.asarray(tw, dtype=np.int64), np.asarray(rw, dtype=np.int64)
    return np.asarray(t, dtype=np.int64).reshape(-1), np.asarray(r, dtype=np.int64).reshape(-1)


def _window_bounds(t: np.ndarray, r: np.ndarray, width: int) -> np.ndarray:
    """For every window start s, Σ_c min(count of c in r, count of c in t[s:s+width]): the size of
    the bag intersection, an upper bound on LCS(t[s:s+width], r)."""
    n_starts = len(t) - width + 1
    uniq, r_counts = np.unique(r, return_counts=True)
    # (n + 1, U) running counts in t of each distinct token of r; time-major so cumsum adds rows.
    dtype = np.int16 if len(t) < np.iinfo(np.int16).max else np.int32
    cum = np.zeros((len(t) + 1, len(uniq)), dtype=dtype)
    np.cumsum(t[:, None] == uniq[None, :], axis=0, dtype=dtype, out=cum[1:])
    in_window = cum[width : width + n_starts] - cum[:n_starts]  # (n_starts, U)
    return np.minimum(in_window, r_counts[None, :].astype(dtype)).sum(axis=1, dtype=np.int64)


class _BitLCS:
    """Bit-parallel LCS of r against windows of t (Hyyrö 2004), many windows at once.

    V holds one bit per position of r, as W little-endian uint64 words; a 0 bit at i means r[i] is
    the last token of some common subsequence. For each text token c with match mask M[c]:
        V ← (V + (V & M[c])) | (V & ~M[c])
    and LCS = number of 0 bits among the low |r| bits. Carries only move up, so bits above |r|
    never disturb the count.
    """

    def __init__(self, t: np.ndarray, r: np.ndarray) -> None:
        m = len(r)
        self.m = m
        self.n_words = (m + 63) // 64
        uniq, inverse = np.unique(r, return_inverse=True)
        # Row 0: tokens absent from r (no match bits); row u+1: positions of uniq[u] in r.
        masks = np.zeros((len(uniq) + 1, self.n_words), dtype=np.uint64)
        bits = np.uint64(1) << (np.arange(m) % 64).astype(np.uint64)
        np.bitwise_or.at(masks, (inverse + 1, np.arange(m) // 64), bits)
        self.masks = masks
        pos = np.searchsorted(uniq, t)
        pos_clipped = np.minimum(pos, len(uniq) - 1)
        self.t_rows = np.where(uniq[pos_clipped] == t, pos_clipped + 1, 0)  # (n,) row in masks
        low = np.full(self.n_words, np.uint64(0xFFFFFFFFFFFFFFFF))
        if m % 64:
            low[-1] = np.uint64((1 << (m % 64)) - 1)
        self.low = low  # mask of the |r| meaningful bits

    def lcs(self, starts: np.ndarray, width: int) -> np.ndarray:
        """LCS(t[s:s+width], r) for each s in starts (all windows inside t)."""
        # (width, S): row of `masks` for the j-th token of each window.
        rows = np.ascontiguousarray(self.t_rows[starts[None, :] + np.arange(width)[:, None]])
        masks = [np.ascontiguousarray(self.masks[:, w]) for w in range(self.n_words)]
        v = [np.full(len(starts), np.uint64(0xFFFFFFFFFFFFFFFF)) for _ in range(self.n_words)]
        for j in range(width):
            row = rows[j]
            carry = None
            for w in range(self.n_words):  # little-endian words, carry moving up
                mk = masks[w][row]
                total = v[w] + (v[w] & mk)
                out = total < v[w]
                if carry is not None:
                    total += carry
                    out |= total < carry  # wrapped when adding the incoming carry
                carry = out.astype(np.uint64)
                v[w] = total | (v[w] & ~mk)
        zeros = sum(np.bitwise_count(~v[w] & self.low[w]).astype(np.int64) for w in range(self.n_words))
        return np.asarray(zeros, dtype=np.int64)

    def lcs_one(self, start: int, width: int) -> int:
        """The same for one window, on a Python int: cheaper than numpy's per-step overhead."""
        masks = [int.from_bytes(row.tobytes(), "little") for row in self.masks]
        full = (1 << self.m) - 1
        v = full
        for row in self.t_rows[start : start + width].tolist():
            u = v & masks[row]
            v = ((v + u) | (v - u)) & full
        return self.m - v.bit_count()


def _best_lcs(t: np.ndarray, r: np.ndarray, stop_above: int | None) -> int:
    """max over windows of LCS(window, r), pruned with the bag bound. With `stop_above`, returns
    as soon as the answer is known to exceed it, or to be at most it (then the value returned is
    ≤ stop_above but may be below the true maximum)."""
    m = len(r)
    if m == 0 or len(t) == 0:
        return 0
    width = min(2 * m, len(t))
    bounds = _window_bounds(t, r, width)
    order = np.argsort(-bounds, kind="stable")
    floor = -1 if stop_above is None else stop_above  # windows bounded by this cannot leak
    bit = _BitLCS(t, r)
    best = bit.lcs_one(int(order[0]), width)  # a verbatim copy is found here
    i, size = 1, _FIRST_BATCH
    while i < len(order) and best < m and (stop_above is None or best <= stop_above):
        batch = order[i : i + size]
        i, size = i + size, min(2 * size, _BATCH)
        batch = batch[bounds[batch] > max(best, floor)]
        if len(batch) == 0:
            break  # bounds are sorted: no later start can do better
        best = max(best, int(bit.lcs(batch, width).max()))
    return best


def overlap(t: Seq, r: Seq) -> float:
    """Eq. 6: the share of r found in t as a subsequence within a span of at most 2|r| tokens of t.

    t and r are both token id sequences, or both strings (compared as words). Empty r → 0.0.
    """
    ta, ra = _as_ids(t, r)
    if len(ra) == 0:
        return 0.0
    return _best_lcs(ta, ra, None) / len(ra)


def leaks(t: Seq, r: Seq, threshold: float) -> bool:
    """overlap(t, r) > threshold, usually much faster than computing the overlap: it stops as soon
    as the answer is known."""
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"leak threshold must be in [0, 1], got {threshold}")
    ta, ra = _as_ids(t, r)
    m = len(ra)
    if m == 0:
        return False
    # The largest LCS that does not leak, found with the same float test as `overlap(...) > threshold`.
    allowed = int(threshold * m)
    while allowed < m and (allowed + 1) / m <= threshold:
        allowed += 1
    while allowed > 0 and allowed / m > threshold:
        allowed -= 1
    return _best_lcs(ta, ra, allowed) / m > threshold


def leak_check(leak_texts: Sequence[str] | None, threshold: float | None) -> Callable[[int, str], bool]:
    """The leak filter of a batch of queries (the paper, §4.4): `is_leak(i, reference_text)` says
    whether the reference (nearly) contains query i's text, so that it is skipped and the next
    hit takes its place. Never true without both texts and a threshold."""
    if leak_texts is None or threshold is None:
        return lambda i, text: False
    return lambda i, text: leaks(leak_texts[i], text, threshold)


def filter_hits(hits: Sequence[H], text: str, threshold: float, k: int | None = None) -> list[H]:
    """Drop hits whose text overlaps `text` by more than `threshold` (words), keeping the order;
    with k, stop after k survivors, so the next hit takes a dropped hit's slot (§4.4)."""
    kept: list[H] = []
    for hit in hits:
        if k is not None and len(kept) >= k:
            break
        if not leaks(text, hit.text, threshold):
            kept.append(hit)
    return kept


def overlap_reference(t: Seq, r: Seq) -> float:
    """Plain-Python Eq. 6, straight from the definition: the LCS dynamic program of r against
    t[s:] for every start s, reading off LCS(t[s:e], r) for every end e with e - s ≤ 2|r|.
    O(|t|·|r|²): for tests only."""
    ta, ra = (a.tolist() for a in _as_ids(t, r))
    m = len(ra)
    if m == 0:
        return 0.0
    best = 0
    for s in range(len(ta)):
        prev = [0] * (m + 1)  # LCS(t[s:e], r[:i]) for the current e
        for e in range(s + 1, min(s + 2 * m, len(ta)) + 1):
            cur = [0] * (m + 1)
            c = ta[e - 1]
            for i in range(1, m + 1):
                cur[i] = prev[i - 1] + 1 if ra[i - 1] == c else max(prev[i], cur[i - 1])
            prev = cur
            best = max(best, cur[m])
    return best / m
