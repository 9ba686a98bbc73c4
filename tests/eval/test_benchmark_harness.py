"""The benchmark harness (benchmarks/harness.py): every benchmark registers, lists and parses its
common arguments; a run loads its model reading memory where --memory-layers / --kept-tokens say."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import tiny_model
from memory3.checkpoint import save_checkpoint

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def harness():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import harness

        yield harness
    finally:
        sys.path.remove(str(BENCHMARKS))


@pytest.mark.slow
def test_every_benchmark_registers_and_lists() -> None:
    scripts = sorted(p.stem.removeprefix("bench_") for p in BENCHMARKS.glob("bench_*.py"))
    out = subprocess.run(
        [sys.executable, str(BENCHMARKS / "run.py"), "--list"], capture_output=True, text=True, check=True
    ).stdout
    listed = out.strip().splitlines()
    assert len(listed) >= len(scripts)
    for name in scripts:
        assert any(f"bench_{name}.py" in line for line in listed), name
    assert not any("issue" in line.lower() for line in listed)  # titles say what, not where from


@pytest.mark.slow
def test_a_run_loads_the_model_in_the_layers_and_kept_tokens_asked(tmp_path, tok, harness) -> None:
    model = tiny_model(seed=3, vocab_size=len(tok))
    ckpt = save_checkpoint(model, tmp_path / "ckpt", tok)
    exp = harness.discover()["general"]
    n_layer = model.config.n_layer
    ap = harness.parser_of(exp)
    args = ap.parse_args(["--model", str(ckpt), "--memory-layers", "all", "--kept-tokens", "5"])
    loaded = harness.Run(exp, args, ap).load()
    assert loaded.model.memory_layers == tuple(range(n_layer))
    assert loaded.memory_config.kept_tokens == 5
    plain = harness.Run(exp, ap.parse_args(["--model", str(ckpt)]), ap).load()
    assert plain.memory_config.kept_tokens != 5
    one = harness.Run(exp, ap.parse_args(["--model", str(ckpt), "--references", "1"]), ap).load()
    assert one.memory_config.memories_per_chunk == 1 != plain.memory_config.memories_per_chunk
