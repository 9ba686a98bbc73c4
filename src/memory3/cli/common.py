"""What the commands share: the arguments that choose a model, its memory and generation, and
loading the model they name."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

Command = Callable[[argparse.Namespace], int | None]
DTYPES = ("float32", "bfloat16", "float16")


def _torch_dtype(name: str) -> Any:
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def add_model_args(p: argparse.ArgumentParser, dtype: str = "float32") -> None:
    from memory3.shipped import default_model

    p.add_argument(
        "--model",
        default=default_model(),
        help="a shipped model name, an adapter or checkpoint directory (default: %(default)s)",
    )
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1")
    p.add_argument(
        "--dtype",
        default=dtype,
        choices=DTYPES,
        help="float32 (default) or bfloat16, which halves memory and, on GPUs and CPUs with native "
        "bfloat16, generates faster (BENCHMARKS.md, speed); elsewhere it is emulated and slow",
    )


def add_kv_dtype_arg(p: argparse.ArgumentParser) -> None:
    from memory3.config import KV_DTYPES

    p.add_argument(
        "--kv-dtype",
        default="auto",
        choices=KV_DTYPES,
        help="dtype of the KV cache and of the memories read from it; auto (default): bfloat16 for a "
        "float32 model on a CPU with native bfloat16 (faster decoding, attention within ~0.5%% of "
        "float32), else the model's dtype",
    )


def add_memory_args(p: argparse.ArgumentParser, what: str) -> None:
    """`--memory-layers`, `--kept-tokens` and `--selection` (§3.2–3.3): which layers read memory
    and how memories are sparsified, on top of the model's own (the shipped reader: 20 layers, 32
    tokens, the paper's rule; other models: the first half, 8). `what` says where the command
    applies them."""
    from memory3.config import SELECTIONS

    p.add_argument(
        "--memory-layers",
        default=None,
        help="layers that read memory: all, half, first:N, or indices and ranges such as 0-29 "
        f"(default: the model's own; a --store reads in the layers it was built with); {what}",
    )
    p.add_argument(
        "--kept-tokens",
        type=int,
        default=None,
        help=f"tokens kept per memory head (default: the model's own); {what}",
    )
    p.add_argument(
        "--selection",
        default=None,
        choices=SELECTIONS,
        help=f"which tokens a memory keeps (default: the model's own rule); {what}",
    )


def add_min_score_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--min-score",
        type=float,
        default=None,
        help="drop retrieved references whose cosine similarity to the query is below this (e.g. 0.45 "
        "with the bundled embedder), so that a question the knowledge base knows nothing about reads "
        "no unrelated memories; default: always the top k",
    )


def add_generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mode", default="memory", choices=("memory", "none", "rag"))
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument(
        "-k", "--references", type=int, default=None, help="memories per chunk (default: the model's own)"
    )
    p.add_argument("--no-chat", action="store_true", help="do not apply the chat template")


def load_model(args: argparse.Namespace) -> Any:
    """The model `--model` names, reading memory in `--memory-layers` where the command has it."""
    from memory3.checkpoint import load_pretrained
    from memory3.config import parse_memory_layers

    loaded = load_pretrained(args.model, device=args.device, dtype=_torch_dtype(args.dtype))
    spec = getattr(args, "memory_layers", None)
    if spec:
        loaded.model.set_memory_layers(parse_memory_layers(spec, loaded.model.config.n_layer))
    return loaded


def layers_asked(args: argparse.Namespace) -> bool:
    """Whether `--memory-layers` was given: a bank is then read in those layers or refused, not
    read in its own (`open_retriever(adopt_layers=...)`)."""
    return bool(getattr(args, "memory_layers", None))


def kv_dtype_of(args: argparse.Namespace, loaded: Any) -> Any:
    """The KV cache dtype `--kv-dtype` gives for the loaded model: memory banks are opened to
    cache their memories in it, so that no retrieval converts them."""
    from memory3.model import resolve_kv_dtype

    return resolve_kv_dtype(getattr(args, "kv_dtype", "auto"), loaded.model.dtype, loaded.model.device)
