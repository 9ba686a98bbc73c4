"""Generation: three modes, chunked memories, re-retrieval every chunk, batching, streaming."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import tiny_model
from memory3.config import GenerationConfig, MemoryConfig
from memory3.decoding import sample
from memory3.generate import Generator, prefill_chunks
from memory3.memory import layout
from memory3.memory.write import Memories, MemoryFormatError, MemoryWriter
from memory3.model import KVCache, MemoryInput
from memory3.retrieval.inmemory import InMemoryRetriever

FACTS = [
    "Quellmar is the capital of Zantoria, a port on the Amber Sea.",
    "Mount Fjarn, 4,211 metres high, is the highest point of Zantoria.",
    "Velmora Castiglio was a glassblower born in Dresk in 1873.",
    "The Dresk glassworks closed in 1931 after a fire.",
    "Zantoria's currency is the zant, divided into 100 pell.",
    "The Amber Sea freezes every winter north of Quellmar.",
]


class BagOfWords:
    """Deterministic word-hashing embedder for tests."""

    name, dim = "bow", 64

    def embed(self, texts):
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, t in enumerate(texts):
            for w in t.lower().split():
                out[i, sum(map(ord, w.strip(".,?'"))) % self.dim] += 1
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)


@pytest.fixture(scope="module")
def setup(tok):
    model = tiny_model(seed=11, vocab_size=len(tok), bos_token_id=1, eos_token_id=2)
    cfg = MemoryConfig(reference_tokens=24, kept_tokens=4, chunk_tokens=8, memories_per_chunk=2)
    gen = Generator(model, tok, memory_config=cfg, chat=False)
    writer = MemoryWriter(model, gen.prefix_ids, cfg)
    retr = InMemoryRetriever(FACTS, writer, tok, BagOfWords())
    gen.set_retriever(retr)
    return model, cfg, gen, retr


@pytest.mark.slow
def test_none_mode_equals_plain_greedy_recompute(setup, tok) -> None:
    model, _, gen, _ = setup
    out = gen.generate(
        "Tell me about Quellmar and the sea", mode="none", config=GenerationConfig(max_new_tokens=12)
    )[0]
    ids = tok("Tell me about Quellmar and the sea").input_ids
    want = []
    with torch.no_grad():
        for _ in range(len(out.token_ids)):
            want.append(int(model(torch.tensor([ids + want]))[0, -1].argmax()))
    assert out.token_ids == want


def _visible_memories(mem_for_chunk: list[list[int]], token_chunk: list[int], retr, cfg, p: int):
    """MemoryInput where context token t (after the prefix) reads the memories of chunk token_chunk[t]."""
    k, S = cfg.memories_per_chunk, cfg.kept_tokens
    mems = []
    for ids in mem_for_chunk:
        m = retr.memories(ids) if ids else None
        kk = torch.zeros(k, *retr.memories([0]).k.shape[1:])
        vv, valid = torch.zeros_like(kk), torch.zeros(k, S, dtype=torch.bool)
        if m is not None:
            kk[: len(ids)], vv[: len(ids)], valid[: len(ids)] = m.k, m.v, m.valid
        mems.append((kk, vv, valid))
    K = torch.cat([kk.permute(1, 2, 0, 3, 4).flatten(2, 3) for kk, _, _ in mems], 2)[:, None]
    V = torch.cat([vv.permute(1, 2, 0, 3, 4).flatten(2, 3) for _, vv, _ in mems], 2)[:, None]
    slot_valid = torch.cat([v.flatten() for _, _, v in mems])
    slot_chunk = torch.arange(len(mems)).repeat_interleave(k * S)
    tc = torch.tensor([-1] * p + token_chunk)
    return MemoryInput(K, V, ((tc[:, None] == slot_chunk[None]) & slot_valid[None])[None])


@pytest.mark.slow
def test_memory_generation_equals_full_recompute_with_the_same_memories(setup, tok) -> None:
    """Prompt chunks read their own memories; decoded chunk 0 keeps the last prompt chunk's;
    after every chunk of generated tokens new memories are retrieved with those tokens."""
    model, cfg, gen, retr = setup
    gen = Generator(model, tok, retr, cfg, chat=False, kv_dtype="float32")  # exact, as the recompute
    prompt = "Which town was Velmora Castiglio born in and what did the glassworks of Dresk make?"
    out = gen.generate(prompt, mode="memory", config=GenerationConfig(max_new_tokens=21))[0]
    ids = tok(prompt).input_ids
    n_prompt_chunks = -(-len(ids) // cfg.chunk_tokens)
    refs = [[h.ref_id for h in hits] for hits in out.references]
    assert len(out.token_ids) == 21 and len(refs) == n_prompt_chunks + 2  # swaps after 8 and 16 tokens
    assert (gen.timing.generated_tokens, gen.timing.decode_steps) == (21, 20)  # token 1 comes from prefill
    p, R = len(gen.prefix_ids), cfg.reference_tokens
    with torch.no_grad():
        for n in range(len(out.token_ids)):
            seq = ids + out.token_ids[:n]
            chunk_of = [t // 8 for t in range(len(ids))]
            chunk_of += [n_prompt_chunks - 1 + g // 8 for g in range(n)]
            mi = _visible_memories(refs, chunk_of, retr, cfg, p)
            x = torch.tensor([gen.prefix_ids + seq])
            pos = torch.cat((torch.arange(p), torch.arange(len(seq)) + p + R))[None]
            assert int(model(x, pos, memory=mi)[0, -1].argmax()) == out.token_ids[n], n


@pytest.mark.slow
def test_batch_equals_one_by_one(setup) -> None:
    _, _, gen, _ = setup
    prompts = ["Quellmar?", "Where is Mount Fjarn and how high is it, in metres above the sea?", "zant"]
    cfg = GenerationConfig(max_new_tokens=10)
    for mode in ("memory", "none", "rag"):
        batch = gen.generate(prompts, mode=mode, config=cfg)
        single = [gen.generate(p, mode=mode, config=cfg)[0] for p in prompts]
        assert [b.token_ids for b in batch] == [s.token_ids for s in single], mode
        # the same hits; scores agree to float precision (a batched search sums in another order)
        ids = [[[(h.ref_id, h.doc_id, h.text) for h in hits] for hits in o.references] for o in batch]
        assert ids == [
            [[(h.ref_id, h.doc_id, h.text) for h in hits] for hits in o.references] for o in single
        ]
        scores = [h.score for o in batch for hits in o.references for h in hits]
        assert scores == pytest.approx(
            [h.score for o in single for hits in o.references for h in hits], abs=1e-5
        )


@pytest.mark.slow
def test_rag_puts_the_same_references_in_the_prompt(setup) -> None:
    _, _, gen, retr = setup
    out = gen.generate("the capital of Zantoria", mode="rag", config=GenerationConfig(max_new_tokens=2))[0]
    hits = retr.search(["the capital of Zantoria"], 2)[0]
    assert [h.ref_id for h in out.references[0]] == [h.ref_id for h in hits]
    mem = gen.generate("the capital of Zantoria", mode="memory", config=GenerationConfig(max_new_tokens=2))[0]
    assert [h.ref_id for h in mem.references[0]] == [h.ref_id for h in hits]
    assert out.prompt_tokens > mem.prompt_tokens


def test_min_score_drops_unrelated_references_in_every_mode(setup) -> None:
    """Hits below the relevance floor are not read: the memory and RAG modes see only the hits
    that pass it, and with none passing RAG's prompt is the plain one (the same answer as none)."""
    model, cfg, gen, retr = setup
    q, g = "the capital of Zantoria", GenerationConfig(max_new_tokens=6)
    hits = retr.search([q], 2)[0]
    floor = (hits[0].score + hits[1].score) / 2  # between the best hit and the second
    assert hits[0].score > hits[1].score
    for mode in ("memory", "rag"):
        out = gen.generate(q, mode=mode, config=g, min_score=floor)[0]
        assert [h.ref_id for h in out.references[0]] == [hits[0].ref_id]
    rag = gen.generate(q, mode="rag", config=g, min_score=1.0)[0]
    assert rag.references[0] == [] and rag.token_ids == gen.generate(q, mode="none", config=g)[0].token_ids
    strict = Generator(model, gen.tokenizer, retr, cfg, chat=False, min_score=1.0)  # the generator's floor
    assert strict.generate(q, mode="memory", config=g)[0].references[0] == []
    assert strict.generate(q, mode="memory", config=g, min_score=-1.0)[0].references[0] != []  # per call
    with pytest.raises(ValueError, match=r"cosine similarity in \[-1, 1\]"):
        gen.generate(q, mode="memory", config=g, min_score=1.5)


