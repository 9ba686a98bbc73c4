from __future__ import annotations

import os

import pytest
import torch

from memory3.config import MemoryConfig, ModelConfig
from memory3.model import Memory3Model

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


@pytest.fixture
def tiny() -> Memory3Model:
    return tiny_model()


@pytest.fixture
def mem_cfg() -> MemoryConfig:
    return MemoryConfig(reference_tokens=16, kept_tokens=4, chunk_tokens=8, memories_per_chunk=3)


@pytest.fixture(scope="session")
def smol():
    """The real bundled SmolLM2-135M-Instruct (converted once, cached in MEMORY3_HOME)."""
    from memory3.checkpoint import load_pretrained

    return load_pretrained()
