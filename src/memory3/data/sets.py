"""The shipped question sets: `generate` builds the Factbook, fictional-entity and Wikipedia sets
and writes them with their knowledge bases.

Run `python -m memory3.data.sets --out src/memory3/assets/qa` to regenerate the shipped sets.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from memory3.data.factbook import build_factbook, sample_per_entity
from memory3.data.fictional import build_fictional
from memory3.data.qa import count_splits, save_kb, save_qa
from memory3.data.wikipedia import build_wikipedia_qa

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerateConfig:
    """What `generate` writes. The counts keep the shipped files small; the full sets are built
    at run time by `build_factbook()`, `build_fictional()` and `build_wikipedia_qa()`."""

    factbook_questions_per_country: int = 2
    fictional_entities: int = 80
    fictional_seed: int = 0
    wikipedia_questions: int = 300


def generate(out: str | Path, config: GenerateConfig = GenerateConfig()) -> dict[str, dict[str, int]]:
    """Write `factbook.jsonl`, `fictional.jsonl`, `wikipedia.jsonl` with `factbook_kb.jsonl` and
    `fictional_kb.jsonl` under `out`; returns the item count per file and split.

    References are left out of the question files (rebuilt from the KB by `load_qa`); Wikipedia
    text is never written (only titles, answers and answer offsets).
    """
    out = Path(out)
    counts: dict[str, dict[str, int]] = {}

    docs, items = build_factbook()
    save_kb(docs, out / "factbook_kb.jsonl")
    items = sample_per_entity(items, config.factbook_questions_per_country)
    save_qa(items, out / "factbook.jsonl", with_text=False)
    counts["factbook"] = count_splits(items)

    docs, items = build_fictional(config.fictional_entities, seed=config.fictional_seed)
    save_kb(docs, out / "fictional_kb.jsonl")
    save_qa(items, out / "fictional.jsonl", with_text=False)
    counts["fictional"] = count_splits(items)

    items = build_wikipedia_qa(limit=config.wikipedia_questions)
    save_qa(items, out / "wikipedia.jsonl", with_text=False)
    counts["wikipedia"] = count_splits(items)
    for name, c in counts.items():
        log.info("%s: %s", name, c)
    return counts


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m memory3.data.sets", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for the JSONL files")
    parser.add_argument(
        "--factbook-per-country", type=int, default=GenerateConfig.factbook_questions_per_country
    )
    parser.add_argument("--fictional-entities", type=int, default=GenerateConfig.fictional_entities)
    parser.add_argument("--fictional-seed", type=int, default=GenerateConfig.fictional_seed)
    parser.add_argument("--wikipedia-questions", type=int, default=GenerateConfig.wikipedia_questions)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = GenerateConfig(
        args.factbook_per_country, args.fictional_entities, args.fictional_seed, args.wikipedia_questions
    )
    counts = generate(args.out, config)
    print(json.dumps(counts))


if __name__ == "__main__":
    main()