@pytest.mark.slow
def test_stream_matches_generate_and_stop_strings_cut(setup) -> None:
    _, _, gen, _ = setup
    cfg = GenerationConfig(max_new_tokens=16)
    full = gen.generate("Mount Fjarn", mode="memory", config=cfg)[0]
    events = list(gen.stream("Mount Fjarn", mode="memory", config=cfg))
    assert "".join(e.delta for e in events) == full.text
    assert events[-1].finish_reason == full.finish_reason
    stop = full.text[len(full.text) // 2 : len(full.text) // 2 + 2]
    if stop.strip():
        cut = gen.generate(
            "Mount Fjarn", mode="memory", config=GenerationConfig(max_new_tokens=16, stop=(stop,))
        )[0]
        assert cut.finish_reason == "stop" and stop not in cut.text and full.text.startswith(cut.text)
        streamed = "".join(
            e.delta
            for e in gen.stream("Mount Fjarn", config=GenerationConfig(max_new_tokens=16, stop=(stop,)))
        )
        assert streamed == cut.text


def test_sampling_is_seeded_and_top_p_narrows() -> None:
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    cfg = GenerationConfig(temperature=1.0, top_p=0.9, seed=3)
    a = sample(logits, cfg, torch.Generator().manual_seed(3))
    b = sample(logits, cfg, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    tiny_p = GenerationConfig(temperature=1.0, top_p=1e-6)
    assert torch.equal(sample(logits, tiny_p, torch.Generator().manual_seed(1)), logits.argmax(-1))
    top1 = GenerationConfig(temperature=0.7, top_k=1)
    assert torch.equal(sample(logits, top1, torch.Generator().manual_seed(1)), logits.argmax(-1))


def test_bad_input_is_named(setup, tok) -> None:
    model, cfg, gen, _ = setup
    with pytest.raises(ValueError, match="empty prompt"):
        gen.generate("   ")
    with pytest.raises(ValueError, match="does not fit the context"):
        gen.generate("word " * model.config.max_seq_len)
    with pytest.raises(ValueError, match="mode must be one of"):
        gen.generate("hi", mode="cache")  # type: ignore[arg-type]
    other = tiny_model(seed=99, vocab_size=len(tok))
    other_writer = MemoryWriter(other, gen.prefix_ids, cfg)
    foreign = InMemoryRetriever(FACTS[:2], other_writer, tok, BagOfWords())
    with pytest.raises(MemoryFormatError, match="fingerprint"):
        Generator(model, tok, retriever=foreign, memory_config=cfg)
    with pytest.raises(ValueError, match="need a retriever"):
        Generator(model, tok, memory_config=cfg).generate("hi", mode="memory")


def test_memories_of_wrong_shape_are_refused(setup) -> None:
    model, cfg, gen, retr = setup

    class Broken:
        memory_fingerprint = retr.memory_fingerprint

        def search(self, queries, k, leak_texts=None, leak_threshold=None):
            return retr.search(queries, k)

        def memories(self, ids):
            m = retr.memories(ids)
            return Memories(m.k[:, :, :, :2], m.v[:, :, :, :2], m.positions[:, :, :, :2], m.fingerprint)

    g = Generator(model, gen.tokenizer, retriever=Broken(), memory_config=cfg, chat=False)
    with pytest.raises(MemoryFormatError, match="shape"):
        g.generate("Quellmar")


def _prefill_inputs(cfg, mem_cfg, lens: list[int], seed: int, p: int = 3, R: int = 16):
    """prefill_chunks' arguments for right-padded prompts of `lens` tokens after one p-token
    prefix, with random memories: 3 chunks of J memories each, -1 for chunks a prompt lacks."""
    n, J, S = mem_cfg.chunk_tokens, mem_cfg.memories_per_chunk, mem_cfg.kept_tokens
    B, C, T = len(lens), 3, p + max(lens)
    g = torch.Generator().manual_seed(seed)
    shape = (B * C * J, cfg.n_memory_layers, cfg.n_kv_head, S, cfg.head_dim)
    positions = (torch.arange(S, dtype=torch.int32) + p).expand(shape[:4]).contiguous()
    mem = Memories(torch.randn(shape, generator=g), torch.randn(shape, generator=g), positions, "t")
    index = torch.arange(B * C * J).view(B, C, J)
    for b, L in enumerate(lens):  # chunks a prompt does not have read nothing (-1)
        index[b, -(-L // n) :] = -1
    ids = torch.randint(3, cfg.vocab_size, (B, T), generator=g)
    ids[:, :p] = ids[0, :p]  # one prefix for every row, as in generation
    pos = torch.zeros(B, T, dtype=torch.long)
    valid = torch.zeros(B, T, dtype=torch.bool)
    for b, L in enumerate(lens):
        pos[b, :p], pos[b, p : p + L] = torch.arange(p), torch.arange(L) + p + R
        valid[b, : p + L] = True
    last = torch.tensor([p + L - 1 for L in lens])
    return ids, pos, valid, mem, index, last, p


def test_chunked_prefill_equals_the_one_pass_forward_for_each_prompt(mem_cfg) -> None:
    """prefill_chunks on a right-padded batch of prompts with 1, 2 and 3 chunks gives, for each
    prompt, the last-token logits of the one-pass block-masked forward over that prompt alone."""
    model = tiny_model(seed=5)
    cfg, n, slots = model.config, mem_cfg.chunk_tokens, mem_cfg.memories_per_chunk * mem_cfg.kept_tokens
    lens = [5, 2 * n + 3, 3 * n]
    ids, pos, valid, mem, index, last, p = _prefill_inputs(cfg, mem_cfg, lens, seed=0)
    cache = KVCache(cfg, len(lens), ids.shape[1], slots)
    with torch.no_grad():
        got = prefill_chunks(model, ids, pos, valid, mem, index, last, p, n, cache)
        for b, L in enumerate(lens):
            chunk = torch.cat((torch.full((p,), -1), torch.arange(L) // n))[None]
            memory = layout.chunked(mem, index[b : b + 1], chunk)
            want = model(ids[b : b + 1, : p + L], pos[b : b + 1, : p + L], memory=memory)[0, -1]
            torch.testing.assert_close(got[b], want, rtol=1e-4, atol=1e-4)
    assert cache.len == ids.shape[1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_from_a_written_prefix_equals_prefilling_it(mem_cfg, dtype: torch.dtype) -> None:
    """The prefix computed once by a batch-1 pass and copied into every row (KVCache.write_prefix,
    what Generator does) gives the logits of prefilling it in every row, with a float32 cache and
    with the bfloat16 one generation uses on CPUs with native bfloat16; a cache holding anything
    else, or a prompt with no token after the prefix, is refused."""
    model = tiny_model(seed=6)
    cfg, n, slots = model.config, mem_cfg.chunk_tokens, mem_cfg.memories_per_chunk * mem_cfg.kept_tokens
    lens = [4, 2 * n + 1]
    ids, pos, valid, mem, index, last, p = _prefill_inputs(cfg, mem_cfg, lens, seed=1)
    B, T = ids.shape
    with torch.no_grad():
        fresh = KVCache(cfg, B, T, slots, dtype=dtype)
        want = prefill_chunks(model, ids, pos, valid, mem, index, last, p, n, fresh)
        once = KVCache(cfg, 1, p, dtype=dtype)
        model(ids[:1, :p], cache=once)
        prefix = [(k[:, :, :p], v[:, :, :p]) for k, v in zip(once.k, once.v, strict=True)]
        cache = KVCache(cfg, B, T, slots, dtype=dtype)
        cache.write_prefix(prefix)
        assert cache.len == p
        got = prefill_chunks(model, ids, pos, valid, mem, index, last, p, n, cache)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match="starts from an empty cache"):
            prefill_chunks(model, ids, pos, valid, mem, index, last, p, n, cache)
        with pytest.raises(ValueError, match="needs an empty cache"):
            cache.write_prefix(prefix)
        with pytest.raises(ValueError, match="at least one token after"):
            prefill_chunks(model, ids, pos, valid, mem, index, torch.tensor([p - 1, p]), p, n, fresh)


def test_generator_recomputes_its_prefix_when_the_weights_change(setup, tok) -> None:
    """Generator keeps the prefix's keys/values between calls; a weight changed in place (a
    training step) makes it compute them again, so memory-mode output equals a fresh Generator's."""
    cfg = setup[1]
    model = tiny_model(seed=12, vocab_size=len(tok), bos_token_id=1, eos_token_id=2)
    gen = Generator(model, tok, memory_config=cfg, chat=False)
    gen.set_retriever(InMemoryRetriever(FACTS, MemoryWriter(model, gen.prefix_ids, cfg), tok, BagOfWords()))
    prompt, config = "Where is Quellmar?", GenerationConfig(max_new_tokens=6)
    gen.generate(prompt, mode="memory", config=config)
    before = gen._prefix_kv()
    assert gen._prefix_kv() is before  # kept, not recomputed
    with torch.no_grad():
        model.model.layers[0].self_attn.k_proj.weight.mul_(1.5)
    after = gen._prefix_kv()
    assert after is not before and not torch.equal(after[0][0], before[0][0])
    fresh = Generator(model, tok, memory_config=cfg, chat=False)
    fresh.set_retriever(gen.retriever)
    assert (
        gen.generate(prompt, mode="memory", config=config)[0].token_ids
        == fresh.generate(prompt, mode="memory", config=config)[0].token_ids
    )


def test_generator_of_a_model_made_under_inference_mode_computes_its_prefix_each_time(setup, tok) -> None:
    """Weights created under torch.inference_mode keep no version counter, so a change to them
    cannot be seen: the prefix is then computed in every call rather than kept."""
    cfg, retr = setup[1], setup[3]
    with torch.inference_mode():
        model = tiny_model(seed=11, vocab_size=len(tok), bos_token_id=1, eos_token_id=2)
    gen = Generator(model, tok, retriever=retr, memory_config=cfg, chat=False)
    config = GenerationConfig(max_new_tokens=5)
    first = gen.generate("Where is Quellmar?", mode="memory", config=config)[0].token_ids
    assert gen._prefix_cache is None and gen._prefix_kv() is not gen._prefix_kv()
    assert gen.generate("Where is Quellmar?", mode="memory", config=config)[0].token_ids == first
    assert setup[2].generate("Where is Quellmar?", mode="memory", config=config)[0].token_ids == first
