"""`memory3 eval qa|ppl|compare` and `memory3 bench all`; `register` adds `eval` and `bench`
(bench speed and storage are cli/bench.py, what both share cli/measure.py).

Every command prints its summary as JSON on stdout (progress bars and logs go to stderr) and can
write the full results (`--out FILE.json`), its section of BENCHMARKS.md (`--report FILE`) and its
figures (`--figures DIR`). One command regenerates everything published:

    memory3 bench all                # the issue's full specification (long: about an hour here)
    memory3 bench all --quick        # the reduced settings used for the figures in BENCHMARKS.md
    memory3 bench all --render-only  # redraw BENCHMARKS.md sections and plots from saved JSON

`bench all` writes results under `--results-dir`, the report to `--report` and figures under
`--figures`; each defaults to the repository's own (`benchmarks/results/`, `BENCHMARKS.md`,
`docs/figures/` of the checkout this package runs from, never the working directory). An installed
package has no repository: there the three flags are required.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from memory3.cli.bench import add_speed_parser, add_storage_parser
from memory3.cli.common import (
    add_kv_dtype_arg,
    add_min_score_arg,
    add_model_args,
    kv_dtype_of,
    layers_asked,
)
from memory3.cli.measure import (
    add_leak_args,
    add_memory_override_args,
    add_output_args,
    add_retrieval_args,
    check_memory_overrides,
    csv_of,
    emit,
    load_cached,
    memory_config_of,
    run_context,
)
from memory3.config import layer_span
from memory3.errors import InputError
from memory3.eval.render import FIGURES_DIR, REPORT, RESULTS_DIR, SECTIONS, repository

log = logging.getLogger(__name__)

COMMANDS = {"qa": "eval qa", "ppl": "eval ppl", "speed": "bench speed", "storage": "bench storage"}
# `bench all --quick`: minutes on a shared 2-core CPU instead of an hour
QUICK = {
    "qa": "--set fictional --limit 40 --max-new-tokens 32",
    "ppl": "--limit 16 --max-tokens 256",
    "speed": "--batch-sizes 1,8 --prompt-tokens 64 --new-tokens 64 --runs 2 --warmup first --kb-articles 50",
    "storage": "",
}


# --- eval qa ----------------------------------------------------------------------------------------


def cmd_eval_qa(args: argparse.Namespace) -> int:
    from memory3.eval.qa import QAEvalConfig, build_retriever, evaluate_qa, kb_documents, load_set
    from memory3.generate import Generator
    from memory3.retrieval.embed import get_embedder
    from memory3.retrieval.open import open_retriever

    config = QAEvalConfig(
        modes=args.modes,
        k=args.references,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        leak_threshold=None if args.no_leak_filter else args.leak_threshold,
        min_score=args.min_score,
    )
    check_memory_overrides(args)
    loaded = load_cached(args)
    needs_retrieval = any(m != "none" for m in config.modes)
    store = None
    if args.store is not None and args.kb != "set":
        raise ValueError("give either --store (a memory bank) or --kb, not both")
    if args.store is not None:
        store, mem_cfg = open_retriever(
            loaded, store=args.store, dtype=kv_dtype_of(args, loaded), adopt_layers=not layers_asked(args)
        )
    other = _read_results(args.compare) if args.compare else None
    results: dict[str, Any] = {"sets": {}, **run_context(args)}
    written: dict[tuple[str, ...], Any] = {}  # knowledge bases written in this run (dev and test share one)
    for name in args.set:
        path, items = load_set(name, args.split, args.limit)
        retriever, kb_desc = store, f"memory bank {args.store}"
        if store is None:
            mem_cfg = memory_config_of(args, loaded)
            if needs_retrieval:
                docs = kb_documents(path, items, args.kb)
                kb_desc = f"{args.kb}: {len(docs)} documents written to memory in RAM"
                key = tuple(f"{d.doc_id}\0{d.text}" for d in docs)
                if key not in written:
                    written[key] = build_retriever(
                        loaded.model, loaded.tokenizer, docs, mem_cfg, get_embedder(args.embedder)
                    )
                retriever = written[key]
            else:
                kb_desc = "none"
        gen = Generator(loaded.model, loaded.tokenizer, retriever, mem_cfg, kv_dtype=args.kv_dtype)
        report = evaluate_qa(gen, items, config, progress=not args.no_progress)
        report.meta = {
            "set": str(name),
            "path": str(path),
            "split": args.split,
            "kb": kb_desc,
            "embedder": args.embedder,
        }
        results["sets"][path.stem] = report.to_dict()
    results["memory"] = {
        "layers": len(loaded.model.memory_layers),
        "memory_layers": layer_span(loaded.model.memory_layers),
        "kept_tokens": mem_cfg.kept_tokens,
        "selection": mem_cfg.selection,
    }
    if other is not None:
        results["compare"] = _compare(results, other, args.compare)
    summary = {k: v["summary"] for k, v in results["sets"].items()}
    emit("qa", results, args, summary)
    return 0


def _read_results(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(
            f"--compare {path}: no such file; give a JSON written by `memory3 eval qa --out`"
        )
    res = json.loads(p.read_text())
    if not isinstance(res, dict) or "sets" not in res:
        raise ValueError(f"--compare {path}: not a results file of `memory3 eval qa --out` (no 'sets')")
    return res


def _compare(results: dict[str, Any], other: dict[str, Any], other_path: str) -> dict[str, Any]:
    """This run against another results file, mode by mode, paired on the questions of each set."""
    from memory3.eval.paired import compare_runs

    modes = [
        m
        for m in ("none", "memory", "rag")
        if any(m in s["config"]["modes"] for s in results["sets"].values())
    ]
    out: dict[str, Any] = {"other": other_path, "other_model": other.get("model"), "modes": {}}
    for mode in modes:
        try:
            pairs = compare_runs(results, other, mode)
        except ValueError:
            continue  # the other run did not answer in this mode
        out["modes"][mode] = {name: p.to_dict() for name, p in pairs.items()}
    if not out["modes"]:
        raise ValueError(
            f"--compare {other_path}: no set and mode in common with this run; compare runs of the "
            "same --set and --split"
        )
    return out


def cmd_eval_compare(args: argparse.Namespace) -> int:
    """Two saved `eval qa` results, paired question by question (no model is loaded)."""
    results, other = _read_results(args.results), _read_results(args.other)
    out = _compare(results, other, args.other)
    print(json.dumps(out, indent=1, ensure_ascii=False))
    return 0


# --- eval ppl ---------------------------------------------------------------------------------------


def _ppl_texts(source: str, limit: int | None) -> list[Any]:
    from memory3.eval.ppl import PPLText

    if source == "wikipedia":
        from memory3.data.wikipedia import load_articles

        texts = [PPLText(a.text, a.title) for a in load_articles("heldout")]
    else:
        from memory3.memory.ingest import read_documents

        texts = [PPLText(d.text, d.title) for d in read_documents(source)]
    return texts[:limit] if limit else texts


def cmd_eval_ppl(args: argparse.Namespace) -> int:
    from memory3.eval.ppl import PPLConfig, perplexity, tokenize_texts
    from memory3.memory.ingest import Document
    from memory3.retrieval.embed import get_embedder
    from memory3.retrieval.open import open_retriever

    config = PPLConfig(
        max_tokens=args.max_tokens,
        min_tokens=args.min_tokens,
        k=args.references,
        leak_threshold=None if args.no_leak_filter else args.leak_threshold,
        first_query=args.first_query,
        batch_size=args.batch_size,
    )
    check_memory_overrides(args)
    loaded = load_cached(args)
    model, tok = loaded.model, loaded.tokenizer
    pool = _ppl_texts(args.texts, None)
    kept = tokenize_texts(tok, pool, config)[: args.limit]
    texts = [t for t, _ in kept]
    if not texts:
        raise ValueError(f"{args.texts}: no text has at least --min-tokens {config.min_tokens} tokens")
    retriever, mem_cfg, kb_desc = None, memory_config_of(args, loaded), "none"
    if "memory" in args.modes:
        if args.store is not None or args.kb is not None:
            retriever, mem_cfg = open_retriever(
                loaded,
                store=args.store,
                kb=args.kb,
                embedder=args.embedder,
                kept_tokens=args.kept_tokens,
                selection=args.selection,
                dtype=kv_dtype_of(args, loaded),
                adopt_layers=not layers_asked(args),
            )
            kb_desc = f"memory bank {args.store}" if args.store else f"{args.kb}"
        else:
            from memory3.eval.qa import build_retriever

            docs = [Document(f"ppl/{i}", t.text, t.title) for i, t in enumerate(texts)]
            retriever = build_retriever(model, tok, docs, mem_cfg, get_embedder(args.embedder))
            kb_desc = (
                f"the {len(texts)} evaluated texts' own references (each text's own are dropped by the "
                "leak filter, the others remain)"
            )
    if config.k is None:  # record the number of memories read, as perplexity() resolves it
        config = dataclasses.replace(config, k=mem_cfg.memories_per_chunk)
    out: dict[str, Any] = {
        "config": asdict(config),
        "texts": args.texts,
        "kb": kb_desc,
        "memory": {
            "layers": len(model.memory_layers),
            "memory_layers": layer_span(model.memory_layers),
            "kept_tokens": mem_cfg.kept_tokens,
            "selection": mem_cfg.selection,
        },
        "modes": {},
        **run_context(args),
    }
    for mode in args.modes:
        r = perplexity(model, tok, texts, mode, retriever, mem_cfg, config, progress=not args.no_progress)
        out["modes"][mode] = r.to_dict()
    summary = {
        m: {"perplexity": v["perplexity"], "tokens": v["tokens"], "texts": v["texts"]}
        for m, v in out["modes"].items()
    }
    emit("ppl", out, args, summary)
    return 0


# --- bench all ---------------------------------------------------------------------------------------


def _bench_all_paths(args: argparse.Namespace) -> tuple[Path, str | Path, str | Path]:
    """Where `bench all` writes: the results directory, report and figures directory given, else
    the repository's own (an empty --report or --figures, as before, writes none)."""
    given = {"--results-dir": args.results_dir, "--report": args.report, "--figures": args.figures}
    if None in given.values():
        root = repository()
        if root is None:
            missing = " ".join(flag for flag, value in given.items() if value is None)
            raise ValueError(
                f"bench all: this memory3 is installed without its repository, so there is no "
                f"BENCHMARKS.md of its own to update; give {missing} (e.g. --results-dir results "
                "--report BENCHMARKS.md --figures figures)"
            )
        defaults = {"--results-dir": RESULTS_DIR, "--report": REPORT, "--figures": FIGURES_DIR}
        given = {flag: root / defaults[flag] if value is None else value for flag, value in given.items()}
    return Path(given["--results-dir"]), given["--report"], given["--figures"]


