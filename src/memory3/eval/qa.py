"""`memory3 eval qa`: question answering with explicit memory, without memory, and with RAG (§7).

The three modes share one model and one retriever, so the only difference is how the retrieved
references reach the model: as memories read by attention ("memory"), as text in the prompt
("rag"), or not at all ("none"). Each question is scored two ways (`exact_match`, and
`answer_contained`, the fair score for chatty models that restate the question).

The retrieval hit rate, whether a reference of the question's gold document is among the k hits
of the question (the query RAG uses and memory mode's first chunk uses), is measured once per
question. Accuracy is also split by hit and miss, so a low memory score can be told apart: the
retriever did not find the fact, or the model did not read it.

Leak filter (§4.4): at evaluation, references whose overlap with the question exceeds 2/3 are
dropped and the next hit takes the slot (`leak_threshold`, passed to `Generator.generate` and to
the hit-rate search alike).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

from memory3.config import GenerationConfig
from memory3.data import natural, unseen
from memory3.data.qa import QAItem, answer_contained, exact_match, load_kb, load_qa, shipped_path
from memory3.eval.breakdown import answer_type_of, breakdown, family_of
from memory3.generate import MODES, Generator
from memory3.memory.ingest import Document
from memory3.retrieval.base import Hit, Retriever, above_floor, check_min_score
from memory3.retrieval.leak import EVAL_THRESHOLD

log = logging.getLogger(__name__)

SHIPPED_SETS = ("factbook", "fictional", "wikipedia")


class SplitSet(NamedTuple):
    """A set shipped as a dev and a test file that share one knowledge base."""

    files: dict[str, str]  # split -> file name
    load: Callable[[Any], list[QAItem]]  # split -> its questions, references resolved
    knowledge_base: Callable[[], list[Document]]


SPLIT_SETS: dict[str, SplitSet] = {
    natural.NAME: SplitSet(natural.FILES, natural.load_natural, natural.knowledge_base),
    unseen.NAME: SplitSet(unseen.FILES, unseen.load_unseen, unseen.knowledge_base),
}
KBChoice = Literal["set", "gold"]


@dataclass(frozen=True)
class QAEvalConfig:
    """How `evaluate_qa` runs. Greedy decoding; `max_new_tokens` leaves room for SmolLM2-style
    answers that restate the question before answering."""

    modes: tuple[str, ...] = ("none", "memory", "rag")
    k: int | None = None  # references per retrieval (memory: per 64-token chunk); None: the model's own
    batch_size: int = 8
    max_new_tokens: int = 48
    leak_threshold: float | None = EVAL_THRESHOLD
    min_score: float | None = None  # relevance floor for hits (cosine); None: the top k whatever their score

    def __post_init__(self) -> None:
        bad = [m for m in self.modes if m not in MODES]
        if bad or not self.modes:
            raise ValueError(f"modes must be a non-empty subset of {MODES}, got {self.modes}")
        if (self.k is not None and self.k < 1) or self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError(
                f"k, batch_size and max_new_tokens must be ≥ 1, got {self.k}, {self.batch_size}, "
                f"{self.max_new_tokens}"
            )
        if self.leak_threshold is not None and not 0.0 <= self.leak_threshold <= 1.0:
            raise ValueError(f"leak_threshold must be in [0, 1] or None, got {self.leak_threshold}")
        check_min_score(self.min_score)


@dataclass
class ItemResult:
    """One question: its generated answers and scores per mode, and where retrieval put its gold
    document (1-based rank among the k hits; None = missed, or no retrieval was run)."""

    id: str
    question: str
    answers: list[str]
    doc_id: str
    answer_type: str = ""  # `memory3.eval.breakdown.answer_type_of`
    family: str = ""  # `memory3.eval.breakdown.family_of`
    gold_rank: int | None = None
    hits: list[str] = field(default_factory=list)  # doc_ids of the k hits, best first
    texts: dict[str, str] = field(default_factory=dict)
    exact: dict[str, bool] = field(default_factory=dict)
    contained: dict[str, bool] = field(default_factory=dict)

    @property
    def hit(self) -> bool:
        return self.gold_rank is not None


@dataclass
class ModeTiming:
    """Wall time and generated tokens of one mode over the whole set (for orientation only:
    `memory3 bench speed` is the controlled speed measurement)."""

    wall_s: float = 0.0
    decode_s: float = 0.0
    generated_tokens: int = 0


@dataclass
class QAReport:
    items: list[ItemResult]
    config: QAEvalConfig
    retrieval: bool  # whether hit ranks were measured
    timing: dict[str, ModeTiming] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """Accuracy per mode (exact match, answer contained, and answer contained split by
        retrieval hit/miss) and the hit rate; fractions in [0, 1], None where undefined."""
        n = len(self.items)
        hits = [it for it in self.items if it.hit]
        misses = [it for it in self.items if not it.hit]
        modes: dict[str, Any] = {}
        for mode in self.config.modes:
            t = self.timing.get(mode, ModeTiming())
            modes[mode] = {
                "exact_match": _mean([it.exact[mode] for it in self.items]),
                "contained": _mean([it.contained[mode] for it in self.items]),
                "contained_when_hit": _mean([it.contained[mode] for it in hits]) if self.retrieval else None,
                "contained_when_missed": _mean([it.contained[mode] for it in misses])
                if self.retrieval
                else None,
                # of the questions answered right without memory, the share this mode keeps right:
                # what the model knew must survive reading memories (or the references' text)
                "keeps_known": _mean([it.contained[mode] for it in self.items if it.contained.get("none")])
                if "none" in self.config.modes and mode != "none"
                else None,
                "wall_s": t.wall_s,
                "decode_tokens_per_s": t.generated_tokens / t.decode_s if t.decode_s else None,
            }
        return {
            "n": n,
            "k": self.config.k,
            "hit_rate": _mean([it.hit for it in self.items]) if self.retrieval else None,
            "modes": modes,
            **breakdown([asdict(it) for it in self.items], self.config.modes),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "summary": self.summary(),
            "config": asdict(self.config),
            "meta": self.meta,
            "items": [asdict(it) for it in self.items],
        }


def _mean(xs: Sequence[bool]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def gold_rank(hits: Sequence[Hit], doc_id: str) -> int | None:
    """1-based rank of the first hit that belongs to the gold document, or None."""
    for i, h in enumerate(hits, start=1):
        if h.doc_id == doc_id:
            return i
    return None


def evaluate_qa(
    generator: Generator,
    items: Sequence[QAItem],
    config: QAEvalConfig = QAEvalConfig(),
    progress: bool = False,
) -> QAReport:
    """Answer every question in every mode, in batches, and score the answers.

    The generator's retriever serves all modes and the hit-rate search; it may be None only when
    `config.modes == ("none",)`.
    """
    if not items:
        raise ValueError("no questions to evaluate: the set (or its split/limit) is empty")
    if config.k is None:  # the number of memories the model reads per chunk, for every mode
        config = dataclasses.replace(config, k=generator.mem_cfg.memories_per_chunk)
    needs_retrieval = any(m != "none" for m in config.modes)
    retriever: Retriever | None = generator.retriever
    if needs_retrieval and retriever is None:
        raise ValueError(
            f"modes {config.modes} need a retriever: give --store, --kb, or evaluate --modes none only"
        )
    results = [
        ItemResult(it.id, it.question, list(it.answers), it.doc_id, answer_type_of(it), family_of(it))
        for it in items
    ]
    gen_cfg = GenerationConfig(max_new_tokens=config.max_new_tokens)
    batches = [
        list(range(s, min(s + config.batch_size, len(items))))
        for s in range(0, len(items), config.batch_size)
    ]
    timing = {m: ModeTiming() for m in config.modes}

    from tqdm.auto import tqdm

    bar = tqdm(total=len(items) * len(config.modes), desc="eval qa", unit="answer", disable=not progress)
    for idx in batches:
        questions = [items[i].question for i in idx]
        if retriever is not None:
            found = retriever.search(
                questions,
                config.k,
                leak_texts=questions if config.leak_threshold is not None else None,
                leak_threshold=config.leak_threshold,
            )
            found = above_floor(found, config.min_score)  # as generation drops them
            for i, hits in zip(idx, found, strict=True):
                results[i].gold_rank = gold_rank(hits, items[i].doc_id)
                results[i].hits = [h.doc_id for h in hits]
        for mode in config.modes:
            t0 = time.perf_counter()
            outs = generator.generate(
                questions,
                mode,  # type: ignore[arg-type]
                gen_cfg,
                k=config.k,
                leak_threshold=config.leak_threshold,
                min_score=config.min_score,
            )
            t = timing[mode]
            t.wall_s += time.perf_counter() - t0
            t.decode_s += generator.timing.decode_s
            t.generated_tokens += generator.timing.generated_tokens
            for i, out in zip(idx, outs, strict=True):
                r = results[i]
                r.texts[mode] = out.text
                r.exact[mode] = exact_match(out.text, r.answers)
                r.contained[mode] = answer_contained(out.text, r.answers)
            bar.update(len(idx))
    bar.close()
    report = QAReport(results, config, retrieval=retriever is not None, timing=timing)
    log.info("eval qa: %s", report.summary())
    return report


# --- question sets and their knowledge base -------------------------------------------------------


def resolve_set(name_or_path: str | Path, split: str = "heldout") -> Path:
    """A shipped set by name ("factbook", "fictional", "wikipedia", "natural", "unseen") or a
    JSONL path. The natural and unseen sets are one file per split: `split` "dev", or "test" (also
    for "heldout")."""
    if str(name_or_path) in SPLIT_SETS:
        return shipped_path(SPLIT_SETS[str(name_or_path)].files[_dev_or_test(str(name_or_path), split)])
    if str(name_or_path) in SHIPPED_SETS:
        return shipped_path(f"{name_or_path}.jsonl")
    path = Path(name_or_path)
    if not path.exists():
        raise FileNotFoundError(
            f"question set {str(name_or_path)!r} not found: give a JSONL file or one of "
            f"{(*SHIPPED_SETS, *SPLIT_SETS)}"
        )
    return path


def _dev_or_test(name: str, split: str) -> str:
    s = "test" if split == "heldout" else split
    if s not in ("dev", "test"):
        raise ValueError(
            f"--split {split} for the {name} set: give --split dev (for choosing settings) or "
            "--split test (the reported figure); it has no train split, as no training step reads it"
        )
    return s


def load_set(
    name_or_path: str | Path, split: str = "heldout", limit: int | None = None
) -> tuple[Path, list[QAItem]]:
    """A question set's file and the questions of one split, the first `limit` of them.

    "dev" and "test" are the splits of the natural and unseen sets (each its own file); the
    generated sets have "heldout", "train" and "all"; a hand-written file is all held out
    ("heldout" or "all")."""
    path = resolve_set(name_or_path, split)
    name = str(name_or_path)
    if name in SPLIT_SETS:
        return path, select_items(SPLIT_SETS[name].load(_dev_or_test(name, split)), "all", limit)
    if split in ("dev", "test"):
        raise ValueError(
            f"--split {split} is a split of the {' and '.join(SPLIT_SETS)} sets; {name!r} has heldout, "
            "train and all"
        )
    return path, select_items(load_qa(path), split, limit)


def select_items(items: Sequence[QAItem], split: str = "heldout", limit: int | None = None) -> list[QAItem]:
    """Items of one split ("heldout", "train" or "all"), the first `limit` of them."""
    if split not in ("heldout", "train", "all"):
        raise ValueError(f"split must be 'heldout', 'train' or 'all', got {split!r}")
    chosen = [it for it in items if split == "all" or it.split == split]
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be ≥ 1, got {limit}")
        chosen = chosen[:limit]
    return chosen


def kb_documents(
    set_path: str | Path, items: Sequence[QAItem], kb: KBChoice | str | Path = "set"
) -> list[Document]:
    """The knowledge base to retrieve from when no memory bank is given.

    - "gold": the gold references of `items` only (retrieval is then nearly trivial);
    - "set" (default): the gold references of every question in the set file (both splits) plus
      the set's whole KB file `<stem>_kb.jsonl` when there is one, so that the gold reference
      competes with distractors of the same kind;
    - a path: the documents of that file or directory (`memory3.memory.ingest.read_documents`),
      plus the gold references of `items` whose document it lacks.
    Gold documents keep the question's `doc_id`, so hits can be checked against it.
    """
    docs: dict[str, Document] = {}
    shared_kb = [s.knowledge_base for s in SPLIT_SETS.values() if Path(set_path).name in s.files.values()]
    if kb == "set" and shared_kb:
        docs = {d.doc_id: d for d in shared_kb[0]()}
        pool: Sequence[QAItem] = items
    elif kb == "set":
        set_path = Path(set_path)
        kb_file = set_path.with_name(f"{set_path.stem}_kb.jsonl")
        if kb_file.exists():
            for d in load_kb(kb_file):
                docs.setdefault(d.doc_id, d)
        pool = load_qa(set_path)
    elif kb == "gold":
        pool = items
    else:
        from memory3.memory.ingest import read_documents

        for d in read_documents(kb):
            docs.setdefault(d.doc_id, d)
        pool = items
    for it in pool:
        if it.reference:
            docs.setdefault(it.doc_id, Document(it.doc_id, it.reference, it.entity))
    missing = [it.id for it in items if it.doc_id not in docs]
    if missing:
        raise ValueError(
            f"{len(missing)} questions have no reference in the knowledge base (e.g. {missing[:3]}): "
            "give --store BANK or --kb FILE holding their doc_id, or a 'reference' on each line"
        )
    return list(docs.values())


def build_retriever(
    model: Any,
    tokenizer: Any,
    docs: Sequence[Document],
    memory_config: Any,
    embedder: Any,
    batch_size: int = 16,
    codec: Any = None,
    calibration: Any = None,
) -> Retriever:
    """Chunk `docs` into references and write them to memory in RAM (`InMemoryRetriever`).

    With a `codec` config (`memory3.memory.codec.CodecConfig`), the memories are then held as a
    bank built with it would hold them: the codec fitted on the same sample of references a
    build takes (`calibration` for a transform codec), every memory encoded and decoded."""
    import torch

    from memory3.memory.build import BuildConfig, codec_sample, fit_codec
    from memory3.memory.ingest import chunk_documents
    from memory3.memory.write import MemoryWriter, reference_prefix_ids
    from memory3.retrieval.inmemory import InMemoryRetriever

    refs = list(chunk_documents(docs, tokenizer, memory_config.reference_tokens))
    if not refs:
        raise ValueError("the knowledge base has no text to remember")
    prefix = reference_prefix_ids(tokenizer, model.config.bos_token_id, memory_config)
    writer = MemoryWriter(model, prefix, memory_config)
    log.info("writing %d memories from %d documents", len(refs), len(docs))
    with torch.inference_mode():
        retriever = InMemoryRetriever(refs, writer, tokenizer, embedder, batch_size=batch_size)
    if codec is not None and codec.kind != "none":
        build = BuildConfig(codec=codec)
        sample = retriever.memories(codec_sample(len(refs), build)).to("cpu", torch.float32)
        theta = model.config.rope
        retriever.through_codec(fit_codec(sample, build, theta, memory_config.kept_tokens, calibration))
    return retriever
