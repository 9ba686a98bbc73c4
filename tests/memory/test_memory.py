"""Writing memories (§3.3) and reading them in attention (§3.1–3.2)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from conftest import tiny_model
from memory3.config import SELECTIONS, MemoryConfig
from memory3.memory.write import Memories, MemoryWriter
from memory3.model import KVCache, MemoryInput

PREFIX = [1, 7, 9]  # <s> + "Reference:" stand-in


def refs(n: int, lo: int, hi: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi + 1, (n,), generator=g)
    return [torch.randint(3, 256, (int(L),), generator=g).tolist() for L in lens]


def loop_scores(model, ref: list[int], layer_pos: int, kv_head: int) -> list[float]:
    """Plain-loop §3.3 score of each reference token for one memory layer and kv head."""
    ids = torch.tensor([PREFIX + ref])
    caps = model.capture_memory_layers(ids, torch.arange(ids.shape[1])[None])
    cap = caps[layer_pos]
    H, K, D = model.config.n_head, model.config.n_kv_head, model.config.head_dim
    group = range(kv_head * (H // K), (kv_head + 1) * (H // K))
    p = len(PREFIX)
    scores = []
    for j in range(p, p + len(ref)):
        w = 0.0
        for i in range(p, p + len(ref)):
            for h in group:
                w += math.exp(float((cap.q[0, h, i] @ cap.k_pre[0, kv_head, j]).detach()) / math.sqrt(D))
        scores.append(w)
    return scores


@pytest.mark.slow
def test_sparsification_matches_plain_loop() -> None:
    model = tiny_model()
    cfg = MemoryConfig(reference_tokens=16, kept_tokens=4)
    writer = MemoryWriter(model, PREFIX, cfg)
    rs = refs(3, 9, 16, seed=1)
    with torch.no_grad():
        mem = writer.write(rs, batch_size=2)  # batched, different lengths
    assert mem.k.shape == (3, 2, 2, 4, 16)
    for m, r in enumerate(rs):
        for lp in range(model.config.n_memory_layers):
            for kh in range(model.config.n_kv_head):
                s = loop_scores(model, r, lp, kh)
                want = sorted(sorted(range(len(r)), key=lambda j: -s[j])[:4])
                got = (mem.positions[m, lp, kh] - len(PREFIX)).tolist()
                assert got == want, (m, lp, kh)


def loop_rule_scores(model, ref: list[int], layer_pos: int, kv_head: int, rule: str) -> list[float]:
    """Plain-loop score of each reference token under the alternative selection rules."""
    ids = torch.tensor([PREFIX + ref])
    cap = model.capture_memory_layers(ids, torch.arange(ids.shape[1])[None])[layer_pos]
    H, K, D = model.config.n_head, model.config.n_kv_head, model.config.head_dim
    p, n = len(PREFIX), len(ref)
    toks = range(p, p + n)
    if rule == "key-norm":
        return [-float(cap.k_pre[0, kv_head, j].norm()) for j in toks]
    received = [0.0] * n
    for h in range(kv_head * (H // K), (kv_head + 1) * (H // K)):
        for i in toks:
            e = [math.exp(float(cap.q[0, h, i] @ cap.k_pre[0, kv_head, j]) / math.sqrt(D)) for j in toks]
            for j in range(n):
                received[j] += e[j] / sum(e)
    if rule == "value-attention":
        return [w * float(cap.v[0, kv_head, p + j].norm()) for j, w in enumerate(received)]
    return received


@pytest.mark.parametrize("rule", ["attention-mean", "value-attention", "key-norm"])
@pytest.mark.slow
def test_alternative_selections_match_plain_loop(rule: str) -> None:
    model = tiny_model()
    writer = MemoryWriter(model, PREFIX, MemoryConfig(reference_tokens=16, kept_tokens=4, selection=rule))
    rs = refs(3, 9, 16, seed=1)
    with torch.no_grad():
        mem = writer.write(rs, batch_size=2)  # batched, different lengths
        for m, r in enumerate(rs):
            for lp in range(model.config.n_memory_layers):
                for kh in range(model.config.n_kv_head):
                    s = loop_rule_scores(model, r, lp, kh, rule)
                    want = sorted(sorted(range(len(r)), key=lambda j: -s[j])[:4])
                    assert (mem.positions[m, lp, kh] - len(PREFIX)).tolist() == want, (m, lp, kh)


def test_selection_rule_is_part_of_the_memory_fingerprint() -> None:
    model = tiny_model()
    fps = {MemoryWriter(model, PREFIX, MemoryConfig(selection=r)).fingerprint for r in SELECTIONS}
    assert len(fps) == len(SELECTIONS)
    with pytest.raises(ValueError, match="selection must be one of"):
        MemoryConfig(selection="loudest")


def test_kept_tokens_are_real_reference_tokens_with_post_rope_kv() -> None:
    model = tiny_model()
    cfg = MemoryConfig(reference_tokens=16, kept_tokens=4)
    writer = MemoryWriter(model, PREFIX, cfg)
    rs = refs(5, 2, 16, seed=2)
    with torch.no_grad():
        mem = writer.write(rs, batch_size=5)
        for m, r in enumerate(rs):
            ids = torch.tensor([PREFIX + r])
            caps = model.capture_memory_layers(ids, torch.arange(ids.shape[1])[None])
            n_real = min(4, len(r))
            pos = mem.positions[m]
            # exactly min(8, len) real tokens per layer and head; never prefix or padding
            assert ((pos >= 0).sum(-1) == n_real).all()
            real = pos[pos >= 0]
            assert (real >= len(PREFIX)).all() and (real < len(PREFIX) + len(r)).all()
            assert mem.valid[m].sum() == n_real
            for lp, cap in enumerate(caps):
                for kh in range(model.config.n_kv_head):
                    for s in range(n_real):
                        j = int(pos[lp, kh, s])
                        assert_close(mem.k[m, lp, kh, s], cap.k[0, kh, j])
                        assert_close(mem.v[m, lp, kh, s], cap.v[0, kh, j])


@pytest.mark.parametrize("selection", ["attention", "random"])
def test_batched_writing_equals_one_by_one(selection: str) -> None:
    model = tiny_model()
    writer = MemoryWriter(
        model, PREFIX, MemoryConfig(reference_tokens=16, kept_tokens=4, selection=selection)
    )
    rs = refs(6, 4, 16, seed=3)
    with torch.no_grad():
        batched = writer.write(rs, batch_size=4)
        single = Memories.cat([writer.write([r]) for r in rs])
    assert torch.equal(batched.positions, single.positions)
    assert_close(batched.k, single.k, rtol=1e-5, atol=1e-5)


def test_writer_rejects_bad_references() -> None:
    writer = MemoryWriter(tiny_model(), PREFIX, MemoryConfig(reference_tokens=16, kept_tokens=4))
    with pytest.raises(ValueError, match=r"1\.\.16 tokens"):
        writer.write([[5] * 17])
    with pytest.raises(ValueError, match=r"1\.\.16 tokens"):
        writer.write([[]])


def _setup(all_layers: bool = False, selection: str = "attention"):
    overrides = {"memory_layers": (0, 1, 2, 3)} if all_layers else {}
    model = tiny_model(seed=5, **overrides)
    cfg = MemoryConfig(reference_tokens=16, kept_tokens=4, chunk_tokens=8, selection=selection)
    writer = MemoryWriter(model, PREFIX, cfg)
    with torch.no_grad():
        mem = writer.write(refs(6, 3, 16, seed=6))
    return model, cfg, mem


def _layout(n_prompt: int, cfg: MemoryConfig):
    p = len(PREFIX)
    g = torch.Generator().manual_seed(7)
    ids = torch.tensor([PREFIX + torch.randint(3, 256, (n_prompt,), generator=g).tolist()])
    pos = torch.cat((torch.arange(p), torch.arange(n_prompt) + p + cfg.reference_tokens))[None]
    return ids, pos


def _memory_input(mem: Memories, chunks: list[list[int]], T: int, p: int, cfg: MemoryConfig) -> MemoryInput:
    """Chunk c reads memories chunks[c]; (Lm, 1, K, C·k·S, D) with a block mask."""
    k = max(len(c) for c in chunks)
    S = cfg.kept_tokens
    ks, vs, valid = [], [], []
    for sel in chunks:
        m = mem[sel]
        pad = k - len(sel)
        kk = torch.cat((m.k, torch.zeros(pad, *m.k.shape[1:])))  # (k, Lm, K, S, D)
        vv = torch.cat((m.v, torch.zeros(pad, *m.v.shape[1:])))
        ks.append(kk.permute(1, 2, 0, 3, 4).flatten(2, 3))  # (Lm, K, k·S, D)
        vs.append(vv.permute(1, 2, 0, 3, 4).flatten(2, 3))
        valid.append(torch.cat((m.valid, torch.zeros(pad, S, dtype=torch.bool))).flatten())
    K = torch.cat(ks, 2)[:, None]
    V = torch.cat(vs, 2)[:, None]
    slot_valid = torch.cat(valid)
    chunk_of_slot = torch.arange(len(chunks)).repeat_interleave(k * S)
    chunk_of_tok = torch.tensor([-1] * p + [t // cfg.chunk_tokens for t in range(T - p)])
    vis = (chunk_of_tok[:, None] == chunk_of_slot[None]) & slot_valid[None]
    return MemoryInput(K, V, vis[None])


def test_block_mask_equals_per_chunk_loop() -> None:
    """All chunks in one call == the paper's loop: one chunk at a time through a KV cache."""
    model, cfg, mem = _setup()
    ids, pos = _layout(21, cfg)  # 3 chunks of 8, the last one partial
    p, T = len(PREFIX), ids.shape[1]
    chunks = [[0, 1, 2], [3, 4], [5, 0, 2]]  # the second chunk has fewer memories (padded)
    with torch.no_grad():
        one_call = model(ids, pos, memory=_memory_input(mem, chunks, T, p, cfg))
        cache = KVCache(model.config, 1, T)
        outs = [model(ids[:, :p], pos[:, :p], cache=cache)]
        for c, sel in enumerate(chunks):
            a, b = p + c * 8, min(p + (c + 1) * 8, T)
            mi = _memory_input(mem, [sel], b - a + p, p, cfg)
            mi = MemoryInput(mi.k, mi.v, mi.visible[:, p:])  # all of this chunk's tokens read sel
            outs.append(model(ids[:, a:b], pos[:, a:b], cache=cache, memory=mi))
    assert_close(one_call, torch.cat(outs, 1), rtol=1e-5, atol=1e-5)


