from __future__ import annotations

import os

import pytest
import torch

from memory3.config import MemoryConfig, ModelConfig
from memory3.model import KVCache, Memory3Model

torch.set_num_threads(min(2, os.cpu_count() or 1))


def free_port() -> int:
    """A TCP port nothing listens on now, for torchrun's rendezvous: a fixed one can still be held
    by the previous test's processes."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_checked(cmd: list[str], **kwargs) -> None:
    """subprocess.run that fails with the command's stderr in the message."""
    import subprocess

    done = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    assert done.returncode == 0, f"{' '.join(cmd)} exited {done.returncode}:\n{done.stderr[-4000:]}"


def tiny_model(preset: str = "tiny", seed: int = 0, **overrides) -> Memory3Model:
    torch.manual_seed(seed)
    return Memory3Model(ModelConfig.from_preset(preset, **overrides)).init_weights(seed).eval()


def decode_with_memories(
    model: Memory3Model, dtype: torch.dtype, seed: int, empty_from: int
) -> tuple[torch.Tensor, KVCache]:
    """Logits of a 12-token prefill (row 0 left-padded by 4) and 8 single-token steps reading 6
    random memory slots per row (row 1's from `empty_from` on empty), through a KV cache of
    `dtype` whose unwritten slots hold junk (1e3) that nothing may read. Returns them and the cache."""
    cfg, B, N = model.config, 2, 6
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 256, (B, 20), generator=g)
    valid = torch.ones(B, 20, dtype=torch.bool)
    valid[0, :4] = False
    Lm = len(cfg.memory_layers or ())
    mk = torch.randn(Lm, B, cfg.n_kv_head, N, cfg.head_dim, generator=g)
    mv = torch.randn(Lm, B, cfg.n_kv_head, N, cfg.head_dim, generator=g)
    mvalid = torch.ones(B, N, dtype=torch.bool)
    mvalid[1, empty_from:] = False
    cache = KVCache(cfg, B, 32, N, dtype=dtype)
    for t in cache.k + cache.v:
        t.fill_(1e3)
    with torch.no_grad():
        steps = [model(ids[:, :12], token_valid=valid[:, :12], cache=cache)[:, -1:]]
        cache.set_memory(mk, mv, mvalid)
        steps += [model(ids[:, t : t + 1], cache=cache) for t in range(12, 20)]
    return torch.cat(steps, 1), cache


@pytest.fixture
def tiny() -> Memory3Model:
    return tiny_model()


@pytest.fixture
def mem_cfg() -> MemoryConfig:
    return MemoryConfig(reference_tokens=16, kept_tokens=4, chunk_tokens=8, memories_per_chunk=3)


@pytest.fixture(scope="session")
def tok():
    """The bundled SmolLM2 tokenizer (the checkpoint converted once if needed)."""
    from memory3.checkpoint import load_bundled_tokenizer

    return load_bundled_tokenizer()


@pytest.fixture(scope="session")
def smol():
    """The real bundled SmolLM2-135M-Instruct (converted once, cached in MEMORY3_HOME)."""
    from memory3.checkpoint import load_pretrained

    return load_pretrained()
