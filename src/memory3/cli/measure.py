"""What `memory3 eval` and `memory3 bench` share: their flags, the models they load (once per
process, so `bench all` reuses them), and how a command emits its results (JSON on stdout, and
as asked a results file, its section of the report and its figures)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from memory3.cli.common import (
    _torch_dtype,
    add_kv_dtype_arg,
    add_memory_args,
    add_model_args,
    load_model,
)
from memory3.eval.render import FIGURES_DIR, REPORT

log = logging.getLogger(__name__)

LOADED: dict[tuple[str, str, str], Any] = {}  # models loaded by this process (bench all reuses them)


def store_size(path: str) -> int | str:
    from memory3.memory.manifest import read_manifest

    return (read_manifest(path).get("extra") or {}).get("references", "?")


def csv_of(kind: type) -> Any:
    def parse(s: str) -> tuple[Any, ...]:
        try:
            return tuple(kind(x) for x in s.split(",") if x.strip())
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__}s, got {s!r}") from e

    return parse


def load_cached(args: argparse.Namespace) -> Any:
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)  # on a shared machine fewer threads can be faster
    key = (str(args.model), args.device, args.dtype, getattr(args, "memory_layers", None))
    if key not in LOADED:
        LOADED[key] = load_model(args)
    return LOADED[key]


def emit(name: str, results: dict[str, Any], args: argparse.Namespace, summary: Any) -> None:
    """Print the summary; write JSON, report section and figures as asked."""
    if getattr(args, "out", None):
        path = Path(args.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        if invoked_as_memory3():  # the section rendered from this file later names this command
            results = {**results, "reproduce": command_line()}
        path.write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")
        log.info("wrote %s", path)
    if getattr(args, "report", None) or getattr(args, "figures", None):
        from memory3.eval.render import render

        render({name: results}, args.report, args.figures, command=command_line())
    print(json.dumps(summary, indent=1, ensure_ascii=False))


def invoked_as_memory3() -> bool:
    """Run as the `memory3` command or `python -m memory3` (not called from other Python code)."""
    if not sys.argv:
        return False
    exe = Path(sys.argv[0])
    return exe.name == "memory3" or (exe.name == "__main__.py" and exe.parent.name == "memory3")


def command_line() -> str:
    return "memory3 " + " ".join(sys.argv[1:]) if invoked_as_memory3() else "memory3 bench all"


def run_context(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from memory3.eval.report import machine
    from memory3.model import resolve_kv_dtype

    kv = resolve_kv_dtype(getattr(args, "kv_dtype", "auto"), _torch_dtype(args.dtype), args.device)
    return {
        "threads": torch.get_num_threads(),
        "model": str(args.model),
        "dtype": args.dtype,
        "kv_dtype": str(kv).removeprefix("torch."),
        "device": args.device,
        "machine": machine(),
    }


def check_memory_overrides(args: argparse.Namespace) -> None:
    for flag, value in (("--kept-tokens", args.kept_tokens), ("--selection", args.selection)):
        if value is not None and args.store is not None:
            raise ValueError(
                f"{flag} {value} with --store: a memory bank's memories were written with its own "
                f"kept tokens and selection; drop --store (an in-RAM knowledge base is written with "
                f"{flag}) or build another bank with `memory3 build … {flag} …`"
            )


def memory_config_of(args: argparse.Namespace, loaded: Any) -> Any:
    """The model's own memory config, or another number of kept tokens per head (`--kept-tokens`)
    or selection rule (`--selection`): what they cost, on the same model."""
    return loaded.memory_config.override(args.kept_tokens, args.selection)


def add_output_args(p: argparse.ArgumentParser) -> None:
    """The model to measure, and where the results go."""
    add_model_args(p)
    add_kv_dtype_arg(p)
    p.add_argument("--out", default=None, help="write the full results as JSON to this file")
    p.add_argument(
        "--report", default=None, help=f"update this command's section of a Markdown file (e.g. {REPORT})"
    )
    p.add_argument(
        "--figures", default=None, help=f"write PNG figures to this directory (e.g. {FIGURES_DIR})"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def add_retrieval_args(
    p: argparse.ArgumentParser,
    k_default: str = "the memories per chunk the model reads with",
) -> None:
    p.add_argument("--store", default=None, help="memory bank directory (memory3 build)")
    p.add_argument(
        "--embedder", default="minilm", help="retrieval embedder for knowledge bases written on the fly"
    )
    p.add_argument(
        "-k",
        "--references",
        type=int,
        default=None,
        help=f"references per retrieval (default: {k_default})",
    )


def add_memory_override_args(p: argparse.ArgumentParser, what: str) -> None:
    add_memory_args(
        p,
        f"measures the {what} of another setting on the same model, with an in-RAM knowledge base (not --store)",
    )


def add_leak_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--leak-threshold", type=float, default=2 / 3, help="§4.4 drop references overlapping more"
    )
    p.add_argument("--no-leak-filter", action="store_true")
