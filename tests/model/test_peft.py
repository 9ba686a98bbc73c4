"""Adapters in PEFT's format: what memory3 writes, `peft` loads onto the base model's transformers
twin with the same logits; what `peft` trains, memory3 loads; the shipped adapter makes the round
trip memory3 → PEFT → memory3 with identical logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import tiny_model
from memory3.checkpoint import ADAPTER_FILE, load_pretrained, read_adapter, save_checkpoint
from memory3.errors import CheckpointError
from memory3.families import to_hf
from memory3.lora import PEFT_CONFIG, LoRAConfig, apply_lora, lora_state, merge_lora
from memory3.shipped import ADAPTER_META, TRAINED
from memory3.train.adapters import write_peft

peft = pytest.importorskip("peft", reason="peft is a test dependency (requirements-cpu.txt)")


def ids(n: int = 48) -> torch.Tensor:
    return torch.randint(3, 256, (2, n), generator=torch.Generator().manual_seed(2))


@pytest.fixture
def base_dir(tmp_path: Path) -> Path:
    return save_checkpoint(tiny_model(seed=3), tmp_path / "base")


@pytest.mark.slow
def test_memory3_adapter_loads_in_peft_with_the_same_logits(base_dir: Path, tmp_path: Path) -> None:
    model = load_pretrained(base_dir).model
    lora = LoRAConfig(rank=4, alpha=8.0, targets=("q_proj", "v_proj", "down_proj"), layers=(0, 2))
    apply_lora(model, lora, seed=1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    state = lora_state(model)
    out = tmp_path / "adapter"
    out.mkdir()
    write_peft(out, state, lora, str(base_dir))
    ours = merge_lora(model)
    hf = peft.PeftModel.from_pretrained(to_hf(load_pretrained(base_dir).model), out).eval()
    with torch.no_grad():
        assert (hf(ids()).logits - ours(ids())).abs().max() <= 1e-5
        assert (load_pretrained(out).model(ids()) - ours(ids())).abs().max() <= 1e-6


def test_adapter_trained_by_peft_loads_into_memory3(base_dir: Path, tmp_path: Path) -> None:
    base = load_pretrained(base_dir).model
    config = peft.LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "o_proj", "up_proj"], task_type="CAUSAL_LM"
    )
    hf = peft.get_peft_model(to_hf(base), config)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    hf.save_pretrained(tmp_path / "peft")
    cfg = json.loads((tmp_path / "peft" / PEFT_CONFIG).read_text())
    cfg["base_model_name_or_path"] = str(base_dir)  # a local base: nothing is downloaded
    (tmp_path / "peft" / PEFT_CONFIG).write_text(json.dumps(cfg))
    loaded = load_pretrained(tmp_path / "peft")
    with torch.no_grad():
        want = hf.eval()(ids()).logits
        assert (loaded.model(ids()) - want).abs().max() <= 1e-5
    assert loaded.model.memory_layers == (0, 1)  # no adapter.json: the default memory layers


@pytest.mark.parametrize(
    "field, value",
    [("use_dora", True), ("use_rslora", True), ("bias", "all"), ("target_modules", ".*proj"),
     ("modules_to_save", ["lm_head"])],
)  # fmt: skip
def test_what_memory3_does_not_run_is_refused_by_name(
    base_dir: Path, tmp_path: Path, field: str, value
) -> None:
    model = load_pretrained(base_dir).model
    lora = LoRAConfig(rank=2, targets=("q_proj",))
    apply_lora(model, lora)
    write_peft(tmp_path, lora_state(model), lora, str(base_dir))
    cfg = json.loads((tmp_path / PEFT_CONFIG).read_text())
    cfg[field] = value
    (tmp_path / PEFT_CONFIG).write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=field):
        load_pretrained(tmp_path)


@pytest.mark.slow
def test_shipped_adapter_round_trips_through_peft_format(tmp_path: Path) -> None:
    """The shipped adapter (PEFT files) written back in memory3's first format gives identical
    logits and the same fingerprint (banks written before stay valid); peft reads it too."""
    shipped = read_adapter(TRAINED)
    meta = dict(shipped.meta, format=1, lora=json.loads(json.dumps(shipped.lora.__dict__)))
    save_file(shipped.state, tmp_path / ADAPTER_FILE, metadata={"format": "pt"})
    (tmp_path / ADAPTER_META).write_text(json.dumps(meta))
    a, b = load_pretrained(TRAINED), load_pretrained(tmp_path)
    x = ids(40)
    with torch.no_grad():
        assert torch.equal(a.model(x), b.model(x))
        base = load_pretrained(shipped.base)
        hf = peft.PeftModel.from_pretrained(to_hf(base.model), shipped.path).eval()
        # peft adds B·A·x beside W·x, memory3 merged it into W: equal up to float rounding
        assert (hf(x).logits - a.model(x)).abs().max() <= 1e-3  # logits up to ~20
    assert a.model._memory3_fingerprint == b.model._memory3_fingerprint
