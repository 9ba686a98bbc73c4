"""`memory3 serve`: the OpenAI-compatible HTTP server (memory3.serve) from the command line.

memory3 serve --store wiki=stores/wiki --port 8000
memory3 serve --store wiki=stores/wiki --writable      # /v1/documents may change the bank
MEMORY3_API_KEY=secret memory3 serve --store stores/wiki --host 0.0.0.0
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from memory3.cli.common import (
    add_kv_dtype_arg,
    add_memory_args,
    add_min_score_arg,
    add_model_args,
    kv_dtype_of,
    layers_asked,
    load_model,
)

if TYPE_CHECKING:
    from memory3.config import Selection

log = logging.getLogger(__name__)


def register(subparsers: Any) -> None:

    p = subparsers.add_parser(
        "serve", help="OpenAI-compatible HTTP server with explicit memory and knowledge endpoints"
    )
    add_model_args(p)
    add_kv_dtype_arg(p)
    p.add_argument(
        "--store",
        action="append",
        default=[],
        metavar="[NAME=]DIR",
        help="memory bank to serve (repeatable); NAME defaults to the directory name",
    )
    p.add_argument(
        "--writable",
        action="store_true",
        help="open the --store banks for writing, so that /v1/documents can add, replace and delete "
        "documents (this server then holds each bank's writer lock: one writer per bank)",
    )
    p.add_argument(
        "--kb",
        action="append",
        default=[],
        metavar="[NAME=]FILE",
        help="a text/JSONL file written to memory at start-up (small KBs; repeatable)",
    )
    p.add_argument("--embedder", default="minilm", help="retrieval embedder for --kb")
    add_memory_args(p, "how --kb's memories are written (a --store keeps what it was built with)")
    add_min_score_arg(p)
    p.add_argument(
        "--default-store", default=None, help="store used when a request names none (default: the first)"
    )
    p.add_argument(
        "--default-mode",
        default=None,
        choices=("memory", "none", "rag"),
        help="default: memory when a store is loaded",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--api-key",
        default=os.environ.get("MEMORY3_API_KEY"),
        help="bearer token required on every endpoint but /health (default: $MEMORY3_API_KEY)",
    )
    p.add_argument(
        "--served-model-name",
        default=None,
        help="the `model` clients send (default: the model's directory name)",
    )
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument(
        "--batch-window-ms",
        type=float,
        default=20.0,
        help="a batch closes when no request has come for this long...",
    )
    p.add_argument(
        "--max-batch-wait-ms",
        type=float,
        default=200.0,
        help="...or when its oldest request has waited this long",
    )
    p.add_argument("--max-queue", type=int, default=64, help="waiting requests beyond this get 429")
    p.add_argument("--request-timeout", type=float, default=300.0, help="seconds (queueing + generation)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20)
    p.add_argument("--max-prompt-tokens", type=int, default=1024)
    p.add_argument("--max-tokens", type=int, default=512, help="largest max_tokens a request may ask for")
    p.add_argument("--default-max-tokens", type=int, default=128)
    p.add_argument("--max-references", type=int, default=16, help="largest memory.k a request may ask for")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    p.set_defaults(func=cmd_serve)


def parse_named(spec: str) -> tuple[str, str]:
    """ "wiki=stores/wiki" -> ("wiki", "stores/wiki"); "stores/wiki" -> ("wiki", "stores/wiki")."""
    name, sep, path = spec.partition("=")
    if sep and name and not any(c in name for c in "/\\"):
        return name, path
    p = Path(spec)
    return (p.stem if p.suffix else p.name) or spec, spec


def open_stores(
    loaded: Any,
    stores: list[str],
    kbs: list[str],
    embedder: str,
    kept_tokens: int | None = None,
    selection: Selection | None = None,
    dtype: Any = None,
    writable: bool = False,
    adopt_layers: bool = True,
) -> tuple[dict[str, Any], Any]:
    """Open every --store and --kb once, at start-up: {name: retriever} and their shared memory
    config (the model's own, or `kept_tokens` / `selection` on top of it for --kb; a --store keeps
    what it was built with). Paths come from the command line only; requests name stores from this dict.
    `writable`: open the banks for writing (document operations). `adopt_layers`: the model reads
    memory in the banks' layers (not when --memory-layers was given: they must match it)."""

    from memory3.config import layer_span

    out: dict[str, Any] = {}
    mem_cfg = None
    first_layers = tuple(loaded.model.memory_layers)
    specs = [("store", s) for s in stores] + [("kb", s) for s in kbs]
    for kind, spec in specs:
        name, path = parse_named(spec)
        if name in out:
            raise ValueError(f"two stores are named {name!r}; name them apart with NAME=PATH")
        try:
            from memory3.retrieval.open import open_retriever
        except ModuleNotFoundError as e:
            raise ValueError(f"cannot open --{kind} {path}: {e}; this install has no store support") from e
        retriever, cfg = open_retriever(
            loaded,
            **{kind: path},
            embedder=embedder,
            kept_tokens=kept_tokens,
            selection=selection,
            dtype=dtype,
            **({"writable": writable, "adopt_layers": adopt_layers} if kind == "store" else {}),
        )
        layers = tuple(loaded.model.memory_layers)
        if out and layers != first_layers:
            raise ValueError(
                f"store {name!r} holds memories of other layers ({layer_span(layers)}) than the first "
                f"({layer_span(first_layers)}); serve them separately or rebuild one with --memory-layers"
            )
        first_layers = layers
        if mem_cfg is not None and cfg != mem_cfg:
            raise ValueError(
                f"store {name!r} was written with another memory config ({cfg}) than the first ({mem_cfg}); serve them separately"
            )
        out[name], mem_cfg = retriever, cfg
    return out, mem_cfg or loaded.memory_config.override(kept_tokens, selection)


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from memory3.generate import Generator
    from memory3.scheduler import SchedulerConfig
    from memory3.serve import ServerConfig, create_app

    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        log.warning(
            "serving on %s without an API key: anyone who reaches the port can use and change the knowledge base",
            args.host,
        )
    loaded = load_model(args)
    stores, mem_cfg = open_stores(
        loaded,
        args.store,
        args.kb,
        args.embedder,
        args.kept_tokens,
        args.selection,
        kv_dtype_of(args, loaded),
        writable=args.writable,
        adopt_layers=not layers_asked(args),
    )
    gen = Generator(
        loaded.model, loaded.tokenizer, None, mem_cfg, min_score=args.min_score, kv_dtype=args.kv_dtype
    )
    config = ServerConfig(
        model_name=args.served_model_name or Path(str(args.model)).name,
        api_key=args.api_key or None,
        default_store=args.default_store,
        default_mode=args.default_mode,
        max_body_bytes=args.max_body_bytes,
        max_prompt_tokens=args.max_prompt_tokens,
        max_tokens=args.max_tokens,
        default_max_tokens=min(args.default_max_tokens, args.max_tokens),
        max_k=args.max_references,
    )
    sched = SchedulerConfig(
        max_batch_size=args.max_batch_size,
        batch_window_s=args.batch_window_ms / 1000,
        max_batch_wait_s=args.max_batch_wait_ms / 1000,
        max_queue=args.max_queue,
        request_timeout_s=args.request_timeout,
    )
    app = create_app(gen, stores, config, sched)
    log.info(
        "serving %r with stores %s on http://%s:%d",
        config.model_name,
        sorted(stores) or "(none)",
        args.host,
        args.port,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
