"""`memory3 eval qa|ppl` and `memory3 bench speed|storage|all`.

Every command prints its summary as JSON on stdout (progress bars and logs go to stderr) and can
write the full results (`--out FILE.json`), its section of BENCHMARKS.md (`--report FILE`) and its
figures (`--figures DIR`). One command regenerates everything published:

    memory3 bench all                # the issue's full specification (long: about an hour here)
    memory3 bench all --quick        # the reduced settings used for the figures in BENCHMARKS.md
    memory3 bench all --render-only  # redraw BENCHMARKS.md sections and plots from saved JSON

Results are saved under `--results-dir`
(default `benchmarks/results/`), figures under `docs/figures/`.
"""

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
    add_min_score_arg,
    add_model_args,
    kv_dtype_of,
    load_model,
)

log = logging.getLogger(__name__)

RESULTS_DIR = "benchmarks/results"
FIGURES_DIR = "docs/figures"
REPORT = "BENCHMARKS.md"
SECTIONS = {
    "qa": ("eval-qa", "Question answering: explicit memory vs no memory vs RAG"),
    "ppl": ("eval-ppl", "Perplexity of held-out text with and without memory"),
    "speed": ("bench-speed", "Speed: throughput and time to first token"),
    "storage": ("bench-storage", "Storage per memory"),
}
COMMANDS = {"qa": "eval qa", "ppl": "eval ppl", "speed": "bench speed", "storage": "bench storage"}
# `bench all --quick`: minutes on a shared 2-core CPU instead of an hour
QUICK = {
    "qa": "--set fictional --limit 40 --max-new-tokens 32",
    "ppl": "--limit 16 --max-tokens 256",
    "speed": "--batch-sizes 1,8 --prompt-tokens 64 --new-tokens 64 --runs 2 --warmup first --kb-articles 50",
    "storage": "",
}
_LOADED: dict[tuple[str, str, str], Any] = {}  # models loaded by this process (bench all reuses them)


def _store_size(path: str) -> int | str:
    from memory3.memory.manifest import read_manifest

    return (read_manifest(path).get("extra") or {}).get("references", "?")


def _csv(kind: type) -> Any:
    def parse(s: str) -> tuple[Any, ...]:
        try:
            return tuple(kind(x) for x in s.split(",") if x.strip())
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__}s, got {s!r}") from e

    return parse


def _load(args: argparse.Namespace) -> Any:
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)  # on a shared machine fewer threads can be faster
    key = (str(args.model), args.device, args.dtype)
    if key not in _LOADED:
        _LOADED[key] = load_model(args)
    return _LOADED[key]