def test_memory_layer_attention_matches_naive_softmax() -> None:
    """One memory layer against a per-query softmax over [prefix, its chunk's memories, context]."""
    model, cfg, mem = _setup()
    ids, pos = _layout(13, cfg)
    p, T = len(PREFIX), ids.shape[1]
    chunks = [[0, 1], [2, 3]]
    mi = _memory_input(mem, chunks, T, p, cfg)
    attn = model.model.layers[0].self_attn
    from memory3.model import apply_rope, context_mask, rope_cos_sin

    with torch.no_grad():
        x = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids))
        cos, sin = rope_cos_sin(pos, model.config.rope, 16, x.dtype)
        mask = torch.cat((mi.visible[:, None], context_mask(T, 0, None, 1, x.device)), -1)
        ours = attn(x, cos, sin, mask, 0, None, (mi.k[0], mi.v[0]), False, None)
        q, k, v = attn.qkv(x)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        G = model.config.n_head // model.config.n_kv_head
        out = torch.zeros(1, model.config.n_head, T, 16)
        for i in range(T):
            c = -1 if i < p else (i - p) // cfg.chunk_tokens
            for h in range(model.config.n_head):
                kh = h // G
                keys, vals = [k[0, kh, : i + 1]], [v[0, kh, : i + 1]]
                if c >= 0:
                    for m in chunks[c]:
                        keys.append(mem.k[m, 0, kh])
                        vals.append(mem.v[m, 0, kh])
                K_, V_ = torch.cat(keys), torch.cat(vals)
                w = torch.softmax(K_ @ q[0, h, i] / 4.0, 0)
                out[0, h, i] = w @ V_
        naive = attn.o_proj(out.transpose(1, 2).reshape(1, T, -1))
    assert_close(ours, naive, rtol=1e-5, atol=1e-5)


