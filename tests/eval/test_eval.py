"""Evaluation and benchmark harness: QA scoring and hit rate, perplexity, speed, storage, plots, CLI."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_model
from memory3.config import GenerationConfig, MemoryConfig, ModelConfig
from memory3.data.qa import QAItem, answer_contained, exact_match
from memory3.eval.ppl import PPLConfig, PPLText, perplexity
from memory3.eval.qa import QAEvalConfig, evaluate_qa, gold_rank
from memory3.eval.speed import SpeedConfig, bench_speed, make_prompts, paired_ratio, ratios, throughput
from memory3.eval.storage import (
    PAPER_CODEC,
    bytes_per_memory,
    codec_size,
    full_kv_bytes,
    storage_rows,
    text_sample,
)
from memory3.generate import Generator
from memory3.memory.ingest import Document, chunk_documents
from memory3.memory.write import Memories, MemoryWriter
from memory3.model import KVCache
from memory3.retrieval.base import Hit
from memory3.retrieval.embed import HashingEmbedder
from memory3.retrieval.inmemory import InMemoryRetriever

FACTS = {
    "zantoria": "Quellmar is the capital of Zantoria, a port on the Amber Sea.",
    "fjarn": "Mount Fjarn, 4,211 metres high, is the highest point of Zantoria.",
    "velmora": "Velmora Castiglio was a glassblower born in Dresk in 1873.",
    "dresk": "The Dresk glassworks closed in 1931 after a fire.",
    "zant": "Zantoria's currency is the zant, divided into 100 pell.",
    "amber": "The Amber Sea freezes every winter north of Quellmar.",
}
QUESTIONS = [
    ("q0", "What is the capital of Zantoria?", "zantoria"),
    ("q1", "How high is Mount Fjarn?", "fjarn"),
    ("q2", "When was Velmora Castiglio born?", "velmora"),
    ("q3", "When did the Dresk glassworks close?", "dresk"),
    ("q4", "What is the currency of Zantoria?", "zant"),
    ("q5", "When does the Amber Sea freeze?", "amber"),
]


@pytest.fixture(scope="module")
def setup(tok):
    model = tiny_model(seed=5, vocab_size=len(tok), bos_token_id=1, eos_token_id=2)
    cfg = MemoryConfig(reference_tokens=24, kept_tokens=4, chunk_tokens=8, memories_per_chunk=2)
    gen = Generator(model, tok, memory_config=cfg, chat=False)
    writer = MemoryWriter(model, gen.prefix_ids, cfg)
    docs = [Document(d, t, d) for d, t in FACTS.items()]
    refs = list(chunk_documents(docs, tok, cfg.reference_tokens))
    retr = InMemoryRetriever(refs, writer, tok, HashingEmbedder(128))
    gen.set_retriever(retr)
    return model, cfg, gen, retr


def _items(answers: Sequence[Sequence[str]] | None = None) -> list[QAItem]:
    return [
        QAItem(qid, q, list(answers[i]) if answers else ["?"], "e", "heldout", "test", doc, FACTS[doc])
        for i, (qid, q, doc) in enumerate(QUESTIONS)
    ]


# --- eval qa -------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_qa_accuracy_equals_hand_computation_from_generated_texts(setup) -> None:
    _, _, gen, _ = setup
    cfg = QAEvalConfig(k=2, batch_size=4, max_new_tokens=6)
    questions = [q for _, q, _ in QUESTIONS]
    gcfg = GenerationConfig(max_new_tokens=cfg.max_new_tokens)
    texts: dict[str, list[str]] = {}
    for mode in cfg.modes:  # the same batches as evaluate_qa: 4 then 2
        texts[mode] = [
            o.text
            for s in (0, 4)
            for o in gen.generate(questions[s : s + 4], mode, gcfg, k=2, leak_threshold=cfg.leak_threshold)
        ]
    # answers that some modes get right: a word of the no-memory answer, the whole memory answer
    answers = []
    for i in range(len(QUESTIONS)):
        if i % 3 == 0 and texts["none"][i].split():
            answers.append([texts["none"][i].split()[-1]])
        elif i % 3 == 1 and texts["memory"][i].strip():
            answers.append([texts["memory"][i]])
        else:
            answers.append(["zzz-never-said"])
    items = _items(answers)
    report = evaluate_qa(gen, items, cfg)
    summary = report.summary()
    for mode in cfg.modes:
        want_c = sum(answer_contained(t, a) for t, a in zip(texts[mode], answers, strict=True)) / len(items)
        want_em = sum(exact_match(t, a) for t, a in zip(texts[mode], answers, strict=True)) / len(items)
        assert summary["modes"][mode]["contained"] == pytest.approx(want_c)
        assert summary["modes"][mode]["exact_match"] == pytest.approx(want_em)
        assert [r.texts[mode] for r in report.items] == texts[mode]
    assert summary["modes"]["none"]["contained"] >= 1 / 3  # the test is not vacuous
    assert summary["modes"]["memory"]["exact_match"] >= 1 / 3
    known = [i for i, (t, a) in enumerate(zip(texts["none"], answers, strict=True)) if answer_contained(t, a)]
    for mode in ("memory", "rag"):
        kept = sum(answer_contained(texts[mode][i], answers[i]) for i in known) / len(known)
        assert summary["modes"][mode]["keeps_known"] == pytest.approx(kept)
    assert summary["modes"]["none"]["keeps_known"] is None


class ControlledRetriever:
    """Returns the hits a test chooses (by doc_id, best first), memories from a real retriever."""

    def __init__(self, inner: InMemoryRetriever, plan: dict[str, list[str]]) -> None:
        self.inner, self.plan = inner, plan
        self.calls: list[tuple[list[str], float | None]] = []
        self.row = {r.doc_id: i for i, r in enumerate(inner.references)}

    @property
    def memory_fingerprint(self) -> str:
        return self.inner.memory_fingerprint

    def search(self, queries, k, leak_texts=None, leak_threshold=None):
        self.calls.append((list(queries), leak_threshold))
        out = []
        for q in queries:
            docs = self.plan.get(q, [])[:k]
            out.append([Hit(self.row[d], 1.0 - 0.1 * j, FACTS[d], d, d) for j, d in enumerate(docs)])
        return out

    def memories(self, ref_ids):
        return self.inner.memories(ref_ids)


@pytest.mark.slow
def test_hit_rate_and_gold_rank_for_controlled_hits(setup, tok) -> None:
    model, cfg, _, retr = setup
    others = [d for d in FACTS if d not in ("zantoria", "fjarn")]
    plan = {
        QUESTIONS[0][1]: ["amber", "zantoria"],  # gold at rank 2: hit
        QUESTIONS[1][1]: ["amber", "dresk"],  # gold absent: miss
        QUESTIONS[2][1]: ["velmora"],  # rank 1: hit
        QUESTIONS[3][1]: [*others[:4], "dresk"],  # gold 5th of 5 but "dresk" is also in others: rank 2
        QUESTIONS[4][1]: ["amber", "dresk", "velmora", "fjarn", "zantoria", "zant"],  # 6th with k=5: miss
        QUESTIONS[5][1]: [],  # nothing retrieved: miss
    }
    controlled = ControlledRetriever(retr, plan)
    gen = Generator(model, tok, controlled, cfg, chat=False)
    report = evaluate_qa(gen, _items(), QAEvalConfig(modes=("none",), k=5, max_new_tokens=2))
    ranks = [r.gold_rank for r in report.items]
    assert ranks == [2, None, 1, 2, None, None]
    assert report.summary()["hit_rate"] == pytest.approx(3 / 6)
    assert all(th == pytest.approx(2 / 3) for _, th in controlled.calls)  # the eval leak filter
    assert gold_rank([Hit(0, 1.0, "", "", "x"), Hit(1, 0.5, "", "", "y")], "y") == 2


@pytest.mark.slow
def test_build_retriever_through_a_codec_holds_what_a_bank_would(setup, tok) -> None:
    """`build_retriever(codec=…)` holds each memory as encoded and decoded by a codec fitted on
    the build's sample of references: SQ8 keeps positions and is close to exact; a transform codec
    at 8 bits per vector is far coarser; `none` leaves the written memories as they are."""
    from memory3.eval.qa import build_retriever
    from memory3.memory.codec import CodecConfig

    model, cfg, _, exact = setup
    docs = [Document(d, t, d) for d, t in FACTS.items()]
    ids = list(range(len(exact)))
    want = exact.memories(ids)  # the fixture wrote these outside inference mode
    want = Memories(want.k.detach(), want.v.detach(), want.positions, want.fingerprint)
    errors = {}
    for name in ("none", "default", "tc8"):
        retr = build_retriever(model, tok, docs, cfg, HashingEmbedder(128), codec=CodecConfig.parse(name))
        got = retr.memories(ids)
        assert torch.equal(got.positions, want.positions)
        errors[name] = float((got.k - want.k).norm() / want.k.norm())
    assert errors["none"] == 0 and 0 < errors["default"] < 0.02 < errors["tc8"]


@pytest.mark.slow
def test_qa_reads_as_many_references_as_the_model_reads_memories_unless_told(setup, tok) -> None:
    model, cfg, _, retr = setup
    q, gold = QUESTIONS[0][1], QUESTIONS[0][2]
    others = [d for d in FACTS if d != gold]
    controlled = ControlledRetriever(retr, {q: [others[0], others[1], gold]})  # gold 3rd
    for per_chunk, k, hit in ((2, None, False), (3, None, True), (2, 3, True)):
        mc = dataclasses.replace(cfg, memories_per_chunk=per_chunk)
        gen = Generator(model, tok, controlled, mc, chat=False)
        report = evaluate_qa(gen, _items()[:1], QAEvalConfig(modes=("none",), k=k, max_new_tokens=2))
        assert report.summary()["k"] == (per_chunk if k is None else k)
        assert (report.items[0].gold_rank is not None) == hit


def test_qa_config_rejects_unknown_modes() -> None:
    with pytest.raises(ValueError, match="modes"):
        QAEvalConfig(modes=("memory", "telepathy"))


# --- eval ppl ------------------------------------------------------------------------------------------

TEXTS = [
    PPLText(
        "Quellmar is the capital of Zantoria, a port on the Amber Sea. The Amber Sea freezes every "
        "winter north of Quellmar, and the port closes for three months.",
        "Quellmar",
    ),
    PPLText(
        "Velmora Castiglio was a glassblower born in Dresk in 1873. The Dresk glassworks closed in 1931.", "V"
    ),
    PPLText("Mount Fjarn, 4,211 metres high, is the highest point of Zantoria.", "Fjarn"),
]


@pytest.mark.slow
def test_ppl_without_memory_is_exp_mean_nll_of_the_model_logits(setup, tok) -> None:
    model = setup[0]
    config = PPLConfig(min_tokens=2, max_tokens=40, batch_size=2)  # batches of 2: padding is exercised
    res = perplexity(model, tok, TEXTS, "none", config=config)
    nll, n = 0.0, 0
    with torch.no_grad():
        for t in TEXTS:
            ids = torch.tensor([tok(t.text).input_ids[:40]])
            logits = model(ids)[0].float()
            nll += F.cross_entropy(logits[:-1], ids[0, 1:], reduction="sum").item()
            n += ids.shape[1] - 1
    assert res.tokens == n
    assert res.perplexity == pytest.approx(math.exp(nll / n), rel=1e-4)


@pytest.mark.slow
def test_ppl_prefix_control_is_the_memory_layout_without_memories(setup, tok) -> None:
    model, cfg, gen, retr = setup
    config = PPLConfig(min_tokens=2, max_tokens=30, k=2)
    prefix = perplexity(model, tok, TEXTS[:1], "prefix", None, cfg, config)
    ids = tok(TEXTS[0].text).input_ids[:30]
    p, R = len(gen.prefix_ids), cfg.reference_tokens
    pos = list(range(p)) + list(range(p + R, p + R + len(ids)))
    with torch.no_grad():
        logits = model(torch.tensor([gen.prefix_ids + ids]), torch.tensor([pos]))[0, p:-1].float()
    nll = F.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum").item()
    assert prefix.perplexity == pytest.approx(math.exp(nll / (len(ids) - 1)), rel=1e-4)
    nothing = perplexity(model, tok, TEXTS[:1], "memory", ControlledRetriever(retr, {}), cfg, config)
    assert nothing.perplexity == pytest.approx(prefix.perplexity, rel=1e-6)  # no hits: no memory read
    found = perplexity(model, tok, TEXTS[:1], "memory", retr, cfg, config)
    assert found.retrievals > 0 and found.perplexity != pytest.approx(prefix.perplexity, rel=1e-6)


class RecordingRetriever(ControlledRetriever):
    """Real search, recorded."""

    def search(self, queries, k, leak_texts=None, leak_threshold=None):
        self.calls.append((list(queries), leak_threshold))
        self.leak_texts = list(leak_texts or [])
        return self.inner.search(queries, k, leak_texts, leak_threshold)


def test_ppl_memory_chunk_reads_memories_retrieved_with_the_previous_chunk(setup, tok) -> None:
    model, cfg, _, retr = setup
    rec = RecordingRetriever(retr, {})
    text = TEXTS[0]
    ids = tok(text.text).input_ids[:40]
    perplexity(model, tok, [text], "memory", rec, cfg, PPLConfig(min_tokens=2, max_tokens=40, k=2))
    ((queries, threshold),) = rec.calls
    n = cfg.chunk_tokens
    want = [
        tok.decode(ids[c * n : (c + 1) * n], skip_special_tokens=True) for c in range((len(ids) - 1) // n)
    ]
    assert queries == want  # chunk 0 has no query; chunk c queries with chunk c-1's text
    assert threshold == pytest.approx(2 / 3)
    assert rec.leak_texts == [tok.decode(ids, skip_special_tokens=True)] * len(want)


@pytest.mark.slow
def test_ppl_memory_equals_token_by_token_decoding_with_chunk_memories(setup, tok) -> None:
    """The block-masked pass against an independent path: the KV cache, one token at a time,
    swapping in each chunk's memories (what generation does while decoding)."""
    model, cfg, gen, retr = setup
    text = TEXTS[0]
    ids = tok(text.text).input_ids[:30]
    config = PPLConfig(min_tokens=2, max_tokens=30, k=2, leak_threshold=None)
    res = perplexity(model, tok, [text], "memory", retr, cfg, config)
    n, p, R, S = cfg.chunk_tokens, len(gen.prefix_ids), cfg.reference_tokens, cfg.kept_tokens
    queries = [
        tok.decode(ids[c * n : (c + 1) * n], skip_special_tokens=True) for c in range((len(ids) - 1) // n)
    ]
    hits = [[], *retr.search(queries, 2)]
    assert sum(map(len, hits)) > 0
    cache = KVCache(model.config, 1, p + len(ids), 2 * S, model.device, model.dtype)
    nll = 0.0
    with torch.no_grad():
        model(torch.tensor([gen.prefix_ids]), torch.arange(p)[None], cache=cache)
        for j, t in enumerate(ids):
            if j % n == 0:
                h = hits[j // n]
                if h:
                    m = retr.memories([x.ref_id for x in h])
                    k = m.k.permute(1, 2, 0, 3, 4).reshape(m.k.shape[1], m.k.shape[2], -1, m.k.shape[4])
                    v = m.v.permute(1, 2, 0, 3, 4).reshape(m.v.shape[1], m.v.shape[2], -1, m.v.shape[4])
                    cache.set_memory(k[:, None], v[:, None], m.valid.reshape(1, -1))
                else:
                    cache.clear_memory()
            logits = model(torch.tensor([[t]]), torch.tensor([[p + R + j]]), cache=cache)[0, -1].float()
            if j + 1 < len(ids):
                nll -= torch.log_softmax(logits, -1)[ids[j + 1]].item()
    assert res.perplexity == pytest.approx(math.exp(nll / (len(ids) - 1)), rel=1e-4)


# --- bench speed ---------------------------------------------------------------------------------------


def test_throughput_is_batch_times_generated_over_wall_time() -> None:
    assert throughput(8, 128, 16.0) == 64.0
    assert throughput(32, 128, 10.0) == pytest.approx(409.6)
    with pytest.raises(ValueError):
        throughput(1, 1, 0.0)


def test_ratios_compare_memory_with_rag_and_no_retrieval() -> None:
    def row(mode, cache, tput, ttft, dec):
        s = lambda x: {"median": x, "min": x, "max": x, "runs": [x]}  # noqa: E731
        return {
            "mode": mode,
            "cache": cache,
            "batch": 32,
            "throughput": s(tput),
            "ttft_s": s(ttft),
            "decode_tokens_per_s": s(dec),
        }

    rows = [
        row("none", "-", 100.0, 0.5, 120.0),
        row("rag", "warm", 40.0, 3.0, 90.0),
        row("memory", "warm", 96.0, 0.6, 118.0),
    ]
    (r,) = ratios(rows)
    assert r["throughput_memory_over_rag"] == pytest.approx(2.4)
    assert r["throughput_memory_over_none"] == pytest.approx(0.96)
    assert r["ttft_memory_over_rag"] == pytest.approx(0.2)
    assert r["throughput_memory_over_none_paired"] == pytest.approx(0.96)


def test_paired_ratio_compares_runs_of_the_same_round() -> None:
    """Throughputs of three rounds measured on a shared machine: the ratio of the medians (0.84)
    sets memory's round 3 against none's round 1; the ratios within rounds are 0.94, 0.78, 0.88."""
    none = {"runs": [116.7, 120.9, 111.6]}
    memory = {"runs": [110.1, 93.8, 98.1]}
    assert paired_ratio(memory, none) == pytest.approx(98.1 / 111.6)
    assert paired_ratio({"runs": [1.0, 3.0, 2.0]}, {"runs": [2.0, 2.0, 2.0]}) == 1.0


@pytest.mark.slow
def test_bench_speed_counts_retrievals_like_the_paper(setup, tok) -> None:
    model, cfg, _, retr = setup
    gen = Generator(model, tok, None, cfg, chat=False)
    prompts = make_prompts(tok, list(FACTS.values()) * 3, 2, 16)
    assert all(len(tok(p).input_ids) <= 16 for p in prompts)
    config = SpeedConfig(batch_sizes=(1, 2), prompt_tokens=16, new_tokens=10, k=2, runs=1)
    res = bench_speed(gen, prompts, lambda c: retr if c == "warm" else None, config)
    assert "cold" in res["skipped"]
    per = {(r["mode"], r["batch"]): r for r in res["rows"]}
    assert set(per) == {(m, b) for m in ("none", "rag", "memory") for b in (1, 2)}
    for b in (1, 2):
        # 2 prompt chunks + 1 after the first decoded chunk (none after the last token)
        assert per[("memory", b)]["retrievals_per_sequence"] == 3
        assert per[("rag", b)]["retrievals_per_sequence"] == 1
        assert per[("none", b)]["retrievals_per_sequence"] == 0
        assert per[("none", b)]["new_tokens"] == 10
        t = per[("memory", b)]["throughput"]
        assert t["min"] <= t["median"] <= t["max"]
    assert {(r["batch"], r["cache"]) for r in res["ratios"]} == {(1, "warm"), (2, "warm")}


# --- bench storage -------------------------------------------------------------------------------------


def test_storage_arithmetic_for_the_paper_preset() -> None:
    paper = ModelConfig.from_preset("memory3-2b")
    mc = MemoryConfig()
    bf16 = codec_size("none", paper.head_dim).bytes_per_vector
    assert bf16 == 160
    assert bytes_per_memory(paper, mc, bf16) == 22 * 2 * 8 * 8 * 80 * 2 == 440 * 1024
    assert full_kv_bytes(paper, 128) == 44 * 2 * 8 * 128 * 80 * 2
    assert full_kv_bytes(paper, 128, heads=paper.n_head) / (440 * 1024) == pytest.approx(
        160
    )  # the paper's 160×
    assert codec_size(PAPER_CODEC, 80).bytes_per_vector == 14  # App. B: 80 bf16 values -> 14 bytes
    (row,) = storage_rows(paper, mc, [PAPER_CODEC])
    assert row["kib_per_memory"] == pytest.approx(38.5)
    assert row["full_kv_over_memory"] == pytest.approx(44 * 2 * 8 * 128 * 80 * 2 / (38.5 * 1024))


def test_storage_against_text(tok) -> None:
    sample = text_sample(["é" * 10 + " word" * 300], tok, 128)
    assert sample.references >= 2
    (row,) = storage_rows(ModelConfig.from_preset("smollm2-135m"), MemoryConfig(), ["none"], sample)
    assert row["bytes_per_memory"] == 15 * 2 * 3 * 8 * 64 * 2
    assert row["memory_over_text"] == pytest.approx(
        row["bytes_per_memory"] / (sample.utf8_bytes_per_token * 128)
    )
    # the table's bytes are what the memory bank's codec writes per memory
    from memory3.memory.codec import CodecConfig, MemoryCodec, MemoryShape

    smol = ModelConfig.from_preset("smollm2-135m")
    (row,) = storage_rows(smol, MemoryConfig(), ["default"])
    codec = MemoryCodec(CodecConfig(kind="faiss"), MemoryShape(15, 3, 8, 64))
    assert row["bytes_per_memory"] + row["position_bytes"] == codec.record_bytes
    with pytest.raises(ValueError, match=r"FAISS cannot build"):
        codec_size("faiss:PQ7", 64)  # 64 dims do not split into 7


# --- plots and the report ------------------------------------------------------------------------------


def _fake_results() -> dict:
    def spread(x):
        return {"median": x, "min": 0.9 * x, "max": 1.1 * x, "runs": [x]}

    modes = {
        m: {
            "exact_match": a / 2,
            "contained": a,
            "contained_when_hit": a,
            "contained_when_missed": 0.0,
            "wall_s": 1.0,
            "decode_tokens_per_s": 10.0,
        }
        for m, a in (("none", 0.1), ("memory", 0.3), ("rag", 0.5))
    }
    cfgd = {
        "modes": ["none", "memory", "rag"],
        "k": 5,
        "batch_size": 8,
        "max_new_tokens": 48,
        "leak_threshold": 2 / 3,
    }
    meta = {"set": "fictional", "path": "x", "split": "heldout", "kb": "set", "embedder": "minilm"}
    qa = {
        "sets": {
            "fictional": {
                "summary": {"n": 10, "k": 5, "hit_rate": 0.9, "modes": modes},
                "config": cfgd,
                "meta": meta,
                "items": [],
            }
        },
        "model": "m",
        "dtype": "bfloat16",
    }
    rows = [
        {
            "mode": m,
            "cache": c,
            "batch": b,
            "throughput": spread(t * b),
            "ttft_s": spread(0.5),
            "decode_tokens_per_s": spread(20.0),
            "wall_s": spread(1.0),
            "retrieval_s": 0.1,
            "prefill_s": 0.2,
            "prompt_tokens": 128,
            "retrievals_per_sequence": 3,
            "memories_loaded": 5,
            "new_tokens": 128,
        }
        for b in (1, 8)
        for m, c, t in (("none", "-", 20.0), ("rag", "warm", 8.0), ("memory", "warm", 19.0))
    ]
    speed = {
        "config": {"prompt_tokens": 128, "new_tokens": 128, "k": 5, "runs": 3},
        "rows": rows,
        "ratios": ratios(rows),
        "skipped": {"cold": "no store"},
        "kb": "x",
        "model": "m",
        "dtype": "bfloat16",
    }
    return {"qa": qa, "speed": speed}


@pytest.mark.slow
def test_plots_are_written_as_png(tmp_path) -> None:
    from memory3.eval.plots import write_figures

    res = _fake_results()
    paths = write_figures(tmp_path, res["qa"], res["speed"])
    assert {p.name for p in paths} == {"qa_accuracy.png", "throughput.png", "accuracy_vs_speed.png"}
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert p.stat().st_size > 5000


@pytest.mark.slow
def test_bench_all_render_only_rewrites_report_sections_and_figures(tmp_path) -> None:
    from memory3.cli import main

    results = tmp_path / "results"
    results.mkdir()
    for name, res in _fake_results().items():
        (results / f"{name}.json").write_text(json.dumps(res))
    report = tmp_path / "BENCHMARKS.md"
    report.write_text("# benchmarks\n\n<!-- bench:core -->\nkept\n<!-- /bench:core -->\n")
    argv = [
        "bench",
        "all",
        "--render-only",
        "--results-dir",
        str(results),
        "--report",
        str(report),
        "--figures",
        str(tmp_path / "fig"),
    ]
    assert main(argv) == 0
    text = report.read_text()
    assert "kept" in text and "<!-- bench:eval-qa -->" in text and "<!-- bench:bench-speed -->" in text
    assert "](fig/throughput.png)" in text
    assert main(argv) == 0 and report.read_text() == text  # idempotent: sections are replaced, not appended
    assert (tmp_path / "fig" / "accuracy_vs_speed.png").exists()


def test_bench_all_writes_into_the_repository_or_where_it_is_told(tmp_path, monkeypatch, capsys) -> None:
    """Without --results-dir/--report/--figures `bench all` uses the repository checkout the package
    runs from, never the working directory; an installed package has none and needs the flags."""
    import memory3
    from memory3.cli import eval as cli
    from memory3.cli import main
    from memory3.eval import render

    checkout = Path(__file__).resolve().parents[2]
    if Path(memory3.__file__).resolve().is_relative_to(checkout / "src"):  # not an installed copy
        assert render.repository() == checkout
    repo = tmp_path / "repo"
    (repo / "benchmarks" / "results").mkdir(parents=True)
    for name, res in _fake_results().items():
        (repo / "benchmarks" / "results" / f"{name}.json").write_text(json.dumps(res))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "repository", lambda: repo)
    assert main(["bench", "all", "--render-only", "--figures", str(tmp_path / "fig")]) == 0
    assert "<!-- bench:eval-qa -->" in (repo / "BENCHMARKS.md").read_text()
    assert (tmp_path / "fig" / "throughput.png").exists() and not (repo / "docs").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fig", "repo"]  # nothing in the cwd
    monkeypatch.setattr(cli, "repository", lambda: None)
    assert main(["bench", "all", "--render-only", "--report", str(tmp_path / "B.md")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "give --results-dir --figures" in err[0], err


def test_bench_speed_kept_tokens_refuses_a_store_written_with_its_own(tmp_path, capsys) -> None:
    from memory3.cli import main

    argv = ["bench", "speed", "--kept-tokens", "8", "--store", str(tmp_path / "bank")]
    assert main(argv) == 2  # refused before any model is loaded
    err = capsys.readouterr().err
    assert "--kept-tokens 8 with --store" in err and "memory3 build" in err
    assert main(["bench", "speed", "--selection", "random", "--store", str(tmp_path / "bank")]) == 2
    assert "--selection random with --store" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_speed_kept_tokens_sets_the_memory_slots_read(tmp_path, tok) -> None:
    from memory3.checkpoint import save_checkpoint
    from memory3.cli import main

    model = tiny_model(seed=5, vocab_size=len(tok), bos_token_id=1, eos_token_id=2)
    ckpt = save_checkpoint(model, tmp_path / "ckpt", tok)
    out = tmp_path / "speed.json"
    argv = ["bench", "speed", "--model", str(ckpt), "--dtype", "float32", "--embedder", "hashing-64"]
    argv += ["--batch-sizes", "1", "--prompt-tokens", "16", "--new-tokens", "4", "--runs", "1"]
    argv += ["--modes", "none,memory", "--caches", "warm", "--kb-articles", "4", "--no-progress"]
    assert main([*argv, "--kept-tokens", "4", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["memory"]["kept_tokens"] == 4
    assert {r["mode"] for r in res["rows"]} == {"none", "memory"}
    # a bank built with other kept tokens than the model's own is read with the bank's
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(
        "".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(FACTS.values()))
    )
    bank = tmp_path / "bank"
    build = ["build", str(corpus), "--out", str(bank), "--model", str(ckpt), "--dtype", "float32"]
    assert (
        main([*build, "--codec", "none", "--embedder", "hashing-64", "--index", "flat", "--kept-tokens", "4"])
        == 0
    )
    argv = ["bench", "speed", "--model", str(ckpt), "--dtype", "float32", "--store", str(bank)]
    argv += ["--batch-sizes", "1", "--prompt-tokens", "16", "--new-tokens", "4", "--runs", "1"]
    assert (
        main([*argv, "--modes", "none,memory", "--caches", "warm", "--no-progress", "--out", str(out)]) == 0
    )
    res = json.loads(out.read_text())
    assert res["memory"]["kept_tokens"] == 4 and res["rows"][1]["retrievals_per_sequence"] > 0


@pytest.mark.slow
def test_eval_qa_kept_tokens_writes_the_kb_with_them_and_records_it(tmp_path, tok, capsys) -> None:
    from memory3.checkpoint import save_checkpoint
    from memory3.cli import main

    argv = ["eval", "qa", "--kept-tokens", "4", "--store", str(tmp_path / "bank")]
    assert main(argv) == 2  # refused before any model is loaded
    assert "--kept-tokens 4 with --store" in capsys.readouterr().err
    model = tiny_model(seed=5, vocab_size=len(tok), bos_token_id=1, eos_token_id=2)
    ckpt = save_checkpoint(model, tmp_path / "ckpt", tok)
    out = tmp_path / "qa.json"
    argv = ["eval", "qa", "--model", str(ckpt), "--dtype", "float32", "--embedder", "hashing-64"]
    argv += ["--set", "fictional", "--limit", "2", "--modes", "memory", "--max-new-tokens", "2"]
    assert main([*argv, "--kept-tokens", "4", "--no-progress", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["memory"] == {
        "layers": len(model.memory_layers),
        "memory_layers": f"0-{len(model.memory_layers) - 1}",
        "kept_tokens": 4,
        "selection": "attention",
    }
    assert res["sets"]["fictional"]["summary"]["n"] == 2


@pytest.mark.slow
def test_eval_ppl_reads_in_the_layers_and_kept_tokens_asked(tmp_path, tok) -> None:
    from memory3.checkpoint import save_checkpoint
    from memory3.cli import main

    model = tiny_model(seed=6, vocab_size=len(tok), bos_token_id=1, eos_token_id=2)
    ckpt = save_checkpoint(model, tmp_path / "ckpt", tok)
    texts = tmp_path / "texts.jsonl"
    sentence = "The harbour of Brakmoor shipped {} tons of salt to the island in the spring of {}. "
    rows = [{"text": "".join(sentence.format(i * 7 + j, 1800 + j) for j in range(8))} for i in range(4)]
    texts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "ppl.json"
    argv = ["eval", "ppl", "--model", str(ckpt), "--dtype", "float32", "--embedder", "hashing-64"]
    argv += [
        "--texts",
        str(texts),
        "--max-tokens",
        "128",
        "--min-tokens",
        "65",
        "--no-progress",
        "--no-leak-filter",
    ]
    assert main([*argv, "--memory-layers", "all", "--kept-tokens", "4", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    n_layer = model.config.n_layer
    assert res["memory"]["memory_layers"] == f"0-{n_layer - 1}" and res["memory"]["kept_tokens"] == 4
    assert res["modes"]["memory"]["retrievals"] > 0
    # without -k a chunk reads as many memories as the model's memory config says, and the results say so
    from memory3.checkpoint import load_pretrained

    assert res["config"]["k"] == load_pretrained(ckpt).memory_config.memories_per_chunk
    assert main([*argv, "-k", "2", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["config"]["k"] == 2


def test_publish_writes_all_results_and_a_section_that_names_the_file_and_machine(tmp_path) -> None:
    from memory3.eval.report import publish

    md = tmp_path / "B.md"
    md.write_text(
        "# b\n\n<!-- bench:x -->\nold\n<!-- /bench:x -->\n\n<!-- bench:y -->\nkept\n<!-- /bench:y -->\n"
    )
    res = {
        "rows": [{"a": 1}],
        "answers": {"q": ["long answer"]},
        "machine": {"cpu": "Some CPU", "cpu_count": 2},
    }
    publish(res, tmp_path / "r" / "x.json", md, "x", "X", "python x.py", "body")
    assert json.loads((tmp_path / "r" / "x.json").read_text()) == res
    text = md.read_text()
    assert "old" not in text and "body" in text and "python x.py" in text and "kept" in text
    assert "Machine: Some CPU, 2 cores" in text and "Results: `r/x.json`" in text  # relative to the report
    assert '"rows"' not in text and "long answer" not in text  # the results stay in their file


def test_a_results_file_names_the_command_that_made_it(tmp_path, monkeypatch, capsys) -> None:
    """`bench all --render-only` writes each section's Reproduce line from its JSON: a file made by
    `memory3 eval qa --out` must name that command, not the `bench all` that renders it."""
    import argparse
    import sys

    from memory3.cli import measure

    out = tmp_path / "qa.json"
    monkeypatch.setattr(sys, "argv", ["/venv/bin/memory3", "eval", "qa", "--threads", "2", "--out", str(out)])
    measure.emit("qa", {"sets": {}}, argparse.Namespace(out=str(out)), {})
    assert json.loads(out.read_text())["reproduce"] == f"memory3 eval qa --threads 2 --out {out}"
    monkeypatch.setattr(sys, "argv", ["/src/memory3/__main__.py", "eval", "qa", "--out", str(out)])
    measure.emit("qa", {"sets": {}}, argparse.Namespace(out=str(out)), {})  # python -m memory3
    assert json.loads(out.read_text())["reproduce"] == f"memory3 eval qa --out {out}"
    for caller in ("pytest", "/work/memory3/benchmarks/bench_x.py"):  # called from Python: no command
        monkeypatch.setattr(sys, "argv", [caller])
        measure.emit("qa", {"sets": {}}, argparse.Namespace(out=str(out)), {})
        assert "reproduce" not in json.loads(out.read_text()), caller
