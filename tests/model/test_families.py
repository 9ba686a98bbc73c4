"""Model families users bring (Llama 3.x, Mistral, Qwen2/2.5, Qwen3): a random model of each,
built by transformers' own class and saved as a Hugging Face directory, converts into memory3 and
gives the same logits over 256 tokens; reads memory like a plain forward over prefix + reference
+ prompt; exports back. Every config field memory3 does not run is refused by name."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import transformers

from memory3.checkpoint import export_hf, load_checkpoint, load_pretrained, model_from_state_dict
from memory3.config import MemoryConfig, ModelConfig
from memory3.errors import CheckpointError
from memory3.families import ARCHITECTURES, UNSUPPORTED, config_from_hf
from memory3.memory.write import MemoryWriter
from memory3.model import MemoryInput

TOKENS = 256
TINY = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=1024,
    rms_norm_eps=1e-6,
    bos_token_id=1,
    eos_token_id=2,
)
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}  # fmt: skip
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}

# name -> (family, extra config fields)
CASES: dict[str, tuple[str, dict]] = {
    "llama": ("llama", {"rope_theta": 10000.0}),
    "llama3-rope_scaling": ("llama", {"rope_theta": 500000.0, "rope_scaling": LLAMA3}),
    "llama3-rope_parameters": ("llama", {"rope_parameters": {**LLAMA3, "rope_theta": 500000.0}}),
    "llama-linear": ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 4.0}}),
    "llama-dynamic": ("llama", {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0,
                                                 "original_max_position_embeddings": 512}}),
    "llama-yarn": ("llama", {"rope_scaling": YARN}),
    "llama-biases": ("llama", {"attention_bias": True, "mlp_bias": True}),
    "llama-tied": ("llama", {"tie_word_embeddings": True}),
    "mistral": ("mistral", {"sliding_window": 512, "rope_theta": 1000000.0}),
    "qwen2": ("qwen2", {"rope_theta": 1000000.0, "tie_word_embeddings": True}),
    "qwen2.5-yarn": ("qwen2", {"rope_scaling": YARN}),
    "qwen3": ("qwen3", {"rope_theta": 1000000.0}),
    "qwen3-biases": ("qwen3", {"attention_bias": True}),
}  # fmt: skip


def hf_model(family: str, extra: dict, seed: int = 0) -> transformers.PreTrainedModel:
    """A transformers model of the family with every weight random (biases and norms included,
    which their own init leaves at 0 and 1)."""
    arch = ARCHITECTURES[family]
    extra = copy.deepcopy(extra)  # transformers adds rope_theta to the dicts it is given
    config = getattr(transformers, arch.replace("ForCausalLM", "Config"))(**{**TINY, **extra})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, arch)(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.08)
    return model.eval()


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request, tmp_path_factory) -> tuple[str, transformers.PreTrainedModel, object, Path]:
    family, extra = CASES[request.param]
    hf = hf_model(family, extra)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return request.param, hf, load_checkpoint(path).model, path


def ids(n: int = TOKENS, batch: int = 2) -> torch.Tensor:
    return torch.randint(3, TINY["vocab_size"], (batch, n), generator=torch.Generator().manual_seed(1))


@pytest.mark.slow
def test_logits_equal_transformers_over_256_tokens(pair) -> None:
    name, hf, model, _ = pair
    x = ids()
    with torch.no_grad():
        ours, theirs = model(x), hf(x).logits
    assert theirs.abs().max() > 0.3, "the random model must give logits worth comparing"
    assert (ours - theirs).abs().max() <= 1e-4, name


@pytest.mark.parametrize("case", ["llama3-rope_parameters", "llama-yarn", "llama-linear", "qwen2.5-yarn"])
@pytest.mark.slow
def test_dropping_rope_scaling_would_be_caught(case: str) -> None:
    """The parity test sees RoPE scaling: the same weights with plain RoPE differ by far more."""
    family, extra = CASES[case]
    hf = hf_model(family, extra)
    cfg = config_from_hf(hf.config.to_dict())
    assert cfg.rope_scaling is not None
    wrong = model_from_state_dict(
        ModelConfig.from_dict({**cfg.to_dict(), "rope_scaling": None}), hf.state_dict()
    )
    x = ids(batch=1)
    with torch.no_grad():
        assert (wrong(x) - hf(x).logits).abs().max() > 1e-3


def test_config_fields_of_each_family(pair) -> None:
    name, _, model, _ = pair
    c = model.config
    family = CASES[name][0]
    assert c.family == family
    assert c.qk_norm == (family == "qwen3")
    assert c.qkv_bias == (family == "qwen2" or name.endswith("biases"))
    if name == "mistral":
        assert c.sliding_window == 512 and c.context_limit == 512
    if name == "llama-dynamic":
        # transformers' dynamic NTK is plain RoPE up to max_position_embeddings, whatever the
        # original_max_position_embeddings it is given
        assert c.context_limit == TINY["max_position_embeddings"] == c.max_seq_len
    if "rope_parameters" in name or "rope_scaling" in name:
        assert c.rope_scaling == LLAMA3 and c.rope_theta == 500000.0


@pytest.mark.slow
def test_memory_reads_like_a_plain_forward_over_the_reference(pair) -> None:
    """The positive control of every family: all reference tokens kept in every layer, read as
    memory, give the logits of a plain forward over prefix + reference + prompt at the same
    positions."""
    _, _, model, _ = pair
    model.set_memory_layers(tuple(range(model.config.n_layer)))
    try:
        cfg = MemoryConfig(reference_tokens=16, kept_tokens=16, selection="all", chunk_tokens=64)
        prefix = [1, 7, 9]
        ref = ids(16, 1)[0].tolist()
        with torch.no_grad():
            m = MemoryWriter(model, prefix, cfg).write([ref])
            p, n = len(prefix), 40
            prompt = ids(n, 1)[:, :n]
            x = torch.cat((torch.tensor([prefix]), prompt), 1)
            pos = torch.cat((torch.arange(p), torch.arange(n) + p + 16))[None]
            visible = torch.zeros(1, p + n, 16, dtype=torch.bool)
            visible[:, p:] = m.valid[0]
            memory = MemoryInput(m.k.permute(1, 0, 2, 3, 4), m.v.permute(1, 0, 2, 3, 4), visible)
            read = model(x, pos, memory=memory)[:, p:]
            plain_x = torch.cat((x[:, :p], torch.tensor([ref]), prompt), 1)
            plain = model(plain_x, torch.arange(p + 16 + n)[None])[:, p + 16 :]
        assert (read - plain).abs().max() <= 1e-4
    finally:
        model.set_memory_layers(tuple(range(model.config.n_layer // 2)))


@pytest.mark.slow
def test_export_is_read_back_by_transformers_and_memory3(pair, tmp_path) -> None:
    name, hf, _, path = pair
    loaded = load_pretrained(path)
    out = export_hf(loaded, tmp_path / "export")
    written = json.loads((out / "config.json").read_text())
    assert written["model_type"] == CASES[name][0]
    again = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    x = ids(64, 1)
    with torch.no_grad():
        assert (again(x).logits - hf(x).logits).abs().max() <= 1e-5
        assert (load_checkpoint(out).model(x) - hf(x).logits).abs().max() <= 1e-4
    assert config_from_hf(written).to_dict() == {**loaded.model.config.to_dict(), "name": "hf"}


def _refused(hf: dict) -> str:
    with pytest.raises(CheckpointError) as e:
        config_from_hf(hf)
    return str(e.value)


@pytest.mark.parametrize("field", sorted(UNSUPPORTED))
def test_each_unsupported_field_is_refused_by_name(field: str) -> None:
    bad = {"hidden_act": "gelu", "partial_rotary_factor": 0.5}.get(field, 2.0)
    hf = {**TINY, "model_type": "llama", field: bad}
    assert field in _refused(hf)


@pytest.mark.parametrize(
    "hf, name",
    [
        ({"model_type": "gemma"}, "gemma"),
        ({"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 64}, "use_sliding_window"),
        ({"model_type": "mistral", "attention_bias": True}, "attention_bias"),
        ({"model_type": "qwen2", "mlp_bias": True}, "mlp_bias"),
        ({"model_type": "llama", "rope_scaling": {"rope_type": "longrope", "factor": 2.0}}, "longrope"),
        ({"model_type": "llama", "rope_scaling": {"rope_type": "linear", "factor": 2.0, "foo": 1}}, "foo"),
        ({"model_type": "llama", "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "low_freq_factor"),
        (
            {"model_type": "llama", "rope_parameters": {"full_attention": {"rope_type": "default"}}},
            "per layer",
        ),
    ],
)
def test_other_unsupported_configs_are_refused_by_name(hf: dict, name: str) -> None:
    assert name in _refused({**TINY, **hf})


def test_sliding_window_limits_the_context_generation_accepts(tok) -> None:
    """A Mistral with a 64-token window runs up to 64 tokens (where the window hides nothing) and
    refuses a longer prompt by naming the limit."""
    from memory3.generate import Generator

    hf = hf_model("mistral", {"sliding_window": 64, "vocab_size": len(tok)})
    cfg = config_from_hf(hf.config.to_dict())
    assert cfg.context_limit == 64 and cfg.max_seq_len == TINY["max_position_embeddings"]
    gen = Generator(
        model_from_state_dict(cfg, hf.state_dict()), tok, memory_config=MemoryConfig(), chat=False
    )
    with pytest.raises(ValueError, match="context of 64 tokens"):
        gen.generate(["word " * 70], mode="none")


@pytest.mark.slow
def test_dynamic_rope_is_exact_up_to_the_context_limit(tmp_path: Path) -> None:
    """Dynamic NTK changes frequencies only past max_position_embeddings, where memory3 stops."""
    hf = hf_model(
        "llama", {"max_position_embeddings": 300, "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}
    )
    hf.save_pretrained(tmp_path)
    model = load_checkpoint(tmp_path).model
    assert model.config.context_limit == 300
    x = ids(300, 1)
    with torch.no_grad():
        assert (model(x) - hf(x).logits).abs().max() <= 1e-4
