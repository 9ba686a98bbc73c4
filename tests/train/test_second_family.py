"""The training recipe is not tied to SmolLM2: LoRA SFT of a tiny random Qwen2 model, given as a
Hugging Face directory, lowers its loss, resumes exactly, and exports an adapter that memory3
and peft both load onto that base."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import transformers
from test_train import _losses, _tiny_sft_config

from memory3.checkpoint import load_pretrained
from memory3.config import MemoryConfig
from memory3.families import to_hf
from memory3.lora import LoRAConfig
from memory3.train.config import LoopConfig, OptimConfig


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory, tok) -> Path:
    config = transformers.Qwen2Config(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("qwen2")
    transformers.Qwen2ForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.slow
def test_sft_on_a_qwen2_model_learns_resumes_and_exports(qwen_dir: Path, tmp_path: Path) -> None:
    from memory3.train.sft import Stage, run_sft

    cfg = _tiny_sft_config(
        tmp_path,
        model=str(qwen_dir),
        lora=LoRAConfig(rank=4, alpha=8.0),
        optim=OptimConfig(lr=1e-2, warmup_steps=1),
        loop=LoopConfig(steps=12, log_every=1, checkpoint_every=100, bf16=False),
        stages=(Stage(1.0, 8, "half"),),
        memory=MemoryConfig(kept_tokens=8),
    )
    straight = run_sft(cfg, tmp_path / "straight")
    losses = _losses(straight)
    assert sum(losses[-3:]) < sum(losses[:3])  # it learns
    run_sft(cfg, tmp_path / "split", stop_after=5)
    run_sft(cfg, tmp_path / "split")
    assert _losses(tmp_path / "split") == losses  # and resumes exactly

    adapter = straight / "adapter"
    ours = load_pretrained(adapter).model
    assert ours.config.family == "qwen2" and ours.config.qkv_bias
    peft = pytest.importorskip("peft")
    base = load_pretrained(qwen_dir).model
    hf = peft.PeftModel.from_pretrained(to_hf(base), adapter).eval()
    x = torch.randint(3, 1000, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (hf(x).logits - ours(x)).abs().max() <= 1e-4
    assert dataclasses.asdict(ours.config)["memory_layers"] == (0, 1)