def test_no_memory_is_bit_identical_to_plain_model() -> None:
    model, cfg, _ = _setup()
    ids, pos = _layout(10, cfg)
    with torch.no_grad():
        plain = model(ids, pos)
        # a cache that reserves memory slots but holds none
        cache = KVCache(model.config, 1, 32, mem_slots=cfg.slots)
        cached = model(ids, pos, cache=cache)
    assert torch.equal(plain, cached)


def test_cached_decoding_with_memories_equals_full_recompute() -> None:
    model, cfg, mem = _setup()
    ids, pos = _layout(12, cfg)
    p, T = len(PREFIX), ids.shape[1]
    sel = [1, 4, 5]
    with torch.no_grad():
        mi = _memory_input(mem, [sel], T, p, cfg)
        vis = mi.visible.clone()
        vis[:, p:] = vis[:, p:].any(1, keepdim=True)  # every prompt token reads the same memories
        full = model(ids, pos, memory=MemoryInput(mi.k, mi.v, vis))
        cache = KVCache(model.config, 1, T, mem_slots=mi.k.shape[3])
        first = model(ids[:, :8], pos[:, :8], cache=cache, memory=MemoryInput(mi.k, mi.v, vis[:, :8]))
        cache.set_memory(mi.k, mi.v, vis[:, -1])
        steps = [model(ids[:, t : t + 1], pos[:, t : t + 1], cache=cache) for t in range(8, T)]
    assert_close(torch.cat([first, *steps], 1), full, rtol=1e-5, atol=1e-5)