def _emit(name: str, results: dict[str, Any], args: argparse.Namespace, summary: Any) -> None:
    """Print the summary; write JSON, report section and figures as asked."""
    if getattr(args, "out", None):
        path = Path(args.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        if _invoked_as_memory3():  # the section rendered from this file later names this command
            results = {**results, "reproduce": _command_line()}
        path.write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")
        log.info("wrote %s", path)
    if getattr(args, "report", None) or getattr(args, "figures", None):
        render({name: results}, args.report, args.figures, command=_command_line())
    print(json.dumps(summary, indent=1, ensure_ascii=False))


def _invoked_as_memory3() -> bool:
    """Run as the `memory3` command or `python -m memory3` (not called from other Python code)."""
    if not sys.argv:
        return False
    exe = Path(sys.argv[0])
    return exe.name == "memory3" or (exe.name == "__main__.py" and exe.parent.name == "memory3")


def _command_line() -> str:
    return "memory3 " + " ".join(sys.argv[1:]) if _invoked_as_memory3() else "memory3 bench all"


def _context(args: argparse.Namespace) -> dict[str, Any]:
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


def _check_memory_overrides(args: argparse.Namespace) -> None:
    for flag, value in (("--kept-tokens", args.kept_tokens), ("--selection", args.selection)):
        if value is not None and args.store is not None:
            raise ValueError(
                f"{flag} {value} with --store: a memory bank's memories were written with its own "
                f"kept tokens and selection; drop --store (an in-RAM knowledge base is written with "
                f"{flag}) or build another bank with `memory3 build … {flag} …`"
            )


def _memory_config(args: argparse.Namespace, loaded: Any) -> Any:
    """The model's own memory config, or another number of kept tokens per head (`--kept-tokens`)
    or selection rule (`--selection`): what they cost, on the same model."""
    return loaded.memory_config.override(args.kept_tokens, args.selection)


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
    _check_memory_overrides(args)
    loaded = _load(args)
    needs_retrieval = any(m != "none" for m in config.modes)
    store = None
    if args.store is not None and args.kb != "set":
        raise ValueError("give either --store (a memory bank) or --kb, not both")
    if args.store is not None:
        store, mem_cfg = open_retriever(loaded, store=args.store, dtype=kv_dtype_of(args, loaded))
    other = _read_results(args.compare) if args.compare else None
    results: dict[str, Any] = {"sets": {}, **_context(args)}
    written: dict[tuple[str, ...], Any] = {}  # knowledge bases written in this run (dev and test share one)
    for name in args.set:
        path, items = load_set(name, args.split, args.limit)
        retriever, kb_desc = store, f"memory bank {args.store}"
        if store is None:
            mem_cfg = _memory_config(args, loaded)
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
        "kept_tokens": mem_cfg.kept_tokens,
        "selection": mem_cfg.selection,
    }
    if other is not None:
        results["compare"] = _compare(results, other, args.compare)
    summary = {k: v["summary"] for k, v in results["sets"].items()}
    _emit("qa", results, args, summary)
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
    loaded = _load(args)
    model, tok = loaded.model, loaded.tokenizer
    pool = _ppl_texts(args.texts, None)
    kept = tokenize_texts(tok, pool, config)[: args.limit]
    texts = [t for t, _ in kept]
    if not texts:
        raise ValueError(f"{args.texts}: no text has at least --min-tokens {config.min_tokens} tokens")
    retriever, mem_cfg, kb_desc = None, loaded.memory_config, "none"
    if "memory" in args.modes:
        if args.store is not None or args.kb is not None:
            retriever, mem_cfg = open_retriever(
                loaded, store=args.store, kb=args.kb, embedder=args.embedder, dtype=kv_dtype_of(args, loaded)
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
    out: dict[str, Any] = {
        "config": _asdict(config),
        "texts": args.texts,
        "kb": kb_desc,
        "memory": {
            "layers": len(model.memory_layers),
            "kept_tokens": mem_cfg.kept_tokens,
            "selection": mem_cfg.selection,
        },
        "modes": {},
        **_context(args),
    }
    for mode in args.modes:
        r = perplexity(model, tok, texts, mode, retriever, mem_cfg, config, progress=not args.no_progress)
        out["modes"][mode] = r.to_dict()
    summary = {
        m: {"perplexity": v["perplexity"], "tokens": v["tokens"], "texts": v["texts"]}
        for m, v in out["modes"].items()
    }
    _emit("ppl", out, args, summary)
    return 0


def _asdict(obj: Any) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(obj)


# --- bench speed -------------------------------------------------------------------------------------


def _open_store(path: str, loaded: Any, cache: str, dtype: Any) -> Any:
    """A memory bank on disk, its memories read in `dtype`; "cold" turns its memory cache off
    (every read from disk)."""
    import inspect

    from memory3.retrieval.retriever import StoreRetriever  # type: ignore[import-not-found]

    params = inspect.signature(StoreRetriever.open).parameters
    if "cache_size" not in params:
        raise ValueError("this StoreRetriever.open has no cache_size: cannot run the cold-cache setting")
    kw = {"cache_size": 0} if cache == "cold" else {}
    return StoreRetriever.open(path, loaded.model, dtype=dtype, **kw)


def cmd_bench_speed(args: argparse.Namespace) -> int:
    import torch

    from memory3.data.wikipedia import load_articles
    from memory3.eval.qa import build_retriever
    from memory3.eval.speed import SpeedConfig, bench_speed, make_prompts
    from memory3.generate import Generator
    from memory3.memory.ingest import Document
    from memory3.retrieval.embed import get_embedder

    config = SpeedConfig(
        batch_sizes=args.batch_sizes,
        prompt_tokens=args.prompt_tokens,
        new_tokens=args.new_tokens,
        k=args.references,
        runs=args.runs,
        modes=args.modes,
        caches=args.caches,
        warmup=args.warmup,
    )
    _check_memory_overrides(args)
    torch.manual_seed(0)
    loaded = _load(args)
    model, tok = loaded.model, loaded.tokenizer
    articles = load_articles("heldout")
    kb_articles, prompt_articles = articles[: args.kb_articles], articles[args.kb_articles :]
    prompts = make_prompts(
        tok, [a.text for a in prompt_articles], max(config.batch_sizes), config.prompt_tokens
    )
    if args.store is not None:  # a bank's memories were written with its own config
        from memory3.memory.manifest import read_memory_config

        mem_cfg = read_memory_config(args.store)
    else:
        mem_cfg = _memory_config(args, loaded)
    warm = None
    if args.store is None and any(m != "none" for m in config.modes):
        docs = [Document(a.doc_id, a.text, a.title) for a in kb_articles]
        warm = build_retriever(model, tok, docs, mem_cfg, get_embedder(args.embedder))

    def factory(cache: str) -> Any:
        if args.store is not None:
            return _open_store(args.store, loaded, cache, kv_dtype_of(args, loaded))
        return warm if cache == "warm" else None

    gen = Generator(model, tok, None, mem_cfg, chat=False, kv_dtype=args.kv_dtype)
    results = bench_speed(gen, prompts, factory, config, progress=not args.no_progress)
    results["kb"] = (
        f"memory bank of {_store_size(args.store)} references given as `--store` (warm: its RAM cache "
        "on; cold: cache_size=0, every memory read and decoded from disk)"
        if args.store
        else f"{len(kb_articles)} held-out Wikipedia summaries written to memory in RAM"
    )
    results["memory"] = {
        "layers": len(model.memory_layers),
        "kept_tokens": mem_cfg.kept_tokens,
        "selection": mem_cfg.selection,
    }
    results.update(_context(args))
    _emit("speed", results, args, {"ratios": results["ratios"], "skipped": results["skipped"]})
    return 0


# --- bench storage -----------------------------------------------------------------------------------


def cmd_bench_storage(args: argparse.Namespace) -> int:
    from memory3.config import MemoryConfig, ModelConfig
    from memory3.data.wikipedia import load_articles
    from memory3.eval.storage import storage_rows, text_sample

    loaded = _load(args)
    mem_cfg = loaded.memory_config
    texts = [a.text for a in load_articles("heldout")[: args.texts]]
    sample = text_sample(texts, loaded.tokenizer, mem_cfg.reference_tokens)
    rows: list[dict[str, Any]] = []
    skipped: list[str] = []
    # the loaded model as it reads (a trained adapter's memory config); presets as the paper sets them
    models = [(loaded.model.config, mem_cfg)] + [
        (ModelConfig.from_preset(p), MemoryConfig()) for p in args.presets
    ]
    for mc, cfg in models:
        for c in args.codecs:
            try:
                rows += [
                    {**r, "kept_tokens": cfg.kept_tokens, "memory_layers": mc.n_memory_layers}
                    for r in storage_rows(mc, cfg, [c], sample)
                ]
            except ValueError as e:
                skipped.append(f"{mc.name}/{c}: {e}")
    results = {
        "rows": rows,
        "skipped": skipped,
        "text_sample": {**_asdict(sample), "utf8_bytes_per_token": sample.utf8_bytes_per_token},
        "memory_config": mem_cfg.to_dict(),
        **_context(args),
    }
    _emit("storage", results, args, rows)
    return 0


# --- bench all and the report ------------------------------------------------------------------------


def cmd_bench_all(args: argparse.Namespace) -> int:
    results_dir = Path(args.results_dir)
    from memory3.shipped import default_model

    cmd = (
        "memory3 bench all"
        + (f" --model {args.model}" if str(args.model) != default_model() else "")
        + (" --quick" if args.quick else "")
        + (f" --threads {args.threads}" if args.threads else "")
        + (f" --store {args.store}" if args.store else "")
        + (f" --kv-dtype {args.kv_dtype}" if args.kv_dtype != "auto" else "")
    )
    if not args.render_only:
        q = args.quick
        common = ["--model", str(args.model), "--device", args.device, "--dtype", args.dtype]
        common += ["--kv-dtype", args.kv_dtype]
        common += ["--no-progress"] if args.no_progress else []
        common += ["--threads", str(args.threads)] if args.threads else []
        runs = {name: [*c.split(), *(QUICK[name].split() if q else [])] for name, c in COMMANDS.items()}
        unknown = sorted(set(args.only or ()) - set(runs))
        if unknown:
            raise ValueError(f"--only {unknown}: choose from {list(runs)}")
        parser = argparse.ArgumentParser(prog="memory3")
        register(parser.add_subparsers(dest="command"))  # the commands `all` runs are this module's
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
    loaded: dict[str, Any] = {}
    for name in SECTIONS:
        path = results_dir / f"{name}.json"
        if path.exists():
            loaded[name] = json.loads(path.read_text())
    if not loaded:
        raise FileNotFoundError(f"no results in {results_dir}: run `memory3 bench all` without --render-only")
    render(loaded, args.report, args.figures, command=cmd)
    return 0


def render(
    results: dict[str, dict[str, Any]], report: str | Path | None, figures: str | Path | None, command: str
) -> None:
    """Write the figures and the BENCHMARKS.md sections of the given results."""
    from memory3.eval import plots
    from memory3.eval.report import update_section

    figs: dict[str, list[Path]] = {}
    if figures:
        fdir = Path(figures)
        if "qa" in results:
            figs.setdefault("qa", []).append(plots.plot_accuracy(results["qa"], fdir / "qa_accuracy.png"))
        if "speed" in results:
            figs.setdefault("speed", []).append(
                plots.plot_throughput(results["speed"], fdir / "throughput.png")
            )
        if "qa" in results and "speed" in results:
            figs["speed"].append(
                plots.plot_accuracy_vs_speed(results["qa"], results["speed"], fdir / "accuracy_vs_speed.png")
            )
    if not report:
        return
    for name, res in results.items():
        key, title = SECTIONS[name]
        body = {"qa": _md_qa, "ppl": _md_ppl, "speed": _md_speed, "storage": _md_storage}[name](res)
        if figs.get(name):
            body += "\n\n" + plots.figure_links(figs[name], report)
        compact = {k: v for k, v in res.items() if k != "sets"}
        if name == "qa":  # per-item answers stay in the JSON file, not in the report
            compact["sets"] = {
                s: {"summary": v["summary"], "meta": v["meta"], "config": v["config"]}
                for s, v in res["sets"].items()
            }
        update_section(report, key, title, res.get("reproduce", command), body, compact)


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _md_qa(res: dict[str, Any]) -> str:
    from memory3.eval.report import table

    rows = []
    for name, s in res["sets"].items():
        summ = s["summary"]
        for mode, m in summ["modes"].items():
            rows.append(
                {
                    "set": name,
                    "mode": mode,
                    "n": summ["n"],
                    "exact match": _pct(m["exact_match"]),
                    "answer contained": _pct(m["contained"]),
                    "contained, gold retrieved": _pct(m["contained_when_hit"]),
                    "contained, gold missed": _pct(m["contained_when_missed"]),
                    f"hit@{summ['k']}": _pct(summ["hit_rate"]),
                    "keeps what none knew": _pct(m.get("keeps_known")),
                }
            )
    from memory3.eval.breakdown import breakdown_md

    parts = [
        f"**{name}** by answer type and by family (answer contained):\n\n{md}"
        for name, s in res["sets"].items()
        if (md := breakdown_md(s["summary"]))
    ]
    if res.get("compare"):
        parts.append(_md_compare(res["compare"]))
    any_set = next(iter(res["sets"].values()))
    cfg, meta = any_set["config"], any_set["meta"]
    leak = "off" if cfg["leak_threshold"] is None else f"{cfg['leak_threshold']:.3g}"
    return (
        f"Model `{res['model']}` ({res['dtype']}, KV cache {res.get('kv_dtype', res['dtype'])}), split `{meta['split']}`, {cfg['k']} references per retrieval, "
        f"greedy, ≤ {cfg['max_new_tokens']} new tokens, batch {cfg['batch_size']}, leak filter "
        f"{leak}"
        + ("" if cfg.get("min_score") is None else f", hits scoring below {cfg['min_score']:.3g} dropped")
        + f". Knowledge base: {meta['kb']}; "
        f"retriever `{meta['embedder']}`. hit@k: a reference of the gold document is among the k hits of the question "
        "(the query RAG and memory's first chunk use). Keeps what none knew: of the questions answered "
        "right without memory, the share this mode answers right too.\n\n"
        + table(rows)
        + "".join(f"\n\n{p}" for p in parts)
    )


def _md_compare(compare: dict[str, Any]) -> str:
    from memory3.eval.report import table

    rows = [
        {
            "mode": mode,
            "set": name,
            "n": p["n"],
            "right (this / other)": f"{p['a_right']} / {p['b_right']}",
            "this only / other only": f"{p['a_only']} / {p['b_only']}",
            "this − other (points)": f"{p['diff_points']:+.1f}",
            "95% interval": f"{p['ci95'][0]:+.1f} to {p['ci95'][1]:+.1f}",
        }
        for mode, sets in compare["modes"].items()
        for name, p in sets.items()
    ]
    return (
        f"Against `{compare['other']}` (model `{compare.get('other_model')}`), paired on the same "
        "questions (answer contained):\n\n" + table(rows)
    )


def _md_ppl(res: dict[str, Any]) -> str:
    from memory3.eval.report import table

    none = res["modes"].get("none", {}).get("perplexity")
    rows = [
        {
            "mode": m,
            "perplexity": f"{v['perplexity']:.3f}",
            "vs none": f"{v['perplexity'] / none:.3f}×" if none else "–",
            "scored tokens": v["tokens"],
            "texts": v["texts"],
            "chunks reading memory": v["retrievals"],
        }
        for m, v in res["modes"].items()
    ]
    c = res["config"]
    leak = "off" if c["leak_threshold"] is None else f"{c['leak_threshold']:.3g}"
    return (
        f"Model `{res['model']}` ({res['dtype']}); texts: `{res['texts']}` (held-out split), first "
        f"{c['max_tokens']} tokens of each text with ≥ {c['min_tokens']}. Memory: chunk c reads {c['k']} memories "
        f"retrieved with chunk c-1's text (chunk 0: {c['first_query']}), so no chunk sees references chosen by its "
        f"own future; leak filter {leak} against the whole scored text; `prefix` is the memory layout (reference "
        f"prefix, text at position p+128) without memories, the control for `memory`. Knowledge base: {res['kb']}.\n\n"
        + table(rows)
    )


def _md_speed(res: dict[str, Any]) -> str:
    from memory3.eval.report import table

    def rng(s: dict[str, float], fmt: str) -> str:
        return f"{s['median']:{fmt}} ({s['min']:{fmt}}–{s['max']:{fmt}})"

    rows = [
        {
            "batch": r["batch"],
            "mode": r["mode"],
            "cache": r["cache"],
            "throughput tok/s": rng(r["throughput"], ".1f"),
            "TTFT s": rng(r["ttft_s"], ".3f"),
            "decode tok/s": rng(r["decode_tokens_per_s"], ".1f"),
            "retrievals/seq": f"{r['retrievals_per_sequence']:.0f}",
            "prompt tokens": f"{r['prompt_tokens']:.0f}",
        }
        for r in res["rows"]
    ]
    names = {
        "throughput_memory_over_rag": "throughput memory/RAG",
        "throughput_memory_over_none": "throughput memory/none",
        "throughput_memory_over_none_paired": "memory/none paired by round",
        "decode_memory_over_none": "decode memory/none",
        "ttft_memory_over_rag": "TTFT memory/RAG",
    }
    ratio_rows = [
        {names.get(k, k): (f"{v:.2f}×" if isinstance(v, float) else v) for k, v in r.items()}
        for r in res["ratios"]
    ]
    c = res["config"]
    warm = (
        "a dropped warm-up round at each batch size"
        if c.get("warmup", "each") == "each"
        else "one dropped warm-up round"
    )
    skipped = "".join(f"\n- skipped `{k}` cache: {v}" for k, v in res.get("skipped", {}).items())
    m = res.get("memory")
    reads = (
        f" It reads memory in {m['layers']} layers, {m['kept_tokens']} tokens per head per reference: "
        f"{c['k'] * m['kept_tokens']} memory keys per layer beside the context."
        if m
        else ""
    )
    return (
        f"Model `{res['model']}` ({res['dtype']}, KV cache {res.get('kv_dtype', res['dtype'])}, torch threads: {res.get('threads', '?')}).{reads} {c['prompt_tokens']} prompt tokens "
        f"+ {c['new_tokens']} generated (EOS ignored), {c['k']} references per retrieval, {c['runs']} measured runs "
        f"after {warm}, median (min–max). Memory retrieves once per 64-token prompt chunk and again after every 64 generated tokens that more tokens follow (3 times per sequence for 128 + 128). Throughput = batch × generated / total wall time (Table 21: prefill "
        f"and every retrieval included); TTFT includes retrieval, memory loading and prefill. Knowledge base: "
        f"{res['kb']}.{skipped}\n\n"
        + table(rows)
        + "\n\nRatios (of the medians, and for memory/none also the median of the ratios within "
        "each round, which runs every setting in turn; targets: memory/RAG throughput ≥ 2 at "
        "batch 32, memory/none throughput ≥ 0.95, memory/RAG TTFT ≤ 0.33):\n\n" + table(ratio_rows)
    )


def _md_storage(res: dict[str, Any]) -> str:
    from memory3.eval.report import table

    rows = [
        {
            "model": r["model"],
            "memory layers × kept tokens": f"{r['memory_layers']} × {r['kept_tokens']}"
            if "kept_tokens" in r
            else "–",
            "codec": f"`{r['codec']}`",
            "bytes/vector": f"{r['bytes_per_vector']:.0f}",
            "KiB/memory": f"{r['kib_per_memory']:.1f}",
            "bytes/ref. token": f"{r['bytes_per_reference_token']:.0f}",
            "full KV / memory": f"{r['full_kv_over_memory']:.0f}×",
            "full KV (MHA) / memory": f"{r['full_kv_query_heads_over_memory']:.0f}×",
            "memory / text": f"{r.get('memory_over_text', float('nan')):.0f}×",
        }
        for r in res["rows"]
    ]
    s = res["text_sample"]
    mc = res["memory_config"]
    skipped = "".join(f"\n- skipped {x}" for x in res.get("skipped", []))
    return (
        "One memory = memory layers × 2 (K, V) × kv heads × kept tokens × head dim (the first model as "
        f"loaded, {mc['kept_tokens']} kept tokens; presets as the paper sets them, 8). Full KV: "
        f"every layer and kv head for all {mc['reference_tokens']} tokens of a reference, bf16 (MHA: counting the "
        "query heads, as the paper's 160× does). Text: UTF-8 of a full reference, from "
        f"{s['references']} held-out Wikipedia references ({s['utf8_bytes_per_token']:.2f} bytes/token, SmolLM2 "
        f"tokenizer). Positions add {res['rows'][0]['position_bytes'] if res['rows'] else 0} bytes per memory "
        f"(one byte each) for the first model.{skipped}\n\n" + table(rows)
    )


# --- the parsers ---------------------------------------------------------------------------------------


def _common(p: argparse.ArgumentParser) -> None:

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


def _retrieval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", default=None, help="memory bank directory (memory3 build)")
    p.add_argument(
        "--embedder", default="minilm", help="retrieval embedder for knowledge bases written on the fly"
    )
    p.add_argument("-k", "--references", type=int, default=5, help="references per retrieval")


def _memory_override_args(p: argparse.ArgumentParser, what: str) -> None:

    add_memory_args(
        p,
        f"measures the {what} of another setting on the same model, with an in-RAM knowledge base (not --store)",
    )


def _leak_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--leak-threshold", type=float, default=2 / 3, help="§4.4 drop references overlapping more"
    )
    p.add_argument("--no-leak-filter", action="store_true")