def _bench_all_command(args: argparse.Namespace) -> str:
    """The `bench all` line each section's Reproduce names."""
    from memory3.shipped import default_model

    return (
        "memory3 bench all"
        + (f" --model {args.model}" if str(args.model) != default_model() else "")
        + (" --quick" if args.quick else "")
        + (f" --threads {args.threads}" if args.threads else "")
        + (f" --store {args.store}" if args.store else "")
        + (f" --kv-dtype {args.kv_dtype}" if args.kv_dtype != "auto" else "")
    )


def _run_all(args: argparse.Namespace, results_dir: Path, cmd: str) -> None:
    """Run each benchmark of `bench all` (or those of --only) into `results_dir`."""
    common = ["--model", str(args.model), "--device", args.device, "--dtype", args.dtype]
    common += ["--kv-dtype", args.kv_dtype]
    common += ["--no-progress"] if args.no_progress else []
    common += ["--threads", str(args.threads)] if args.threads else []
    runs = {name: [*c.split(), *(QUICK[name].split() if args.quick else [])] for name, c in COMMANDS.items()}
    unknown = sorted(set(args.only or ()) - set(runs))
    if unknown:
        raise ValueError(f"--only {unknown}: choose from {list(runs)}")
    parser = argparse.ArgumentParser(prog="memory3")
    register(parser.add_subparsers(dest="command"))  # the commands `all` runs are these
    if args.store:
        runs["speed"] += ["--store", args.store]
    for name in args.only or list(runs):
        out = results_dir / f"{name}.json"
        sub = parser.parse_args([*runs[name], *common, "--out", str(out)])
        log.info("bench all: %s", " ".join(runs[name]))
        sub.func(sub)
        # each result says how to make it again: sections may come from different runs
        saved = json.loads(out.read_text())
        saved["reproduce"] = f"{cmd} --only {name}"
        out.write_text(json.dumps(saved, indent=1, ensure_ascii=False) + "\n")


