from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close
from transformers import LlamaForCausalLM

from conftest import tiny_model
from memory3.checkpoint import to_hf_llama
from memory3.config import ModelConfig
from memory3.model import KVCache, Memory3Model


def hf_twin(model: Memory3Model) -> LlamaForCausalLM:
    return to_hf_llama(model, attn_implementation="eager")


@pytest.mark.parametrize("preset", ["tiny", "tiny-tied"])
def test_logits_match_transformers_llama(preset: str) -> None:
    model = tiny_model(preset, seed=1)
    hf = hf_twin(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 37), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_close(model(ids), hf(ids).logits, rtol=1e-5, atol=1e-5)


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
