"""What every data source shares: a question (`QAItem`), the held-out split, a fact with its
sentence and question, and the token budget of a passage.

Importing this module reads no data.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any, Literal

Split = Literal["train", "heldout"]
SPLITS: tuple[Split, ...] = ("train", "heldout")
HELDOUT_FRACTION = 0.2
_SPLIT_SALT = "memory3-heldout-v1"

# A reference is at most 128 tokens (docs/design.md, "Writing a memory"); passages are built to stay under this estimate so
# they survive a real tokenizer with room to spare (checked in tests/data/test_data.py).
PASSAGE_TOKENS = 100


class QAFormatError(ValueError):
    """A question-set or knowledge-base file that does not follow the format."""


# --- the held-out split -------------------------------------------------------------------------


def split_of(key: str, heldout_fraction: float = HELDOUT_FRACTION) -> Split:
    """The split of an entity, from a hash of its case-folded name.

    A hash (not a random draw) keeps the split stable across runs, machines and data versions, and
    lets every source share it: the Factbook's "France" and the Wikipedia article "France" land on
    the same side, so training on one never leaks a held-out entity of the other.
    """
    if not 0.0 <= heldout_fraction <= 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1], got {heldout_fraction}")
    digest = hashlib.sha256(f"{_SPLIT_SALT}:{key.strip().casefold()}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    return "heldout" if u < heldout_fraction else "train"


# --- items and documents ------------------------------------------------------------------------


@dataclass
class QAItem:
    """One question with its acceptable answers and its gold reference."""

    id: str
    question: str
    answers: list[str]
    entity: str
    split: Split
    source: str
    doc_id: str
    reference: str
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self, with_text: bool = True) -> dict[str, Any]:
        d: dict[str, Any] = {
            "id": self.id,
            "question": self.question if with_text else None,
            "answers": list(self.answers),
            "entity": self.entity,
            "split": self.split,
            "source": self.source,
            "doc_id": self.doc_id,
            "reference": self.reference if with_text else None,
        }
        if self.meta:
            d["meta"] = self.meta
        return d


@dataclass(frozen=True)
class Fact:
    """One fact: the sentence that states it in the knowledge base and the question it answers."""

    key: str
    sentence: str
    question: str
    answers: tuple[str, ...]


# --- token budget -------------------------------------------------------------------------------

_TOKEN_PIECES = re.compile(r"\d|[^\W\d_]+|[^\w\s]")


def estimate_tokens(text: str) -> int:
    """A tokenizer-free upper estimate of a Llama-style BPE token count: one per digit (SmolLM2
    splits numbers into digits), one per punctuation mark, and one per 5 letters of a word (rare
    names split into pieces). Lets the data build without loading a model."""
    n = 0
    for piece in _TOKEN_PIECES.findall(text):
        n += 1 + (len(piece) - 1) // 5 if piece[0].isalpha() else 1
    return n