def cmd_bench_all(args: argparse.Namespace) -> int:
    from memory3.eval.render import render

    results_dir, report, figures = _bench_all_paths(args)
    cmd = _bench_all_command(args)
    if not args.render_only:
        _run_all(args, results_dir, cmd)
    loaded: dict[str, Any] = {}
    for name in SECTIONS:
        path = results_dir / f"{name}.json"
        if path.exists():
            loaded[name] = json.loads(path.read_text())
    if not loaded:
        raise FileNotFoundError(f"no results in {results_dir}: run `memory3 bench all` without --render-only")
    render(loaded, report, figures, command=cmd)
    return 0


# --- the parsers ---------------------------------------------------------------------------------------


def cmd_lm_eval(args: argparse.Namespace) -> int:
    """lm-eval's own command line (`lm-eval run …` or its legacy form), with the model `memory3`
    registered and memory3's tasks on the task path."""
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError:
        raise InputError(
            "lm-evaluation-harness is not installed: pip install 'memory3[harness]' (or lm_eval)"
        ) from None
    from memory3.eval.harness import TASKS_DIR

    rest = list(args.rest)
    if rest and rest[0] not in ("ls", "validate", "-h", "--help") and "--include_path" not in rest:
        rest += ["--include_path", str(TASKS_DIR)]
    saved = sys.argv
    sys.argv = ["lm-eval", *rest]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved
    return 0


