from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close
from transformers import LlamaForCausalLM

from conftest import decode_with_memories, tiny_model
from memory3.config import ModelConfig
from memory3.device import cpu_has_native_bf16
from memory3.families import to_hf
from memory3.model import KVCache, Memory3Model, matmul_attention, resolve_kv_dtype


def hf_twin(model: Memory3Model) -> LlamaForCausalLM:
    return to_hf(model, attn_implementation="eager")


@pytest.mark.parametrize("preset", ["tiny", "tiny-tied"])
def test_logits_match_transformers_llama(preset: str) -> None:
    model = tiny_model(preset, seed=1)
    hf = hf_twin(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 37), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_close(model(ids), hf(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_logits_match_transformers_on_smollm2(smol) -> None:
    model, tok = smol.model, smol.tokenizer
    hf = hf_twin(model)
    ids = tok("The Eiffel Tower is a wrought-iron lattice tower in Paris.", return_tensors="pt").input_ids
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
    assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    assert ours[0, -1].argmax() == theirs[0, -1].argmax()


def test_incremental_decode_equals_full_recompute(tiny: Memory3Model) -> None:
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = tiny(ids)
        cache = KVCache(tiny.config, 2, 32)
        steps = [tiny(ids[:, :12], cache=cache)] + [
            tiny(ids[:, t : t + 1], cache=cache) for t in range(12, 20)
        ]
    assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)


def test_matmul_attention_equals_sdpa() -> None:
    """The bfloat16 decode attention is SDPA with a boolean mask: grouped-query heads in the
    right order, masked keys ignored however large they are."""
    g = torch.Generator().manual_seed(0)
    B, H, K, S, D = 3, 6, 2, 37, 16
    q = torch.randn(B, H, 1, D, generator=g)
    k = torch.randn(B, K, S, D, generator=g).bfloat16()
    v = torch.randn(B, K, S, D, generator=g).bfloat16()
    mask = torch.rand(B, 1, 1, S, generator=g) > 0.3
    mask[..., 0] = True
    want = torch.nn.functional.scaled_dot_product_attention(
        q, k.float(), v.float(), attn_mask=mask, enable_gqa=True
    )
    assert_close(matmul_attention(q, k, v, mask), want, rtol=0.02, atol=0.02)
    hidden = ~mask.view(B, 1, S, 1).expand(B, K, S, D)
    junk_k, junk_v = k.masked_fill(hidden, 1e4), v.masked_fill(hidden, -1e4)
    assert_close(matmul_attention(q, junk_k, junk_v, mask), matmul_attention(q, k, v, mask))
    T = 5  # several queries, each with its own mask row (causal over the last T keys)
    qs = torch.randn(B, H, T, D, generator=g)
    causal = torch.ones(T, S, dtype=torch.bool).tril(S - T).expand(B, 1, T, S)
    want = torch.nn.functional.scaled_dot_product_attention(
        qs, k.float(), v.float(), attn_mask=causal, enable_gqa=True
    )
    assert_close(matmul_attention(qs, k, v, causal), want, rtol=0.02, atol=0.02)


@pytest.mark.slow
def test_bfloat16_cache_decodes_like_float32(tiny: Memory3Model) -> None:
    """A bfloat16 KV cache (the CPU default for float32 models where bfloat16 is native) gives
    the float32 cache's logits to bfloat16 precision: left padding, memories with empty slots,
    and slots not yet written (filled with junk here) all masked."""
    logits = {}
    for dtype in (torch.float32, torch.bfloat16):
        logits[dtype], cache = decode_with_memories(tiny, dtype, seed=5, empty_from=3)
        assert cache.reads_all_slots(1) == (dtype == torch.bfloat16)
    want, got = logits[torch.float32], logits[torch.bfloat16]
    assert torch.isfinite(got).all()
    assert (got - want).abs().max() < 0.02 * want.abs().max()
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9


def test_kv_dtype_resolution() -> None:
    native = cpu_has_native_bf16()
    assert resolve_kv_dtype("auto", torch.float32, "cpu") == (torch.bfloat16 if native else torch.float32)
    assert resolve_kv_dtype("auto", torch.bfloat16, "cpu") == torch.bfloat16
    assert resolve_kv_dtype("auto", torch.float32, "cuda") == torch.float32  # GPUs: the model's dtype
    assert resolve_kv_dtype("float32", torch.float32, "cpu") == torch.float32
    assert resolve_kv_dtype(torch.float16, torch.float32, "cpu") == torch.float16
    with pytest.raises(ValueError, match="kv_dtype must be one of"):
        resolve_kv_dtype("fp8", torch.float32, "cpu")


def test_left_padding_matches_unpadded(tiny: Memory3Model) -> None:
    ids = torch.randint(3, 256, (1, 10), generator=torch.Generator().manual_seed(4))
    pad = torch.zeros(1, 5, dtype=torch.long)
    padded = torch.cat((pad, ids), 1)
    valid = torch.cat((torch.zeros(1, 5, dtype=torch.bool), torch.ones(1, 10, dtype=torch.bool)), 1)
    pos = torch.cat((torch.zeros(1, 5, dtype=torch.long), torch.arange(10)[None]), 1)
    with torch.no_grad():
        assert_close(tiny(padded, pos, token_valid=valid)[:, 5:], tiny(ids), rtol=1e-5, atol=1e-5)


def test_config_validates_and_round_trips(tmp_path) -> None:
    from memory3.config import fingerprint, load_json, save_json

    with pytest.raises(ValueError, match="divisible"):
        ModelConfig(n_head=5, n_kv_head=2)
    with pytest.raises(ValueError, match="memory_layers"):
        ModelConfig(n_layer=4, memory_layers=(3, 4))
    c = ModelConfig.from_preset("memory3-2b")
    assert c.memory_layers == tuple(range(22))
    save_json(c, tmp_path / "c.json")
    c2 = load_json(ModelConfig, tmp_path / "c.json")
    assert c2 == c and fingerprint(c2) == fingerprint(c)
    assert fingerprint(ModelConfig.from_preset("tiny")) != fingerprint(c)
