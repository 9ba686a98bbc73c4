"""The `memory3` command line. Results go to stdout, progress and logs to stderr.

Each command is a plain function of parsed arguments; heavy imports happen inside it, so
`memory3 --help` is instant.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import json
import logging
import os
import sys
import traceback
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
        "bfloat16, generates 2-2.6x faster (measured at batch 32 here); elsewhere it is emulated and slow",
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
    """`--kept-tokens` and `--selection` (§3.3): how memories are sparsified, on top of the model's
    own memory config (the shipped reader: 32 tokens, the paper's rule; other models: 8). `what`
    says where the command applies them."""
    from memory3.config import SELECTIONS

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
    p.add_argument("-k", "--references", type=int, default=None, help="memories per chunk (default 5)")
    p.add_argument("--no-chat", action="store_true", help="do not apply the chat template")


def load_model(args: argparse.Namespace) -> Any:
    from memory3.checkpoint import load_pretrained

    return load_pretrained(args.model, device=args.device, dtype=_torch_dtype(args.dtype))


def kv_dtype_of(args: argparse.Namespace, loaded: Any) -> Any:
    """The KV cache dtype `--kv-dtype` gives for the loaded model: memory banks are opened to
    cache their memories in it, so that no retrieval converts them."""
    from memory3.model import resolve_kv_dtype

    return resolve_kv_dtype(getattr(args, "kv_dtype", "auto"), loaded.model.dtype, loaded.model.device)


def cmd_demo(args: argparse.Namespace) -> int:
    from memory3.demo import run_demo

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="memory3", description="Language modeling with explicit memory (Memory³)"
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="explicit memory vs no memory vs RAG on the bundled model and data")
    add_model_args(p)
    p.add_argument("--articles", type=int, default=6, help="Wikipedia summaries to write as memories")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "convert", help="convert a GGUF file or Hugging Face directory to a memory3 checkpoint"
    )
    p.add_argument("source", help="a .gguf file or a Hugging Face Llama-family directory")
    p.add_argument("out", help="output checkpoint directory")
    p.add_argument("--preset", default=None, help="model preset matching the GGUF file (e.g. smollm2-135m)")
    p.set_defaults(func=cmd_convert)

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

    for register in _extensions():
        register(sub)
    return parser


def _extensions() -> list[Callable[[Any], None]]:
    """Commands defined next to their code (build, store, eval, bench, train, serve)."""
    import importlib

    found = []
    for mod in (
        "memory3.memory.cli",
        "memory3.eval.cli",
        "memory3.train.cli",
        "memory3.serve_cli",
    ):
        try:
            m = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise
            continue
        found.append(m.register)
    return found


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not args.verbose:  # faiss says at INFO which of its builds it loads, failed tries included
        logging.getLogger("faiss").setLevel(logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if argv is None:  # a real process (the console script, torchrun), not a call from Python
        _print_python_stack_on_native_crash()
    try:
        code = int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    except BrokenPipeError:  # the reader of stdout left (`| head`): stop quietly, as a shell tool does
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 141
    except Exception as e:
        code = error_exit_code(e)
        if code is None:
            raise
        if args.verbose:
            traceback.print_exc()
        print(f"error: {error_line(e)}", file=sys.stderr)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and argv is None:
        _leave_torchrun_worker(code)
    return code


def error_exit_code(e: BaseException) -> int | None:
    """The exit code for an error the command line reports in one line (None: a bug, which
    keeps its traceback). memory3's own errors carry theirs; bad input (ValueError) is 2;
    files the system refused (missing, permissions, a damaged database) are 1."""
    import sqlite3

    from memory3.errors import Memory3Error

    if isinstance(e, Memory3Error):
        return e.exit_code
    if isinstance(
        e, ValueError | FileNotFoundError | NotADirectoryError | IsADirectoryError | FileExistsError
    ):
        return 2
    if isinstance(e, OSError | sqlite3.DatabaseError):
        return 1
    return None


def error_line(e: BaseException) -> str:
    """One line: the error's own message (with the file an OSError names), without line breaks."""
    if isinstance(e, OSError) and e.filename and str(e.filename) not in str(e):
        msg = f"{e.filename}: {e.strerror or e}"
    else:
        msg = str(e) or type(e).__name__
    return " ".join(msg.split())


def _print_python_stack_on_native_crash() -> None:
    """A crash in native code (SIGSEGV, SIGABRT) prints the Python stack of every thread. Skipped
    when stderr is not a real file (captured by a test runner or a notebook): faulthandler writes
    to a file descriptor."""
    with contextlib.suppress(AttributeError, OSError, ValueError):  # io.UnsupportedOperation
        faulthandler.enable(file=sys.stderr)


def _leave_torchrun_worker(code: int) -> None:
    """End a torchrun worker without the interpreter's teardown. The commands have left the process
    group (barrier, then destroy_process_group) and closed every file by now, yet gloo's threads
    can still abort the process while it is torn down ("terminate called without an active
    exception", PyTorch issue #190489), which turns a finished run into a failed one for torchrun."""
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
