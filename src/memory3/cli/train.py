"""`memory3 train warmup|continual|sft|pair|calibrate|probe`: the recipes behind the command line.

Each recipe takes a JSON config (see configs/train/) and an output directory; running the same
command again resumes from the last checkpoint in that directory. Data parallel:
`torchrun --nproc_per_node 2 -m memory3 train warmup --config … --out …`.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from memory3.config import SELECTIONS


def _add_recipe(sub: Any, name: str, help_text: str, func: Any) -> None:
    p = sub.add_parser(name, help=help_text)
    p.add_argument("--config", required=True, help="training config JSON (see configs/train/)")
    p.add_argument("--out", required=True, help="run directory (checkpoint/, metrics.jsonl, the result)")
    p.add_argument("--no-resume", action="store_true", help="start over even if out/ has a checkpoint")
    p.add_argument(
        "--stop-after",
        type=int,
        default=None,
        help="stop (with a checkpoint) after this many steps; rerun to resume",
    )
    p.set_defaults(func=func)


def _run_recipe(module: str, args: argparse.Namespace) -> int:
    import importlib

    from memory3.train.loop import finish_distributed

    recipe = importlib.import_module(f"memory3.train.{module}")
    command = f"memory3 train {module} --config {args.config} --out {args.out}"  # recorded with the result
    run = recipe.main_from_file(args.config, args.out, not args.no_resume, args.stop_after, command)
    finish_distributed()
    print(json.dumps({"run": str(run)}))
    return 0


def cmd_warmup(args: argparse.Namespace) -> int:
    return _run_recipe("warmup", args)


def cmd_continual(args: argparse.Namespace) -> int:
    return _run_recipe("continual", args)


def cmd_sft(args: argparse.Namespace) -> int:
    return _run_recipe("sft", args)


def cmd_pair(args: argparse.Namespace) -> int:
    from memory3.checkpoint import load_bundled_tokenizer
    from memory3.train.continual import PairingConfig, prepare_continual
    from memory3.train.data import corpus_texts

    texts = corpus_texts(args.corpus, args.split)
    kb = corpus_texts(args.kb, args.split) if args.kb else texts
    cfg = PairingConfig(seq_len=args.seq_len, embedder=args.embedder)
    data = prepare_continual(texts, kb, load_bundled_tokenizer(), cfg, max_sequences=args.max_sequences)
    data.save(args.out)
    print(json.dumps({"dataset": args.out, "sequences": len(data), "references": len(data.refs)}))
    return 0


def cmd_probe(args: argparse.Namespace) -> int:
    import dataclasses

    import torch

    from memory3.config import MemoryConfig
    from memory3.train.probe import probe

    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = _load(args.model)
    results = {}
    for kept in args.kept:
        mem = MemoryConfig(selection="all") if kept == 0 else MemoryConfig(kept_tokens=kept)
        mem = (
            dataclasses.replace(mem, selection=args.selection)
            if args.selection != "attention" and kept
            else mem
        )
        modes = ("memory", "none", "rag") if kept == args.kept[0] else ("memory",)
        res = probe(loaded.model, loaded.tokenizer, args.n, modes, mem, source=args.source)
        results[f"kept={kept or 'all'}"] = res.accuracy
        print(json.dumps({"kept": kept or "all", **res.accuracy}), flush=True)
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from memory3.memory.transform import CALIBRATION_FILE
    from memory3.train.calibrate import fisher_matrices, layer_sensitivity

    if args.threads:
        torch.set_num_threads(args.threads)
    from memory3.checkpoint import load_pretrained
    from memory3.memory.transform import weights_digest_of

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    loaded = load_pretrained(args.model, device=args.device, dtype=dtype)
    mem = loaded.memory_config.override(args.kept_tokens, None)
    cal = fisher_matrices(loaded.model, loaded.tokenizer, mem, args.groups, args.seed, args.config)
    cal.meta["model"] = str(args.model)
    cal.meta["weights"] = weights_digest_of(loaded.path)  # a calibration left beside other weights is refused
    out = cal.save(Path(args.out) if args.out else loaded.path / CALIBRATION_FILE)
    print(json.dumps({"calibration": str(out), **cal.meta, "layer_sensitivity": layer_sensitivity(cal)}))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from memory3.train.export import adapter_from_run

    out = adapter_from_run(args.run, args.out, args.command, config_file=args.config)
    print(json.dumps({"adapter": str(out)}))
    return 0


def _load(name: str) -> Any:
    from memory3.checkpoint import load_pretrained

    return load_pretrained(name)  # a shipped model or adapter directory too


def register(sub: Any) -> None:
    p = sub.add_parser("train", help="train a model to read explicit memory (warmup, continual, sft)")
    tsub = p.add_subparsers(dest="train_command", required=True)
    _add_recipe(tsub, "warmup", "stage 1: next-token training without memory", cmd_warmup)
    _add_recipe(
        tsub, "continual", "stage 2: continual training with memory (docs/training.md)", cmd_continual
    )
    _add_recipe(tsub, "sft", "SFT with memories retrieved for the prompt, loss on the answer", cmd_sft)

    q = tsub.add_parser("pair", help="precompute the reference of every 64-token chunk (continual's dataset)")
    q.add_argument("--corpus", default="wikipedia", help="'wikipedia' or a .txt/.jsonl file or directory")
    q.add_argument("--kb", default=None, help="knowledge base texts (default: the corpus itself)")
    q.add_argument("--split", default="train", choices=("train", "heldout"), help="Wikipedia split")
    q.add_argument("--seq-len", type=int, default=256)
    q.add_argument("--max-sequences", type=int, default=None)
    q.add_argument("--embedder", default="minilm")
    q.add_argument("--out", required=True)
    q.set_defaults(func=cmd_pair)

    e = tsub.add_parser(
        "export", help="write the adapter (or model) of a run's last checkpoint, finished or not"
    )
    e.add_argument("--run", required=True, help="the --out directory of `memory3 train sft|continual|warmup`")
    e.add_argument("--out", required=True, help="adapter directory, e.g. src/memory3/assets/models/<name>")
    e.add_argument("--config", default="", help="the config file the run was started with (recorded)")
    e.add_argument(
        "--command", default="", help="the commands that made the run, recorded as given (overrides --config)"
    )
    e.set_defaults(func=cmd_export)

    c = tsub.add_parser(
        "calibrate",
        help="measure what a model's answers are sensitive to in its memories (for --codec tc<bits>)",
    )
    c.add_argument("--model", default="smollm2-135m-instruct-memory3", help="model or adapter directory")
    c.add_argument("--groups", type=int, default=48, help="SFT groups of questions (about 24 each)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument(
        "--config",
        default=None,
        help="an SFT config file whose question mix to use (default: the shipped reader's)",
    )
    c.add_argument(
        "--kept-tokens", type=int, default=None, help="tokens kept per head (default: the model's)"
    )
    c.add_argument(
        "--out", default="", help="default: codec_calibration.safetensors in the model's directory"
    )
    c.add_argument("--threads", type=int, default=0)
    c.add_argument("--device", default="cpu", help="e.g. cuda")
    c.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    c.set_defaults(func=cmd_calibrate)

    r = tsub.add_parser("probe", help="quick held-out accuracy: memory / none / RAG, gold among 5")
    r.add_argument("--model", default="smollm2-135m-instruct", help="model, checkpoint or adapter directory")
    r.add_argument("--n", type=int, default=40, help="held-out questions")
    r.add_argument("--kept", type=int, nargs="+", default=[8], help="tokens kept per head (0 = all)")
    r.add_argument(
        "--selection",
        default="attention",
        choices=[s for s in SELECTIONS if s != "all"],
        help="which tokens a memory keeps (kept 0 keeps all)",
    )
    r.add_argument("--source", default="fictional", choices=("fictional", "factbook"))
    r.add_argument(
        "--threads", type=int, default=0, help="torch threads (1 is fastest on a busy 2-core machine)"
    )
    r.set_defaults(func=cmd_probe)


if __name__ == "__main__":
    sys.exit(0)