def register(subparsers: Any) -> None:
    """Add `eval` and `bench` to the `memory3` command line."""
    p_eval = subparsers.add_parser("eval", help="quality: question answering and perplexity")
    ev = p_eval.add_subparsers(dest="eval_command", required=True)
    _add_eval_qa(ev)
    _add_eval_compare(ev)
    _add_eval_ppl(ev)

    p_lm = subparsers.add_parser(
        "lm-eval",
        add_help=False,  # --help goes to lm-eval
        help="lm-evaluation-harness with the memory3 model (--model memory3) and memory3's tasks",
    )
    p_lm.set_defaults(func=cmd_lm_eval, passthrough=True)

    p_bench = subparsers.add_parser("bench", help="speed and storage benchmarks, and `bench all`")
    be = p_bench.add_subparsers(dest="bench_command", required=True)
    add_speed_parser(be)
    add_storage_parser(be)
    _add_bench_all(be)


def _add_eval_qa(ev: Any) -> None:
    p = ev.add_parser("qa", help="QA accuracy with explicit memory, without memory and with RAG")
    add_output_args(p)
    add_retrieval_args(p)
    add_leak_args(p)
    add_min_score_arg(p)
    p.add_argument(
        "--set",
        action="append",
        default=None,
        help="question set: factbook, fictional, wikipedia, natural, unseen, or a JSONL file of "
        '{"question", "answers", "doc_id" or "reference"} lines (repeatable; default: the first three)',
    )
    p.add_argument("--sets", type=csv_of(str), default=None, help="comma-separated question sets (as --set)")
    p.add_argument(
        "--split",
        default="heldout",
        choices=("heldout", "train", "all", "dev", "test"),
        help="heldout/train/all for the generated sets; dev or test for natural and unseen (heldout = test)",
    )
    p.add_argument(
        "--compare",
        default=None,
        help="results JSON of another run (e.g. another reader): paired differences with 95%% intervals",
    )
    p.add_argument("--limit", type=int, default=None, help="first N questions of each set")
    p.add_argument("--modes", type=csv_of(str), default=("none", "memory", "rag"))
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument(
        "--kb",
        default="set",
        help="knowledge base without --store: 'set' (gold references of the whole set + its _kb.jsonl), "
        "'gold' (gold references only) or a file/directory of documents",
    )
    add_memory_override_args(p, "accuracy")
    p.set_defaults(func=_with_sets(cmd_eval_qa))


