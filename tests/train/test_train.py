"""Training: schedule, LoRA, the inference layout in training batches, exact resume, the held-out
split, offline pairing, and data parallel with torchrun."""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from conftest import free_port, run_checked, tiny_model
from memory3.config import MemoryConfig
from memory3.lora import apply_lora, load_lora_state, lora_state, merge_lora
from memory3.memory.write import Memories, MemoryWriter
from memory3.train.config import (
    LoopConfig,
    LoRAConfig,
    OptimConfig,
    from_dict,
    load_config,
    save_config,
    to_dict,
)
from memory3.train.layout import chunked_memory, shared_memory, text_batch
from memory3.train.loop import wsd_lr

VOCAB = 256


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Training steps of tiny models are all synchronisation with 2 threads on a busy 2-core
    machine (10x slower measured); the recipes set loop.threads the same way."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def synthetic_stream(n: int = 6000, seed: int = 0) -> np.ndarray:
    """A learnable token stream: repeated random phrases."""
    rng = np.random.default_rng(seed)
    phrases = [rng.integers(3, VOCAB, size=rng.integers(5, 12)) for _ in range(40)]
    out: list[int] = []
    while len(out) < n:
        out.extend(phrases[rng.integers(len(phrases))].tolist())
    return np.asarray(out[:n], dtype=np.int32)


# --- schedule and config ---------------------------------------------------------------------------


def test_wsd_schedule_warms_up_holds_and_decays() -> None:
    cfg = OptimConfig(lr=1.0, warmup_steps=4, decay_fraction=0.5, min_lr_ratio=0.1)
    lrs = [wsd_lr(s, 20, cfg) for s in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4:10] == [1.0] * 6
    assert all(a > b for a, b in itertools.pairwise(lrs[10:]))
    assert lrs[-1] == pytest.approx(0.1)


def test_config_round_trips_through_json(tmp_path: Path) -> None:
    from memory3.train.sft import SFTConfig, Stage

    cfg = SFTConfig(
        lora=LoRAConfig(rank=4, targets=("q_proj",)), stages=(Stage(0.5, 0, "all"), Stage(1.0, 8, "half"))
    )
    save_config(cfg, tmp_path / "c.json")
    assert load_config(SFTConfig, tmp_path / "c.json") == cfg
    with pytest.raises(ValueError, match="unknown field"):
        from_dict(SFTConfig, {**to_dict(cfg), "lr": 1})


def test_shipped_configs_load() -> None:
    from memory3.shipped import shipped_models
    from memory3.train.sft import SFTConfig

    root = Path(__file__).parents[2] / "configs" / "train"
    for path in sorted(root.glob("sft*.json")):
        cfg = load_config(SFTConfig, path)
        # a chain of runs names the run it continues, or a shipped model (on every install; it
        # changes when a run ships, so such a config says which one in its own name or notes)
        runs = (f"~/.cache/memory3/runs/{p.stem}/adapter" for p in root.iterdir())
        assert cfg.init_adapter in ("", *runs, *shipped_models()), path.name


# --- LoRA ---------------------------------------------------------------------------------------------


def test_lora_starts_at_the_base_model_and_merges_exactly() -> None:
    model = tiny_model(seed=3)
    x = torch.randint(0, VOCAB, (2, 12))
    base = model(x)
    apply_lora(model, LoRAConfig(rank=4, alpha=8.0), seed=1)
    torch.testing.assert_close(model(x), base)  # B = 0: the same model
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 0.05)
    adapted = model(x)
    assert not torch.allclose(adapted, base)
    state = lora_state(model)
    merged = merge_lora(model)
    assert not any(".lora_" in n for n in merged.state_dict())
    torch.testing.assert_close(merged(x), adapted, atol=1e-5, rtol=1e-5)
    # the adapter alone rebuilds the same model from the base
    other = tiny_model(seed=3)
    apply_lora(other, LoRAConfig(rank=4, alpha=8.0), seed=99)
    load_lora_state(other, state)
    torch.testing.assert_close(other(x), adapted)


# --- the inference layout in training ------------------------------------------------------------------