def test_full_memory_at_all_layers_equals_plain_forward_over_reference_and_prompt() -> None:
    """Positive control (docs/design.md, "Training a model to read memory"): unsparsified memory in every layer is exactly the model
    reading prefix + reference + prompt with the same position ids."""
    model, cfg, _ = _setup(all_layers=True, selection="all")
    ref = refs(1, 16, 16, seed=8)[0]
    writer = MemoryWriter(model, PREFIX, cfg)
    with torch.no_grad():
        m = writer.write([ref])
        ids, pos = _layout(7, cfg)
        p, T = len(PREFIX), ids.shape[1]
        mi = _memory_input(m, [[0]], T, p, cfg)
        read = model(ids, pos, memory=mi)[:, p:]
        plain_ids = torch.cat((ids[:, :p], torch.tensor([ref]), ids[:, p:]), 1)
        plain_pos = torch.cat((pos[:, :p], torch.arange(p, p + 16)[None], pos[:, p:]), 1)
        plain = model(plain_ids, plain_pos)[:, p + 16 :]
    assert_close(read, plain, rtol=1e-5, atol=1e-5)


def test_memory_of_wrong_layer_count_is_refused() -> None:
    model, cfg, mem = _setup()
    ids, pos = _layout(5, cfg)
    mi = _memory_input(mem, [[0]], ids.shape[1], len(PREFIX), cfg)
    bad = MemoryInput(mi.k[:1], mi.v[:1], mi.visible)
    with pytest.raises(ValueError, match="memory layers"):
        model(ids, pos, memory=bad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_into_cache_equals_set_memory_of_the_gathered_memories(dtype: torch.dtype) -> None:
    """layout.into_cache (memories copied straight into the cache's slots) reads like
    set_memory(*layout.gather(...)): the same keys/values in every visible slot, the same
    visibility, with absent memories (-1), padded slots inside a memory, and no memories at all."""
    from memory3.memory import layout

    model = tiny_model(seed=3)
    cfg = model.config
    M, S, B, J = 5, 4, 3, 2
    g = torch.Generator().manual_seed(0)
    shape = (M, cfg.n_memory_layers, cfg.n_kv_head, S, cfg.head_dim)
    positions = torch.arange(S, dtype=torch.int32).expand(shape[:4]).clone()
    positions[2, ..., -1] = -1  # memory 2 has a padded slot
    mem = Memories(torch.randn(shape, generator=g), torch.randn(shape, generator=g), positions, "t")
    index = torch.tensor([[0, 2], [4, -1], [-1, -1]])
    want, got = KVCache(cfg, B, 8, J * S + 3, dtype=dtype), KVCache(cfg, B, 8, J * S + 3, dtype=dtype)
    want.set_memory(*layout.gather(mem, index))
    got.set_memory_valid(torch.ones(B, J * S + 3, dtype=torch.bool))  # stale: must be cleared
    layout.into_cache(mem, index, got)
    assert torch.equal(got.mem_valid, want.mem_valid) and got.has_memory
    seen = want.mem_valid[:, None, :, None]  # (B, 1, N, 1): only visible slots must agree
    for layer in want.mem_layer_ids:
        for a, b in ((got.k[layer], want.k[layer]), (got.v[layer], want.v[layer])):
            assert torch.equal(a[:, :, : want.mem_slots] * seen, b[:, :, : want.mem_slots] * seen)
    empty = Memories(mem.k[:0], mem.v[:0], mem.positions[:0], "t")
    layout.into_cache(empty, torch.full((B, J), -1), got)
    assert not got.mem_valid.any() and not got.has_memory
