"""`memory3 demo`, `memory3 convert` and `memory3 generate`."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from memory3.cli.common import (
    add_generation_args,
    add_kv_dtype_arg,
    add_memory_args,
    add_min_score_arg,
    add_model_args,
    kv_dtype_of,
    layers_asked,
    load_model,
)


def cmd_demo(args: argparse.Namespace) -> int:
    from memory3.cli.demo import run_demo

    return run_demo(args)


def cmd_convert(args: argparse.Namespace) -> int:
    from memory3.checkpoint import convert_gguf, load_hf_checkpoint, save_checkpoint

    if args.source.endswith(".gguf"):
        out = convert_gguf(args.source, args.out, preset=args.preset)
    else:
        loaded = load_hf_checkpoint(args.source)
        out = save_checkpoint(loaded.model, args.out, loaded.tokenizer, source=f"hf:{args.source}")
    print(json.dumps({"checkpoint": str(out)}))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from memory3.checkpoint import export_hf, load_pretrained

    loaded = load_pretrained(args.model)
    out = export_hf(loaded, args.out)
    print(json.dumps({"hf_checkpoint": str(out), "family": loaded.model.config.family}))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from memory3.config import GenerationConfig
    from memory3.generate import Generator
    from memory3.retrieval.open import open_retriever

    loaded = load_model(args)
    retriever, mem_cfg = open_retriever(
        loaded,
        args.store,
        args.kb,
        args.embedder,
        kept_tokens=args.kept_tokens,
        selection=args.selection,
        dtype=kv_dtype_of(args, loaded),
        adopt_layers=not layers_asked(args),
    )
    gen = Generator(
        loaded.model,
        loaded.tokenizer,
        retriever,
        mem_cfg,
        chat=False if args.no_chat else None,
        min_score=args.min_score,
        kv_dtype=args.kv_dtype,
    )
    if args.mode != "none" and retriever is None:
        print("error: --mode memory/rag needs --store DIR or --kb FILE (or use --mode none)", file=sys.stderr)
        return 2
    prompts = args.prompt or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    cfg = GenerationConfig(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        stop=tuple(args.stop),
        seed=args.seed,
    )
    kw = {"k": args.references}
    if args.stream:
        if len(prompts) != 1:
            print("error: --stream takes exactly one prompt", file=sys.stderr)
            return 2
        for ev in gen.stream(prompts, args.mode, cfg, **kw):
            sys.stdout.write(ev.delta)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return 0
    outs = gen.generate(prompts, args.mode, cfg, **kw)
    for prompt, o in zip(prompts, outs, strict=True):
        row = {
            "prompt": prompt,
            "text": o.text,
            "finish_reason": o.finish_reason,
            "prompt_tokens": o.prompt_tokens,
            "completion_tokens": len(o.token_ids),
            "references": [
                [{"id": h.ref_id, "title": h.title, "score": round(h.score, 4)} for h in hs]
                for hs in o.references
            ],
        }
        print(json.dumps(row, ensure_ascii=False))
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("demo", help="explicit memory vs no memory vs RAG on the bundled model and data")
    add_model_args(p)
    p.add_argument("--articles", type=int, default=6, help="Wikipedia summaries to write as memories")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "convert", help="convert a GGUF file or Hugging Face directory to a memory3 checkpoint"
    )
    p.add_argument(
        "source", help="a .gguf file or a Hugging Face directory (Llama 3.x, Mistral, Qwen2/2.5, Qwen3)"
    )
    p.add_argument("out", help="output checkpoint directory")
    p.add_argument("--preset", default=None, help="model preset matching the GGUF file (e.g. smollm2-135m)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser(
        "export",
        help="write a model (a trained adapter merged in) as a Hugging Face checkpoint of its family",
    )
    p.add_argument("model", help="a model name, checkpoint or adapter directory (memory3's or PEFT's)")
    p.add_argument("out", help="output directory (config.json, model.safetensors, tokenizer)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("generate", help="generate text with explicit memory, no memory or RAG")
    p.add_argument("prompt", nargs="*", help="prompts (default: one per line on stdin)")
    add_model_args(p)
    add_kv_dtype_arg(p)
    add_generation_args(p)
    p.add_argument("--store", default=None, help="memory bank directory (memory3 build)")
    p.add_argument("--kb", default=None, help="a text/JSONL file written to memory on the fly (small KBs)")
    p.add_argument("--embedder", default="minilm", help="retrieval embedder for --kb")
    add_memory_args(p, "how --kb's memories are written (a --store keeps what it was built with)")
    add_min_score_arg(p)
    p.add_argument("--stream", action="store_true")
    p.set_defaults(func=cmd_generate)