def test_sft_layout_reproduces_generation_with_memory(tok) -> None:
    """Teacher forcing the generated answer in the training layout predicts the same tokens the
    generator produced: same prefix, positions, memories and masks as at inference."""
    from memory3.config import GenerationConfig
    from memory3.generate import Generator
    from memory3.retrieval.inmemory import InMemoryRetriever
    from test_generate import FACTS, BagOfWords

    model = tiny_model(seed=11, vocab_size=len(tok), bos_token_id=1, eos_token_id=2)
    cfg = MemoryConfig(reference_tokens=24, kept_tokens=4, chunk_tokens=64, memories_per_chunk=3)
    gen = Generator(model, tok, memory_config=cfg, chat=True)
    retr = InMemoryRetriever(FACTS, MemoryWriter(model, gen.prefix_ids, cfg), tok, BagOfWords())
    gen.set_retriever(retr)
    q = "Who was Velmora Castiglio?"
    out = gen.generate(q, mode="memory", config=GenerationConfig(max_new_tokens=6, ignore_eos=True))[0]
    text = tok.apply_chat_template(
        [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False
    )
    prompt = tok(text, add_special_tokens=False).input_ids
    mem = retr.memories([h.ref_id for h in out.references[0]])
    b = text_batch([prompt + out.token_ids], [len(prompt)], gen.prefix_ids, cfg.reference_tokens, 0)
    with torch.no_grad():
        logits = model(b.ids, b.pos, token_valid=b.valid, memory=shared_memory(mem, b))
    pred = logits[0, b.text_start + len(prompt) - 1 : -1].argmax(-1).tolist()
    assert pred == out.token_ids
    # answer-only targets: exactly the answer tokens
    assert (
        b.targets[b.targets != -100].tolist() == out.token_ids[1:]
        or b.targets[b.targets != -100].tolist() == out.token_ids
    )


def test_chunked_memory_matches_a_plain_loop() -> None:
    """Chunk c reads exactly the memories assigned to it; the prefix and padding read none."""
    torch.manual_seed(0)
    M, Lm, K, S, D = 4, 2, 2, 3, 8
    from memory3.memory.write import Memories

    pos = torch.arange(S, dtype=torch.int32).expand(M, Lm, K, S).clone()
    pos[3, :, :, 2] = -1  # a short reference: one empty slot
    mem = Memories(torch.randn(M, Lm, K, S, D), torch.randn(M, Lm, K, S, D), pos, "fp")
    prefix = [1, 5]
    b = text_batch([list(range(10, 22)), list(range(30, 37))], None, prefix, 16, 0)  # 12 and 7 tokens
    chunk = 4
    slots = torch.tensor([[[0, 1], [2, -1], [3, 0]], [[1, 1], [-1, 3], [2, 2]]])  # (B, C=3, J=2)
    mi = chunked_memory(mem, slots, b, chunk)
    B, T = b.ids.shape
    C, J = slots.shape[1:]
    for bi in range(B):
        for t in range(T):
            for c in range(C):
                for j in range(J):
                    for s in range(S):
                        n = (c * J + j) * S + s
                        r = int(slots[bi, c, j])
                        text_i = t - len(prefix)
                        want = (
                            bool(b.valid[bi, t])
                            and text_i >= 0
                            and text_i // chunk == c
                            and r >= 0
                            and bool(mem.valid[r, s])
                        )
                        assert bool(mi.visible[bi, t, n]) == want, (bi, t, n)
                        if r >= 0:
                            torch.testing.assert_close(mi.k[:, bi, :, n], mem.k[r, :, :, s])
                            torch.testing.assert_close(mi.v[:, bi, :, n], mem.v[r, :, :, s])


def test_gradients_flow_through_kept_keys_and_values(tok) -> None:
    """docs/design.md, "Training a model to read memory": the writer runs with grad, so the loss of a reading sequence reaches the weights
    through the memories (here: only memory-layer weights below the reader's first token)."""
    model = tiny_model(seed=5)
    cfg = MemoryConfig(reference_tokens=16, kept_tokens=4, chunk_tokens=8, memories_per_chunk=2)
    writer = MemoryWriter(model, [1, 7], cfg)
    mem = writer.write([list(range(20, 32)), list(range(40, 50))])
    b = text_batch([list(range(60, 70))], None, [1, 7], 16, 0)
    logits = model(b.ids, b.pos, token_valid=b.valid, memory=shared_memory(mem, b))
    loss = torch.nn.functional.cross_entropy(logits[b.targets != -100], b.targets[b.targets != -100])
    grads = torch.autograd.grad(loss, [mem.k, mem.v])
    assert all(g.abs().sum() > 0 for g in grads)


# --- the held-out split --------------------------------------------------------------------------------


def test_training_data_never_holds_a_heldout_entity() -> None:
    from memory3.data.qa import QAItem
    from memory3.train.data import (
        HeldOutLeak,
        assert_train_only,
        fictional_training_entities,
        heldout_entities,
    )

    ents = fictional_training_entities(80, seed=3)
    banned = heldout_entities()
    assert ents and not any(e.name.casefold() in banned for e in ents)
    from memory3.data.qa import split_of

    assert all(split_of(e.name) == "train" for e in ents)
    bad = QAItem("x", "q?", ["a"], "Some Place", "heldout", "fictional", "d", "a")
    with pytest.raises(HeldOutLeak, match="held-out"):
        assert_train_only([bad])
    with pytest.raises(ValueError, match="seed 0"):
        fictional_training_entities(10, seed=0)


@pytest.mark.slow
def test_wikipedia_training_groups_are_train_split_cloze_on_one_topic() -> None:
    from memory3.data.qa import load_qa, shipped_path, split_of
    from memory3.train.data import make_group, rng_for, wikipedia_training_entities
    from memory3.train.sft import SFTConfig

    ents = wikipedia_training_entities()
    asked = {
        it.entity for it in load_qa(shipped_path("wikipedia.jsonl"), resolve=False) if it.split == "heldout"
    }
    assert len(ents) > 1000 and all(split_of(e.name) == "train" for e in ents)
    assert asked and not asked & {e.name for e in ents}
    for e in ents[:50]:
        (f,) = e.facts
        assert f.question.startswith("Fill in the blank: ") and "____" in f.question
        assert f.answer in e.reference and f.answer not in f.question
    g = make_group(ents, rng_for(0, 1), 5, 24)
    chosen = [e for e in ents if e.reference in g.references]
    assert len(g.references) == 5 and len(g.questions) == 5
    assert len({e.kind for e in chosen}) == 1  # hard distractors: the same topic
    with pytest.raises(ValueError, match="together ≤ 1"):
        SFTConfig(factbook_fraction=0.6, wikipedia_fraction=0.5)


# --- recipes: exact resume -------------------------------------------------------------------------------


def _warmup_config(steps: int, grad_accum: int = 1, bf16: bool = False):
    from memory3.train.warmup import WarmupConfig

    return WarmupConfig(
        model="preset:tiny",
        model_overrides={"vocab_size": VOCAB, "bos_token_id": 1, "eos_token_id": 2},
        optim=OptimConfig(lr=3e-3, warmup_steps=2, grad_accum=grad_accum),
        loop=LoopConfig(steps=steps, log_every=1, checkpoint_every=100, bf16=bf16),
        seq_len=32,
        batch_size=4,
    )


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_resume_gives_the_same_next_loss_as_no_interruption(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from memory3.train.warmup import run_warmup

    stream = synthetic_stream()
    cfg = _warmup_config(5)
    run_warmup(cfg, tmp_path / "straight", stream=stream)
    run_warmup(cfg, tmp_path / "split", stream=stream, stop_after=2)  # interrupted after step 2
    assert len(_losses(tmp_path / "split")) == 2
    run_warmup(cfg, tmp_path / "split", stream=stream)  # resumed by the same command
    assert _losses(tmp_path / "split") == _losses(tmp_path / "straight")
    a = load_file(tmp_path / "straight" / "model" / "model.safetensors")
    b = load_file(tmp_path / "split" / "model" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _losses(tmp_path / "straight")[-1] < _losses(tmp_path / "straight")[0]


def test_resume_refuses_another_config(tmp_path: Path) -> None:
    import dataclasses

    from memory3.train.warmup import run_warmup

    stream = synthetic_stream()
    cfg = _warmup_config(3)
    run_warmup(cfg, tmp_path / "r", stream=stream, stop_after=1)
    with pytest.raises(ValueError, match="another config"):
        run_warmup(dataclasses.replace(cfg, seq_len=16), tmp_path / "r", stream=stream)


# --- continual: pairing and a step with memory ----------------------------------------------------------


def test_pairing_skips_references_the_sequence_contains(tok) -> None:
    from memory3.retrieval.embed import get_embedder
    from memory3.retrieval.leak import overlap
    from memory3.train.continual import PairingConfig, chunk_slots, prepare_continual

    texts = [
        "The lighthouse of Brakmoor stands on a granite cliff above the northern harbour. " * 3
        + "Keepers lit the lamp every evening from 1820 until the light was automated in 1961.",
        "Glass beads from Vorlund were traded along the river for salt, furs and amber. " * 3
        + "The bead makers guarded the recipe for their blue glass for three hundred years.",
    ]
    kb = [*texts, "Amber from the northern coast was carried south on the river in spring."]
    cfg = PairingConfig(seq_len=64, chunk_tokens=16, reference_tokens=32, embedder="hashing")
    data = prepare_continual(texts, kb, tok, cfg, embedder=get_embedder("hashing"))
    assert data.pairs.shape == (len(data), 4)
    for i in range(len(data)):
        seq = data.sequence(i)
        for r in data.pairs[i]:
            if r >= 0:
                assert overlap(seq, data.reference(int(r))) <= 0.9
    slots = chunk_slots(np.array([[5, 6, 7]]), 2)
    assert slots.tolist() == [[[-1, 5], [5, 6], [6, 7]]]


@pytest.mark.slow
def test_continual_trains_with_memory_and_saves(tmp_path: Path, tok) -> None:
    from memory3.retrieval.embed import get_embedder
    from memory3.train.continual import (
        ContinualConfig,
        PairingConfig,
        evaluate,
        prepare_continual,
        run_continual,
    )

    texts = [
        f"Town number {i} lies on the river {chr(65 + i)} and is known for its {i * 7} bridges. " * 4
        for i in range(6)
    ]
    pcfg = PairingConfig(seq_len=32, chunk_tokens=16, reference_tokens=32, embedder="hashing")
    data = prepare_continual(texts, texts, tok, pcfg, embedder=get_embedder("hashing"))
    data.save(tmp_path / "ds")
    cfg = ContinualConfig(
        model="preset:tiny",
        model_overrides={"vocab_size": len(tok)},
        optim=OptimConfig(lr=3e-3, warmup_steps=1),
        loop=LoopConfig(steps=2, log_every=1, bf16=False),
        memory=MemoryConfig(reference_tokens=32, kept_tokens=4, chunk_tokens=16, memories_per_chunk=3),
        dataset=str(tmp_path / "ds"),
        batch_size=2,
    )
    run = run_continual(cfg, tmp_path / "run")
    assert (run / "model" / "model.safetensors").exists() and len(_losses(run)) == 2
    from memory3.checkpoint import load_checkpoint

    loaded = load_checkpoint(run / "model")
    a = evaluate(loaded.model, tok, data, cfg.memory, with_memory=True, n=2)
    b = evaluate(loaded.model, tok, data, cfg.memory, with_memory=False, n=2)
    assert np.isfinite(a) and np.isfinite(b) and a != b
    # the checkpoint of a full-training run exports to the same model (`memory3 train export`)
    from memory3.train.export import adapter_from_run

    again = load_checkpoint(adapter_from_run(run, tmp_path / "exported"))
    for k, v in loaded.model.state_dict().items():
        assert torch.equal(v, again.model.state_dict()[k]), k
    assert again.meta["train"]["finished"] and again.meta["train"]["step"] == 2
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "train_config.json").write_text('{"lr": 1}')
    with pytest.raises(
        ValueError, match=r"other/train_config\.json: not the config of a memory3 training run"
    ):
        adapter_from_run(tmp_path / "other", tmp_path / "x")
    with pytest.raises(FileNotFoundError, match=r"no train_config\.json"):
        adapter_from_run(tmp_path, tmp_path / "x")


@pytest.mark.slow
def test_continual_starts_from_an_adapter_in_the_layers_asked(tmp_path: Path, tok) -> None:
    """Stage 2 after an earlier run: the LoRA starts from its adapter (its tensors unchanged), the
    model reads memory in the layers the config names, and the exported adapter says so. A
    learning rate of 1e-12 keeps the tensors to within 1e-9 of where they started."""
    from memory3.checkpoint import read_adapter
    from memory3.retrieval.embed import get_embedder
    from memory3.train.continual import ContinualConfig, PairingConfig, prepare_continual, run_continual

    texts = [f"Harbour {i} ships {i * 3} tons of salt to the island of {chr(70 + i)}. " * 4 for i in range(4)]
    pcfg = PairingConfig(seq_len=32, chunk_tokens=16, reference_tokens=32, embedder="hashing")
    prepare_continual(texts, texts, tok, pcfg, embedder=get_embedder("hashing")).save(tmp_path / "ds")
    base = ContinualConfig(
        model="preset:tiny",
        model_overrides={"vocab_size": len(tok)},
        lora=LoRAConfig(rank=2),
        optim=OptimConfig(lr=3e-3, warmup_steps=1),
        loop=LoopConfig(steps=1, log_every=1, bf16=False),
        memory=MemoryConfig(reference_tokens=32, kept_tokens=4, chunk_tokens=16, memories_per_chunk=2),
        dataset=str(tmp_path / "ds"),
        batch_size=2,
        memory_layers="first:1",
    )
    first = read_adapter(run_continual(base, tmp_path / "a") / "adapter")
    assert first.meta["memory_layers"] == [0]
    cont = dataclasses.replace(
        base,
        optim=OptimConfig(lr=1e-12, warmup_steps=0),
        memory_layers="all",
        init_adapter=str(tmp_path / "a" / "adapter"),
    )
    command = "memory3 train continual --config cont.json --out b"
    second = read_adapter(run_continual(cont, tmp_path / "b", command=command) / "adapter")
    assert second.meta["command"] == command and second.meta["lineage"][-1]["command"] == command
    # the last checkpoint exports to the same adapter, in the same layers (a point of a curve)
    from memory3.train.export import adapter_from_run

    again = read_adapter(adapter_from_run(tmp_path / "b", tmp_path / "again", command))
    assert again.meta["memory_layers"] == second.meta["memory_layers"]
    assert again.meta["memory"] == second.meta["memory"] and again.meta["train"]["finished"]
    assert all(torch.equal(again.state[k], second.state[k]) for k in second.state)
    n_layer = len(second.meta["memory_layers"])
    assert second.meta["memory_layers"] == list(range(n_layer)) and n_layer > 1
    assert first.state.keys() == second.state.keys()
    for k in first.state:
        torch.testing.assert_close(second.state[k], first.state[k], rtol=0, atol=1e-9)
    with pytest.raises(ValueError, match="memory_layers must be"):
        dataclasses.replace(base, memory_layers="last:3")


# --- SFT: one short run ------------------------------------------------------------------------------------


def _tiny_sft_config(tmp_path: Path, **overrides: Any) -> Any:
    """A seconds-long SFT run on the tiny preset, invented entities only, a small text corpus."""
    from memory3.train.sft import SFTConfig

    (tmp_path / "corpus.txt").write_text("The quick brown fox jumps over the lazy dog. " * 50)
    base = SFTConfig(
        model="preset:tiny",
        lora=LoRAConfig(rank=2),
        optim=OptimConfig(lr=1e-3, warmup_steps=1),
        fictional_entities=40,
        factbook_fraction=0.0,
        questions_per_group=3,
        text_corpus=str(tmp_path / "corpus.txt"),
        text_seq_len=32,
        val_groups=1,
        probe_questions=0,
    )
    return dataclasses.replace(base, **overrides)


@pytest.mark.slow
def test_sft_runs_a_curriculum_and_saves_an_adapter(tmp_path: Path) -> None:
    from memory3.shipped import ADAPTER_META
    from memory3.train.sft import Stage, run_sft

    cfg = _tiny_sft_config(
        tmp_path,
        loop=LoopConfig(steps=2, log_every=1, eval_every=2, bf16=False),
        stages=(Stage(0.5, 0, "all"), Stage(1.0, 16, "half")),
    )
    run = run_sft(cfg, tmp_path / "run")
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["layers"] for r in rows] == [4, 2] and [r["kept"] for r in rows] == [0, 16]
    assert "val_gold" in rows[-1] and "val_irrelevant" in rows[-1]
    meta = json.loads((run / "adapter" / ADAPTER_META).read_text())
    peft_config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert meta["memory_layers"] == [0, 1] and peft_config["r"] == 2 and meta["format"] == 2
    assert meta["memory"]["kept_tokens"] == 16  # the last stage's: how the trained model reads
    from safetensors.torch import load_file

    from memory3.train.export import adapter_from_run

    again = adapter_from_run(run, tmp_path / "exported")  # from the checkpoint, as after a time-boxed session
    a = load_file(run / "adapter" / "adapter_model.safetensors")
    b = load_file(again / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((again / ADAPTER_META).read_text())["memory_layers"] == [0, 1]
    # a run that starts from that adapter records both runs and what they cost together
    cont = run_sft(
        dataclasses.replace(cfg, init_adapter=str(again), stages=(Stage(1.0, 16, "half"),)), tmp_path / "c"
    )
    first, second = (json.loads((d / ADAPTER_META).read_text()) for d in (again, cont / "adapter"))
    assert [r["init_adapter"] for r in second["lineage"]] == ["", str(again)]
    assert second["train_total"]["tokens"] == first["train"]["tokens"] + second["train"]["tokens"]
    assert second["train_total"]["runs"] == 2


@pytest.mark.parametrize("codec_spec", ["SQ4", "tc16"])
@pytest.mark.slow
def test_sft_with_the_codec_in_the_loop_reads_quantized_memories_and_resumes_exactly(
    tmp_path: Path, codec_spec: str
) -> None:
    """With a transform codec the run also calibrates the model at each refit."""
    from memory3.memory.codec import CodecConfig, MemoryCodec
    from memory3.train.sft import Stage, run_sft

    cfg = _tiny_sft_config(
        tmp_path,
        loop=LoopConfig(steps=4, log_every=1, checkpoint_every=100, bf16=False),
        stages=(Stage(1.0, 8, "half"),),
        codec=dataclasses.replace(CodecConfig.parse(codec_spec), train_vectors=2000),
        codec_references=10,
        codec_refresh_every=2,
        codec_calibration_groups=1,
    )
    run_sft(cfg, tmp_path / "straight")
    run_sft(cfg, tmp_path / "split", stop_after=3)  # interrupted between two codec refreshes
    codec = MemoryCodec.load(tmp_path / "split" / "checkpoint" / "codec")  # saved with the checkpoint
    assert codec.config == cfg.codec and codec.shape.dims[2] == 8
    if codec.config.kind == "transform":
        assert codec.transform_meta["metric"] == "fisher"
        from memory3.memory.transform import find_calibration

        cal = find_calibration(tmp_path / "straight" / "adapter")  # beside the exported model
        assert cal is not None and cal.meta["memory_config"]["kept_tokens"] == 8
    run_sft(cfg, tmp_path / "split")
    assert _losses(tmp_path / "split") == _losses(tmp_path / "straight")
    exact = run_sft(dataclasses.replace(cfg, codec=None), tmp_path / "exact", stop_after=1)
    assert _losses(exact)[0] != _losses(tmp_path / "straight")[0]  # the codec is in the forward pass
    with pytest.raises(ValueError, match="codec_refresh_every"):
        dataclasses.replace(cfg, codec_refresh_every=0)


@pytest.mark.slow
def test_irrelevant_memory_samples_hide_the_answer_and_pull_towards_the_no_memory_answer(
    tmp_path: Path,
) -> None:
    """The questions of one passage read the group's other passages (and one of another group),
    never their own; the loss is the KL from the model's no-memory prediction, with gradients on
    the memory side only; a run with them logs the loss and resumes exactly."""
    import random

    from memory3.memory.write import reference_prefix_ids
    from memory3.train.data import fictional_training_entities, make_group
    from memory3.train.loop import load_base
    from memory3.train.sft import SFTData, Stage, irrelevant_loss, memory_config_for, run_sft

    ents = fictional_training_entities(40, seed=1)
    g = make_group(ents, random.Random(0), 5, 24)
    by_ref = {e.reference: e for e in ents}
    assert len(g.owners) == len(g.questions)
    assert all(f in by_ref[g.references[o]].facts for f, o in zip(g.questions, g.owners, strict=True))

    cfg = _tiny_sft_config(tmp_path, irrelevant_questions=3, stages=(Stage(1.0, 8, "half"),))
    model, tok = load_base(cfg.model, cfg.model_overrides, 0)
    data = SFTData(cfg, tok, tmp_path / "cache")
    prefix = reference_prefix_ids(tok, model.config.bos_token_id, cfg.memory)
    writer = MemoryWriter(model, prefix, memory_config_for(cfg, cfg.stages[0]))
    written: list[list[list[int]]] = []
    write = writer.write
    writer.write = lambda refs: written.append(refs) or write(refs)  # type: ignore[method-assign]
    other = make_group(ents, random.Random(1), 5, 24)
    rng = random.Random(2)
    kl, ntok = irrelevant_loss(model, data, g, other, writer, prefix, random.Random(2))
    gold = g.owners[rng.randrange(len(g.owners))]  # the same draw irrelevant_loss made
    (refs,) = written
    assert data.reference_ids(g.references[gold]) not in refs
    assert len(refs) == len(set(g.references) | set(other.references[:1])) - 1 and ntok > 0
    assert torch.isfinite(kl) and kl.item() > 0  # the memories and the layout move the prediction
    kl.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)

    loop = LoopConfig(steps=3, log_every=1, checkpoint_every=100, bf16=False)
    cfg = dataclasses.replace(cfg, loop=loop)
    run_sft(cfg, tmp_path / "straight")
    rows = [json.loads(x) for x in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["irrelevant"] > 0 for r in rows)
    run_sft(cfg, tmp_path / "split", stop_after=2)
    run_sft(cfg, tmp_path / "split")
    assert _losses(tmp_path / "split") == _losses(tmp_path / "straight")
    with pytest.raises(ValueError, match="irrelevant_questions"):
        dataclasses.replace(cfg, irrelevant_questions=-1)


# --- data parallel ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_torchrun_two_processes_equal_one_process_with_accumulation(tmp_path: Path) -> None:
    """2 ranks × 1 micro-batch see the same sequences as 1 rank × 2 accumulated micro-batches:
    the averaged gradients, hence the trained weights, agree."""
    from safetensors.torch import load_file

    from memory3.train.warmup import run_warmup

    stream = synthetic_stream()
    corpus = tmp_path / "corpus.jsonl"
    np.save(tmp_path / "stream.npy", stream)
    cfg2 = _warmup_config(3, bf16=True)  # bf16 autocast on the CPU, as the recipes default to
    cfg1 = _warmup_config(3, grad_accum=2, bf16=True)
    # the torchrun workers read the same stream through the token cache of a corpus file
    import dataclasses

    cfg2 = dataclasses.replace(cfg2, corpus=str(corpus))
    cfg1 = dataclasses.replace(cfg1, corpus=str(corpus))
    corpus.write_text("")
    cache = tmp_path / ".cache"
    cache.mkdir()
    np.save(cache / "tokens-corpus.npy", stream)
    save_config(cfg2, tmp_path / "c2.json")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = Path(sys.executable).parent / "torchrun"
    run_checked(
        [
            str(torchrun),
            "--nproc_per_node",
            "2",
            "--master_port",
            str(free_port()),
            "-m",
            "memory3",
            "train",
            "warmup",
            "--config",
            str(tmp_path / "c2.json"),
            "--out",
            str(tmp_path / "two"),
        ],
        env=env,
        timeout=300,
    )
    run_warmup(cfg1, tmp_path / "one", stream=stream)
    made = json.loads((tmp_path / "two" / "model" / "memory3.json").read_text())["command"]
    assert made == f"memory3 train warmup --config {tmp_path / 'c2.json'} --out {tmp_path / 'two'}"
    a = load_file(tmp_path / "two" / "model" / "model.safetensors")
    b = load_file(tmp_path / "one" / "model" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-4, rtol=1e-3)


# --- adapters ------------------------------------------------------------------------------------------------


def test_adapter_saved_and_loaded_merged_gives_the_trained_model(tmp_path: Path) -> None:
    from memory3.checkpoint import load_pretrained, load_trained, save_checkpoint
    from memory3.train.adapters import save_adapter
    from memory3.train.loop import set_memory_layers
    from memory3.train.sft import SFTConfig

    base = tiny_model(seed=4)
    save_checkpoint(base, tmp_path / "base")
    cfg = SFTConfig(model=str(tmp_path / "base"), lora=LoRAConfig(rank=4, alpha=8.0))
    model = tiny_model(seed=4)
    apply_lora(model, cfg.lora)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_" in n:
                p.copy_((torch.randn_like(p) * 0.05).to(torch.bfloat16).float())  # bf16-exact
    set_memory_layers(model, (0, 1, 2))
    x = torch.randint(0, VOCAB, (2, 10))
    want = model(x)
    save_adapter(model, tmp_path / "adapter", cfg, {"steps": 1}, command="memory3 train sft …")
    loaded = load_trained(tmp_path / "adapter")
    assert loaded.model.memory_layers == (0, 1, 2)
    assert loaded.meta["command"].startswith("memory3 train sft")
    torch.testing.assert_close(loaded.model(x), want, atol=1e-5, rtol=1e-5)
    assert loaded.model._memory3_fingerprint != getattr(base, "_memory3_fingerprint", None)
    assert loaded.memory_config == cfg.memory  # what it was trained with, for every command
    # load_pretrained (behind every --model) takes an adapter directory as well
    again = load_pretrained(tmp_path / "adapter")
    torch.testing.assert_close(again.model(x), want, atol=1e-5, rtol=1e-5)
    assert again.model._memory3_fingerprint == loaded.model._memory3_fingerprint
    with pytest.raises(FileNotFoundError, match="no trained adapter"):
        load_trained(tmp_path / "nowhere")


# --- the shipped model ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_shipped_model_reads_facts_only_its_memory_holds() -> None:
    """The default model is SmolLM2 with the shipped adapter; it answers held-out fictional
    questions from explicit memory, and cannot without it."""
    from memory3.checkpoint import load_pretrained
    from memory3.config import GenerationConfig
    from memory3.data.qa import answer_contained, load_kb, shipped_path
    from memory3.generate import Generator
    from memory3.memory.ingest import chunk_documents
    from memory3.memory.write import MemoryWriter
    from memory3.retrieval.embed import get_embedder
    from memory3.retrieval.inmemory import InMemoryRetriever
    from memory3.shipped import TRAINED, default_model

    assert default_model() == TRAINED
    torch.set_num_threads(1)
    loaded = load_pretrained(TRAINED)
    cfg = loaded.memory_config
    assert loaded.model.memory_layers == tuple(range(30)) and cfg.kept_tokens == 64
    assert cfg.memories_per_chunk == 1
    kb = load_kb(shipped_path("fictional_kb.jsonl"))
    docs = [d for d in kb if d.title in ("Brokirton", "Midrienza")] + kb[:6]
    assert len({d.title for d in docs} & {"Brokirton", "Midrienza"}) == 2
    gen = Generator(loaded.model, loaded.tokenizer, memory_config=cfg)
    refs = list(chunk_documents(docs, loaded.tokenizer, cfg.reference_tokens))
    gen.set_retriever(
        InMemoryRetriever(
            refs, MemoryWriter(loaded.model, gen.prefix_ids, cfg), loaded.tokenizer, get_embedder()
        )
    )
    qa = [
        ("On which lake does the town of Brokirton lie?", "Steimach"),
        ("How many inhabitants does the town of Brokirton have?", "79,974"),
        ("In which year was the town of Midrienza founded?", "1539"),
    ]
    right = {}
    for mode in ("memory", "none"):
        outs = gen.generate([q for q, _ in qa], mode=mode, config=GenerationConfig(max_new_tokens=24))
        right[mode] = sum(answer_contained(o.text, [a]) for o, (_, a) in zip(outs, qa, strict=True))
    assert right["memory"] >= 2 and right["none"] == 0, right


def test_calibration_sums_the_outer_products_of_each_questions_gradient(tmp_path: Path) -> None:
    """`fisher_from_data` equals a plain loop that asks each question alone, backpropagates its
    summed answer loss to the memories' keys (rotated back to before RoPE) and values, and sums
    g·gᵀ over questions and memory slots; the model's trainable flags and mode come back."""
    import random

    from memory3.config import parse_memory_layers
    from memory3.memory.transform import rotate
    from memory3.memory.write import reference_prefix_ids
    from memory3.train.fisher import fisher_from_data
    from memory3.train.loop import batch_loss, load_base, set_memory_layers
    from memory3.train.sft import SFTData, Stage, memory_config_for

    cfg = _tiny_sft_config(tmp_path, stages=(Stage(1.0, 8, "half"),))
    model, tok = load_base(cfg.model, cfg.model_overrides, 0)
    set_memory_layers(model, parse_memory_layers("half", model.config.n_layer))
    apply_lora(model, cfg.lora)
    model.train()
    flags = [p.requires_grad for p in model.parameters()]
    mc = memory_config_for(cfg, cfg.stages[0])
    data = SFTData(cfg, tok, tmp_path / "cache")
    cal = fisher_from_data(model, tok, mc, data, groups=2, seed=3, progress=False)
    assert [p.requires_grad for p in model.parameters()] == flags and model.training

    model.eval()
    prefix = reference_prefix_ids(tok, model.config.bos_token_id, mc)
    writer = MemoryWriter(model, prefix, mc)
    rng = random.Random(3)
    Fk = torch.zeros(cal.key_fisher.shape, dtype=torch.float64)
    Fv = torch.zeros_like(Fk)
    slots = 0
    for _ in range(2):
        group = data.group(rng)
        with torch.no_grad():
            mem = writer.write([data.reference_ids(r) for r in group.references])
        for q in group.questions:
            k = mem.k.detach().clone().requires_grad_(True)
            v = mem.v.detach().clone().requires_grad_(True)
            seqs, starts = data.qa_seqs([q])
            b = text_batch(seqs, starts, prefix, mc.reference_tokens, 0)
            loss, n = batch_loss(model, b, shared_memory(Memories(k, v, mem.positions, ""), b))
            (loss * n).backward()
            keep = (mem.positions >= 0)[..., None].double()
            gk = rotate(k.grad, mem.positions, model.config.rope_theta, -1).double() * keep
            gv = v.grad.double() * keep
            Fk += torch.einsum("mlksd,mlkse->lkde", gk, gk)
            Fv += torch.einsum("mlksd,mlkse->lkde", gv, gv)
        slots += int(mem.valid.sum())
    np.testing.assert_allclose(cal.key_fisher, (Fk / slots).numpy(), rtol=1e-4, atol=1e-12)
    np.testing.assert_allclose(cal.value_fisher, (Fv / slots).numpy(), rtol=1e-4, atol=1e-12)
    assert cal.meta["groups"] == 2 and cal.meta["memory_config"]["kept_tokens"] == 8
