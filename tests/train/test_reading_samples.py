"""Self-supervised reading samples for SFT: blanks of every answer kind and quoted sentences on
train-split Wikipedia passages, never on a held-out article."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from memory3.lora import LoRAConfig
from memory3.train.config import OptimConfig


@pytest.fixture(scope="module")
def entities():
    from memory3.train.data import reading_training_entities

    return reading_training_entities()


@pytest.mark.slow
def test_reading_entities_are_train_split_and_never_a_heldout_article(entities) -> None:
    from memory3.data import natural
    from memory3.data.qa import load_qa, shipped_path, split_of

    assert len(entities) > 1000 and all(split_of(e.name) == "train" for e in entities)
    asked = {it.doc_id.removeprefix("wikipedia/") for s in natural.FILES for it in natural.load_natural(s)}
    asked |= {
        it.entity for it in load_qa(shipped_path("wikipedia.jsonl"), resolve=False) if it.split == "heldout"
    }
    asked |= {d.doc_id.removeprefix("wikipedia/") for d in natural.knowledge_base()}
    assert asked and not asked & {e.name for e in entities}
    assert all(e.kind.startswith("reading/") for e in entities)


@pytest.mark.slow
def test_reading_questions_ask_for_spans_of_every_kind_out_of_the_reference(entities) -> None:
    kinds = {"number": 0, "name": 0, "word": 0, "phrase": 0, "quote": 0}
    for e in entities[:400]:
        for f in e.facts:
            assert f.answer in e.reference
            if "____" in f.question:  # a blank: the answer is not in the question
                assert f.answer not in f.question.split("____")[0][-len(f.answer) - 2 :]
                assert f.question.count("____") == 1
                if re.fullmatch(r"[\d,.]+", f.answer):
                    kinds["number"] += 1
                elif f.answer[0].isupper():
                    kinds["name"] += 1
                elif " " in f.answer:
                    kinds["phrase"] += 1
                else:
                    kinds["word"] += 1
            else:  # a quote: the whole sentence
                assert len(f.answer.split()) >= 6 and f.answer.endswith((".", "!", "?", '"', ")"))
                kinds["quote"] += 1
    assert min(kinds.values()) >= 20, kinds


@pytest.mark.slow
def test_reading_facts_are_a_pure_function_of_the_article(entities) -> None:
    from memory3.train.data import reading_training_entities

    again = {e.name: e for e in reading_training_entities()}
    assert all(again[e.name] == e for e in entities[:200])


@pytest.mark.slow
def test_sft_data_draws_reading_groups_that_fit_a_chunk_and_the_memory(tmp_path: Path) -> None:
    from memory3.train.data import rng_for
    from memory3.train.loop import load_base
    from memory3.train.sft import SFTConfig, SFTData

    (tmp_path / "corpus.txt").write_text("The quick brown fox jumps over the lazy dog. " * 50)
    cfg = SFTConfig(
        model="preset:tiny",
        lora=LoRAConfig(rank=2),
        optim=OptimConfig(lr=1e-3, warmup_steps=1),
        fictional_entities=40,
        factbook_fraction=0.0,
        reading_fraction=1.0,
        questions_per_group=6,
        text_corpus=str(tmp_path / "corpus.txt"),
        text_seq_len=32,
        probe_questions=0,
    )
    _, tok = load_base(cfg.model, cfg.model_overrides, 0)
    data = SFTData(cfg, tok, tmp_path / "cache")
    assert len(data.reading) > 1000
    g = data.group(rng_for(0, 1))
    assert g == data.group(rng_for(0, 1))  # batches are a pure function of the step: exact resume
    assert len(g.references) == cfg.memory.memories_per_chunk and g.questions
    for f, owner in zip(g.questions, g.owners, strict=True):
        held = tok.decode(data.reference_ids(g.references[owner]))
        assert f.answer in held
        assert len(data.prompt_ids(f.question)) <= cfg.memory.chunk_tokens
    with pytest.raises(ValueError, match="together ≤ 1"):
        dataclasses.replace(cfg, factbook_fraction=0.5, wikipedia_fraction=0.3, reading_fraction=0.3)
