"""Reading probe: the memories of a chunk at positions of their own instead of one shared interval.

Every memory is written at positions p..p+R-1 and, as in the paper, all memories a chunk reads
share that interval. This probe asks whether the reader would tell memories apart if each had its
own: memory j is moved to p+j·R..p+(j+1)·R-1 (`--order best-first`, as RAG lists its passages) or
the best one is put nearest the text (`--order best-last`), by rotating its stored keys (RoPE
composes: rotating a key written at t by the angle of j·R gives the key at t+j·R); the text then
starts at p+k·R. Nothing is retrained, so this measures a model trained with the shared interval.

It runs `reading_probes.py` with two functions of `memory3.memory.layout` replaced, so its flags
are those of that script:

    .venv/bin/python benchmarks/research/position_probe.py --order best-first --set unseen --split dev \\
        --settings 0-29:64 --k 5 --out benchmarks/results/reading-probes-j-unseen-dev-positions-best-first.json
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

from memory3.memory import layout
from memory3.model import apply_rope, rope_cos_sin

sys.path.insert(0, str(Path(__file__).resolve().parent))
import reading_probes

_shared_into_cache = layout.into_cache
_state: dict[str, Any] = {}


def _own_text_start(prefix_len: int, reference_tokens: int) -> int:
    return prefix_len + _state["k"] * reference_tokens


def _into_own_positions(mem: Any, index: torch.Tensor, cache: Any) -> None:
    _shared_into_cache(mem, index, cache)
    config = _state["model"].config
    _, J = index.shape
    S = mem.k.shape[3]
    R = _state["reference_tokens"]
    for j in range(J):
        shift = (j if _state["order"] == "best-first" else J - 1 - j) * R
        if shift == 0:
            continue
        cos, sin = rope_cos_sin(torch.tensor([[shift]]), config.rope, config.head_dim, torch.float32)
        for keys, _ in cache.memory_slots(J * S):
            part = keys[:, :, j * S : (j + 1) * S]
            part.copy_(apply_rope(part.float(), cos, sin).to(part.dtype))


def main() -> int:
    argv = sys.argv[1:]
    if "--order" not in argv:
        raise SystemExit("position_probe.py needs --order best-first or --order best-last")
    i = argv.index("--order")
    order = argv[i + 1]
    if order not in ("best-first", "best-last"):
        raise SystemExit(f"--order is best-first or best-last, got {order!r}")
    del argv[i : i + 2]
    k = int(argv[argv.index("--k") + 1]) if "--k" in argv else 5
    _state.update(order=order, k=k)
    load = reading_probes.load_pretrained

    def load_and_keep(*args: Any, **kw: Any) -> Any:
        loaded = load(*args, **kw)
        _state["model"] = loaded.model
        _state["reference_tokens"] = loaded.memory_config.reference_tokens
        return loaded

    reading_probes.load_pretrained = load_and_keep
    layout.text_start = _own_text_start
    layout.into_cache = _into_own_positions
    sys.argv = [sys.argv[0], *argv]
    return reading_probes.main()


if __name__ == "__main__":
    raise SystemExit(main())