def register(subparsers: Any) -> None:
    """Add `eval` and `bench` to the `memory3` command line."""

    p_eval = subparsers.add_parser("eval", help="quality: question answering and perplexity")
    ev = p_eval.add_subparsers(dest="eval_command", required=True)

    p = ev.add_parser("qa", help="QA accuracy with explicit memory, without memory and with RAG")
    _common(p)
    _retrieval_args(p)
    _leak_args(p)
    add_min_score_arg(p)
    p.add_argument(
        "--set",
        action="append",
        default=None,
        help="question set: factbook, fictional, wikipedia, natural, or a JSONL file of "
        '{"question", "answers", "doc_id" or "reference"} lines (repeatable; default: the first three)',
    )
    p.add_argument("--sets", type=_csv(str), default=None, help="comma-separated question sets (as --set)")
    p.add_argument(
        "--split",
        default="heldout",
        choices=("heldout", "train", "all", "dev", "test"),
        help="heldout/train/all for the generated sets; dev or test for natural (heldout = test)",
    )
    p.add_argument(
        "--compare",
        default=None,
        help="results JSON of another run (e.g. another reader): paired differences with 95%% intervals",
    )
    p.add_argument("--limit", type=int, default=None, help="first N questions of each set")
    p.add_argument("--modes", type=_csv(str), default=("none", "memory", "rag"))
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument(
        "--kb",
        default="set",
        help="knowledge base without --store: 'set' (gold references of the whole set + its _kb.jsonl), "
        "'gold' (gold references only) or a file/directory of documents",
    )
    _memory_override_args(p, "accuracy")
    p.set_defaults(func=_with_sets(cmd_eval_qa))

    p = ev.add_parser("compare", help="two saved `eval qa` results, paired question by question")
    p.add_argument("results", help="JSON written by `memory3 eval qa --out`")
    p.add_argument("other", help="the run to compare against (e.g. the previous reader's)")
    p.set_defaults(func=cmd_eval_compare)

    p = ev.add_parser("ppl", help="perplexity of held-out text with and without memory")
    _common(p)
    _retrieval_args(p)
    _leak_args(p)
    p.add_argument(
        "--texts", default="wikipedia", help="'wikipedia' (held-out summaries) or a text/JSONL file"
    )
    p.add_argument("--limit", type=int, default=32, help="texts to score")
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--min-tokens", type=int, default=129, help="skip shorter texts (129: at least 3 chunks)")
    p.add_argument(
        "--modes",
        type=_csv(str),
        default=("none", "prefix", "memory"),
        help="none: plain model; prefix: the memory layout without memories (control); memory",
    )
    p.add_argument(
        "--first-query", default="none", choices=("none", "title"), help="what chunk 0 retrieves with"
    )
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--kb", default=None, help="documents to remember (default: the scored texts themselves)")
    p.set_defaults(func=cmd_eval_ppl)

    p_bench = subparsers.add_parser("bench", help="speed and storage benchmarks, and `bench all`")
    be = p_bench.add_subparsers(dest="bench_command", required=True)

    p = be.add_parser("speed", help="throughput and time to first token: memory vs RAG vs no retrieval")
    _common(p)
    _retrieval_args(p)
    p.add_argument("--batch-sizes", type=_csv(int), default=(1, 8, 32))
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--runs", type=int, default=3, help="measured runs (one more warm-up run is dropped)")
    p.add_argument("--modes", type=_csv(str), default=("none", "rag", "memory"))
    p.add_argument(
        "--warmup",
        default="each",
        choices=("each", "first"),
        help="dropped warm-up round at each batch size, or only before the first",
    )
    p.add_argument("--caches", type=_csv(str), default=("warm", "cold"), help="cold needs --store")
    p.add_argument(
        "--kb-articles", type=int, default=200, help="Wikipedia summaries to retrieve from (no --store)"
    )
    _memory_override_args(p, "speed")
    p.set_defaults(func=cmd_bench_speed)

    p = be.add_parser("storage", help="bytes per memory for each codec vs full KV cache vs text")
    _common(p)
    p.add_argument(
        "--codecs",
        type=_csv(str),
        default=("none", "default", "faiss:OPQ20_80,Residual2x14,PQ8x10"),
        help="none (bf16), default (the memory bank's), faiss:<factory string>, fp16, fp32",
    )
    p.add_argument(
        "--presets", type=_csv(str), default=("memory3-2b",), help="model presets to add to the table"
    )
    p.add_argument("--texts", type=int, default=200, help="Wikipedia summaries measured for text bytes")
    p.set_defaults(func=cmd_bench_storage)

    p = be.add_parser("all", help="run every benchmark, then rewrite BENCHMARKS.md sections and the figures")

    add_model_args(p)
    add_kv_dtype_arg(p)
    p.add_argument("--quick", action="store_true", help="reduced settings (minutes, not an hour)")
    p.add_argument("--only", type=_csv(str), default=None, help=f"run only these of {list(SECTIONS)}")
    p.add_argument(
        "--render-only", action="store_true", help="only redraw report and figures from saved JSON"
    )
    p.add_argument("--store", default=None, help="memory bank for `bench speed` (needed for the cold cache)")
    p.add_argument("--results-dir", default=RESULTS_DIR)
    p.add_argument("--report", default=REPORT)
    p.add_argument("--figures", default=FIGURES_DIR)
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
