"""Evaluation and training data: question sets with gold references, knowledge bases, held-out
entities, and scoring.

- `items`: what every source shares: `QAItem`, `Fact`, `split_of` (the held-out split shared by
  all sources) and the token budget of a passage.
- `qa`: the JSONL files (question sets, knowledge bases of `Document`s) and answer scoring; it
  re-exports `items`.
- `factbook`: CIA World Factbook facts as passages and questions.
- `fictional`: invented people, towns and companies that no model can know.
- `wikipedia`: the bundled Wikipedia summaries (CC BY-SA 4.0; read at run time, never copied).
- `natural`: hand-written questions on the Wikipedia summaries.
- `sets`: the generator of the shipped sets (`python -m memory3.data.sets`), above all sources.

Importing this package reads no data: the packages that hold the data are opened on first use.
"""

from memory3.data.qa import (
    Document,
    QAFormatError,
    QAItem,
    Split,
    answer_contained,
    exact_match,
    load_kb,
    load_qa,
    normalize_answer,
    save_kb,
    save_qa,
    shipped_path,
    split_of,
    token_f1,
)

__all__ = [
    "Document",
    "QAFormatError",
    "QAItem",
    "Split",
    "answer_contained",
    "exact_match",
    "load_kb",
    "load_qa",
    "normalize_answer",
    "save_kb",
    "save_qa",
    "shipped_path",
    "split_of",
    "token_f1",
]