def _add_eval_compare(ev: Any) -> None:
    p = ev.add_parser("compare", help="two saved `eval qa` results, paired question by question")
    p.add_argument("results", help="JSON written by `memory3 eval qa --out`")
    p.add_argument("other", help="the run to compare against (e.g. the previous reader's)")
    p.set_defaults(func=cmd_eval_compare)


def _add_eval_ppl(ev: Any) -> None:
    p = ev.add_parser("ppl", help="perplexity of held-out text with and without memory")
    add_output_args(p)
    add_retrieval_args(p)
    add_leak_args(p)
    p.add_argument(
        "--texts", default="wikipedia", help="'wikipedia' (held-out summaries) or a text/JSONL file"
    )
    p.add_argument("--limit", type=int, default=32, help="texts to score")
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--min-tokens", type=int, default=129, help="skip shorter texts (129: at least 3 chunks)")
    p.add_argument(
        "--modes",
        type=csv_of(str),
        default=("none", "prefix", "memory"),
        help="none: plain model; prefix: the memory layout without memories (control); memory",
    )
    p.add_argument(
        "--first-query", default="none", choices=("none", "title"), help="what chunk 0 retrieves with"
    )
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--kb", default=None, help="documents to remember (default: the scored texts themselves)")
    add_memory_override_args(p, "perplexity")
    p.set_defaults(func=cmd_eval_ppl)


def _add_bench_all(be: Any) -> None:
    p = be.add_parser("all", help="run every benchmark, then rewrite BENCHMARKS.md sections and the figures")
    add_model_args(p)
    add_kv_dtype_arg(p)
    p.add_argument("--quick", action="store_true", help="reduced settings (minutes, not an hour)")
    p.add_argument("--only", type=csv_of(str), default=None, help=f"run only these of {list(SECTIONS)}")
    p.add_argument(
        "--render-only", action="store_true", help="only redraw report and figures from saved JSON"
    )
    p.add_argument("--store", default=None, help="memory bank for `bench speed` (needed for the cold cache)")
    where = "of the repository this package runs from; required for an installed package"
    p.add_argument(
        "--results-dir", default=None, help=f"results JSON directory (default: {RESULTS_DIR} {where})"
    )
    p.add_argument("--report", default=None, help=f"Markdown report to update (default: {REPORT} {where})")
    p.add_argument("--figures", default=None, help=f"figures directory (default: {FIGURES_DIR} {where})")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.set_defaults(func=cmd_bench_all)


def _with_sets(fn: Any) -> Any:
    def run(args: argparse.Namespace) -> Any:
        args.set = [*(args.set or ()), *(args.sets or ())]
        if not args.set:
            args.set = ["factbook", "fictional", "wikipedia"]
        return fn(args)

    return run
