"""Scoring continuations as generation reads memory, and the lm-evaluation-harness model: its
answers are `memory3 eval qa`'s on the same questions in all three modes, offline, on the task
memory3 ships (YAML plus a local JSONL set)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import tiny_model
from memory3.config import GenerationConfig, MemoryConfig
from memory3.data.qa import load_qa
from memory3.errors import InputError
from memory3.eval.qa import QAEvalConfig, evaluate_qa
from memory3.generate import Generator
from memory3.memory.write import MemoryWriter
from memory3.retrieval.inmemory import InMemoryRetriever
from memory3.scoring import score
from test_generate import FACTS, BagOfWords

lm_eval = pytest.importorskip("lm_eval", reason="lm_eval is a test dependency (requirements-cpu.txt)")
from memory3.eval.harness import TASKS_DIR, Memory3LM  # noqa: E402

QUESTIONS = [
    ("What is the capital of Zantoria?", "Quellmar", "0"),
    ("How high is Mount Fjarn?", "4,211 metres", "1"),
    ("Where was Velmora Castiglio born?", "Dresk", "2"),
    ("When did the Dresk glassworks close?", "1931", "3"),
    ("What is the currency of Zantoria?", "zant", "4"),
]


@pytest.fixture(scope="module")
def gen(tok) -> Generator:
    model = tiny_model(seed=11, vocab_size=len(tok), bos_token_id=1, eos_token_id=2)
    cfg = MemoryConfig(reference_tokens=24, kept_tokens=4, chunk_tokens=8, memories_per_chunk=2)
    g = Generator(model, tok, memory_config=cfg, chat=False, kv_dtype="float32")
    g.set_retriever(InMemoryRetriever(FACTS, MemoryWriter(model, g.prefix_ids, cfg), tok, BagOfWords()))
    return g


def test_score_in_none_mode_is_the_plain_forward(gen: Generator) -> None:
    ctx, cont = "Tell me about Quellmar", " and the Amber Sea in winter"
    s = score(gen, ctx, cont, "none")
    ids = gen.tokenizer(ctx + cont).input_ids
    n = len(gen.tokenizer(ctx).input_ids)
    with torch.no_grad():
        logp = torch.log_softmax(gen.model(torch.tensor([ids]))[0].float(), -1)
    want = [float(logp[t - 1, ids[t]]) for t in range(n, len(ids))]
    assert len(s.logprobs) == len(want)
    assert max(abs(a - b) for a, b in zip(s.logprobs, want, strict=True)) <= 1e-4


@pytest.mark.parametrize("mode", ["memory", "rag", "none"])
@pytest.mark.slow
def test_generation_is_greedy_under_score_across_retrievals(gen: Generator, mode: str) -> None:
    """Scoring what greedy generation produced finds every token greedy and reads the same
    references: 30 tokens cross three retrievals (every 8 tokens here), aligned as decoding."""
    prompt = "Tell me about Quellmar and the sea near Zantoria"
    out = gen.generate(prompt, mode, GenerationConfig(max_new_tokens=30, ignore_eos=True))[0]
    s = score(gen, prompt, out.token_ids, mode)
    assert len(s.logprobs) == 30 and s.is_greedy
    if mode == "memory":
        assert [[h.ref_id for h in hits] for hits in s.references] == [
            [h.ref_id for h in hits] for hits in out.references
        ]


def _qa_file(tmp_path: Path) -> Path:
    path = tmp_path / "questions.jsonl"
    rows = [
        {"id": f"q{i}", "question": q, "answers": [a], "doc_id": d} for i, (q, a, d) in enumerate(QUESTIONS)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("mode", ["none", "memory", "rag"])
@pytest.mark.slow
def test_lm_eval_answers_equal_eval_qa(gen: Generator, tmp_path: Path, mode: str) -> None:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    path = _qa_file(tmp_path)
    items = load_qa(path, kb=[], resolve=False)
    ours = evaluate_qa(gen, items, QAEvalConfig(modes=(mode,), batch_size=8, k=2, max_new_tokens=48))
    lm = Memory3LM(generator=gen, mode=mode, k=2, batch_size=8)
    results = simple_evaluate(
        model=lm,
        tasks=["memory3_qa"],
        task_manager=TaskManager(include_path=str(TASKS_DIR), metadata={"set": str(path), "split": "all"}),
        log_samples=True,
    )
    samples = {s["doc"]["id"]: s["resps"][0][0] for s in results["samples"]["memory3_qa"]}
    assert samples == {r.id: r.texts[mode] for r in ours.items}
    contained = results["results"]["memory3_qa"]["contained,none"]
    assert math.isclose(contained, ours.summary()["modes"][mode]["contained"], abs_tol=1e-9)


def _req(*args):
    return SimpleNamespace(args=args)


@pytest.mark.slow
def test_loglikelihood_and_rolling(gen: Generator) -> None:
    lm = Memory3LM(generator=gen, mode="none")
    ((total, greedy),) = lm.loglikelihood([_req("Quellmar is the capital of", " Zantoria")])
    scored = score(gen, "Quellmar is the capital of", " Zantoria", "none")
    assert total == pytest.approx(scored.total) and greedy == scored.is_greedy
    text = FACTS[0] + " " + FACTS[5]
    (rolling,) = lm.loglikelihood_rolling([_req(text)])
    ids = gen.tokenizer(text, add_special_tokens=False).input_ids
    assert rolling == pytest.approx(score(gen, [gen.model.config.bos_token_id], ids, "none").total, abs=1e-4)
    ((empty, _),) = Memory3LM(generator=gen, mode="memory").loglikelihood([_req("", text)])  # no context
    assert math.isfinite(empty)
    memory = Memory3LM(generator=gen, mode="memory").loglikelihood_rolling([_req(text)])[0]
    assert math.isfinite(memory) and memory != rolling  # memories read from the 8th token on
    with pytest.raises(InputError, match="rag"):
        Memory3LM(generator=gen, mode="rag").loglikelihood_rolling([_req(text)])
    with pytest.raises(InputError, match="apply_chat_template"):
        lm.apply_chat_template([{"role": "user", "content": "hi"}])
